"""Benchmark rows of MasaCtrl and StyleAligned (``imageprompt bench --rows ...``).

- MasaCtrl (mutual self-attention from the paper's step 4 and its layer 10 on SD 1.5;
  with and without cross-attention masks) on a source and a target prompt, against
  plain diffusers sampling the same two prompts (same batch: 2 prompts x CFG): the
  ratio column compares with the prompt-to-prompt module's
  ``plain diffusers, 2 prompts, base size`` row, which these rows run too when asked;
- StyleAligned on four prompts (shared attention with AdaIN in every self-attention
  layer) against plain diffusers sampling the same four prompts from the same noise.

All at the context size (``--size``: 512x512 by default, 64x64 with ``--tiny``).
"""

from __future__ import annotations

from imageprompt.bench.common import measure

SOURCE, TARGET = "a photo of a cat sitting on the beach", "a photo of a cat jumping on the beach"
STYLE = ["a toy train. macro photo. 3d game asset", "a toy airplane. macro photo. 3d game asset",
         "a toy bicycle. macro photo. 3d game asset", "a toy car. macro photo. 3d game asset"]  # the authors' set
PLAIN_TWO = "plain diffusers, 2 prompts, base size"
PLAIN_FOUR = "plain diffusers, 4 prompts, base size"


def _noise(ctx, pipe, rows: int):
    import torch

    side = ctx.size // pipe.vae_scale_factor
    gen = torch.Generator("cpu").manual_seed(0)
    return torch.randn(rows, pipe.unet.config.in_channels, side, side, generator=gen).to(ctx.device, ctx.dtype)


def _kw(ctx) -> dict:
    return dict(height=ctx.size, width=ctx.size, num_inference_steps=ctx.steps, guidance_scale=7.5)


def _masactrl(masks: bool):
    def run(ctx):
        from imageprompt.pipelines import StableDiffusionMasaCtrlPipeline

        pipe = StableDiffusionMasaCtrlPipeline.from_pipe(ctx.imageprompt_pipeline())
        pipe.set_progress_bar_config(disable=True)
        latents = _noise(ctx, pipe, 1)
        words = ["cat"] if masks else None
        result = measure(ctx, lambda: pipe(SOURCE, TARGET, mask_words=words, latents=latents,
                                           **_kw(ctx)), 2)
        result.baseline, result.note = PLAIN_TWO, f"{ctx.size}x{ctx.size}"
        return result

    return run


def _plain_four(ctx):
    pipe = ctx.plain_pipeline()
    pipe.set_progress_bar_config(disable=True)
    latents = _noise(ctx, pipe, len(STYLE))
    result = measure(ctx, lambda: pipe(STYLE, latents=latents, **_kw(ctx)), len(STYLE))
    result.note = f"{ctx.size}x{ctx.size}"
    return result


def _style_aligned(ctx):
    from imageprompt.pipelines import StableDiffusionStyleAlignedPipeline

    pipe = StableDiffusionStyleAlignedPipeline.from_pipe(ctx.imageprompt_pipeline())
    pipe.set_progress_bar_config(disable=True)
    latents = _noise(ctx, pipe, len(STYLE))
    result = measure(ctx, lambda: pipe(STYLE, latents=latents, **_kw(ctx)), len(STYLE))
    result.baseline, result.note = PLAIN_FOUR, f"{ctx.size}x{ctx.size}"
    return result


ROWS = {
    "masactrl, base size": _masactrl(masks=False),
    "masactrl + masks, base size": _masactrl(masks=True),
    PLAIN_FOUR: _plain_four,
    "style-aligned, 4 prompts, base size": _style_aligned,
}
