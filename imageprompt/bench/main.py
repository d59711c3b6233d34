"""Speed and memory benchmark: ``imageprompt bench`` (or ``python -m imageprompt.bench.main``).

Builds Stable Diffusion 1.5 shapes with random weights (speed and memory do not
depend on weight values) and times plain diffusers against imageprompt in the
same process, so ratios are meaningful. Rows are plain functions ``fn(ctx) -> Result``;
each row module lists its own in a ``ROWS`` dict, and :func:`all_rows` joins those lists.
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile

from imageprompt.bench.common import Context, Result, device_name, markdown_table, peak_kind

# The quick rows (under a minute in all with --tiny --steps 5 on a CPU): one image per call, base size only;
# no batch of 8, no 1.5x size, no online tuning, no null-text inversion, no 64-row jobs, no --compile.
SMOKE_ROWS = (
    "plain diffusers, batch 1",
    "imageprompt variation, batch 1",
    "ip-adapter sd15 (diffusers), batch 1",
    "ip-adapter sd15 (imageprompt), batch 1",
    "ip-adapter plus (diffusers), batch 1",
    "ip-adapter plus (imageprompt), batch 1",
    "plain diffusers, 2 prompts, base size",
    "p2p replace + local blend, base size",
    "negative-prompt inversion",
)


def build_context(device: str | None, dtype: str | None, steps: int, size: int | None, tiny: bool) -> Context:
    import torch
    from diffusers import DDIMScheduler

    from imageprompt.loading import default_device, resolve_dtype
    from imageprompt.testing import build_components

    dev = torch.device(device) if device else default_device()
    torch_dtype = resolve_dtype(dtype, dev)
    with tempfile.TemporaryDirectory() as tmp:
        parts = build_components(tmp, full_size=not tiny)
    parts["scheduler"] = DDIMScheduler.from_config(parts["scheduler"].config)
    for name in ("unet", "vae", "text_encoder"):
        parts[name] = parts[name].to(dev, torch_dtype).eval()
    size = size or (64 if tiny else 512)
    return Context(dev, torch_dtype, steps, size, parts, tiny)


def run_rows(ctx: Context, names: list[str]) -> list[tuple[str, Result]]:
    import torch

    rows = all_rows()
    results = []
    for name in names:
        result = rows[name](ctx)
        results.append((name, result))
        print(f"  {name}: {result.seconds_per_image:.3f} s/image", file=sys.stderr)
        gc.collect()
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def format_table(ctx: Context, results: list[tuple[str, Result]]) -> str:
    """Markdown table; the ratio columns compare each row with the plain row of the same batch."""
    shapes = "tiny random components" if ctx.tiny else "SD 1.5 shapes, random weights"
    dtype = str(ctx.dtype).replace("torch.", "")
    heading = (f"{shapes}, {dtype}, {ctx.size}x{ctx.size} unless the note says otherwise, DDIM {ctx.steps} steps, "
               f"CFG 7.5, {device_name(ctx)}; {peak_kind(ctx)}")
    return markdown_table(ctx, results, heading, "plain")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", help="default: cuda if available")
    parser.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], help="default: fp16 on GPU, fp32 on CPU")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50)")
    parser.add_argument("--size", type=int, help="image side in pixels (default 512; 64 with --tiny)")
    parser.add_argument("--tiny", action="store_true",
                        help="tiny random components instead of SD 1.5 shapes; runs the --smoke rows unless "
                             "--all or --rows is given")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--smoke", action="store_true",
                       help="only the quick rows (batch 1, base size, no --compile, no null-text inversion)")
    which.add_argument("--all", action="store_true", help="every row (the default without --tiny)")
    which.add_argument("--rows", nargs="*", help="row names to run; see --list")
    parser.add_argument("--list", action="store_true", help="list the rows that would run (all, or --smoke) and exit")
    parser.add_argument("--sdxl", action="store_true",
                        help="the Stable Diffusion XL rows instead (SDXL base shapes, 1024x1024, 30 steps unless "
                             "--size/--steps say otherwise; tiny SDXL components with --tiny): imageprompt.bench.sdxl")
    parser.add_argument("--sd3", action="store_true",
                        help="the Stable Diffusion 3.5 rows instead (SD 3.5 Large shapes, 1024x1024, 28 steps; a CUDA "
                             "GPU; tiny SD3 components with --tiny): imageprompt.bench.sd3")
    parser.add_argument("--threads", type=int,
                        help="torch CPU threads (default: 1 for --tiny on the CPU, where tiny components gain nothing "
                             "from more and threads contending on a loaded machine make the timings erratic; else "
                             "torch's default)")


def selected_rows(args) -> list[str]:
    """The row names a command runs: --rows; else the smoke rows with --smoke (or --tiny without --all); else all."""
    rows = all_rows()
    if args.rows:
        unknown = [n for n in args.rows if n not in rows]
        if unknown:
            raise ValueError(f"unknown rows {unknown}; see `imageprompt bench --list`")
        return list(args.rows)
    if args.smoke or (args.tiny and not args.all):
        return [name for name in rows if name in SMOKE_ROWS]
    return list(rows)


def run(args) -> int:
    if getattr(args, "sd3", False):
        from imageprompt.bench.sd3 import run as run_sd3

        return run_sd3(args)
    if getattr(args, "sdxl", False):
        from imageprompt.bench.sdxl import run as run_sdxl

        return run_sdxl(args)
    names = selected_rows(args)
    if args.list:
        print("\n".join(names))
        return 0
    if len(names) < len(all_rows()) and not args.rows:
        print(f"imageprompt: bench: smoke run, {len(names)} of {len(all_rows())} rows (--all for the full table)",
              file=sys.stderr)
    ctx = build_context(args.device, args.dtype, args.steps, args.size, args.tiny)
    threads = args.threads or (1 if args.tiny and ctx.device.type == "cpu" else None)
    if threads:
        import torch

        torch.set_num_threads(threads)
    print(format_table(ctx, run_rows(ctx, names)))
    return 0


def all_rows() -> dict:
    """Every row by name, in table order (imported here, not at start-up: ``--help`` stays fast)."""
    from imageprompt.bench import adapter, batch, compiled, consistency, core, p2p, tune

    return {**core.ROWS, **tune.ROWS, **adapter.ROWS, **p2p.ROWS, **compiled.ROWS, **consistency.ROWS,
            **batch.ROWS}


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench", help="speed and memory against plain diffusers",
        description="Time imageprompt against plain diffusers in the same process, on shared random weights (speed "
                    "and memory do not depend on weight values): SD 1.5 shapes by default (a CUDA machine), or "
                    "tiny components with --tiny. Prints a markdown table: seconds per image, peak GPU memory, each "
                    "as a ratio to the plain pipeline. `imageprompt bench --tiny --steps 5 --device cpu` is a "
                    "smoke run of the quick rows (under a minute on a CPU); --all runs every row.")
    add_arguments(parser)
    parser.set_defaults(func=run)


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="python -m imageprompt.bench.main", description=__doc__.split("\n")[0])
    add_arguments(_parser)
    sys.exit(run(_parser.parse_args()))
