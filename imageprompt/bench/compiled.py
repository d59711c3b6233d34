"""Benchmark rows of torch.compile, MasaCtrl and StyleAligned (``imageprompt bench --rows ...``).

Each technique eager and compiled (``--compile``'s :func:`~imageprompt.jobs.sampling.apply_speed_options`: the UNet
and the VAE decoder, mode ``reduce-overhead``, CUDA graphs, on a GPU), every row against *eager* plain diffusers
with the same batch: plain diffusers compiled, SD-IPC variation, IP-Adapter sd15, prompt-to-prompt replace + local
blend, MasaCtrl, StyleAligned. The compiler backend follows ``IMAGEPROMPT_COMPILE_BACKEND`` (default inductor;
``eager``: dynamo alone, for a machine without a C compiler). Each compiled row starts and ends with an empty
compile cache (``torch.compiler.reset``), and warms up twice (compilation, then the CUDA graphs' recording).
"""

from __future__ import annotations

from imageprompt.bench.adapter import _adapter_parts
from imageprompt.bench.common import measure
from imageprompt.bench.p2p import SOURCE, TARGET, _noise, _p2p_pipeline
from imageprompt.images import generators

PLAIN_1, PLAIN_2 = "plain diffusers, batch 1", "plain diffusers, 2 prompts, base size"
STYLE_PROMPTS = ["a photo of a cat, watercolor", "a photo of a dog, watercolor"]


def _kwargs(ctx):
    return dict(num_inference_steps=ctx.steps, guidance_scale=7.5, height=ctx.size, width=ctx.size)


# Each setup: (pipeline, call, images, baseline row, clean-up) on the context's shared weights.
def _plain(ctx):
    pipe = ctx.plain_pipeline()
    return pipe, lambda: pipe("a photo of a cat", generator=generators(0, 1), **_kwargs(ctx)), 1, PLAIN_1, None


def _variation(ctx):
    pipe, image = ctx.imageprompt_pipeline(), ctx.reference_image()
    return pipe, lambda: pipe(image=image, generator=generators(0, 1), **_kwargs(ctx)), 1, PLAIN_1, None


def _ip_adapter(ctx):
    state, (encoder, _) = _adapter_parts(ctx, "sd15")
    pipe, image = ctx.imageprompt_pipeline(), ctx.reference_image()
    pipe.load_ip_adapter(state, image_encoder=encoder)

    def call():
        return pipe(prompt="a photo of a cat", ip_adapter_image=image, generator=generators(0, 1), **_kwargs(ctx))

    return pipe, call, 1, PLAIN_1, pipe.unload_ip_adapter


def _plain_two(ctx):
    pipe = ctx.plain_pipeline()
    latents = _noise(ctx, pipe, ctx.size).expand(2, -1, -1, -1)
    return pipe, lambda: pipe([SOURCE, TARGET], latents=latents, **_kwargs(ctx)), 2, PLAIN_2, None


def _p2p(ctx):
    pipe = _p2p_pipeline(ctx)
    latents = _noise(ctx, pipe, ctx.size)

    def call():
        return pipe(SOURCE, TARGET, mode="replace", blend_words=["cat", "dog"], latents=latents, **_kwargs(ctx))

    return pipe, call, 2, PLAIN_2, None


def _masactrl(ctx):
    from imageprompt.pipelines import StableDiffusionMasaCtrlPipeline

    pipe = StableDiffusionMasaCtrlPipeline.from_pipe(ctx.imageprompt_pipeline())
    pipe.set_progress_bar_config(disable=True)
    latents = _noise(ctx, pipe, ctx.size)
    return pipe, lambda: pipe(SOURCE, TARGET, latents=latents, **_kwargs(ctx)), 2, PLAIN_2, None


def _masactrl_masks(ctx):
    pipe, _, images, baseline, clean_up = _masactrl(ctx)
    latents = _noise(ctx, pipe, ctx.size)

    def call():
        return pipe(SOURCE, TARGET, mask_words=["cat", "dog"], latents=latents, **_kwargs(ctx))

    return pipe, call, images, baseline, clean_up


def _style_aligned(ctx):
    from imageprompt.pipelines import StableDiffusionStyleAlignedPipeline

    pipe = StableDiffusionStyleAlignedPipeline.from_pipe(ctx.imageprompt_pipeline())
    pipe.set_progress_bar_config(disable=True)
    return pipe, lambda: pipe(STYLE_PROMPTS, generator=generators(0, 1)[0], **_kwargs(ctx)), 2, PLAIN_2, None


def _row(setup, compile: bool):
    def run(ctx):
        import torch

        from imageprompt.jobs.sampling import apply_speed_options

        torch.compiler.reset()
        pipe, call, images, baseline, clean_up = setup(ctx)
        decoder = pipe.vae.decoder
        try:
            apply_speed_options(pipe, compile=compile)
            result = measure(ctx, call, images, warmups=2 if compile else 1)
        finally:
            pipe.vae.decoder = decoder  # the VAE is shared with the other rows: undo the compile
            if clean_up is not None:
                clean_up()
            torch.compiler.reset()
        result.baseline = baseline
        result.note = f"{ctx.size}x{ctx.size}" + (", compiled" if compile else "")
        return result

    return run


ROWS = {
    "plain diffusers, batch 1, compiled": _row(_plain, True),
    "imageprompt variation, batch 1, compiled": _row(_variation, True),
    "ip-adapter sd15 (imageprompt), batch 1, compiled": _row(_ip_adapter, True),
    "plain diffusers, 2 prompts, base size, compiled": _row(_plain_two, True),
    "p2p replace + local blend, base size, compiled": _row(_p2p, True),
    "masactrl, base size": _row(_masactrl, False),
    "masactrl, base size, compiled": _row(_masactrl, True),
    "masactrl + masks, base size": _row(_masactrl_masks, False),
    "style aligned, 2 prompts, base size": _row(_style_aligned, False),
    "style aligned, 2 prompts, base size, compiled": _row(_style_aligned, True),
}
