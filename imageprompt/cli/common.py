"""What every ``imageprompt`` subcommand shares: options, errors, output writing.

Import-light (no torch at import time) so that ``imageprompt --help`` stays fast.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
import warnings
from pathlib import Path

EXIT_USAGE = 2
EXIT_FAILURE = 1
SEED_MAX = 2**64 - 1  # torch.Generator.manual_seed takes an unsigned 64-bit seed
STARTED = time.perf_counter()  # when the command line was imported: the start of a command's "s in all"


class CommandError(Exception):
    """A failure whose message is meant for the user as it is."""


def user_errors() -> tuple[type[BaseException], ...]:
    """Exception types whose message is shown as is, without a traceback."""
    from imageprompt.images import ImageInputError
    from imageprompt.loading import ModelLoadError

    # Not TypeError: from inside the library it is a bug, shown as "unexpected" with the --debug hint.
    return (CommandError, ImageInputError, ModelLoadError, ValueError, FileNotFoundError)


# ------------------------------------------------------------------ options
def _number(text: str, convert, ok, expected: str, must: str):
    """``convert(text)`` if it parses and ``ok`` holds, else argparse's error (exit 2, usage shown)."""
    try:
        value = convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"must be {must}, got {value}")
    return value


def positive_int(text: str) -> int:
    return _number(text, int, lambda v: v >= 1, "a positive integer", "at least 1")


def positive_float(text: str) -> float:
    return _number(text, float, lambda v: v > 0, "a positive number", "positive")


def fraction(text: str) -> float:
    return _number(text, float, lambda v: 0.0 <= v <= 1.0, "a number in [0, 1]", "in [0, 1]")


def seed_number(text: str) -> int:
    return _number(text, int, lambda v: 0 <= v <= SEED_MAX, "an integer seed", f"in 0..{SEED_MAX} (2**64-1)")


def finite_float(text: str) -> float:
    return _number(text, float, math.isfinite, "a number", "a finite number")


def port_number(text: str) -> int:
    return _number(text, int, lambda v: 1 <= v <= 65535, "a port number", "in 1..65535")


def add_model_options(parser: argparse.ArgumentParser) -> None:
    from imageprompt.schedulers import SCHEDULERS

    group = parser.add_argument_group("model")
    group.add_argument("--model", help="hub id, diffusers folder or .safetensors/.ckpt file "
                                       "(default: SD 1.5 if cached, else the bundled model)")
    group.add_argument("--clip", help="hub id or CLIPModel folder for the conversion "
                                      "(default: openai/clip-vit-large-patch14, or the bundled CLIP)")
    group.add_argument("--config", help="for a single-file --model: local diffusers folder with its configs")
    group.add_argument("--vae", help="a VAE replacing the model's (hub id, folder or single file), e.g. "
                                     "madebyollama/sdxl-vae-fp16-fix for SDXL in fp16")
    group.add_argument("--clip-2", help="SDXL: hub id or CLIPModel folder of OpenCLIP bigG for the conversion "
                                        "(default: laion/CLIP-ViT-bigG-14-laion2B-39B-b160k)")
    group.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], help="default: fp16 on GPU, fp32 on CPU")
    group.add_argument("--device", help="cuda, cuda:1, mps or cpu (default: the first available)")
    group.add_argument("--attention", choices=["sdpa", "xformers"], default="sdpa")
    group.add_argument("--scheduler", choices=sorted(SCHEDULERS), default="ddim")


def add_sampling_options(parser: argparse.ArgumentParser, num: bool = True) -> None:
    group = parser.add_argument_group("sampling")
    if num:
        group.add_argument("--num", type=positive_int, default=1, help="images per input (default 1)")
        group.add_argument("--batch-size", type=positive_int, default=4, help="images per forward pass")
    group.add_argument("--seed", type=seed_number,
                       help="seed of the first image; image i uses seed+i (default: random)")
    group.add_argument("--steps", type=positive_int, default=50, help="denoising steps (default 50)")
    group.add_argument("--guidance", type=finite_float, default=7.5,
                       help="classifier-free guidance scale (default 7.5)")
    group.add_argument("--negative-prompt", default=None)
    group.add_argument("--height", type=positive_int)
    group.add_argument("--width", type=positive_int)
    add_compile_option(group)
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace outputs whose names are taken (default: the new ones get a suffix _2, _3, ...)")


def add_compile_option(group) -> None:
    group.add_argument("--compile", action="store_true",
                       help="torch.compile the UNet and the VAE decoder (CUDA: mode reduce-overhead, CUDA graphs); "
                            "the first image pays the compile time")


def load_pipeline_from_args(args):
    import diffusers.utils.logging
    import transformers.utils.logging

    from imageprompt.pipelines.loading import load_pipeline
    from imageprompt.progress import LOADING, say

    # the sampling bar is the one the user wants to see; the loading bars are noise: one line says what loads
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    say(LOADING, args.model or "the default model")
    pipe = load_pipeline(model=args.model, clip=args.clip, dtype=args.dtype, device=args.device,
                         attention=args.attention, scheduler=args.scheduler, config=args.config,
                         vae=getattr(args, "vae", None), clip_2=getattr(args, "clip_2", None))
    if getattr(args, "compile", False):
        from imageprompt.jobs.sampling import apply_speed_options

        apply_speed_options(pipe, compile=True)
    return pipe


def warn_unknown_words(pipe, prompts) -> None:
    """Warn once per prompt whose words the bundled model does not know (:mod:`imageprompt.vocabulary`).

    ``prompts``: ``(option, text)`` pairs such as ``("--prompt", args.prompt)``.
    """
    from imageprompt.vocabulary import warn_unknown_words as warn

    warn(getattr(pipe, "model_name", None), prompts)


def warn_fitted(pipe, encoded=(), resized=(), size: tuple[int | None, int | None] = (None, None)) -> None:
    """A warning for each input that is cropped or resized on its way into the model.

    ``encoded``: ``(option, path, image)`` read by the image encoder (CLIP: the short side scaled, the centre
    cropped); ``resized``: photos resized to the output ``size`` (``(width, height)``, None: the model's) to
    be inverted.
    """
    from imageprompt.families import native_size
    from imageprompt.images import crop_notice, resize_notice

    native = native_size(pipe)
    target = (size[0] or native, size[1] or native)
    processor = getattr(pipe, "feature_extractor", None)
    notices = [crop_notice(_input_name(option, path), image.size, processor) for option, path, image in encoded]
    notices += [resize_notice(_input_name(option, path), image.size, target) for option, path, image in resized]
    for notice in dict.fromkeys(n for n in notices if n):
        warnings.warn(notice, UserWarning, stacklevel=2)


def _input_name(option: str, path) -> str:
    """``--image photo.png``, or ``photo.png`` for a positional input (``option`` empty)."""
    return " ".join(filter(None, (option, Path(path).name)))


def adapter_inputs(args) -> list[tuple]:
    """``(option, path, image)`` of each --adapter-image, for :func:`warn_fitted`."""
    return [("--adapter-image", path, image) for path, image in zip(args.adapter_image or [],
                                                                     getattr(args, "_adapter_images", []))]


def base_parameters(pipe, args, method: str) -> dict:
    """What any output records so it can be reproduced: :func:`imageprompt.images.generation_parameters`."""
    from imageprompt.images import generation_parameters

    return generation_parameters(pipe, method, model=args.model, clip=args.clip, scheduler=args.scheduler,
                                 steps=args.steps, guidance=args.guidance, negative_prompt=args.negative_prompt)


def check_out_dir(path: str) -> Path:
    """The output folder, checked before any model loads (it is created only when writing).

    Refused if it is an existing file, or if neither it nor (when it does not exist yet) its nearest
    existing parent can be written to.
    """
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise CommandError(f"--out {path}: exists and is not a folder")
    probe = out.absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise CommandError(f"--out {path}: {probe} is not a folder, so the output folder cannot be created")
    try:  # a real write: permissions, read-only file systems and root's rights all count
        fd, name = tempfile.mkstemp(dir=probe, prefix=".imageprompt-write-test-")
        os.close(fd)
        os.unlink(name)
    except OSError as err:
        what = "the folder is not writable" if probe == out.absolute() else \
            f"cannot create it: {probe} is not writable"
        raise CommandError(f"--out {path}: {what} ({err.strerror or type(err).__name__})") from None
    return out


def cap_prompt(text: str | None, option: str) -> str | None:
    """``text`` cut to :data:`~imageprompt.images.MAX_PROMPT_CHARS` characters, with one warning when it was longer.

    CLIP reads at most 77 tokens; tokenizing megabytes of text only costs time and memory.
    """
    from imageprompt.images import MAX_PROMPT_CHARS

    if text is None or len(text) <= MAX_PROMPT_CHARS:
        return text
    warnings.warn(f"{option} has {len(text)} characters; only the first {MAX_PROMPT_CHARS} are read "
                  "(the model reads at most 77 tokens)", UserWarning, stacklevel=2)
    return text[:MAX_PROMPT_CHARS]


def cap_prompt_options(args, *names: str) -> None:
    """Apply :func:`cap_prompt` to the options ``names`` (attribute names such as ``"negative_prompt"``) of ``args``."""
    for name in names:
        if getattr(args, name, None) is not None:
            setattr(args, name, cap_prompt(getattr(args, name), "--" + name.replace("_", "-")))


def free_names(out_dir: Path, names: list[str], overwrite: bool = False) -> list[str]:
    """``names``, or, when one of them is taken in ``out_dir`` (and not ``overwrite``), every one with the first
    suffix ``_2``, ``_3``, ... that frees them all: one run's outputs share their suffix."""
    if overwrite or not any((out_dir / name).exists() for name in names):
        return list(names)
    number = 2
    while True:
        numbered = [f"{Path(name).stem}_{number}{Path(name).suffix}" for name in names]
        if not any((out_dir / name).exists() for name in numbered):
            return numbered
        number += 1


def write_outputs(images, out_dir: Path, names: list[str], parameters: list[dict],
                  overwrite: bool = False) -> list[Path]:
    """Save each image as ``out_dir / name``; a file that appeared under that name meanwhile is never replaced
    unless ``overwrite`` (:func:`free_names` picks names that are free when the command starts)."""
    from imageprompt.images import save_png

    try:
        return [save_png(im, out_dir / name, params, replace=overwrite)
                for im, name, params in zip(images, names, parameters)]
    except FileExistsError as err:
        raise CommandError(f"{err.filename}: written by something else while this command ran; rerun, or pass "
                           "--overwrite to replace it") from None
