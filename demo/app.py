"""The imageprompt web demo (Gradio): the page, serving it, and ``imageprompt demo``.

One page, one tab per capability that is installed: Variation and Image + text
(SD-IPC) always; IP-Adapter, Prompt-to-prompt and Real-image edit when their
modules import. The parts, one concern each:

- :mod:`imageprompt.demo.tabs`: the tabs, each a function ``(DemoContext) -> None`` listed in :data:`TABS`;
- :mod:`imageprompt.demo.components`: page parts the tabs share (upload, "Advanced options", result views);
- :mod:`imageprompt.demo.validation`: input checks that turn bad input into a readable ``gr.Error``;
- :mod:`imageprompt.demo.running`: one job at a time, failures shown in the page, sampling;
- :mod:`imageprompt.demo.context`: the :class:`DemoContext` (pipeline, adapters, sibling pipelines, outputs);
- :mod:`imageprompt.demo.limits`: the page's limits.

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

import logging
import tempfile
from pathlib import Path

import gradio as gr
from imageprompt.checkpoints import BUNDLED_IP_ADAPTER, BUNDLED_MODEL
from imageprompt.demo.context import DemoContext, load_adapters
from imageprompt.demo.limits import (
    EXAMPLES_DIR,
    MAX_FILE_SIZE,
    MAX_IMAGES,
    MAX_INPUT_PIXELS,
    MAX_SIDE,
    MAX_STEPS,
    QUEUE_SIZE,
)
from imageprompt.demo.tabs import TABS, Tab
from imageprompt.demo.validation import readable_numbers, set_debug

from imageprompt.progress import LOADING, SAMPLING, label, say

logger = logging.getLogger(__name__)

__all__ = [
    "EXAMPLES_DIR", "MAX_FILE_SIZE", "MAX_IMAGES", "MAX_INPUT_PIXELS", "MAX_STEPS", "QUEUE_SIZE", "TABS",
    "DemoContext", "Tab", "build_demo", "bundled_notice", "default_adapters", "launch", "load_adapters", "serve",
    "startup_message",
]


def bundled_notice(model_name: str) -> str | None:
    """The notice shown when the model is the project's bundled shapes-world model."""
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
    controlnet=None,
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
        controlnet: a ``ControlNetModel`` for this UNet: the tabs then take a control image.
    """
    pipe = pipe_or_loader if hasattr(pipe_or_loader, "components") else pipe_or_loader()  # a pipeline, or a loader
    label(pipe, SAMPLING)  # the page's progress says what runs (inverting, where a tab inverts a photo)
    model_name = model_name or getattr(pipe, "model_name", None) or "(unnamed model)"
    folder = Path(output_dir) if output_dir else Path(tempfile.mkdtemp(prefix="imageprompt-demo-"))
    folder.mkdir(parents=True, exist_ok=True)
    ctx = DemoContext(
        pipe=pipe, model_name=str(model_name), clip_name=clip_name or getattr(pipe, "clip_name", None),
        notice=notice or bundled_notice(str(model_name)), scheduler=scheduler, output_dir=folder,
        max_side=max_side, max_images=max_images, max_steps=max_steps, default_steps=min(default_steps, max_steps),
        adapters=list(adapters or []),
        adapter_names=list(adapter_names or [getattr(a, "name", type(a).__name__) for a in adapters or []]),
        controlnet=controlnet,
    )
    with gr.Blocks(title="imageprompt demo", delete_cache=(3600, 3600), analytics_enabled=False) as demo:
        gr.Markdown(header(ctx), elem_id="model-info")
        with gr.Tabs():
            for tab in tabs if tabs is not None else TABS:
                if tab.available(ctx):
                    with gr.Tab(tab.title):
                        tab.build(ctx)
    readable_numbers(demo)  # API callers may send steps='abc': a gr.Error naming the control
    demo.queue(max_size=queue_size, default_concurrency_limit=1)
    demo.imageprompt_context = ctx  # for tests and embedding apps
    return demo


def serve(demo: gr.Blocks, host: str = "127.0.0.1", port: int | None = 7860, share: bool = False,
          max_file_size: str | int | None = MAX_FILE_SIZE, block: bool = True, quiet: bool = False):
    """Launch with the demo's limits (upload size, no extra allowed paths); ``block=False`` returns at once."""
    return demo.launch(server_name=host, server_port=port, share=share, max_file_size=max_file_size,
                       prevent_thread_lock=not block, quiet=quiet, show_error=False, footer_links=["api", "gradio"])


def startup_message(local_url: str, share_url: str | None, share: bool) -> str:
    """What ``imageprompt demo`` prints once the page is served, in place of gradio's own lines.

    Gradio's hint ("set ``share=True`` in ``launch()``") is for its Python API; the command's switch is ``--share``.
    Gradio prints the public URL itself, and why a requested one could not be made.
    """
    lines = [f"* Running on local URL:  {local_url}"]
    if share_url:
        lines.append("* The public link is temporary (up to a week) and lets anyone who has it use this demo.")
    elif not share:
        lines.append("* To create a temporary public gradio.live link, start the demo with --share.")
    lines.append("* Press Ctrl+C to stop.")
    return "\n".join(lines)


def default_adapters(model: str) -> list[str]:
    """The adapters the demo loads when none are named: the bundled IP-Adapter with the bundled model, else none."""
    if Path(model).expanduser().resolve() == BUNDLED_MODEL.resolve() and BUNDLED_IP_ADAPTER.is_file():
        return [str(BUNDLED_IP_ADAPTER)]
    return []


def launch(*, model: str | None = None, clip: str | None = None, dtype: str | None = None, device: str | None = None,
           attention: str = "sdpa", scheduler: str | None = "ddim", config: str | None = None,
           vae: str | None = None, clip_2: str | None = None, adapters: list[str] | None = None,
           image_encoder: str | None = None, controlnet: str | None = None, host: str = "127.0.0.1",
           port: int | None = 7860, share: bool = False, max_queue: int = QUEUE_SIZE,
           max_file_size: str | int | None = MAX_FILE_SIZE, debug: bool = False, compile: bool = False) -> int:
    """``imageprompt demo``: load the model, serve the page and wait until interrupted.

    Arguments as :func:`imageprompt.loading.load_pipeline`, :func:`load_adapters` (``adapters``: specs like
    ``--adapter``; none: :func:`default_adapters`) and :func:`serve`. The model's notice (the bundled model is
    used, for instance) is logged to the terminal as well as shown on the page. ``compile``: torch.compile the
    UNet and the VAE decoder (:func:`imageprompt.jobs.sampling.apply_speed_options`; every tab shares them).
    """
    import diffusers.utils.logging
    import transformers.utils.logging
    from imageprompt.pipelines.loading import load_pipeline

    from imageprompt.loading import resolve_model

    set_debug(debug)  # refused requests: one log line each, the traceback only with --debug
    model, clip, notice = resolve_model(model, clip)
    say(LOADING, model)
    notice = notice or bundled_notice(model)
    if notice:
        logger.warning(notice)
    # the sampling bar is the one the page follows; the loading bars are noise
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    pipe = load_pipeline(model=model, clip=clip, dtype=dtype, device=device, attention=attention,
                         scheduler=scheduler, config=config, vae=vae, clip_2=clip_2)
    if compile:  # `--compile`: every tab's pipeline shares the compiled UNet (`from_pipe`)
        from imageprompt.jobs.sampling import apply_speed_options

        apply_speed_options(pipe, compile=True)
    specs = list(adapters or default_adapters(model))
    loaded = load_adapters(pipe, specs, image_encoder) if specs else []
    net = None
    if controlnet:
        from imageprompt.pipelines.toolbox import load_controlnets

        from imageprompt.toolbox import check_controlnet

        net = load_controlnets([controlnet], pipe.unet.dtype, pipe.unet.device)[0]
        check_controlnet(net, pipe.unet)
    demo = build_demo(pipe, notice=notice, scheduler=scheduler, queue_size=max_queue, adapters=loaded,
                      adapter_names=specs, controlnet=net)
    serve(demo, host=host, port=port, share=share, max_file_size=max_file_size, block=False, quiet=True)
    print(startup_message(demo.local_url, demo.share_url, share), flush=True)
    demo.block_thread()
    return 0
