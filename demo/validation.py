"""Checking what a request sends, before any sampling: bad input becomes a readable ``gr.Error``.

Uploads (not an image, too many pixels), prompts, the "Advanced options" numbers (API callers skip the
sliders' own limits) and prompt-to-prompt settings. Messages quote user text, so they are HTML-escaped:
gradio renders alerts as HTML.
"""

from __future__ import annotations

import functools
import html
import logging
import math
import re
import warnings
from collections.abc import Callable
from pathlib import Path

import gradio as gr
from imageprompt.demo.context import DemoContext, Sampling
from imageprompt.demo.limits import MAX_INPUT_PIXELS, MAX_WORD_WEIGHT, SEED_MAX
from PIL import Image

from imageprompt.images import (
    MAX_PROMPT_CHARS,
    ImageInputError,
    crop_notice,
    load_image,
    resize_notice,
    sha256_file,
)


def escape(message: str) -> str:
    """Gradio renders alert messages as HTML; they quote user text (prompts, file names), so escape it."""
    return html.escape(message, quote=False)


logger = logging.getLogger("imageprompt.demo")
DEBUG = {"on": False}  # set by ``imageprompt demo --debug`` (:func:`set_debug`)


def set_debug(on: bool) -> None:
    """With ``on``, refused requests also print their traceback to the server log (``imageprompt demo --debug``)."""
    DEBUG["on"] = bool(on)


def page_error(message: str, log: bool = True) -> gr.Error:
    """A readable error in the page (``gr.Error``), with the message shown as text.

    A refused request is one line in the server log (``log``); its traceback only with :func:`set_debug`.
    """
    if log:
        logger.warning("request refused: %s", message.splitlines()[0][:300] if message else "")
    return gr.Error(escape(message), print_exception=DEBUG["on"])


# ----------------------------------------------------------------- images
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


def notify_fitted(ctx: DemoContext, image: Image.Image, about: dict, sampling: Sampling | None = None) -> None:
    """Say on the page how an input is cropped by the image encoder or, with ``sampling`` (a photo to invert),
    resized to the output size."""
    name = about.get("input", "the image")
    if sampling is None:
        notice = crop_notice(name, image.size, getattr(ctx.pipe, "feature_extractor", None))
    else:
        from imageprompt.families import native_size

        native = native_size(ctx.pipe)
        notice = resize_notice(name, image.size, (sampling.width or native, sampling.height or native),
                               keep="set Width and Height in its proportions to keep its shape")
    if notice:
        gr.Info(escape(notice))


# ----------------------------------------------------------------- numbers
def readable_number_errors(preprocess: Callable, label: str | None) -> Callable:
    """Wrap a ``gr.Slider``/``gr.Number`` ``preprocess`` so that an API caller's non-number (``steps='abc'``)
    or non-finite value is a readable ``gr.Error`` naming the control, not gradio's generic failure."""
    name = label or "A number"

    @functools.wraps(preprocess)
    def wrapper(payload):
        if payload is not None:
            try:
                value = float(payload)
            except (TypeError, ValueError, OverflowError):
                raise page_error(f"{name} must be a number, got {str(payload)[:40]!r}") from None
            if not math.isfinite(value):
                raise page_error(f"{name} must be a finite number, got {payload!r}")
            payload = value
        return preprocess(payload)

    return wrapper


def readable_numbers(blocks) -> None:
    """Apply :func:`readable_number_errors` to every slider and number box of ``blocks`` (a ``gr.Blocks``)."""
    for block in blocks.blocks.values():
        if isinstance(block, (gr.Slider, gr.Number)) and not hasattr(block.preprocess, "__wrapped__"):
            block.preprocess = readable_number_errors(block.preprocess, block.label)


def checked_number(name: str, value, cast, low, high):
    """``cast(value)`` if it is a number within ``[low, high]``, else a ``gr.Error`` naming ``name``."""
    try:
        number = cast(float(value)) if cast is int and isinstance(value, str) else cast(value)
    except (TypeError, ValueError, OverflowError):
        raise page_error(f"{name} must be a number, got {str(value)[:40]!r}") from None
    if isinstance(number, float) and not math.isfinite(number):
        raise page_error(f"{name} must be a finite number, got {value!r}")
    if not low <= number <= high:
        raise page_error(f"{name} must be between {low} and {high}, got {number}")
    return number


# ----------------------------------------------------------------- prompts
def cap_text(text: str | None, what: str) -> str | None:
    """``text`` cut to :data:`~imageprompt.images.MAX_PROMPT_CHARS` characters, with one warning in the page."""
    if text is None:
        return None
    text = str(text)
    if len(text) <= MAX_PROMPT_CHARS:
        return text
    gr.Warning(escape(f"{what[:1].upper()}{what[1:]} has {len(text)} characters; only the first "
                      f"{MAX_PROMPT_CHARS} are read (the model reads at most 77 tokens)."))
    return text[:MAX_PROMPT_CHARS]


def check_prompt(prompt: str | None, what: str = "a prompt") -> str:
    prompt = cap_text(prompt, what)
    if prompt is None or not prompt.strip():
        raise page_error(f"Write {what} first.")
    return prompt.strip()


def optional_prompt(prompt: str | None, what: str) -> str:
    """An optional text box's text, capped (:func:`cap_text`) and stripped; ``""`` when empty."""
    return (cap_text(prompt, what) or "").strip()


def check_words(ctx: DemoContext, prompts: list[tuple[str, str | None]]) -> None:
    """With the bundled model, a warning in the page for each prompt with words outside its vocabulary.

    ``prompts``: ``(what, text)`` pairs such as ``("the edit text", prompt)``. The words are split into letters
    the model never saw, so the user should know (:mod:`imageprompt.vocabulary`); the run goes on.
    """
    from imageprompt.vocabulary import unknown_words_message

    for what, text in prompts:
        message = unknown_words_message(ctx.model_name, text, what)
        if message:
            gr.Warning(escape(message))


def check_sampling(ctx: DemoContext, *, steps, guidance, width, height, negative_prompt, num_images=1,
                   seed=0) -> Sampling:
    """The accordion's values as numbers, or a ``gr.Error`` naming the one out of range (API callers skip the UI)."""

    number = checked_number
    low, high = ctx.size_range
    sampling = Sampling(
        num_images=number("Number of images", num_images, int, 1, ctx.max_images),
        steps=number("Steps", steps, int, 1, ctx.max_steps),
        guidance=number("Guidance", guidance, float, 0.0, 20.0),
        seed=number("Seed", seed if seed is not None else 0, int, 0, SEED_MAX),
        width=number("Width", width, int, low, high),
        height=number("Height", height, int, low, high),
        negative_prompt=optional_prompt(negative_prompt, "the negative prompt") or None,
    )
    factor = ctx.pipe.vae_scale_factor
    for name, value in (("Width", sampling.width), ("Height", sampling.height)):
        if value % factor:
            raise page_error(f"{name} must be a multiple of {factor}, got {value}")
    check_words(ctx, [("the negative prompt", sampling.negative_prompt)])
    return sampling


# --------------------------------------------------------- edit settings
def words(text: str | None) -> list[str]:
    """Words typed in a box, separated by spaces or commas."""
    return [w for w in re.split(r"[,\s]+", text or "") if w]


def check_edit(source: str, target: str | None, mode: str, weights_text: str | None, blend_text: str | None,
               cross_steps, self_steps, blend_threshold, exclude_text: str | None = None, blend_start=0.0) -> dict:
    """Prompt-to-prompt settings checked on the text alone, before any sampling (``gr.Error`` when they don't fit)."""
    from imageprompt.p2p import PromptToPromptSettings, parse_word_weights

    source = check_prompt(source, "the source prompt")
    try:
        weights = parse_word_weights(words(cap_text(weights_text, "the word weights")))
    except ValueError as err:  # "expects WORD=NUMBER, got 'dog'"
        raise page_error(f"Word weights: {err}") from None
    for word, weight in weights.items():
        if abs(weight) > MAX_WORD_WEIGHT:
            raise page_error(f"Word weights: {word}={weight:g} is too large; use weights between "
                             f"-{MAX_WORD_WEIGHT} and {MAX_WORD_WEIGHT}")
    blend = words(cap_text(blend_text, "the blend words")) or None
    target = None if mode == "reweight" else check_prompt(target, "the target prompt")
    settings = dict(mode=mode, weights=weights or None, blend_words=blend,
                    blend_threshold=checked_number("Blend threshold", blend_threshold, float, 0.0, 1.0),
                    cross_steps=checked_number("Cross-attention steps", cross_steps, float, 0.0, 1.0),
                    self_steps=checked_number("Self-attention steps", self_steps, float, 0.0, 1.0))
    exclude = words(cap_text(exclude_text, "the excluded blend words")) or None
    start = checked_number("Blend start", blend_start, float, 0.0, 1.0)
    if exclude or start:  # only then, so that earlier parameters stay as they were
        settings.update(blend_exclude=exclude, blend_start=start)
    target = PromptToPromptSettings(mode, weights or None, blend, settings["blend_threshold"], exclude, start,
                                    settings["cross_steps"], None, settings["self_steps"]).check(source, target)[0]
    return dict(source_prompt=source, target_prompt=None if mode == "reweight" else target, **settings)


def check_inversion(method: str) -> str:
    """One of :data:`imageprompt.inversion.METHODS` or ``"dpl"`` (:mod:`imageprompt.dpl`), or a ``gr.Error``."""
    from imageprompt.dpl import METHOD as DPL
    from imageprompt.inversion import METHODS

    if method not in (*METHODS, DPL):
        raise page_error(f"Inversion must be one of {', '.join((*METHODS, DPL))}, got {method!r}")
    return method


def check_dpl_words(method: str, text: str | None, source: str) -> list[str] | None:
    """The DPL nouns typed in a box: needed by ``dpl``, each in the source prompt; None for other inversions."""
    from imageprompt.p2p import prompt_words

    nouns = words(cap_text(text, "the DPL nouns"))
    if method != "dpl":
        return None
    if not nouns:
        raise page_error("DPL inversion needs the nouns of the source prompt whose tokens it learns "
                         "(e.g. circle square)")
    known = set(prompt_words(source))
    for noun in nouns:
        if noun.lower() not in known:
            raise page_error(f"DPL noun {noun!r} is not in the source prompt")
    return nouns
