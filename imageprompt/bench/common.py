"""What every benchmark row shares: the run's context (shared random-weight components),
timing and the result record."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field


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
        pipe = StableDiffusionPipeline(
            vae=p["vae"], text_encoder=p["text_encoder"], tokenizer=p["tokenizer"], unet=p["unet"],
            scheduler=p["scheduler"], safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        ).to(self.device)
        pipe.set_progress_bar_config(disable=True)  # the table is the output
        return pipe

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
            scheduler=p["scheduler"], sdipc_image_encoder=self.cache["image_encoder"],
            converter=self.cache["converter"],
        ).to(self.device)
        pipe.set_attention(attention)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def reference_image(self):
        import numpy as np
        from PIL import Image

        rng = np.random.default_rng(0)
        return Image.fromarray(rng.integers(0, 255, (self.size, self.size, 3), dtype=np.uint8))


PEAK_RSS_MISSING = ("peak RSS: not measured here: resetting the process's peak needs Linux's /proc/self/clear_refs "
                    "(writable), and reading it /proc/self/status")


def reset_peak_rss() -> bool:
    """Reset this process's peak resident set size (Linux: ``VmHWM``); False where it cannot be reset."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def peak_rss_gib() -> float | None:
    """This process's peak resident set size since the last :func:`reset_peak_rss`, in GiB (Linux)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20  # kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def peak_kind(ctx: Context) -> str:
    """What the peak GiB column measures on ``ctx``'s device."""
    if ctx.device.type == "cuda":
        return "peak: GPU memory allocated"
    return "peak: the process's resident set (RSS)" if ctx.device.type == "cpu" else "peak: not measured"


def timed(ctx: Context, call: Callable[[], object]) -> tuple[float, float | None]:
    """Seconds and peak GiB of one ``call()``: CUDA memory allocated on a GPU, the process's peak RSS on the CPU
    (None where it cannot be measured: :data:`PEAK_RSS_MISSING`)."""
    import torch

    cuda = ctx.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss = not cuda and ctx.device.type == "cpu" and reset_peak_rss()
    start = time.perf_counter()
    call()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if cuda:
        return seconds, torch.cuda.max_memory_allocated() / 2**30
    return seconds, peak_rss_gib() if rss else None


def measure(ctx: Context, call: Callable[[], object], images: int, warmups: int = 1) -> Result:
    """Seconds per image and peak memory of ``call`` after ``warmups`` warm-up runs (a compiled module: 2, as CUDA
    graphs record on the second call of a module called once per image, the VAE decoder)."""
    for _ in range(warmups):
        call()  # warm-up: kernels, allocator, compilation
    seconds, peak = timed(ctx, call)
    return Result(seconds / images, peak, images)


def device_name(ctx: Context) -> str:
    """The GPU's name, or the CPU with its thread count."""
    import torch

    if ctx.device.type == "cuda":
        return torch.cuda.get_device_name(ctx.device)
    threads = torch.get_num_threads()
    return f"CPU, {threads} thread{'s' if threads > 1 else ''}"


def markdown_table(ctx: Context, results: list[tuple[str, Result]], heading: str, plain_prefix: str) -> str:
    """The bench's Markdown table under ``heading``: each row against its baseline (the row it names, else the row
    starting with ``plain_prefix`` that has the same image count), in time and in peak memory."""
    lines = [heading, "", "| row | s/image | x plain | peak GiB | x plain | note |", "|---|---|---|---|---|---|"]
    by_name = dict(results)
    plain = {r.images: r for n, r in results if n.startswith(plain_prefix)}
    for name, r in results:
        base = by_name.get(r.baseline) if r.baseline else plain.get(r.images)
        t_ratio = f"{r.seconds_per_image / base.seconds_per_image:.3f}" if base else "-"
        peak = f"{r.peak_gib:.2f}" if r.peak_gib is not None else "-"
        m_ratio = f"{r.peak_gib / base.peak_gib:.3f}" if base and r.peak_gib and base.peak_gib else "-"
        lines.append(f"| {name} | {r.seconds_per_image:.3f} | {t_ratio} | {peak} | {m_ratio} | {r.note} |")
    if ctx.device.type != "cuda" and any(r.peak_gib is None for _, r in results):
        lines += ["", PEAK_RSS_MISSING if ctx.device.type == "cpu" else f"peak: not measured on {ctx.device.type}"]
    return "\n".join(lines)
