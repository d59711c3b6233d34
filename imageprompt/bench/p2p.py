"""Benchmark rows of prompt-to-prompt (``imageprompt bench --rows ...``).

- a two-prompt replace edit with local blend against plain diffusers sampling
  the same two prompts (same batch: 2 prompts x CFG), at the base size (``--size``:
  512x512 by default, 64x64 with ``--tiny``) and 1.5x it (768x768, 96x96); the
  pixel size is in each row's note;
- seconds per image of null-text inversion (10 inner steps, the paper's early
  stop) and negative-prompt inversion, at the context size.
"""

from __future__ import annotations

from imageprompt.bench.common import measure

SOURCE, TARGET = "a photo of a cat on the beach", "a photo of a dog on the beach"
SIZES = {"base size": 1.0, "1.5x size": 1.5}  # row label -> factor of the context size (--size)


def _size(ctx, label: str) -> int:
    """The row's pixel side: the context size times the label's factor, a multiple of 8."""
    return int(ctx.size * SIZES[label]) // 8 * 8


def _noise(ctx, pipe, size: int):
    import torch

    side = size // pipe.vae_scale_factor
    gen = torch.Generator("cpu").manual_seed(0)
    return torch.randn(1, pipe.unet.config.in_channels, side, side, generator=gen).to(ctx.device, ctx.dtype)


def _p2p_pipeline(ctx):
    from imageprompt.pipelines.loading import prompt_to_prompt_from

    pipe = prompt_to_prompt_from(ctx.imageprompt_pipeline())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _two_prompts(label: str, edit: bool):
    """Source and target in one batch: plain diffusers (``edit`` False) or the p2p replace + blend edit."""

    def run(ctx):
        size = _size(ctx, label)
        pipe = _p2p_pipeline(ctx) if edit else ctx.plain_pipeline()
        pipe.set_progress_bar_config(disable=True)
        latents = _noise(ctx, pipe, size)
        kw = dict(height=size, width=size, num_inference_steps=ctx.steps, guidance_scale=7.5)
        if edit:
            call = lambda: pipe(SOURCE, TARGET, mode="replace", blend_words=["cat", "dog"], latents=latents, **kw)  # noqa: E731
        else:
            call = lambda: pipe([SOURCE, TARGET], latents=latents.expand(2, -1, -1, -1), **kw)  # noqa: E731
        result = measure(ctx, call, 2)
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
    ROWS[f"plain diffusers, 2 prompts, {_label}"] = _two_prompts(_label, edit=False)
    ROWS[f"p2p replace + local blend, {_label}"] = _two_prompts(_label, edit=True)
ROWS["null-text inversion, 10 inner steps"] = _inversion("null-text")
ROWS["negative-prompt inversion"] = _inversion("negative-prompt")
