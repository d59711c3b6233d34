"""What every tab works with: the loaded pipeline, its image adapters and sibling pipelines, and the results folder.

The tabs share one :class:`DemoContext`. Its pipelines all run over the same modules (no copies), and the
image adapters live on the shared UNet (:mod:`imageprompt.ip_adapter`), so they are installed only for the
IP-Adapter tab's own jobs. Results are PNGs with their generation parameters in the ``parameters`` text
chunk (:func:`imageprompt.images.save_png`), one fresh folder per run.
"""

from __future__ import annotations

import shutil
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imageprompt.demo.limits import KEEP_RUNS, MAX_IMAGES, MAX_SIDE, MAX_STEPS

from imageprompt.images import generation_parameters, save_png
from imageprompt.progress import SAMPLING, label


@dataclass
class Sampling:
    """The checked values of the "Advanced options" accordion."""

    num_images: int
    steps: int
    guidance: float
    seed: int
    width: int
    height: int
    negative_prompt: str | None


@dataclass
class DemoContext:
    """What every tab needs: the pipeline, the page's limits and where results go."""

    pipe: Any
    model_name: str
    clip_name: str | None
    notice: str | None
    scheduler: str | None
    output_dir: Path
    max_side: int = MAX_SIDE
    max_images: int = MAX_IMAGES
    max_steps: int = MAX_STEPS
    default_steps: int = 30
    adapters: list = field(default_factory=list)  # loaded image adapters, installed only while their tab runs
    adapter_names: list = field(default_factory=list)
    controlnet: Any = None  # `imageprompt demo --controlnet`: the tabs' control image conditions it
    pipelines: dict = field(default_factory=dict)  # other pipelines over the same modules, built on first use

    @property
    def native_size(self) -> int:
        from imageprompt.families import native_size

        return native_size(self.pipe)

    @property
    def size_step(self) -> int:
        """Pixels per latent cell times the UNet's total downsampling (SD3: its patch size): sizes that need no
        padding."""
        from imageprompt.families import size_step

        return size_step(self.pipe)

    @property
    def size_range(self) -> tuple[int, int]:
        step = self.size_step
        return max(step, self.native_size // 2 // step * step), self.native_size * 2

    def new_run_dir(self) -> Path:
        """A fresh folder for one run's PNGs; the oldest folders beyond :data:`KEEP_RUNS` are removed."""
        runs = sorted((p for p in self.output_dir.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
        for old in runs[: max(0, len(runs) - KEEP_RUNS + 1)]:
            shutil.rmtree(old, ignore_errors=True)
        folder = self.output_dir / f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
        folder.mkdir(parents=True)
        return folder


# ---------------------------------------------------------------- outputs
def parameters(ctx: DemoContext, method: str, sampling: Sampling, **extra) -> dict:
    """What each PNG records, in the same form as the command line's outputs."""
    params = generation_parameters(ctx.pipe, method, model=ctx.model_name, clip=ctx.clip_name,
                                   scheduler=ctx.scheduler, steps=sampling.steps, guidance=sampling.guidance,
                                   negative_prompt=sampling.negative_prompt)
    params.update(extra, source="imageprompt demo")
    return params


def write_results(ctx: DemoContext, images, method: str, seeds: list[int], params: dict):
    """Save PNGs with their parameters; returns ``(gallery items, file paths)``."""
    folder = ctx.new_run_dir()
    gallery, files = [], []
    for image, seed in zip(images, seeds):
        meta = dict(params, seed=seed, width=image.size[0], height=image.size[1])
        path = str(save_png(image, folder / f"{method}-{seed}.png", meta))
        gallery.append((path, f"seed {seed}"))
        files.append(path)
    return gallery, files


def write_edit_results(ctx: DemoContext, result, params: dict, tag: str):
    """Source, edit and attention-map PNGs of a prompt-to-prompt run: ``(gallery, maps path, files)``."""
    from imageprompt.attention_maps import render_attention_maps

    folder = ctx.new_run_dir()
    gallery, files = [], []
    for role, image in zip(("source", "edit"), result.images):
        meta = dict(params, role=role, width=image.size[0], height=image.size[1])
        path = str(save_png(image, folder / f"{tag}-{role}.png", meta))
        gallery.append((path, role))
        files.append(path)
    maps = None
    if getattr(result, "attention_maps", None) is not None:  # MasaCtrl records none
        picture = render_attention_maps(result.attention_maps, result.tokens, result.images)
        maps = str(save_png(picture, folder / f"{tag}-attention.png", dict(params, role="attention")))
        files.append(maps)
    return gallery, maps, files


# --------------------------------------------------------------- adapters
def load_adapters(pipe, specs: list[str], image_encoder: str | None = None) -> list:
    """Read the image adapters named like ``--adapter`` (a file, ``HUB_ID:path``, a short name or ``sdipc``).

    They are built for ``pipe``'s UNet but not installed on it: the IP-Adapter tab installs them for its own jobs.
    """
    from imageprompt import ip_adapter
    from imageprompt.adapter_files import parse_adapter_spec
    from imageprompt.sdipc_branch import SDIPCBranch

    files = [parse_adapter_spec(spec) for spec in specs if spec != "sdipc"]
    loaded = iter(ip_adapter.load_adapters(pipe, [source for source, _ in files],
                                           weight_name=[weight for _, weight in files],
                                           image_encoder=image_encoder) if files else [])
    return [SDIPCBranch() if spec == "sdipc" else next(loaded) for spec in specs]


@contextmanager
def adapters_installed(ctx: DemoContext, scale: float):
    """Install the loaded image adapters at ``scale`` for one job only, so the SD-IPC tabs see a plain UNet."""
    from imageprompt.ip_adapter import install_adapters

    install_adapters(ctx.pipe.unet, ctx.adapters, [float(scale)] * len(ctx.adapters))
    try:
        yield
    finally:
        ctx.pipe.unload_ip_adapter()


# ------------------------------------------------------ sibling pipelines
def p2p_pipeline(ctx: DemoContext, ddim: bool = False, edit: str = "p2p"):
    """The prompt-to-prompt (``edit="masactrl"``: MasaCtrl) pipeline over the demo's modules (no copies); ``ddim``
    for inverting photos."""
    key = f"{edit}-ddim" if ddim else edit
    if key not in ctx.pipelines:
        from diffusers import DDIMScheduler
        from imageprompt.pipelines.loading import edit_pipeline_from

        # its own scheduler object: schedulers keep per-run state
        scheduler = DDIMScheduler if ddim else type(ctx.pipe.scheduler)
        ctx.pipelines[key] = label(edit_pipeline_from(  # SD 1.x or SDXL, as the model is
            ctx.pipe, edit, scheduler=scheduler.from_config(ctx.pipe.scheduler.config)), SAMPLING)
    return ctx.pipelines[key]
