"""The imageprompt web demo (Gradio).

One page, one tab per capability that is installed: Variation and Image + text
(SD-IPC) always; IP-Adapter, Prompt-to-prompt and Real-image edit when their
modules import. Each tab is a small function ``(DemoContext) -> None`` listed
in :data:`TABS` with a test of whether it can be shown.

Every run goes through the same steps: check the inputs (a readable
``gr.Error`` on bad input, before any sampling), sample with one CPU generator
per image (image ``i`` uses ``seed + i``, as on the command line), write PNGs
with their parameters in the ``parameters`` text chunk
(:func:`imageprompt.images.save_png`) into the demo's own temporary folder, and
return those paths to the gallery and the download list.

Start it with ``imageprompt demo`` or, in Python::

    from imageprompt.demo.app import build_demo, serve
    from imageprompt import load_pipeline

    serve(build_demo(load_pipeline()), port=7860)
"""

from __future__ import annotations

import functools
import html
import importlib.util
import logging
import random
import re
import shutil
import tempfile
import time
import uuid
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import gradio as gr
from PIL import Image

from imageprompt.images import MAX_SIDE, ImageInputError, load_image, save_png, sha256_file

logger = logging.getLogger(__name__)

EXAMPLES_DIR = Path(__file__).resolve().parent / "examples"
MAX_FILE_SIZE = "10mb"  # uploads above this are refused by gradio itself
MAX_INPUT_PIXELS = 4096 * 4096  # refused before decoding; larger sides up to this are downscaled to MAX_SIDE
MAX_IMAGES = 4
MAX_STEPS = 150
QUEUE_SIZE = 16  # waiting jobs; more are turned away with "queue is full"
KEEP_RUNS = 64  # result folders kept in the demo's temporary folder
GPU = "gpu"  # one concurrency group: all tabs share the one pipeline, one job at a time
SEED_MAX = 2**31 - 1


# ------------------------------------------------------------------ context
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
    pipelines: dict = field(default_factory=dict)  # other pipelines over the same modules, built on first use

    @property
    def native_size(self) -> int:
        return self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor

    @property
    def size_step(self) -> int:
        """Pixels per latent cell times the UNet's total downsampling: sizes that need no padding."""
        levels = len(self.pipe.unet.config.block_out_channels) - 1
        return self.pipe.vae_scale_factor * 2**levels

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
class SamplingControls:
    """The components of the "Advanced options" accordion; ``inputs`` is the order the handlers take them in."""

    num_images: gr.Slider | None
    steps: gr.Slider
    guidance: gr.Slider
    seed: gr.Number | None
    width: gr.Slider
    height: gr.Slider
    negative_prompt: gr.Textbox

    @property
    def inputs(self) -> list:
        parts = [self.num_images, self.steps, self.guidance, self.seed, self.width, self.height, self.negative_prompt]
        return [p for p in parts if p is not None]


# ---------------------------------------------------------- input handling
def escape(message: str) -> str:
    """Gradio renders alert messages as HTML; they quote user text (prompts, file names), so escape it."""
    return html.escape(message, quote=False)


def page_error(message: str) -> gr.Error:
    """A readable error in the page (``gr.Error``), with the message shown as text."""
    return gr.Error(escape(message))


def readable_upload_errors(preprocess: Callable) -> Callable:
    """Wrap ``gr.Image.preprocess`` so a bad upload (not an image, a decompression bomb) is a readable ``gr.Error``.

    Wrapped on the instance: a ``gr.Image`` subclass would make gradio write a ``.pyi`` stub beside this module.
    """

    @functools.wraps(preprocess)
    def wrapper(payload):
        try:
            return preprocess(payload)
        except gr.Error:
            raise
        except Image.DecompressionBombError:
            raise page_error("The image has too many pixels to open safely.") from None
        except Exception:
            raise page_error("The upload is not an image that can be read; use PNG, JPEG or WebP.") from None

    return wrapper


def image_input(label: str = "Image", elem_id: str | None = None) -> gr.Image:
    # filepath: the handler opens only the file gradio wrote into its upload folder
    image = gr.Image(label=label, type="filepath", image_mode=None, sources=["upload", "clipboard"], height=280,
                     elem_id=elem_id)
    image.preprocess = readable_upload_errors(image.preprocess)
    return image


def read_image(ctx: DemoContext, path: str | None, what: str = "an image") -> tuple[Image.Image, dict]:
    """The uploaded image, checked and decoded, and what its PNGs record about it."""
    if not path:
        raise page_error(f"Upload {what} first.")
    name = Path(path).name
    try:
        with Image.open(path) as probe:  # reads the header only
            width, height = probe.size
    except Image.DecompressionBombError:
        raise page_error(f"{name}: the image has too many pixels to open safely.") from None
    except Exception:
        raise page_error(f"{name}: not an image that can be read; use PNG, JPEG or WebP.") from None
    if width * height > MAX_INPUT_PIXELS:
        raise page_error(f"{name}: {width}x{height} is too large; the demo takes up to "
                       f"{MAX_INPUT_PIXELS / 1e6:.1f} megapixels.")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            image = load_image(path, max_side=ctx.max_side)
        except ImageInputError as err:
            raise page_error(str(err).replace(str(path), name)) from None
    for warning in caught:
        gr.Info(escape(str(warning.message)))  # e.g. "input image 3000x2000 resized to 2048x1365"
    return image, {"input": name, "input_sha256": sha256_file(path)}


def check_prompt(prompt: str | None, what: str = "a prompt") -> str:
    if prompt is None or not str(prompt).strip():
        raise page_error(f"Write {what} first.")
    return str(prompt).strip()


def check_sampling(ctx: DemoContext, *, steps, guidance, width, height, negative_prompt, num_images=1,
                   seed=0) -> Sampling:
    """The accordion's values as numbers, or a ``gr.Error`` naming the one out of range (API callers skip the UI)."""

    def number(name, value, cast, low, high):
        try:
            value = cast(value)
        except (TypeError, ValueError):
            raise page_error(f"{name} must be a number, got {value!r}") from None
        if not low <= value <= high:
            raise page_error(f"{name} must be between {low} and {high}, got {value}")
        return value

    low, high = ctx.size_range
    sampling = Sampling(
        num_images=number("Number of images", num_images, int, 1, ctx.max_images),
        steps=number("Steps", steps, int, 1, ctx.max_steps),
        guidance=number("Guidance", guidance, float, 0.0, 20.0),
        seed=number("Seed", seed if seed is not None else 0, int, 0, SEED_MAX),
        width=number("Width", width, int, low, high),
        height=number("Height", height, int, low, high),
        negative_prompt=(negative_prompt or "").strip() or None,
    )
    factor = ctx.pipe.vae_scale_factor
    for name, value in (("Width", sampling.width), ("Height", sampling.height)):
        if value % factor:
            raise page_error(f"{name} must be a multiple of {factor}, got {value}")
    return sampling


# --------------------------------------------------------------- running
def user_errors() -> tuple[type[BaseException], ...]:
    from imageprompt.cli.common import user_errors as cli_errors

    return cli_errors()


def shows_errors(fn: Callable) -> Callable:
    """Turn known failures into a readable ``gr.Error``; log and summarise the unexpected ones."""

    @functools.wraps(fn)  # keeps the signature: gradio reads the parameter names and the Progress default
    def wrapper(*args, **kwargs):
        import torch

        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            raise page_error("Out of GPU memory: try fewer images or a smaller size.") from None
        except user_errors() as err:
            raise page_error(str(err)) from None
        except Exception as err:
            logger.exception("demo request failed")
            raise page_error(f"Unexpected {type(err).__name__}: {err}") from None

    return wrapper


def parameters(ctx: DemoContext, method: str, sampling: Sampling, **extra) -> dict:
    """What each PNG records, in the same form as the command line's outputs."""
    from imageprompt.cli.common import base_parameters

    args = SimpleNamespace(model=ctx.model_name, clip=ctx.clip_name, scheduler=ctx.scheduler, steps=sampling.steps,
                           guidance=sampling.guidance, negative_prompt=sampling.negative_prompt)
    params = base_parameters(ctx.pipe, args, method)
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


def sample(ctx: DemoContext, method: str, inputs: dict, sampling: Sampling, params: dict):
    """Run the SD-IPC pipeline with the accordion's settings and write the results."""
    from imageprompt.images import generators

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = ctx.pipe(
            **inputs, negative_prompt=sampling.negative_prompt, num_inference_steps=sampling.steps,
            guidance_scale=sampling.guidance, num_images_per_prompt=sampling.num_images, height=sampling.height,
            width=sampling.width, generator=generators(sampling.seed, sampling.num_images),
        )
    for warning in caught:
        if issubclass(warning.category, UserWarning):
            gr.Warning(escape(str(warning.message)))  # e.g. a prompt truncated to 77 tokens
    seeds = [sampling.seed + i for i in range(sampling.num_images)]
    return write_results(ctx, result.images, method, seeds, params)


# ------------------------------------------------------- shared components
def sampling_controls(ctx: DemoContext, guidance: float = 7.5, num: bool = True, seed: bool = True) -> SamplingControls:
    """Steps, guidance, seed (with a randomise button), size, number of images, negative prompt."""
    low, high = ctx.size_range
    native = ctx.native_size
    with gr.Row():
        num_images = gr.Slider(1, ctx.max_images, value=1, step=1, label="Number of images") if num else None
        steps = gr.Slider(1, ctx.max_steps, value=ctx.default_steps, step=1, label="Steps")
        guidance_slider = gr.Slider(0.0, 20.0, value=guidance, step=0.5, label="Guidance scale")
    seed_box = None
    if seed:
        with gr.Row(equal_height=True):
            seed_box = gr.Number(value=0, precision=0, minimum=0, maximum=SEED_MAX,
                                 label="Seed (image i uses seed + i)", scale=3)
            dice = gr.Button("Random seed", scale=1, size="sm")
        dice.click(lambda: random.randint(0, SEED_MAX), None, seed_box, queue=False, api_visibility="private")
    with gr.Row():
        width = gr.Slider(low, high, value=native, step=ctx.size_step, label="Width")
        height = gr.Slider(low, high, value=native, step=ctx.size_step, label="Height")
    negative = gr.Textbox(label="Negative prompt", placeholder="(empty prompt)", max_lines=2)
    return SamplingControls(num_images, steps, guidance_slider, seed_box, width, height, negative)


def result_outputs(name: str, label: str = "Results") -> tuple[gr.Gallery, gr.File]:
    gallery = gr.Gallery(label=label, columns=2, height=420, object_fit="contain", buttons=["download", "fullscreen"],
                         format="png", interactive=False, elem_id=f"{name}-gallery")
    files = gr.File(label="Download PNGs (parameters in the PNG metadata)", file_count="multiple", interactive=False,
                    elem_id=f"{name}-files")
    return gallery, files


def example_path(name: str) -> str:
    return str(EXAMPLES_DIR / name)


def on_run(button: gr.Button, fn: Callable, inputs: list, outputs: list, api_name: str) -> None:
    """Attach a sampling handler: queued, one job at a time across all tabs."""
    button.click(shows_errors(fn), inputs, outputs, api_name=api_name, concurrency_limit=1, concurrency_id=GPU)


# ------------------------------------------------------------------- tabs
def variation_tab(ctx: DemoContext) -> None:
    """SD-IPC image variation: the image becomes the prompt."""
    with gr.Row():
        with gr.Column():
            image = image_input("Reference image", elem_id="variation-image")
            run = gr.Button("Generate variations", variant="primary", elem_id="variation-run")
            with gr.Accordion("Advanced options", open=False):
                opts = sampling_controls(ctx)
        with gr.Column():
            gallery, files = result_outputs("variation")
    gr.Examples([[example_path("red-circle.png")], [example_path("blue-square.png")],
                 [example_path("green-triangle-yellow-circle.png")]], [image], label="Examples (shapes world)")

    def variation(image, num_images, steps, guidance, seed, width, height, negative_prompt,
                  progress=gr.Progress(track_tqdm=True)):
        picture, source = read_image(ctx, image)
        sampling = check_sampling(ctx, num_images=num_images, steps=steps, guidance=guidance, seed=seed, width=width,
                                  height=height, negative_prompt=negative_prompt)
        params = parameters(ctx, "sdipc-variation", sampling, **source)
        return sample(ctx, "sdipc-variation", dict(image=picture), sampling, params)

    on_run(run, variation, [image, *opts.inputs], [gallery, files], "variation")


def edit_tab(ctx: DemoContext) -> None:
    """SD-IPC image + text editing: text states blended into the converted image prompt with weight alpha."""
    with gr.Row():
        with gr.Column():
            image = image_input("Reference image", elem_id="edit-image")
            prompt = gr.Textbox(label="Edit text", placeholder="e.g. a blue circle", max_lines=2, elem_id="edit-prompt")
            run = gr.Button("Edit", variant="primary", elem_id="edit-run")
            with gr.Accordion("Advanced options", open=False):
                alpha = gr.Slider(0.0, 2.0, value=0.5, step=0.05, label="Alpha (text weight, 0.5-0.6 usual)")
                opts = sampling_controls(ctx)
        with gr.Column():
            gallery, files = result_outputs("edit")
    gr.Examples([[example_path("red-circle.png"), "a blue circle"],
                 [example_path("blue-square.png"), "a yellow square on a black background"]],
                [image, prompt], label="Examples (shapes world)")

    def edit(image, prompt, alpha, num_images, steps, guidance, seed, width, height, negative_prompt,
             progress=gr.Progress(track_tqdm=True)):
        picture, source = read_image(ctx, image)
        prompt = check_prompt(prompt, "the edit text")
        sampling = check_sampling(ctx, num_images=num_images, steps=steps, guidance=guidance, seed=seed, width=width,
                                  height=height, negative_prompt=negative_prompt)
        alpha = float(alpha)
        params = parameters(ctx, "sdipc-edit", sampling, prompt=prompt, alpha=alpha, **source)
        return sample(ctx, "sdipc-edit", dict(image=picture, prompt=prompt, alpha=alpha), sampling, params)

    on_run(run, edit, [image, prompt, alpha, *opts.inputs], [gallery, files], "edit")


@contextmanager
def adapters_installed(ctx: DemoContext, scale: float):
    """Install the loaded image adapters for one job only, so the SD-IPC tabs see a plain UNet."""
    from imageprompt.ip_adapter import install_adapters

    install_adapters(ctx.pipe.unet, ctx.adapters)
    try:
        ctx.pipe.set_ip_adapter_scale(float(scale))
        yield
    finally:
        install_adapters(ctx.pipe.unet, [])


def ip_adapter_tab(ctx: DemoContext) -> None:
    """IP-Adapter-style decoupled cross-attention: the image through its own key/value branch, text optional."""
    with gr.Row():
        with gr.Column():
            gr.Markdown(f"Adapter: `{', '.join(ctx.adapter_names)}`")
            image = image_input("Image prompt", elem_id="ip-image")
            prompt = gr.Textbox(label="Text prompt (optional)", placeholder="e.g. on a black background",
                                max_lines=2, elem_id="ip-prompt")
            run = gr.Button("Generate", variant="primary", elem_id="ip-run")
            with gr.Accordion("Advanced options", open=False):
                scale = gr.Slider(0.0, 2.0, value=1.0, step=0.05, label="Adapter scale (image branch weight)")
                opts = sampling_controls(ctx)
        with gr.Column():
            gallery, files = result_outputs("ip")
    gr.Examples([[example_path("red-circle.png"), ""],
                 [example_path("blue-square.png"), "on a black background"]],
                [image, prompt], label="Examples (shapes world)")

    def ip_adapter(image, prompt, scale, num_images, steps, guidance, seed, width, height, negative_prompt,
                   progress=gr.Progress(track_tqdm=True)):
        picture, source = read_image(ctx, image, "an image prompt")
        sampling = check_sampling(ctx, num_images=num_images, steps=steps, guidance=guidance, seed=seed, width=width,
                                  height=height, negative_prompt=negative_prompt)
        text = (prompt or "").strip()
        method = "ip-adapter-edit" if text else "ip-adapter-variation"
        count = len(ctx.adapters)
        params = parameters(ctx, method, sampling, prompt=text or None, adapters=list(ctx.adapter_names),
                            adapter_scales=[float(scale)] * count, **source)
        references = picture if count == 1 else [picture] * count  # diffusers' layout: one entry per adapter
        with adapters_installed(ctx, scale):
            return sample(ctx, method, dict(image=None, prompt=text, ip_adapter_image=references), sampling, params)

    on_run(run, ip_adapter, [image, prompt, scale, *opts.inputs], [gallery, files], "ip_adapter")


def load_adapters(pipe, specs: list[str], image_encoder: str | None = None) -> list:
    """Read the image adapters named like ``--adapter`` (a file, ``HUB_ID:path``, a short name or ``sdipc``).

    They are returned unloaded from ``pipe``: the IP-Adapter tab installs them for its own jobs.
    """
    from imageprompt.adapter_files import parse_adapter_spec
    from imageprompt.sdipc_branch import SDIPCBranch

    files = [parse_adapter_spec(spec) for spec in specs if spec != "sdipc"]
    if files:
        pipe.load_ip_adapter([source for source, _ in files], weight_name=[weight for _, weight in files],
                             image_encoder=image_encoder)
    loaded = iter(pipe.image_adapters)
    adapters = [SDIPCBranch() if spec == "sdipc" else next(loaded) for spec in specs]
    pipe.unload_ip_adapter()
    return adapters


def p2p_pipeline(ctx: DemoContext, ddim: bool = False):
    """The prompt-to-prompt pipeline over the demo's modules (no copies); ``ddim`` for inverting photos."""
    key = "p2p-ddim" if ddim else "p2p"
    if key not in ctx.pipelines:
        from diffusers import DDIMScheduler
        from imageprompt.pipelines import StableDiffusionPromptToPromptPipeline

        # its own scheduler object: schedulers keep per-run state
        scheduler = DDIMScheduler if ddim else type(ctx.pipe.scheduler)
        pipe = StableDiffusionPromptToPromptPipeline.from_pipe(
            ctx.pipe, scheduler=scheduler.from_config(ctx.pipe.scheduler.config))
        pipe.set_progress_bar_config(**getattr(ctx.pipe, "_progress_bar_config", {}))
        ctx.pipelines[key] = pipe
    return ctx.pipelines[key]


def words(text: str | None) -> list[str]:
    """Words typed in a box, separated by spaces or commas."""
    return [w for w in re.split(r"[,\s]+", text or "") if w]


def check_edit(source: str, target: str | None, mode: str, weights_text: str | None, blend_text: str | None,
               cross_steps, self_steps, blend_threshold) -> dict:
    """Prompt-to-prompt settings checked on the text alone, before any sampling (``gr.Error`` when they don't fit)."""
    from imageprompt.cli.p2p import parse_weights
    from imageprompt.p2p import validate_edit

    source = check_prompt(source, "the source prompt")
    weights = parse_weights(words(weights_text))
    blend = words(blend_text) or None
    target = None if mode == "reweight" else check_prompt(target, "the target prompt")
    settings = dict(mode=mode, weights=weights or None, blend_words=blend, blend_threshold=float(blend_threshold),
                    cross_steps=float(cross_steps), self_steps=float(self_steps))
    target = validate_edit(source, target, mode, weights, blend, settings["cross_steps"], None,
                           settings["self_steps"], settings["blend_threshold"])
    return dict(source_prompt=source, target_prompt=None if mode == "reweight" else target, **settings)


def edit_controls() -> dict:
    """Target prompt, mode, blend and weight words (the step fractions: :func:`step_controls`)."""
    target = gr.Textbox(label="Target prompt", placeholder="the source prompt with words changed", max_lines=2)
    mode = gr.Radio(["replace", "refine", "reweight"], value="replace", label="Mode",
                    info="replace: same word count · refine: words added or removed · reweight: only word weights")
    with gr.Row():
        blend = gr.Textbox(label="Blend words (only their region changes)", placeholder="e.g. circle", max_lines=1)
        weights = gr.Textbox(label="Word weights", placeholder="e.g. blue=2, large=0.5", max_lines=1)
    return dict(target=target, mode=mode, blend=blend, weights=weights)


def step_controls() -> dict:
    with gr.Row():
        cross = gr.Slider(0.0, 1.0, value=0.8, step=0.05, label="Cross-attention steps (fraction)")
        self_ = gr.Slider(0.0, 1.0, value=0.4, step=0.05, label="Self-attention steps (fraction)")
        threshold = gr.Slider(0.0, 1.0, value=0.3, step=0.05, label="Blend threshold")
    return dict(cross=cross, self=self_, threshold=threshold)


def p2p_outputs(name: str) -> tuple[gr.Gallery, gr.Image, gr.File]:
    with gr.Row():
        gallery = gr.Gallery(label="Source and edit", columns=2, height=320, object_fit="contain",
                             buttons=["download", "fullscreen"], interactive=False, elem_id=f"{name}-gallery")
        maps = gr.Image(label="Cross-attention maps (per word, source row then edit row)", type="filepath",
                        interactive=False, height=320, elem_id=f"{name}-maps")
    files = gr.File(label="Download PNGs (parameters in the PNG metadata)", file_count="multiple", interactive=False,
                    elem_id=f"{name}-files")
    return gallery, maps, files


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
    if result.attention_maps is not None:
        picture = render_attention_maps(result.attention_maps, result.tokens, result.images)
        maps = str(save_png(picture, folder / f"{tag}-attention.png", dict(params, role="attention")))
        files.append(maps)
    return gallery, maps, files


def p2p_tab(ctx: DemoContext) -> None:
    """Prompt-to-prompt: change the prompt, keep the layout, with the attention maps beside the result."""
    with gr.Row():
        with gr.Column(scale=2):
            source = gr.Textbox(label="Source prompt", placeholder="e.g. a red circle in the center", max_lines=2,
                                elem_id="p2p-source")
            edit = edit_controls()
            run = gr.Button("Edit the prompt", variant="primary", elem_id="p2p-run")
            with gr.Accordion("Advanced options", open=False):
                steps_ = step_controls()
                opts = sampling_controls(ctx, num=False)
        with gr.Column(scale=3):
            gallery, maps, files = p2p_outputs("p2p")
    gr.Examples([["a large red circle in the center", "a large blue circle in the center", "replace", "circle", ""],
                 ["a red square on the left", "a red triangle on the left", "replace", "", ""],
                 ["a green circle on the right", "", "reweight", "", "green=2"]],
                [source, edit["target"], edit["mode"], edit["blend"], edit["weights"]],
                label="Examples (shapes world)")

    def p2p(source, target, mode, blend, weights, cross_steps, self_steps, blend_threshold, steps, guidance, seed,
            width, height, negative_prompt, progress=gr.Progress(track_tqdm=True)):
        from imageprompt.images import generators

        settings = check_edit(source, target, mode, weights, blend, cross_steps, self_steps, blend_threshold)
        sampling = check_sampling(ctx, steps=steps, guidance=guidance, seed=seed, width=width, height=height,
                                  negative_prompt=negative_prompt)
        params = parameters(ctx, "p2p", sampling, seed=sampling.seed, **settings)
        result = p2p_pipeline(ctx)(
            **settings, negative_prompt=sampling.negative_prompt, height=sampling.height, width=sampling.width,
            num_inference_steps=sampling.steps, guidance_scale=sampling.guidance,
            generator=generators(sampling.seed, 1),
        )
        return write_edit_results(ctx, result, params, f"p2p-{sampling.seed}")

    inputs = [source, edit["target"], edit["mode"], edit["blend"], edit["weights"], steps_["cross"], steps_["self"],
              steps_["threshold"], *opts.inputs]
    on_run(run, p2p, inputs, [gallery, maps, files], "p2p")


def real_edit_tab(ctx: DemoContext) -> None:
    """A real photo: invert it (null-text, negative-prompt or DDIM), then edit its description with prompt-to-prompt."""
    with gr.Row():
        with gr.Column(scale=2):
            image = image_input("Photo", elem_id="real-image")
            source = gr.Textbox(label="Describe the photo (source prompt)", max_lines=2,
                                placeholder="e.g. a large red circle in the center on a white background",
                                elem_id="real-source")
            edit = edit_controls()
            method = gr.Radio(["null-text", "negative-prompt", "ddim"], value="negative-prompt", label="Inversion",
                              info="null-text: most faithful, slowest · negative-prompt: fast · ddim: plain")
            run = gr.Button("Invert and edit", variant="primary", elem_id="real-run")
            with gr.Accordion("Advanced options", open=False):
                inner = gr.Slider(1, 20, value=10, step=1, label="Null-text inner steps")
                steps_ = step_controls()
                opts = sampling_controls(ctx, num=False, seed=False)
        with gr.Column(scale=3):
            gallery, maps, files = p2p_outputs("real")
    gr.Examples([[example_path("red-circle.png"), "a large red circle in the center on a white background",
                  "a large blue circle in the center on a white background"]],
                [image, source, edit["target"]], label="Examples (shapes world)")

    def real_edit(image, source, target, mode, blend, weights, method, inner_steps, cross_steps, self_steps,
                  blend_threshold, steps, guidance, width, height, negative_prompt,
                  progress=gr.Progress(track_tqdm=True)):
        from imageprompt.inversion import METHODS

        photo, about = read_image(ctx, image, "a photo")
        settings = check_edit(source, target, mode, weights, blend, cross_steps, self_steps, blend_threshold)
        if method not in METHODS:
            raise page_error(f"Inversion must be one of {', '.join(METHODS)}, got {method!r}")
        sampling = check_sampling(ctx, steps=steps, guidance=guidance, width=width, height=height,
                                  negative_prompt=negative_prompt)
        inner_steps = int(inner_steps)
        params = parameters(ctx, "p2p", sampling, invert=method, scheduler="ddim",
                            inner_steps=inner_steps if method == "null-text" else None, **settings, **about)
        pipe = p2p_pipeline(ctx, ddim=True)
        inversion = pipe.invert(photo, settings["source_prompt"], method, sampling.steps, sampling.guidance,
                                sampling.height, sampling.width, num_inner_steps=inner_steps)
        result = pipe(**settings, inversion=inversion, negative_prompt=sampling.negative_prompt,
                      height=sampling.height, width=sampling.width, num_inference_steps=sampling.steps,
                      guidance_scale=sampling.guidance)
        return write_edit_results(ctx, result, params, f"real-{method}")

    inputs = [image, source, edit["target"], edit["mode"], edit["blend"], edit["weights"], method, inner,
              steps_["cross"], steps_["self"], steps_["threshold"], *opts.inputs]
    on_run(run, real_edit, inputs, [gallery, maps, files], "real_edit")


def importable(*modules: str) -> Callable[[DemoContext], bool]:
    """A tab's availability test: every module it needs can be found."""

    def check(ctx: DemoContext) -> bool:
        try:
            return all(importlib.util.find_spec(name) is not None for name in modules)
        except ModuleNotFoundError:  # a parent package is missing
            return False

    return check


@dataclass
class Tab:
    title: str
    available: Callable[[DemoContext], bool]
    build: Callable[[DemoContext], None]


TABS: list[Tab] = [
    Tab("Variation", lambda ctx: True, variation_tab),
    Tab("Image + text", lambda ctx: True, edit_tab),
    Tab("IP-Adapter", lambda ctx: bool(ctx.adapters) and importable("imageprompt.ip_adapter")(ctx), ip_adapter_tab),
    Tab("Prompt-to-prompt", importable("imageprompt.p2p", "imageprompt.attention_maps",
                                       "imageprompt.pipelines.pipeline_p2p"), p2p_tab),
    Tab("Real-image edit", importable("imageprompt.p2p", "imageprompt.attention_maps", "imageprompt.inversion",
                                      "imageprompt.pipelines.pipeline_p2p"), real_edit_tab),
]


# ------------------------------------------------------------------- page
def bundled_notice(model_name: str) -> str | None:
    """The notice shown when the model is the project's bundled shapes-world model."""
    try:
        from imageprompt.checkpoints import BUNDLED_MODEL
    except ImportError:
        return None
    try:
        same = Path(model_name).expanduser().resolve() == Path(BUNDLED_MODEL).resolve()
    except (OSError, TypeError):
        return None
    if not same:
        return None
    return ("This is imageprompt's small bundled model of a world of simple shapes (coloured circles, squares "
            "and triangles on plain backgrounds), for trying the toolkit offline; start the demo with "
            "`--model` to use Stable Diffusion.")


def header(ctx: DemoContext) -> str:
    lines = ["# imageprompt", "Prompt Stable Diffusion with images.", "",
             f"**Model:** `{ctx.model_name}`" + (f" · **CLIP:** `{ctx.clip_name}`" if ctx.clip_name else "")]
    if ctx.notice:
        lines += ["", f"> **Note:** {ctx.notice}"]
    return "\n".join(lines)


def build_demo(
    pipe_or_loader,
    *,
    model_name: str | None = None,
    clip_name: str | None = None,
    notice: str | None = None,
    scheduler: str | None = None,
    output_dir: str | Path | None = None,
    max_side: int = MAX_SIDE,
    max_images: int = MAX_IMAGES,
    max_steps: int = MAX_STEPS,
    default_steps: int = 30,
    queue_size: int = QUEUE_SIZE,
    adapters: list | None = None,
    adapter_names: list[str] | None = None,
    tabs: list[Tab] | None = None,
) -> gr.Blocks:
    """The demo page for a loaded pipeline.

    Args:
        pipe_or_loader: a :class:`~imageprompt.pipelines.StableDiffusionImagePromptPipeline`, or a callable with no
            arguments returning one (called once, here, so loading errors surface before the page is served).
        model_name, clip_name: shown on the page (default: the pipeline's ``model_name`` / ``clip_name``).
        notice: shown under the model name (default: a note when the model is the bundled shapes model).
        scheduler: the scheduler's short name, recorded in each PNG.
        output_dir: where result PNGs are written (default: a new folder in the system temp dir).
        max_side: longer side inputs are downscaled to.
        queue_size: waiting jobs beyond the running one; more are refused.
        adapters, adapter_names: image adapters from :func:`load_adapters` and their names; with them the
            IP-Adapter tab is shown.
        tabs: the tabs to offer (default :data:`TABS`); those whose capability is missing are left out.
    """
    pipe = pipe_or_loader if hasattr(pipe_or_loader, "unet") else pipe_or_loader()
    model_name = model_name or getattr(pipe, "model_name", None) or "(unnamed model)"
    folder = Path(output_dir) if output_dir else Path(tempfile.mkdtemp(prefix="imageprompt-demo-"))
    folder.mkdir(parents=True, exist_ok=True)
    ctx = DemoContext(
        pipe=pipe, model_name=str(model_name), clip_name=clip_name or getattr(pipe, "clip_name", None),
        notice=notice or bundled_notice(str(model_name)), scheduler=scheduler, output_dir=folder,
        max_side=max_side, max_images=max_images, max_steps=max_steps, default_steps=min(default_steps, max_steps),
        adapters=list(adapters or []),
        adapter_names=list(adapter_names or [getattr(a, "name", type(a).__name__) for a in adapters or []]),
    )
    with gr.Blocks(title="imageprompt demo", delete_cache=(3600, 3600), analytics_enabled=False) as demo:
        gr.Markdown(header(ctx), elem_id="model-info")
        with gr.Tabs():
            for tab in tabs if tabs is not None else TABS:
                if tab.available(ctx):
                    with gr.Tab(tab.title):
                        tab.build(ctx)
    demo.queue(max_size=queue_size, default_concurrency_limit=1)
    demo.imageprompt_context = ctx  # for tests and embedding apps
    return demo


def serve(demo: gr.Blocks, host: str = "127.0.0.1", port: int | None = 7860, share: bool = False,
          max_file_size: str | int | None = MAX_FILE_SIZE, block: bool = True, quiet: bool = False):
    """Launch with the demo's limits (upload size, no extra allowed paths); ``block=False`` returns at once."""
    return demo.launch(server_name=host, server_port=port, share=share, max_file_size=max_file_size,
                       prevent_thread_lock=not block, quiet=quiet, show_error=False, footer_links=["api", "gradio"])


def launch(args) -> int:
    """``imageprompt demo``: load the model named on the command line and serve the page until interrupted."""
    from imageprompt.cli.common import load_pipeline_from_args
    from imageprompt.loading import resolve_model

    model, clip, notice = resolve_model(args.model, args.clip)
    args.model, args.clip = model, clip
    pipe = load_pipeline_from_args(args)
    specs = args.adapter or []
    adapters = load_adapters(pipe, specs, args.image_encoder) if specs else []
    demo = build_demo(pipe, notice=notice or bundled_notice(model), scheduler=args.scheduler,
                      queue_size=args.max_queue, adapters=adapters, adapter_names=specs)
    serve(demo, host=args.host, port=args.port, share=args.share, max_file_size=args.max_file_size)
    return 0
