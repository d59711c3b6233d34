"""Benchmark rows of prompt-to-prompt (``imageprompt bench --rows ...``).

- a two-prompt replace edit with local blend against plain diffusers sampling
  the same two prompts (same batch: 2 prompts x CFG), at 512x512 and 768x768
  (with ``--tiny``: the context size and 1.5x it);
- seconds per image of null-text inversion (10 inner steps, the paper's early
  stop) and negative-prompt inversion, at the context size.
"""

from __future__ import annotations

from imageprompt.bench.common import measure

SOURCE, TARGET = "a photo of a cat on the beach", "a photo of a dog on the beach"
SIZES = {"512x512": 512, "768x768": 768}


def _size(ctx, label: str) -> int:
    if not ctx.tiny:
        return SIZES[label]
    return ctx.size if label == "512x512" else ctx.size * 3 // 2 // 8 * 8


def _noise(ctx, pipe, size: int):
    import torch

    side = size // pipe.vae_scale_factor
    gen = torch.Generator("cpu").manual_seed(0)
    return torch.randn(1, pipe.unet.config.in_channels, side, side, generator=gen).to(ctx.device, ctx.dtype)


def _p2p_pipeline(ctx):
    from imageprompt.pipelines import StableDiffusionPromptToPromptPipeline

    pipe = StableDiffusionPromptToPromptPipeline(**ctx.imageprompt_pipeline().components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _plain_two_prompts(label: str):
    def run(ctx):
        size, pipe = _size(ctx, label), ctx.plain_pipeline()
        pipe.set_progress_bar_config(disable=True)
        latents = _noise(ctx, pipe, size).expand(2, -1, -1, -1)
        result = measure(ctx, lambda: pipe([SOURCE, TARGET], latents=latents, height=size, width=size,
                                           num_inference_steps=ctx.steps, guidance_scale=7.5), 2)
        result.baseline, result.note = f"plain diffusers, 2 prompts, {label}", f"{size}x{size}"
        return result

    return run


def _p2p_edit(label: str):
    def run(ctx):
        size, pipe = _size(ctx, label), _p2p_pipeline(ctx)
        latents = _noise(ctx, pipe, size)
        result = measure(ctx, lambda: pipe(SOURCE, TARGET, mode="replace", blend_words=["cat", "dog"],
                                           latents=latents, height=size, width=size,
                                           num_inference_steps=ctx.steps, guidance_scale=7.5), 2)
        result.baseline, result.note = f"plain diffusers, 2 prompts, {label}", f"{size}x{size}"
        return result

    return run


def _inversion(method: str):
    def run(ctx):
        pipe = _p2p_pipeline(ctx)
        photo = ctx.reference_image()
        return measure(ctx, lambda: pipe.invert(photo, SOURCE, method, ctx.steps, 7.5, ctx.size, ctx.size,
                                                num_inner_steps=10), 1)

    return run


ROWS = {}
for _label in SIZES:
    ROWS[f"plain diffusers, 2 prompts, {_label}"] = _plain_two_prompts(_label)
    ROWS[f"p2p replace + local blend, {_label}"] = _p2p_edit(_label)
ROWS["null-text inversion, 10 inner steps"] = _inversion("null-text")
ROWS["negative-prompt inversion"] = _inversion("negative-prompt")
