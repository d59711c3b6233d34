"""Speed and memory benchmark: ``imageprompt bench`` (or ``python -m imageprompt.bench``).

Builds Stable Diffusion 1.5 shapes with random weights (speed and memory do not
depend on weight values) and times plain diffusers against imageprompt in the
same process, so ratios are meaningful. Rows are plain functions registered in
:data:`ROWS`; later features add theirs with :func:`row`.
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field

ROWS: dict[str, Callable] = {}


def row(name: str):
    """Register ``fn(ctx) -> Result`` as a benchmark row."""

    def wrap(fn):
        ROWS[name] = fn
        return fn

    return wrap


@dataclass
class Result:
    seconds_per_image: float
    peak_gib: float | None
    images: int = 1
    note: str = ""
    baseline: str | None = None  # row to compare with (default: the plain row with the same image count)


@dataclass
class Context:
    """Shared components of one benchmark run (weights are shared between rows)."""

    device: object
    dtype: object
    steps: int
    size: int
    parts: dict
    tiny: bool
    cache: dict = field(default_factory=dict)

    def plain_pipeline(self):
        """diffusers' own StableDiffusionPipeline on the shared weights, with its default SDPA processors."""
        from diffusers import StableDiffusionPipeline
        from diffusers.models.attention_processor import AttnProcessor2_0

        p = self.parts
        p["unet"].set_attn_processor(AttnProcessor2_0())
        return StableDiffusionPipeline(
            vae=p["vae"], text_encoder=p["text_encoder"], tokenizer=p["tokenizer"], unet=p["unet"],
            scheduler=p["scheduler"], safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        ).to(self.device)

    def imageprompt_pipeline(self, attention: str = "sdpa"):
        """imageprompt's SD-IPC pipeline on the same weights."""
        from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

        from imageprompt.conversion import SDIPCConverter
        from imageprompt.pipelines import StableDiffusionImagePromptPipeline

        if "image_encoder" not in self.cache:
            clip = self.parts["clip"]
            cfg = CLIPVisionConfig(**{**clip.config.vision_config.to_dict(),
                                      "projection_dim": clip.config.projection_dim})
            encoder = CLIPVisionModelWithProjection(cfg)
            encoder.vision_model.load_state_dict(clip.vision_model.state_dict())
            encoder.visual_projection.load_state_dict(clip.visual_projection.state_dict())
            self.cache["image_encoder"] = encoder.to(self.device, self.dtype)
            self.cache["converter"] = SDIPCConverter.from_clip(clip).to(self.device)
        p = self.parts
        pipe = StableDiffusionImagePromptPipeline(
            vae=p["vae"], text_encoder=p["text_encoder"], tokenizer=p["tokenizer"], unet=p["unet"],
            scheduler=p["scheduler"], image_encoder=self.cache["image_encoder"], converter=self.cache["converter"],
        ).to(self.device)
        pipe.set_attention(attention)
        return pipe

    def reference_image(self):
        import numpy as np
        from PIL import Image

        rng = np.random.default_rng(0)
        return Image.fromarray(rng.integers(0, 255, (self.size, self.size, 3), dtype=np.uint8))


def timed(ctx: Context, call: Callable[[], object]) -> tuple[float, float | None]:
    """Seconds and peak GiB (CUDA only) of one ``call()``."""
    import torch

    cuda = ctx.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    call()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start, torch.cuda.max_memory_allocated() / 2**30 if cuda else None


def measure(ctx: Context, call: Callable[[], object], images: int) -> Result:
    """Seconds per image and peak memory of ``call`` after one warm-up run."""
    call()  # warm-up: kernels, allocator
    seconds, peak = timed(ctx, call)
    return Result(seconds / images, peak, images)


def _generator(ctx, n):
    import torch

    return [torch.Generator("cpu").manual_seed(i) for i in range(n)]


def _plain(batch):
    def run(ctx):
        pipe = ctx.plain_pipeline()
        kw = dict(num_inference_steps=ctx.steps, guidance_scale=7.5, height=ctx.size, width=ctx.size)
        return measure(ctx, lambda: pipe("a photo of a cat", num_images_per_prompt=batch,
                                         generator=_generator(ctx, batch), **kw), batch)

    return run


def _variation(batch):
    def run(ctx):
        pipe = ctx.imageprompt_pipeline()
        image = ctx.reference_image()
        kw = dict(num_inference_steps=ctx.steps, guidance_scale=7.5, height=ctx.size, width=ctx.size)
        return measure(ctx, lambda: pipe(image=image, num_images_per_prompt=batch,
                                         generator=_generator(ctx, batch), **kw), batch)

    return run


row("plain diffusers, batch 1")(_plain(1))
row("imageprompt variation, batch 1")(_variation(1))
row("plain diffusers, batch 8")(_plain(8))
row("imageprompt variation, batch 8")(_variation(8))


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

    results = []
    for name in names:
        result = ROWS[name](ctx)
        results.append((name, result))
        print(f"  {name}: {result.seconds_per_image:.3f} s/image", file=sys.stderr)
        gc.collect()
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def format_table(ctx: Context, results: list[tuple[str, Result]]) -> str:
    """Markdown table; the ratio column compares each row with the plain row of the same batch."""
    import torch

    where = torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else "CPU"
    shapes = "tiny random components" if ctx.tiny else "SD 1.5 shapes, random weights"
    dtype = str(ctx.dtype).replace("torch.", "")
    lines = [
        f"{shapes}, {dtype}, {ctx.size}x{ctx.size}, DDIM {ctx.steps} steps, CFG 7.5, {where}",
        "",
        "| row | s/image | x plain | peak GiB | x plain |",
        "|---|---|---|---|---|",
    ]
    plain = {r.images: r for n, r in results if n.startswith("plain")}
    for name, r in results:
        base = dict(results).get(r.baseline) if r.baseline else plain.get(r.images)
        t_ratio = f"{r.seconds_per_image / base.seconds_per_image:.3f}" if base else "-"
        peak = f"{r.peak_gib:.2f}" if r.peak_gib is not None else "-"
        m_ratio = f"{r.peak_gib / base.peak_gib:.3f}" if base and r.peak_gib and base.peak_gib else "-"
        lines.append(f"| {name} | {r.seconds_per_image:.3f} | {t_ratio} | {peak} | {m_ratio} |")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", help="default: cuda if available")
    parser.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], help="default: fp16 on GPU, fp32 on CPU")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--size", type=int, help="image side (default 512; 64 with --tiny)")
    parser.add_argument("--tiny", action="store_true", help="tiny components (CPU smoke run) instead of SD 1.5 shapes")
    parser.add_argument("--rows", nargs="*", help="row names to run (default: all); see --list")
    parser.add_argument("--list", action="store_true", help="list the rows and exit")


def run(args) -> int:
    _load_extra_rows()
    if args.list:
        print("\n".join(ROWS))
        return 0
    names = args.rows or list(ROWS)
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        raise ValueError(f"unknown rows {unknown}; see `imageprompt bench --list`")
    ctx = build_context(args.device, args.dtype, args.steps, args.size, args.tiny)
    print(format_table(ctx, run_rows(ctx, names)))
    return 0


# Modules that register more rows when imported (added by later features).
EXTRA_ROW_MODULES: list[str] = [
    "imageprompt.bench_tune",  # SD-IPC online tuning
    "imageprompt.bench_adapter",  # IP-Adapter sd15 / plus
    "imageprompt.bench_p2p",  # prompt-to-prompt edit, inversions
    "imageprompt.bench_batch",  # batch jobs against a loop of single calls
]


def _load_extra_rows() -> None:
    import importlib

    for name in EXTRA_ROW_MODULES:
        importlib.import_module(name)


def register(subparsers) -> None:
    parser = subparsers.add_parser("bench", help="speed and memory against plain diffusers")
    add_arguments(parser)
    parser.set_defaults(func=run)


if __name__ == "__main__":
    from imageprompt.cli import main

    sys.exit(main(["bench", *sys.argv[1:]]))
