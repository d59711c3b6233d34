"""Benchmark rows for batch jobs (:mod:`imageprompt.jobs`), registered into ``imageprompt bench``.

A 64-row variation job (one image a row, PNGs written, results manifest and
all) against a loop of plain diffusers calls, one image at a time, on the same
weights in the same run. The ``x plain`` column of the table is the job's
seconds per image over the loop's: 0.25 means 4x the loop's throughput.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from imageprompt.bench.common import Result, timed

JOB_ROWS = 64
BATCH_SIZE = 16


def plain_loop(ctx) -> Result:
    import torch

    pipe = ctx.plain_pipeline()
    pipe.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=ctx.steps, guidance_scale=7.5, height=ctx.size, width=ctx.size)

    def loop(count):
        for i in range(count):
            pipe("a photo of a cat", generator=torch.Generator("cpu").manual_seed(i), **kw)

    loop(1)  # warm-up
    seconds, peak = timed(ctx, lambda: loop(JOB_ROWS))
    return Result(seconds / JOB_ROWS, peak, JOB_ROWS)


def write_variation_job(folder: Path, count: int, size: int) -> Path:
    """``count`` random input images and a JSONL job of one variation row each."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    lines = []
    for i in range(count):
        name = f"input-{i:03d}.png"
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / name)
        lines.append(json.dumps({"kind": "vary", "image": name, "seed": i}))
    jobs = folder / f"jobs-{count}.jsonl"
    jobs.write_text("\n".join(lines) + "\n")
    return jobs


def _job(compile: bool, batch_size: int = BATCH_SIZE):
    def run(ctx) -> Result:
        import torch

        from imageprompt.jobs import JobDefaults, JobOptions, apply_speed_options, run_job

        pipe = ctx.imageprompt_pipeline()
        decoder = pipe.vae.decoder
        torch.compiler.reset()
        apply_speed_options(pipe, compile=compile)  # once, before the warm-up compiles the shapes
        defaults = JobDefaults(steps=ctx.steps, guidance=7.5, height=ctx.size, width=ctx.size)
        options = JobOptions(batch_size=batch_size, progress=False)
        try:
            with tempfile.TemporaryDirectory() as tmp:
                tmp = Path(tmp)
                warm = write_variation_job(tmp, batch_size, 256)  # one full batch: same shapes as the timed job
                run_job(warm, tmp / "warm", pipe=pipe, defaults=defaults, options=options)
                jobs = write_variation_job(tmp, JOB_ROWS, 256)
                seconds, peak = timed(ctx, lambda: run_job(jobs, tmp / "out", pipe=pipe, defaults=defaults,
                                                             options=options))
                done = sum(1 for _ in (tmp / "out").glob("*.png"))
                if done != JOB_ROWS:
                    raise RuntimeError(f"the benchmark job wrote {done} images, expected {JOB_ROWS}")
        finally:
            pipe.vae.decoder = decoder  # the VAE is shared with the other rows: undo the compile
            torch.compiler.reset()
        return Result(seconds / JOB_ROWS, peak, JOB_ROWS)

    return run


ROWS = {
    f"plain diffusers, loop of {JOB_ROWS} single images": plain_loop,
    f"batch job, {JOB_ROWS} variation rows, batch 8": _job(compile=False, batch_size=8),
    f"batch job, {JOB_ROWS} variation rows, batch {BATCH_SIZE}": _job(compile=False),
    f"batch job, {JOB_ROWS} variation rows, batch {JOB_ROWS}": _job(compile=False, batch_size=JOB_ROWS),
    f"batch job, {JOB_ROWS} variation rows, batch {BATCH_SIZE}, --compile": _job(compile=True),
}
