"""``imageprompt tune domain|online``, and the ``--tuned`` / ``--online-steps`` options of ``vary`` and ``edit``.

Kept import-light: torch and the tuning code load only when a command runs.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import warnings
from pathlib import Path

from imageprompt.cli.common import (
    CommandError,
    add_model_options,
    load_pipeline_from_args,
    positive_float,
    positive_int,
    seed_number,
)
from imageprompt.images import IMAGE_SUFFIXES, read_jsonl

TRAIN_MAX_SIDE = 1024  # training crops to --resolution anyway; keep 100 images small in memory


# ------------------------------------------------------------ tune command
def register(subparsers) -> None:
    tune = subparsers.add_parser(
        "tune", help="SD-IPC tuning: domain (about 100 images) or online (the reference image)",
        description="Tune CLIP's vision tower with deep visual prompts (and optionally UNet LoRA) so SD-IPC's "
                    "closed-form conversion keeps more of the subject. Writes one .safetensors file for --tuned.")
    modes = tune.add_subparsers(dest="mode", metavar="MODE", required=True)

    domain = modes.add_parser("domain", help="tune on a folder or JSONL of images of one domain",
                              description="Domain tuning: a few hundred steps on about 100 images of one domain.")
    domain.add_argument("data", help="folder of images, or a .jsonl file with one {\"image\": PATH} per line "
                                     "(paths relative to the file)")
    _add_tune_options(domain, steps=300, lr=1e-3)
    domain.add_argument("--checkpoint-every", type=positive_int, default=100, metavar="N",
                        help="write OUT's .checkpoint.safetensors every N steps (default 100)")
    domain.add_argument("--resume", action="store_true", help="continue from that checkpoint if it exists")
    domain.set_defaults(func=run_tune)

    online = modes.add_parser("online", help="tune on the reference image(s) themselves",
                              description="Online tuning: about 30 iterations on the reference image(s).")
    online.add_argument("images", nargs="+", metavar="IMAGE", help="reference image(s)")
    _add_tune_options(online, steps=30, lr=2e-3)
    online.set_defaults(func=run_tune)


def _add_tune_options(parser, steps: int, lr: float) -> None:
    parser.add_argument("--out", required=True, metavar="FILE", help="output .safetensors file")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists (default: refuse)")
    group = parser.add_argument_group("tuning")
    group.add_argument("--steps", type=positive_int, default=steps, help=f"optimisation steps (default {steps})")
    group.add_argument("--lr", type=positive_float, default=lr, help=f"AdamW rate of the prompts (default {lr:g})")
    group.add_argument("--batch-size", type=positive_int, default=4, help="images per step (default 4)")
    group.add_argument("--tokens", type=positive_int, default=50, help="prompt tokens per layer (default 50)")
    group.add_argument("--lora-rank", type=int, default=0, metavar="R",
                       help="also tune LoRA of rank R on the UNet's cross-attention to_k/to_v (default 0: off)")
    group.add_argument("--lora-lr", type=positive_float, default=1e-4, help="AdamW rate of the LoRA (default 1e-4)")
    group.add_argument("--resolution", type=positive_int, help="training image side (default: the model's native)")
    group.add_argument("--seed", type=seed_number, default=0,
                       help="seed of the initialisation and every draw (default 0)")
    group.add_argument("--mixed-precision", choices=["auto", "no", "fp16", "bf16"], default="auto",
                       help="autocast dtype (default auto: the model's --dtype; fp16 adds a gradient scaler)")
    group.add_argument("--gradient-checkpointing", action="store_true",
                       help="recompute activations in the backward pass: less memory, about 30%% slower")
    add_model_options(parser)


def config_from_args(args):
    from imageprompt.tuning import TuningConfig

    config = TuningConfig(
        mode=args.mode, steps=args.steps, lr=args.lr, batch_size=args.batch_size, num_tokens=args.tokens,
        lora_rank=args.lora_rank, lora_lr=args.lora_lr, resolution=args.resolution, seed=args.seed,
        mixed_precision=args.mixed_precision, gradient_checkpointing=args.gradient_checkpointing,
    )
    config.check()
    return config


def domain_image_paths(data: str | Path) -> list[Path]:
    """The images of a domain: a folder's image files (sorted), or the paths listed in a JSONL file."""
    path = Path(data)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise CommandError(f"{path}: no image files ({', '.join(IMAGE_SUFFIXES)})")
        return files
    if not path.is_file():
        raise CommandError(f"{path}: no such folder or file")
    if path.suffix.lower() != ".jsonl":
        raise CommandError(f"{path}: give a folder of images or a .jsonl file")
    files = []
    try:
        lines = list(read_jsonl(path))
    except ValueError as err:
        raise CommandError(str(err)) from None
    for number, entry in lines:
        name = entry if isinstance(entry, str) else entry.get("image") if isinstance(entry, dict) else None
        if not isinstance(name, str):
            raise CommandError(f"{path}:{number}: expected {{\"image\": PATH}} or a path string")
        files.append(Path(name) if Path(name).is_absolute() else path.parent / name)
    if not files:
        raise CommandError(f"{path}: no images listed")
    return files


def load_images(paths: list[Path], max_side: int | None = None) -> tuple[list, str]:
    """Decode every image (errors name the file) and a digest of their bytes that identifies the data."""
    from imageprompt.images import load_image, sha256_file

    images, digest = [], hashlib.sha256()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # one resize notice per image is noise here
        for p in paths:
            images.append(load_image(p, max_side) if max_side else load_image(p))
            digest.update(sha256_file(p).encode())
    return images, digest.hexdigest()


def _output_path(text: str) -> Path:
    out = Path(text)
    if out.suffix != ".safetensors":
        raise CommandError(f"--out {text}: the tuning file must end in .safetensors")
    if out.is_dir():
        raise CommandError(f"--out {text}: is a folder")
    return out


def run_tune(args) -> int:
    from imageprompt.tuning import prepare_images, save_tuning, tune

    # 1. Check everything the user gave before loading any model
    config = config_from_args(args)
    out = _output_path(args.out)
    paths = domain_image_paths(args.data) if args.mode == "domain" else [Path(p) for p in args.images]
    images, data_id = load_images(paths, TRAIN_MAX_SIDE)
    checkpoint = out.with_name(out.name[: -len(".safetensors")] + ".checkpoint.safetensors")
    if out.exists() and not args.overwrite and not (args.mode == "domain" and args.resume):
        raise CommandError(f"--out {args.out}: exists; pass --overwrite to replace it, or choose another --out")
    if args.mode == "domain" and args.resume and not checkpoint.exists():
        print(f"imageprompt: no checkpoint at {checkpoint}; starting from step 0", file=sys.stderr)

    # 2. Model, data, tuning
    pipe = load_pipeline_from_args(args)
    data = prepare_images(pipe, images, config.resolution)
    domain = args.mode == "domain"
    output = tune(pipe, data, config, progress=True, checkpoint=checkpoint if domain else None,
                  checkpoint_every=args.checkpoint_every if domain else 0,
                  resume=domain and args.resume, data_id=data_id)

    # 3. The file (then the checkpoint is no longer needed)
    settings = dict(output.settings, images=len(images), data_sha256=data_id,
                    data=str(args.data) if domain else [p.name for p in paths])
    save_tuning(pipe, out, settings)
    if domain:
        checkpoint.unlink(missing_ok=True)
    print_loss_summary(config, output)
    print(out)
    return 0


def print_loss_summary(config, output) -> None:
    """One line on stderr: the training loss over the first and the last tenth of the steps."""
    losses = output.losses
    if losses:
        window = max(1, len(losses) // 10)
        first, last = sum(losses[:window]) / window, sum(losses[-window:]) / window
        print(f"imageprompt: {config.mode} tuning, steps {output.start_step + 1}-{config.steps}: "
              f"training loss {first:.4f} -> {last:.4f}", file=sys.stderr)


# ---------------------------------------------------- vary / edit options
def add_tuning_options(parser: argparse.ArgumentParser) -> None:
    """``--tuned FILE`` and ``--online-steps N`` for a command that generates from a reference image."""
    group = parser.add_argument_group("tuning (SD-IPC)")
    group.add_argument("--tuned", metavar="FILE", help="load a tuning file written by `imageprompt tune`")
    group.add_argument("--online-steps", type=positive_int, metavar="N",
                       help="first tune on the reference image for N iterations (about 30); "
                            "continues from --tuned when given")
    group.add_argument("--online-lr", type=positive_float, default=2e-3, help="AdamW rate of online tuning "
                                                                               "(default 2e-3)")


def check_tuning_options(args) -> None:
    """Fail on a missing or foreign file before any model loads (the CLIP check needs the model: later)."""
    if getattr(args, "tuned", None):
        from imageprompt.tuning import read_tuning_metadata

        read_tuning_metadata(args.tuned)


def apply_tuning_options(pipe, args, images, seed: int) -> dict:
    """Load ``--tuned`` and run ``--online-steps``; returns what the output images should record."""
    from imageprompt.images import sha256_file
    from imageprompt.tuning import TuningConfig, describe, load_tuning, tune_online, visual_prompts_of

    params = {}
    if (getattr(args, "tuned", None) or getattr(args, "online_steps", None)) and hasattr(pipe, "text_encoder_2"):
        raise CommandError("SD-IPC tuning (--tuned, --online-steps) is for SD 1.x models; it is not available on SDXL")
    if getattr(args, "tuned", None):
        settings = load_tuning(pipe, args.tuned)
        params["tuned"] = dict(describe(settings), file=Path(args.tuned).name, sha256=sha256_file(args.tuned))
    if getattr(args, "online_steps", None):
        loaded = visual_prompts_of(pipe)
        tokens = loaded.num_tokens if loaded is not None else 50
        config = TuningConfig.online(steps=args.online_steps, lr=args.online_lr, seed=seed, num_tokens=tokens)
        output = tune_online(pipe, images, config)
        print_loss_summary(config, output)
        params["online_tuning"] = describe(output.settings)
    return params
