"""The baseline rows: plain diffusers text-to-image against SD-IPC variation, batch 1 and 8."""

from __future__ import annotations

from imageprompt.bench.common import measure
from imageprompt.images import generators


def _plain(batch):
    def run(ctx):
        pipe = ctx.plain_pipeline()
        kw = dict(num_inference_steps=ctx.steps, guidance_scale=7.5, height=ctx.size, width=ctx.size)
        return measure(ctx, lambda: pipe("a photo of a cat", num_images_per_prompt=batch,
                                         generator=generators(0, batch), **kw), batch)

    return run


def _variation(batch):
    def run(ctx):
        pipe = ctx.imageprompt_pipeline()
        image = ctx.reference_image()
        kw = dict(num_inference_steps=ctx.steps, guidance_scale=7.5, height=ctx.size, width=ctx.size)
        return measure(ctx, lambda: pipe(image=image, num_images_per_prompt=batch,
                                         generator=generators(0, batch), **kw), batch)

    return run


ROWS = {
    "plain diffusers, batch 1": _plain(1),
    "imageprompt variation, batch 1": _variation(1),
    "plain diffusers, batch 8": _plain(8),
    "imageprompt variation, batch 8": _variation(8),
}
