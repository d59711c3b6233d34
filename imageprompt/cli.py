"""The ``imageprompt`` command line.

Each subcommand lives in a module that defines ``register(subparsers)``; this
file holds the shared options, the output writing and the error handling that
turns known failures into one line and a non-zero exit (``--debug`` shows the
traceback).
"""

from __future__ import annotations

import argparse
import importlib
import os
import random
import sys
import warnings
from pathlib import Path

EXIT_USAGE = 2
EXIT_FAILURE = 1

# Modules that add subcommands (each defines register(subparsers)); kept import-light.
COMMAND_MODULES = [
    "imageprompt.cli",  # vary, edit
    "imageprompt.bench",
    "imageprompt.cli_adapter",  # train-adapter
    "imageprompt.cli_p2p",  # p2p
    "imageprompt.cli_demo",
    "imageprompt.cli_batch",
    "imageprompt.cli_tune",  # tune domain|online
    "imageprompt.evaluate",  # eval --suite world
]


class CommandError(Exception):
    """A failure whose message is meant for the user as it is."""


def user_errors() -> tuple[type[BaseException], ...]:
    """Exception types whose message is shown as is, without a traceback."""
    from imageprompt.images import ImageInputError
    from imageprompt.loading import ModelLoadError

    return (CommandError, ImageInputError, ModelLoadError, ValueError, TypeError, FileNotFoundError)


# ------------------------------------------------------------------ options
def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {value}")
    return value


def add_model_options(parser: argparse.ArgumentParser) -> None:
    from imageprompt.loading import SCHEDULERS

    group = parser.add_argument_group("model")
    group.add_argument("--model", help="hub id, diffusers folder or .safetensors/.ckpt file "
                                       "(default: SD 1.5 if cached, else the bundled model)")
    group.add_argument("--clip", help="hub id or CLIPModel folder for the conversion "
                                      "(default: openai/clip-vit-large-patch14, or the bundled CLIP)")
    group.add_argument("--config", help="for a single-file --model: local diffusers folder with its configs")
    group.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], help="default: fp16 on GPU, fp32 on CPU")
    group.add_argument("--device", help="cuda, cuda:1, mps or cpu (default: the first available)")
    group.add_argument("--attention", choices=["sdpa", "xformers"], default="sdpa")
    group.add_argument("--scheduler", choices=sorted(SCHEDULERS), default="ddim")


def add_sampling_options(parser: argparse.ArgumentParser, num: bool = True) -> None:
    group = parser.add_argument_group("sampling")
    if num:
        group.add_argument("--num", type=positive_int, default=1, help="images per input (default 1)")
        group.add_argument("--batch-size", type=positive_int, default=4, help="images per forward pass")
    group.add_argument("--seed", type=int, help="seed of the first image; image i uses seed+i (default: random)")
    group.add_argument("--steps", type=positive_int, default=50)
    group.add_argument("--guidance", type=float, default=7.5)
    group.add_argument("--negative-prompt", default=None)
    group.add_argument("--height", type=positive_int)
    group.add_argument("--width", type=positive_int)
    parser.add_argument("--out", required=True, help="output folder")


def load_pipeline_from_args(args):
    import diffusers.utils.logging
    import transformers.utils.logging

    from imageprompt.loading import load_pipeline

    # the sampling bar is the one the user wants to see; the loading bars are noise
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    return load_pipeline(model=args.model, clip=args.clip, dtype=args.dtype, device=args.device,
                         attention=args.attention, scheduler=args.scheduler, config=args.config)


def base_parameters(pipe, args, method: str) -> dict:
    """What any output records so it can be reproduced."""
    import imageprompt

    return {
        "method": method,
        "model": getattr(pipe, "model_name", args.model),
        "clip": getattr(pipe, "clip_name", args.clip),
        "scheduler": args.scheduler,
        "steps": args.steps,
        "guidance": args.guidance,
        "negative_prompt": args.negative_prompt,
        "dtype": str(pipe.unet.dtype).replace("torch.", ""),
        "imageprompt": imageprompt.__version__,
    }


def generators(seed: int, count: int):
    """One CPU generator per image, so image i is reproducible alone from seed+i on any device."""
    import torch

    return [torch.Generator("cpu").manual_seed(seed + i) for i in range(count)]


def check_out_dir(path: str) -> Path:
    """The output folder; refused early if it is an existing file (it is created only when writing)."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise CommandError(f"--out {path}: exists and is not a folder")
    return out


def write_outputs(images, out_dir: Path, names: list[str], parameters: list[dict]) -> list[Path]:
    from imageprompt.images import save_png

    return [save_png(im, out_dir / name, params) for im, name, params in zip(images, names, parameters)]


# -------------------------------------------------------------- vary / edit
def register(subparsers) -> None:
    from imageprompt.cli_adapter import add_adapter_options
    from imageprompt.cli_tune import add_tuning_options

    vary = subparsers.add_parser("vary", help="variations of an image (SD-IPC)",
                                 description="Image variation by SD-IPC's closed-form image-to-prompt conversion.")
    vary.add_argument("image", help="reference image")
    add_sampling_options(vary)
    add_model_options(vary)
    add_tuning_options(vary)
    add_adapter_options(vary)
    vary.set_defaults(func=run_sdipc, method="sdipc-variation")

    edit = subparsers.add_parser("edit", help="edit an image with text (SD-IPC)",
                                 description="Image + text editing: the converted image prompt blended with text.")
    edit.add_argument("image", help="reference image")
    edit.add_argument("--prompt", required=True, help="the edit text, e.g. 'on the beach'")
    edit.add_argument("--alpha", type=float, default=0.5, help="weight of the text at positions EOS..76 (0.5-0.6)")
    add_sampling_options(edit)
    add_model_options(edit)
    add_tuning_options(edit)
    add_adapter_options(edit)
    edit.set_defaults(func=run_sdipc, method="sdipc-edit")


def run_sdipc(args) -> int:
    from imageprompt.cli_adapter import apply_adapter_options, check_adapter_options
    from imageprompt.cli_tune import apply_tuning_options, check_tuning_options
    from imageprompt.images import load_image, sha256_file

    if args.method == "sdipc-edit" and not args.prompt.strip():
        raise CommandError("--prompt is empty")
    out_dir = check_out_dir(args.out)
    image = load_image(args.image)  # validate input before loading any model
    digest = sha256_file(args.image)
    seed = args.seed if args.seed is not None else random.randrange(2**31)
    check_tuning_options(args)
    check_adapter_options(args)
    pipe = load_pipeline_from_args(args)
    prompt = getattr(args, "prompt", None)
    alpha = getattr(args, "alpha", None)
    params = base_parameters(pipe, args, args.method)
    params.update(prompt=prompt, alpha=alpha, input=Path(args.image).name, input_sha256=digest)
    params.update(apply_tuning_options(pipe, args, [image], seed))
    adapter = apply_adapter_options(pipe, args, image)
    params.update(adapter["parameters"])

    stem = Path(args.image).stem
    kind = "vary" if args.method == "sdipc-variation" else "edit"
    done = []
    for start in range(0, args.num, args.batch_size):
        count = min(args.batch_size, args.num - start)
        call = dict(image=image, prompt=prompt, alpha=alpha if alpha is not None else 0.5,
                    negative_prompt=args.negative_prompt, num_inference_steps=args.steps,
                    guidance_scale=args.guidance, num_images_per_prompt=count, height=args.height,
                    width=args.width, generator=generators(seed + start, count))
        result = pipe(**{**call, **adapter["pipeline"]})
        seeds = [seed + start + i for i in range(count)]
        metas = [dict(params, seed=s, width=im.size[0], height=im.size[1]) for s, im in zip(seeds, result.images)]
        names = [f"{stem}-{kind}-{s}.png" for s in seeds]
        done += write_outputs(result.images, out_dir, names, metas)
    for path in done:
        print(path)
    return 0


# ----------------------------------------------------------------- entry
def build_parser() -> argparse.ArgumentParser:
    import imageprompt

    parser = argparse.ArgumentParser(prog="imageprompt", description="Prompt Stable Diffusion with images.")
    parser.add_argument("--version", action="version", version=f"imageprompt {imageprompt.__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def _one_line_warnings(message, category, filename, lineno, file=None, line=None):
    print(f"imageprompt: warning: {message}", file=sys.stderr)


def _quiet_libraries() -> None:
    """Keep library chatter (load bars, deprecation notes) out of the user's terminal."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    warnings.simplefilter("ignore", FutureWarning)
    warnings.simplefilter("ignore", DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
    warnings.showwarning = _one_line_warnings
    import logging

    for name in ("huggingface_hub", "httpx", "urllib3"):
        logging.getLogger(name).setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    _quiet_libraries()
    import logging

    logging.basicConfig(format="imageprompt: %(message)s", level=logging.WARNING)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("imageprompt: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if args.debug:
            raise
        if isinstance(err, user_errors()):
            print(f"imageprompt: error: {err}", file=sys.stderr)
            return EXIT_FAILURE
        print(f"imageprompt: error: unexpected {type(err).__name__}: {err} (rerun with --debug for details)",
              file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
