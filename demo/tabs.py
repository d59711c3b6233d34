"""The tabs: one function ``(DemoContext) -> None`` per capability, listed in :data:`TABS` with a test of
whether it can be shown.

Each handler checks its inputs (:mod:`imageprompt.demo.validation`), records the parameters, samples with one
CPU generator per image (image ``i`` uses ``seed + i``) and writes the PNGs (:mod:`imageprompt.demo.context`).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import gradio as gr
from imageprompt.demo.components import (
    edit_controls,
    image_input,
    p2p_outputs,
    result_outputs,
    sampling_controls,
    shapes_examples,
    step_controls,
)
from imageprompt.demo.consistency import masactrl_tab, style_aligned_tab
from imageprompt.demo.context import (
    DemoContext,
    adapters_installed,
    p2p_pipeline,
    parameters,
    write_edit_results,
)
from imageprompt.demo.running import on_run, sample
from imageprompt.demo.toolbox import toolbox_controls, toolbox_inputs
from imageprompt.demo.validation import (
    check_dpl_words,
    check_edit,
    check_inversion,
    check_prompt,
    check_sampling,
    check_words,
    checked_number,
    notify_fitted,
    optional_prompt,
    page_error,
    read_image,
)

from imageprompt import DEFAULT_INVERSION
from imageprompt.images import generators
from imageprompt.progress import INVERTING, labelled


# ----------------------------------------------------------------- SD-IPC
def variation_tab(ctx: DemoContext) -> None:
    """SD-IPC image variation: the image becomes the prompt."""
    with gr.Row():
        with gr.Column():
            image = image_input("Reference image", elem_id="variation-image")
            run = gr.Button("Generate variations", variant="primary", elem_id="variation-run")
            with gr.Accordion("Advanced options", open=False):
                opts = sampling_controls(ctx)
            extras = toolbox_controls(ctx, "variation")
        with gr.Column():
            gallery, files = result_outputs("variation")
    # The bundled model varies triangles and squares reliably; circles come back as rounded squares (README).
    shapes_examples("variation", [image])

    def variation(image, num_images, steps, guidance, seed, width, height, negative_prompt, init_image=None,
                  strength=0.8, mask=None, control=None, control_scale=1.0, progress=gr.Progress(track_tqdm=True)):
        picture, source = read_image(ctx, image)
        sampling = check_sampling(ctx, num_images=num_images, steps=steps, guidance=guidance, seed=seed, width=width,
                                  height=height, negative_prompt=negative_prompt)
        notify_fitted(ctx, picture, source)
        toolbox, recorded = toolbox_inputs(ctx, sampling, init_image, strength, mask, control, control_scale)
        params = parameters(ctx, "sdipc-variation", sampling, **source, **recorded)
        return sample(ctx, "sdipc-variation", dict(image=picture, **toolbox), sampling, params)

    on_run(run, variation, [image, *opts.inputs, *extras], [gallery, files], "variation")


def edit_tab(ctx: DemoContext) -> None:
    """SD-IPC image + text editing: text states blended into the converted image prompt with weight alpha."""
    with gr.Row():
        with gr.Column():
            image = image_input("Reference image", elem_id="edit-image")
            prompt = gr.Textbox(label="Edit text", placeholder="e.g. a blue circle", max_lines=2, elem_id="edit-prompt")
            run = gr.Button("Edit", variant="primary", elem_id="edit-run")
            with gr.Accordion("Advanced options", open=False):
                alpha = gr.Slider(0.0, 2.0, value=0.5, step=0.05, label="Alpha (text weight, 0.5-0.6 usual)")
                opts = sampling_controls(ctx)
            extras = toolbox_controls(ctx, "edit")
        with gr.Column():
            gallery, files = result_outputs("edit")
    shapes_examples("edit", [image, prompt, alpha])

    def edit(image, prompt, alpha, num_images, steps, guidance, seed, width, height, negative_prompt, init_image=None,
             strength=0.8, mask=None, control=None, control_scale=1.0, progress=gr.Progress(track_tqdm=True)):
        picture, source = read_image(ctx, image)
        prompt = check_prompt(prompt, "the edit text")
        check_words(ctx, [("the edit text", prompt)])
        sampling = check_sampling(ctx, num_images=num_images, steps=steps, guidance=guidance, seed=seed, width=width,
                                  height=height, negative_prompt=negative_prompt)
        alpha = checked_number("Alpha", alpha, float, 0.0, 2.0)
        notify_fitted(ctx, picture, source)
        toolbox, recorded = toolbox_inputs(ctx, sampling, init_image, strength, mask, control, control_scale)
        params = parameters(ctx, "sdipc-edit", sampling, prompt=prompt, alpha=alpha, **source, **recorded)
        return sample(ctx, "sdipc-edit", dict(image=picture, prompt=prompt, alpha=alpha, **toolbox), sampling, params)

    on_run(run, edit, [image, prompt, alpha, *opts.inputs, *extras], [gallery, files], "edit")


def ip_adapter_tab(ctx: DemoContext) -> None:
    """IP-Adapter-style decoupled cross-attention: the image through its own key/value branch, text optional."""
    with gr.Row():
        with gr.Column():
            gr.Markdown(f"Adapter: `{', '.join(ctx.adapter_names)}`")
            image = image_input("Image prompt", elem_id="ip-image")
            prompt = gr.Textbox(label="Text prompt (optional)", placeholder="e.g. on a black background",
                                max_lines=2, elem_id="ip-prompt")
            run = gr.Button("Generate", variant="primary", elem_id="ip-run")
            with gr.Accordion("Advanced options", open=False):
                scale = gr.Slider(0.0, 2.0, value=1.0, step=0.05, label="Adapter scale (image branch weight)")
                begin = gr.Slider(0.0, 1.0, value=0.0, step=0.05, label="Adapter from (fraction of the steps)",
                                  elem_id="ip-begin")
                end = gr.Slider(0.0, 1.0, value=1.0, step=0.05, label="Adapter until (fraction of the steps)",
                                info="e.g. from 0.5: the text sets the layout, the image only the later steps",
                                elem_id="ip-end")
                content = gr.Textbox("", label="Subtract content words (InstantStyle)", max_lines=1,
                                     placeholder="e.g. circle: keep the image's style, not its content",
                                     elem_id="ip-content")
                opts = sampling_controls(ctx)
        with gr.Column():
            gallery, files = result_outputs("ip")
    shapes_examples("ip_adapter", [image, prompt])

    def ip_adapter(image, prompt, scale, num_images, steps, guidance, seed, width, height, negative_prompt,
                   begin=0.0, end=1.0, content="", progress=gr.Progress(track_tqdm=True)):
        picture, source = read_image(ctx, image, "an image prompt")
        notify_fitted(ctx, picture, source)
        sampling = check_sampling(ctx, num_images=num_images, steps=steps, guidance=guidance, seed=seed, width=width,
                                  height=height, negative_prompt=negative_prompt)
        text = optional_prompt(prompt, "the text prompt")
        scale = checked_number("Adapter scale", scale, float, 0.0, 2.0)
        window = (checked_number("Adapter from", begin, float, 0.0, 1.0),
                  checked_number("Adapter until", end, float, 0.0, 1.0))
        if window[0] >= window[1]:
            raise page_error(f"Adapter from ({window[0]}) must be below Adapter until ({window[1]})")
        content = optional_prompt(content, "the content words")
        check_words(ctx, [("the text prompt", text), ("the content words", content)])
        method = "ip-adapter-edit" if text else "ip-adapter-variation"
        count = len(ctx.adapters)
        params = parameters(ctx, method, sampling, prompt=text or None, adapters=list(ctx.adapter_names),
                            adapter_scales=[float(scale)] * count, **source,
                            **({"adapter_windows": [list(window)] * count} if window != (0.0, 1.0) else {}),
                            **({"adapter_subtract_text": content} if content else {}))
        references = picture if count == 1 else [picture] * count  # diffusers' layout: one entry per adapter
        with adapters_installed(ctx, scale):
            ctx.pipe.set_ip_adapter_window(window)  # every job: the loaded adapters are reused
            inputs = dict(image=None, prompt=text, ip_adapter_image=references)
            if content:  # InstantStyle: the content words' CLIP embedding subtracted (sd15-format adapters)
                texts = [content if a.kind == "sd15" else None for a in ctx.pipe.image_adapters]
                if not any(texts):
                    raise page_error("Content words need an sd15-format adapter (IP-Adapter's projected CLIP "
                                     "embedding); the loaded ones read other embeddings")
                inputs = dict(image=None, prompt=text, ip_adapter_image_embeds=ctx.pipe.encode_ip_adapter_image(
                    references, content_text=texts, do_classifier_free_guidance=sampling.guidance > 1.0))
            return sample(ctx, method, inputs, sampling, params)

    on_run(run, ip_adapter, [image, prompt, scale, *opts.inputs, begin, end, content], [gallery, files], "ip_adapter")


# ------------------------------------------------------- prompt-to-prompt
def p2p_tab(ctx: DemoContext) -> None:
    """Prompt-to-prompt: change the prompt, keep the layout, with the attention maps beside the result."""
    with gr.Row():
        with gr.Column(scale=2):
            source = gr.Textbox(label="Source prompt", placeholder="e.g. a red circle in the center", max_lines=2,
                                elem_id="p2p-source")
            edit = edit_controls()
            run = gr.Button("Edit the prompt", variant="primary", elem_id="p2p-run")
            with gr.Accordion("Advanced options", open=False):
                steps_ = step_controls()
                opts = sampling_controls(ctx, num=False)
            extras = toolbox_controls(ctx, "p2p")
        with gr.Column(scale=3):
            gallery, maps, files = p2p_outputs("p2p")
    shapes_examples("p2p", [source, edit["target"], edit["mode"], edit["blend"], edit["weights"]])

    def p2p(source, target, mode, blend, weights, cross_steps, self_steps, blend_threshold, steps, guidance, seed,
            width, height, negative_prompt, exclude="", blend_start=0.0, init_image=None, strength=0.8, mask=None,
            control=None, control_scale=1.0, progress=gr.Progress(track_tqdm=True)):

        settings = check_edit(source, target, mode, weights, blend, cross_steps, self_steps, blend_threshold,
                              exclude, blend_start)
        check_words(ctx, [("the source prompt", settings["source_prompt"]),
                          ("the target prompt", settings["target_prompt"])])
        sampling = check_sampling(ctx, steps=steps, guidance=guidance, seed=seed, width=width, height=height,
                                  negative_prompt=negative_prompt)
        toolbox, recorded = toolbox_inputs(ctx, sampling, init_image, strength, mask, control, control_scale)
        params = parameters(ctx, "p2p", sampling, seed=sampling.seed, **settings, **recorded)
        result = p2p_pipeline(ctx)(
            **settings, negative_prompt=sampling.negative_prompt, height=sampling.height, width=sampling.width,
            num_inference_steps=sampling.steps, guidance_scale=sampling.guidance,
            generator=generators(sampling.seed, 1), **toolbox,
        )
        return write_edit_results(ctx, result, params, f"p2p-{sampling.seed}")

    inputs = [source, edit["target"], edit["mode"], edit["blend"], edit["weights"], steps_["cross"], steps_["self"],
              steps_["threshold"], *opts.inputs, steps_["exclude"], steps_["start"], *extras]  # new ones last: API
    on_run(run, p2p, inputs, [gallery, maps, files], "p2p")


def real_edit_tab(ctx: DemoContext) -> None:
    """A real photo: invert it (null-text, negative-prompt, DDIM, direct or DPL), then edit its description (p2p)."""
    with gr.Row():
        with gr.Column(scale=2):
            image = image_input("Photo", elem_id="real-image")
            source = gr.Textbox(label="Describe the photo (source prompt)", max_lines=2,
                                placeholder="e.g. a large red circle in the center on a white background",
                                elem_id="real-source")
            edit = edit_controls()
            method = gr.Radio(["direct", "null-text", "negative-prompt", "ddim", "dpl"], value=DEFAULT_INVERSION,
                              label="Inversion", info="direct: exact source, fast, measured best (the default) · "
                                                      "null-text: faithful, slowest · negative-prompt: fast · "
                                                      "ddim: plain · dpl: null-text plus learned noun tokens "
                                                      "(slower still)")
            dpl_words = gr.Textbox(value="", label="DPL nouns", max_lines=1, placeholder="with dpl: e.g. circle square",
                                   info="the nouns of the source prompt whose tokens DPL learns",
                                   elem_id="real-dpl-words")
            run = gr.Button("Invert and edit", variant="primary", elem_id="real-run")
            with gr.Accordion("Advanced options", open=False):
                inner = gr.Slider(1, 20, value=10, step=1, label="Null-text inner steps")
                steps_ = step_controls()
                opts = sampling_controls(ctx, num=False, seed=False)
        with gr.Column(scale=3):
            gallery, maps, files = p2p_outputs("real")
    shapes_examples("real_edit", [image, source, edit["target"]])

    def real_edit(image, source, target, mode, blend, weights, method, inner_steps, cross_steps, self_steps,
                  blend_threshold, steps, guidance, width, height, negative_prompt, exclude="", blend_start=0.0,
                  dpl_text="", progress=gr.Progress(track_tqdm=True)):
        photo, about = read_image(ctx, image, "a photo")
        settings = check_edit(source, target, mode, weights, blend, cross_steps, self_steps, blend_threshold,
                              exclude, blend_start)
        check_words(ctx, [("the source prompt", settings["source_prompt"]),
                          ("the target prompt", settings["target_prompt"])])
        method = check_inversion(method)
        nouns = check_dpl_words(method, dpl_text, settings["source_prompt"])
        sampling = check_sampling(ctx, steps=steps, guidance=guidance, width=width, height=height,
                                  negative_prompt=negative_prompt)
        inner_steps = checked_number("Null-text inner steps", inner_steps, int, 1, 20)
        notify_fitted(ctx, photo, about, sampling)
        params = parameters(ctx, "p2p", sampling, invert=method, scheduler="ddim",
                            inner_steps=inner_steps if method in ("null-text", "dpl") else None,
                            **({"dpl_words": nouns} if nouns else {}), **settings, **about)
        pipe = p2p_pipeline(ctx, ddim=True)
        with labelled(pipe, INVERTING):
            inversion = pipe.invert(photo, settings["source_prompt"], method, sampling.steps, sampling.guidance,
                                    sampling.height, sampling.width, num_inner_steps=inner_steps, words=nouns)
        result = pipe(**settings, inversion=inversion, negative_prompt=sampling.negative_prompt,
                      height=sampling.height, width=sampling.width, num_inference_steps=sampling.steps,
                      guidance_scale=sampling.guidance)
        return write_edit_results(ctx, result, params, f"real-{method}")

    inputs = [image, source, edit["target"], edit["mode"], edit["blend"], edit["weights"], method, inner,
              steps_["cross"], steps_["self"], steps_["threshold"], *opts.inputs, steps_["exclude"], steps_["start"],
              dpl_words]
    on_run(run, real_edit, inputs, [gallery, maps, files], "real_edit")


# ------------------------------------------------------------- the list
def importable(*modules: str) -> Callable[[DemoContext], bool]:
    """A tab's availability test: every module it needs can be found."""

    def check(ctx: DemoContext) -> bool:
        try:
            return all(importlib.util.find_spec(name) is not None for name in modules)
        except ModuleNotFoundError:  # a parent package is missing
            return False

    return check


def _is_sdxl(ctx: DemoContext) -> bool:
    from imageprompt.pipelines.pipeline_sdipc_xl import is_sdxl_unet

    return is_sdxl_unet(ctx.pipe.unet)


def _unet(check: Callable[[DemoContext], bool]) -> Callable[[DemoContext], bool]:
    """``check``, and not SD3: the tab's technique runs on UNets only (docs/sd3.md)."""
    from imageprompt.families import is_sd3_pipeline

    return lambda ctx: not is_sd3_pipeline(ctx.pipe) and check(ctx)


@dataclass
class Tab:
    title: str
    available: Callable[[DemoContext], bool]
    build: Callable[[DemoContext], None]


TABS: list[Tab] = [
    Tab("Variation", lambda ctx: True, variation_tab),
    Tab("Image + text", lambda ctx: True, edit_tab),
    Tab("IP-Adapter", _unet(lambda ctx: bool(ctx.adapters) and importable("imageprompt.ip_adapter")(ctx)),
        ip_adapter_tab),
    Tab("Prompt-to-prompt", importable("imageprompt.p2p", "imageprompt.attention_maps",
                                       "imageprompt.pipelines.pipeline_p2p"), p2p_tab),
    Tab("Real-image edit", _unet(importable("imageprompt.p2p", "imageprompt.attention_maps",
                                            "imageprompt.inversion", "imageprompt.pipelines.pipeline_p2p")),
        real_edit_tab),
    Tab("MasaCtrl", _unet(importable("imageprompt.masactrl", "imageprompt.pipelines.pipeline_p2p")), masactrl_tab),
    Tab("StyleAligned", _unet(lambda ctx: importable("imageprompt.style_aligned")(ctx) and not _is_sdxl(ctx)),
        style_aligned_tab),
]
