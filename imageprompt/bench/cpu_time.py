"""Compiled against eager in CPU time: ``python -m imageprompt.bench.cpu_time [--tiny] --size 64 --steps 10``.

On a machine shared with other jobs, wall-clock times move by 2x from run to run; the process's CPU time on one
torch thread (``time.process_time``) does not. Each call runs eager (best of ``--reps``), then with ``--compile``'s
:func:`~imageprompt.jobs.sampling.apply_speed_options` (two warm-up calls, then best of ``--reps``), on the
bench's shared random weights (SD 1.5 shapes, or tiny ones with ``--tiny``), fp32 on the CPU.
"""

from __future__ import annotations

import argparse
import time

CALLS = ("plain", "two", "p2p")


def cpu_seconds(call, reps: int) -> float:
    best = []
    for _ in range(reps):
        start = time.process_time()
        call()
        best.append(time.process_time() - start)
    return min(best)


def calls(ctx, which):
    from imageprompt.bench.p2p import SOURCE, TARGET, _noise, _p2p_pipeline
    from imageprompt.images import generators

    kw = dict(height=ctx.size, width=ctx.size, num_inference_steps=ctx.steps, guidance_scale=7.5)
    if "plain" in which:
        pipe = ctx.plain_pipeline()
        yield "plain diffusers, batch 1", pipe, lambda: pipe("a photo of a cat", generator=generators(0, 1), **kw)
    if "two" in which:
        pipe = ctx.plain_pipeline()
        latents = _noise(ctx, pipe, ctx.size).expand(2, -1, -1, -1)
        yield "plain diffusers, 2 prompts", pipe, lambda: pipe([SOURCE, TARGET], latents=latents, **kw)
    if "p2p" in which:
        pipe = _p2p_pipeline(ctx)
        latents = _noise(ctx, pipe, ctx.size)
        yield "p2p replace + local blend", pipe, lambda: pipe(SOURCE, TARGET, blend_words=["cat", "dog"],
                                                              latents=latents, **kw)


def main(argv=None) -> None:
    import torch

    from imageprompt.bench.main import build_context
    from imageprompt.jobs.sampling import apply_speed_options

    parser = argparse.ArgumentParser(prog="python -m imageprompt.bench.cpu_time", description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--calls", nargs="*", choices=CALLS, default=list(CALLS))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    ctx = build_context("cpu", "fp32", args.steps, args.size, args.tiny)
    for name, pipe, call in calls(ctx, args.calls):
        eager = cpu_seconds(call, args.reps)
        unet, decoder = pipe.unet, pipe.vae.decoder
        torch.compiler.reset()
        try:
            apply_speed_options(pipe, compile=True)
            start = time.perf_counter()
            call()
            call()
            warm = time.perf_counter() - start
            compiled = cpu_seconds(call, args.reps)
        finally:
            pipe.unet, pipe.vae.decoder = unet, decoder  # the weights are shared with the next call
            torch.compiler.reset()
        print(f"{name}: eager {eager:.3f} s, compiled {compiled:.3f} s (CPU time, best of {args.reps}), "
              f"ratio {compiled / eager:.3f}; compile + 2 warm-up calls {warm:.0f} s wall", flush=True)


if __name__ == "__main__":
    main()
