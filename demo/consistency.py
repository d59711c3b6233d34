"""The MasaCtrl and StyleAligned tabs (listed in :data:`imageprompt.demo.tabs.TABS`).

- MasaCtrl (Cao et al. 2023): a source and a target prompt; from step S and layer L on the target reads
  the source's keys and values, so a changed pose, shape or position keeps the subject's look.
- StyleAligned (Hertz et al. 2024): one prompt per line; the first is the reference, and every other image
  shares its attention (with AdaIN), so the set shares one style. A photo can be the reference instead.
"""

from __future__ import annotations

import gradio as gr
from imageprompt.demo.components import image_input, p2p_outputs, result_outputs, sampling_controls, shapes_examples
from imageprompt.demo.context import DemoContext, p2p_pipeline, parameters, write_edit_results, write_results
from imageprompt.demo.running import on_run
from imageprompt.demo.validation import (
    check_prompt,
    check_sampling,
    check_words,
    checked_number,
    notify_fitted,
    optional_prompt,
    page_error,
    read_image,
)

from imageprompt.images import generators
from imageprompt.progress import INVERTING, SAMPLING, label, labelled

MAX_SET = 8  # images in one StyleAligned set, the reference included


def masactrl_tab(ctx: DemoContext) -> None:
    """MasaCtrl: change shape, position or pose; the target keeps the source's colours and look."""
    with gr.Row():
        with gr.Column(scale=2):
            source = gr.Textbox(label="Source prompt", placeholder="e.g. a large red circle on the left",
                                max_lines=2, elem_id="masactrl-source")
            target = gr.Textbox(label="Target prompt", placeholder="e.g. a large red square on the right",
                                max_lines=2, elem_id="masactrl-target")
            masks = gr.Textbox(label="Mask words (optional)", max_lines=1, placeholder="e.g. circle square",
                               info="foreground masks from these words' cross-attention maps (MasaCtrl's mask "
                                    "variant)")
            run = gr.Button("Edit with mutual self-attention", variant="primary", elem_id="masactrl-run")
            with gr.Accordion("Advanced options", open=False):
                start_step = gr.Slider(0, 50, value=4, step=1, label="Start step S (the paper's 4 of 50)")
                start_layer = gr.Number(value=None, precision=0, minimum=0, label="Start layer L",
                                        info="self-attention layers counted as they run, from 0; empty: the "
                                             "paper's 10 on SD 1.x, translated to the model")
                opts = sampling_controls(ctx, num=False)
        with gr.Column(scale=3):
            gallery, maps, files = p2p_outputs("masactrl")
    shapes_examples("masactrl", [source, target, masks])

    def masactrl(source, target, masks, start_step, start_layer, steps, guidance, seed, width, height,
                 negative_prompt, progress=gr.Progress(track_tqdm=True)):
        from imageprompt.masactrl import MasaCtrlSettings

        source = check_prompt(source, "a source prompt")
        target = check_prompt(target, "a target prompt")
        words = optional_prompt(masks, "the mask words").split() or None
        step = checked_number("Start step", start_step, int, 0, ctx.max_steps)
        layer = None if start_layer in (None, "") else checked_number("Start layer", start_layer, int, 0, 200)
        try:
            edit = MasaCtrlSettings(step, layer, words)
            edit.check(source, target)
        except ValueError as err:
            raise page_error(str(err)) from None
        check_words(ctx, [("the source prompt", source), ("the target prompt", target)])
        sampling = check_sampling(ctx, steps=steps, guidance=guidance, seed=seed, width=width, height=height,
                                  negative_prompt=negative_prompt)
        params = parameters(ctx, "p2p", sampling, seed=sampling.seed, source_prompt=source, target_prompt=target,
                            mode="masactrl", start_step=step, start_layer=layer, mask_words=words)
        try:
            result = p2p_pipeline(ctx, edit="masactrl")(
                source, target, settings=edit, negative_prompt=sampling.negative_prompt, height=sampling.height,
                width=sampling.width, num_inference_steps=sampling.steps, guidance_scale=sampling.guidance,
                generator=generators(sampling.seed, 1))
        except ValueError as err:  # e.g. a start layer past the model's last
            raise page_error(str(err)) from None
        return write_edit_results(ctx, result, params, f"masactrl-{sampling.seed}")

    inputs = [source, target, masks, start_step, start_layer, *opts.inputs]
    on_run(run, masactrl, inputs, [gallery, maps, files], "masactrl")


def style_pipeline(ctx: DemoContext, ddim: bool = False):
    """The StyleAligned pipeline over the demo's modules (no copies); ``ddim`` for inverting a reference photo."""
    key = "style-ddim" if ddim else "style"
    if key not in ctx.pipelines:
        from diffusers import DDIMScheduler
        from imageprompt.pipelines import StableDiffusionStyleAlignedPipeline

        scheduler = DDIMScheduler if ddim else type(ctx.pipe.scheduler)
        ctx.pipelines[key] = label(StableDiffusionStyleAlignedPipeline.from_pipe(
            ctx.pipe, scheduler=scheduler.from_config(ctx.pipe.scheduler.config)), SAMPLING)
    return ctx.pipelines[key]


def style_aligned_tab(ctx: DemoContext) -> None:
    """StyleAligned: a set of images in the style of the first prompt (or of a photo)."""
    with gr.Row():
        with gr.Column(scale=2):
            prompts = gr.Textbox(label="Prompts, one a line (the first is the reference)", lines=4,
                                 placeholder="a large red circle on the left on a black background\n"
                                             "a large red square on the right\na large red triangle at the top",
                                 elem_id="style-prompts")
            photo = image_input("Reference photo (optional: inverted, then the first prompt describes it)",
                                elem_id="style-photo")
            run = gr.Button("Sample the set", variant="primary", elem_id="style-run")
            with gr.Accordion("Advanced options", open=False):
                keys_scale = gr.Slider(0.5, 2.0, value=1.0, step=0.05, label="Reference keys scale (authors': 1)")
                group_norm = gr.Checkbox(value=False, label="Share group-norm statistics (authors' SD 1.x notebook)")
                opts = sampling_controls(ctx, num=False)
        with gr.Column(scale=3):
            gallery, files = result_outputs("style", label="The reference, then the set")
    shapes_examples("style_aligned", [prompts])

    def style_aligned(text, photo_path, scale, share_norm, steps, guidance, seed, width, height, negative_prompt,
                      progress=gr.Progress(track_tqdm=True)):
        lines = [line.strip() for line in check_prompt(text, "the prompts").splitlines() if line.strip()]
        if len(lines) < 2 or len(lines) > MAX_SET:
            raise page_error(f"Write 2 to {MAX_SET} prompts, one a line: the reference's first.")
        check_words(ctx, [(f"prompt {i + 1}", line) for i, line in enumerate(lines)])
        scale = checked_number("Reference keys scale", scale, float, 0.5, 2.0)
        sampling = check_sampling(ctx, steps=steps, guidance=guidance, seed=seed, width=width, height=height,
                                  negative_prompt=negative_prompt)
        about, inversion = {}, None
        pipe = style_pipeline(ctx, ddim=bool(photo_path))
        if photo_path:
            image, about = read_image(ctx, photo_path, "a reference photo")
            notify_fitted(ctx, image, about, sampling)
            with labelled(pipe, INVERTING):
                inversion = pipe.invert_reference(image, lines[0], sampling.steps, sampling.height, sampling.width)
        params = parameters(ctx, "style-aligned", sampling, prompts=lines, keys_scale=scale,
                            share_group_norm=bool(share_norm), **about)
        result = pipe(lines, inversion=inversion, keys_scale=scale, share_group_norm=bool(share_norm),
                      negative_prompt=sampling.negative_prompt, height=sampling.height, width=sampling.width,
                      num_inference_steps=sampling.steps, guidance_scale=sampling.guidance,
                      generator=generators(sampling.seed, len(lines)))
        seeds = [sampling.seed + i for i in range(len(lines))]
        return write_results(ctx, result.images, "style-aligned", seeds, params)

    inputs = [prompts, photo, keys_scale, group_norm, *opts.inputs]
    on_run(run, style_aligned, inputs, [gallery, files], "style_aligned")
