"""Sampling a batch of rows: how each ``kind`` turns its items into pipeline calls, and the :class:`Runner`
that holds what a job's batches share (the loaded pipeline, input images, inversions, the loaded adapter).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from imageprompt.jobs.schema import Row
from imageprompt.jobs.toolbox_rows import toolbox_call


@dataclass
class Item:
    """One image to sample: image ``index`` of ``row``."""

    row: Row
    index: int

    @property
    def seed(self) -> int:
        return self.row.seed + self.index


def _sampling_kwargs(settings: dict, items) -> dict:
    from imageprompt.images import generators

    # image i of a row has its own generator seeded seed + i, whatever it is batched with
    return dict(num_inference_steps=settings["steps"], guidance_scale=settings["guidance"],
                negative_prompt=settings["negative_prompt"], height=settings["height"], width=settings["width"],
                generator=[generators(item.seed, 1)[0] for item in items])


def run_vary(runner, settings: dict, items) -> list:
    """SD-IPC variation: the converted image prompt alone, one batch for all items."""
    images = [runner.image(item.row) for item in items]
    return runner.pipe(image=images, **_sampling_kwargs(settings, items), **toolbox_call(runner, settings)).images


def run_edit(runner, settings: dict, items) -> list:
    """SD-IPC editing: the image prompt blended with each row's text at positions EOS..76."""
    images = [runner.image(item.row) for item in items]
    prompts = [item.row.params["prompt"] for item in items]
    kwargs = _sampling_kwargs(settings, items)
    return runner.pipe(image=images, prompt=prompts, alpha=settings["alpha"], **kwargs,
                       **toolbox_call(runner, settings)).images


def run_p2p(runner, settings: dict, items) -> list:
    """Prompt-to-prompt (Hertz et al. 2022): each item's source and edit in one call; returns the edits.
    With ``adapter``, its image branch (on the shared UNet) reads the row's ``adapter_image`` in both."""
    from imageprompt.jobs.schema import edit_settings

    if settings.get("adapter"):
        runner.use_adapter(settings["adapter"], settings["scale"], settings.get("window"))
    edits = []
    for item in items:
        p = item.row.params
        pipe = runner.edit_pipeline(p["mode"])
        kwargs = dict(source_prompt=p["prompt"], target_prompt=p.get("target"), settings=edit_settings(p),
                      **_sampling_kwargs(settings, [item]))
        kwargs["generator"] = kwargs["generator"][0]
        if p.get("image") and p.get("invert"):
            kwargs["inversion"] = runner.inversion(item.row, pipe)
        elif p.get("image"):
            kwargs.update(image=runner.image(item.row), alpha=p["alpha"])
        if p.get("adapter_image") and p.get("subtract_text"):  # InstantStyle: content words subtracted
            kwargs["ip_adapter_image_embeds"] = pipe.encode_ip_adapter_image(
                runner.load(p["adapter_image"]), content_text=p["subtract_text"], content_scale=p["subtract_scale"],
                do_classifier_free_guidance=settings["guidance"] > 1.0)
        elif p.get("adapter_image"):
            kwargs["ip_adapter_image"] = runner.load(p["adapter_image"])
        edits.append(pipe(**kwargs, **toolbox_call(runner, p)).images[-1])
    return edits


def run_adapter(runner, settings: dict, items) -> list:
    """IP-Adapter (Ye et al. 2023, Eq. 5): each row's image through the decoupled cross-attention, plus its text."""
    import torch

    pipe = runner.use_adapter(settings["adapter"], settings["scale"], settings.get("window"))
    cfg = settings["guidance"] > 1.0
    # one image prompt per row (a list of images would be several prompts of the *same* row in diffusers' format)
    per_row = [pipe.encode_ip_adapter_image(runner.image(item.row), content_text=item.row.params.get("subtract_text"),
                                            content_scale=item.row.params.get("subtract_scale") or 1.0,
                                            do_classifier_free_guidance=cfg)[0] for item in items]
    if cfg:
        negative, positive = zip(*(embeds.chunk(2) for embeds in per_row))
        embeds = torch.cat([*negative, *positive])
    else:
        embeds = torch.cat(per_row)
    prompts = [item.row.params.get("prompt") or "" for item in items]
    return pipe(prompt=prompts, ip_adapter_image_embeds=[embeds], **_sampling_kwargs(settings, items)).images


def run_style_aligned(runner, settings: dict, items) -> list:
    """StyleAligned (Hertz et al. 2024): the reference (``reference`` from ``reference_seed``, or the DDIM-inverted
    photo ``image``) first, then every item's prompt from its own seed, in one batch; returns the items' images.
    Each image attends only to itself and the reference, so it does not depend on what it is batched with."""
    from imageprompt.images import generators

    pipe = runner.style_pipeline()
    kwargs = _sampling_kwargs(settings, items)
    kwargs["generator"] = [generators(settings["reference_seed"], 1)[0], *kwargs["generator"]]
    prompts = [settings["reference"], *(item.row.params["prompt"] for item in items)]
    if settings.get("image"):
        row = items[0].row
        key = ("style", row.image_sha256, settings["reference"], settings["steps"], settings["height"],
               settings["width"])
        if key not in runner.inversions:
            runner.inversions[key] = pipe.invert_reference(runner.image(row), settings["reference"],
                                                           settings["steps"], settings["height"], settings["width"])
        kwargs["inversion"] = runner.inversions[key]
    return pipe(prompts, keys_scale=settings["keys_scale"], **kwargs).images[1:]


# ``fn(runner, settings, items) -> list[PIL.Image]`` for each kind of :data:`imageprompt.jobs.schema.KINDS`:
# one image per item, all items sharing ``settings`` (the sampling settings plus the kind's ``grouped`` fields)
SAMPLERS: dict[str, Callable] = {"vary": run_vary, "edit": run_edit, "p2p": run_p2p, "adapter": run_adapter,
                                 "style-aligned": run_style_aligned}


class Runner:
    """Samples batches with one loaded pipeline: input images loaded once per row, adapters loaded when needed."""

    def __init__(self, pipe, image_encoder: str | None = None):
        self.pipe = pipe
        self.image_encoder = image_encoder  # for the adapters; None: each adapter's own (the bundled one's: its CLIP)
        self.images: dict[int, object] = {}
        self.inversions: dict[int, object] = {}
        self.adapter: str | None = None
        self.adapter_errors: dict[str, Exception] = {}
        self._edits = {}

    def image(self, row: Row):
        from imageprompt.images import load_image

        if row.line not in self.images:
            self.images[row.line] = load_image(row.image)
            self.notice(row, self.images[row.line])
        return self.images[row.line]

    def notice(self, row: Row, image) -> None:
        """Say how the row's image is fitted: resized to the output size (a photo to invert), or cropped by the
        image encoder (an image prompt)."""
        import warnings
        from pathlib import Path

        from imageprompt.families import native_size
        from imageprompt.images import crop_notice, resize_notice

        p, name = row.params, f"row {row.line}: {Path(row.image).name}"
        if p.get("invert"):
            native = native_size(self.pipe)
            notice = resize_notice(name, image.size, (p.get("width") or native, p.get("height") or native),
                                   keep="give the row a width and height in its proportions to keep its shape")
        else:
            notice = crop_notice(name, image.size, getattr(self.pipe, "feature_extractor", None))
        if notice:
            warnings.warn(notice, UserWarning, stacklevel=2)

    def load(self, path: str):
        """Another image a row names (a p2p row's adapter image), loaded once per path."""
        from imageprompt.images import load_image

        if path not in self.images:
            self.images[path] = load_image(path)
        return self.images[path]

    def inversion(self, row: Row, pipe):
        """The row's photo inverted once for all its seeds (it does not depend on them)."""
        if row.line not in self.inversions:
            p = row.params
            words = {"words": p["dpl_words"]} if p.get("dpl_words") else {}
            self.inversions[row.line] = pipe.invert(self.image(row), p["prompt"], p["invert"], p["steps"],
                                                    p["guidance"], p["height"], p["width"], **words)
        return self.inversions[row.line]

    def forget(self, row: Row) -> None:
        self.images.pop(row.line, None)
        self.inversions.pop(row.line, None)

    def edit_pipeline(self, mode: str):
        """The prompt-to-prompt (or, for mode ``masactrl``, MasaCtrl) pipeline on the same components (no weights
        are copied), SD 1.x or SDXL as the model is."""
        edit = "masactrl" if mode == "masactrl" else "p2p"
        if edit not in self._edits:
            from imageprompt.pipelines.loading import edit_pipeline_from

            self._edits[edit] = edit_pipeline_from(self.pipe, edit)
            self._edits[edit].set_progress_bar_config(disable=True)
        return self._edits[edit]

    def style_pipeline(self):
        """The StyleAligned pipeline on the same components (no weights are copied)."""
        if getattr(self, "_style", None) is None:
            from imageprompt.pipelines import StableDiffusionStyleAlignedPipeline

            self._style = StableDiffusionStyleAlignedPipeline.from_pipe(self.pipe)
            self._style.set_progress_bar_config(disable=True)
        return self._style

    def use_adapter(self, spec: str, scale: float, window: list | None = None):
        """Load IP-Adapter ``spec`` (once; a failure is remembered so each row does not retry it) at ``scale``,
        applied in the step ``window`` ([begin, end]; None: every step)."""
        from imageprompt.adapter_files import parse_adapter_spec
        from imageprompt.families import is_sd3_pipeline

        if is_sd3_pipeline(self.pipe):
            raise ValueError("adapter rows run on UNet models; on SD3 load the SD3.5 IP-Adapter in Python "
                             "(docs/sd3.md)")
        if self.adapter != spec:
            if spec in self.adapter_errors:
                raise self.adapter_errors[spec]
            source, weight_name = parse_adapter_spec(spec)
            try:
                self.pipe.load_ip_adapter(source, weight_name=weight_name, image_encoder=self.image_encoder)
            except Exception as err:
                self.adapter_errors[spec] = err
                raise
            self.adapter = spec
        self.pipe.set_ip_adapter_scale(scale)
        self.pipe.set_ip_adapter_window(window)
        return self.pipe

    def sample(self, items: list[Item]) -> list:
        row = items[0].row
        if not row.params.get("adapter") and self.adapter is not None:
            self.pipe.unload_ip_adapter()  # rows without an adapter run the plain UNet
            self.adapter = None
        images = SAMPLERS[row.kind](self, dict(row.params), items)
        if len(images) != len(items):
            raise RuntimeError(f"kind {row.kind!r} returned {len(images)} images for {len(items)}")
        return images


COMPILE_BACKEND_ENV = "IMAGEPROMPT_COMPILE_BACKEND"


def compile_mode(device) -> str | None:
    """torch.compile's mode for ``device``: ``"reduce-overhead"`` (CUDA graphs: batch 1 is launch-bound) on CUDA,
    the default elsewhere."""
    import torch

    return "reduce-overhead" if torch.device(device).type == "cuda" else None


def apply_speed_options(pipe, compile: bool = False, channels_last: bool = False) -> None:
    """channels-last memory format for the UNet and VAE; torch.compile of the UNet and VAE decoder.

    The compiler backend is inductor unless the environment variable ``IMAGEPROMPT_COMPILE_BACKEND`` names another
    (the tests use ``eager``: dynamo alone, no C compiler); the mode is :func:`compile_mode` of the UNet's device
    (inductor only). imageprompt's attention processors trace as one graph that every step reuses
    (``tests/test_compile.py``).
    """
    import os

    import torch

    if channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    if compile:
        backend = os.environ.get(COMPILE_BACKEND_ENV) or "inductor"
        mode = compile_mode(pipe.unet.device) if backend == "inductor" else None
        pipe.unet = torch.compile(pipe.unet, backend=backend, mode=mode)
        pipe.vae.decoder = torch.compile(pipe.vae.decoder, backend=backend, mode=mode)
