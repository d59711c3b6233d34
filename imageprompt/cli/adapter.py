"""Command line for image adapters: ``--adapter`` on ``vary``/``edit``, and ``imageprompt train-adapter``.

Kept import-light (no torch at import time) so ``imageprompt --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

SDIPC_ADAPTER = "sdipc"  # --adapter sdipc: the training-free branch (no weights)


def adapter_scale(text: str):
    """A number, or an InstantStyle JSON dict such as '{"up": {"block_0": [0.0, 1.0, 0.0]}}'."""
    try:
        return float(text)
    except ValueError:
        pass
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a number or a JSON dict of per-block scales, got {text!r}")
    return value


def step_window(text: str) -> tuple[float, float]:
    """``BEGIN-END``: fractions of the sampling steps, ``0 <= BEGIN < END <= 1`` (e.g. ``0.5-1``)."""
    begin, sep, end = text.partition("-")
    try:
        window = (float(begin), float(end)) if sep else None
    except ValueError:
        window = None
    if window is None:
        raise argparse.ArgumentTypeError(f"expected BEGIN-END fractions of the steps such as 0.5-1, got {text!r}")
    if not 0.0 <= window[0] < window[1] <= 1.0:
        raise argparse.ArgumentTypeError(f"needs 0 <= BEGIN < END <= 1, got {text!r}")
    return window


def add_adapter_options(parser: argparse.ArgumentParser,
                        reference: str = "extra reference image for the adapters (repeatable)") -> None:
    group = parser.add_argument_group("image adapter (IP-Adapter decoupled cross-attention)")
    group.add_argument("--adapter", action="append", metavar="PATH_OR_ID[:WEIGHT_NAME]",
                       help="IP-Adapter weights: a .safetensors/.bin file, HUB_ID:path/in/repo, a short name "
                            "(sd15, sd15_light, plus, plus-face, full-face, sdxl: from h94/IP-Adapter), or 'sdipc' for "
                            "the training-free SD-IPC branch; repeat for several adapters")
    group.add_argument("--scale", action="append", type=adapter_scale, metavar="S",
                       help="adapter scale: a number or a JSON per-block dict (InstantStyle); one for all adapters "
                            "or one per --adapter (default 1.0)")
    group.add_argument("--adapter-image", action="append", default=[], metavar="IMAGE",
                       help=reference)
    group.add_argument("--negative-adapter-image", metavar="IMAGE",
                       help="negative image prompt (default: zeros / a zero image, as IP-Adapter does)")
    group.add_argument("--image-encoder", metavar="PATH",
                       help="CLIP vision folder of the adapter (default: image_encoder next to the weights; for the "
                            "bundled checkpoints/shapes-ip-adapter.safetensors, the bundled CLIP)")
    group.add_argument("--adapter-window", action="append", type=step_window, metavar="BEGIN-END",
                       help="apply the adapter only between these fractions of the sampling steps, e.g. 0.5-1; one "
                            "for all adapters or one per --adapter (default 0-1)")
    group.add_argument("--adapter-combine", metavar="MODE",
                       help="how several reference images of an adapter combine: concat (default: all their tokens), "
                            "add, subtract (first minus the mean of the others), average, norm-average")
    group.add_argument("--adapter-subtract-text", metavar="WORDS",
                       help="InstantStyle content subtraction: subtract the CLIP text embedding of these content words "
                            "from the image embedding (sd15-format adapters), keeping the style")
    group.add_argument("--adapter-subtract-scale", type=float, default=1.0, metavar="S",
                       help="weight of the subtracted text embedding (default 1.0)")
    group.add_argument("--adapter-text-encoder", metavar="PATH",
                       help="CLIP folder (CLIPModel or CLIPTextModelWithProjection, with its tokenizer) of the "
                            "adapter's image encoder, for --adapter-subtract-text (default: the pipeline's CLIP, "
                            "when it is the adapter's image encoder, as for the bundled adapter)")
    group.add_argument("--save-embeds", metavar="FILE.safetensors",
                       help="save the adapters' image embeddings (after combining/subtracting) for reuse")
    group.add_argument("--embeds", metavar="FILE.safetensors",
                       help="use image embeddings saved with --save-embeds instead of encoding reference images")


def check_adapter_options(args) -> None:
    """Validate adapter options and read the weights (refusing unsafe files) before any model loads."""
    from imageprompt.adapter_files import parse_adapter_spec, read_checkpoint, resolve_weight_file
    from imageprompt.cli.common import CommandError
    from imageprompt.images import load_image, sha256_file

    specs = getattr(args, "adapter", None) or []
    if not specs:
        used = [o for o, v in (("--scale", args.scale), ("--adapter-image", args.adapter_image),
                               ("--negative-adapter-image", args.negative_adapter_image),
                               ("--image-encoder", args.image_encoder), ("--adapter-window", args.adapter_window),
                               ("--adapter-combine", args.adapter_combine),
                               ("--adapter-subtract-text", args.adapter_subtract_text),
                               ("--adapter-text-encoder", args.adapter_text_encoder),
                               ("--save-embeds", args.save_embeds), ("--embeds", args.embeds)) if v]
        if used:
            raise CommandError(f"{', '.join(used)} need --adapter")
        return
    check_embedding_options(args, len(specs))
    scales = args.scale or [1.0]
    if len(scales) not in (1, len(specs)):
        raise CommandError(f"{len(scales)} --scale values for {len(specs)} adapters: give one, or one per adapter")
    if specs.count(SDIPC_ADAPTER) > 1:
        raise CommandError("--adapter sdipc given twice")
    if args.image_encoder and not Path(args.image_encoder).expanduser().is_dir():
        raise CommandError(f"--image-encoder {args.image_encoder}: no such folder")
    resolved = []
    for spec in specs:
        if spec == SDIPC_ADAPTER:
            resolved.append(None)
            continue
        source, weight = parse_adapter_spec(spec)
        weight_file, where = resolve_weight_file(source, weight)
        resolved.append((source, weight, weight_file, read_checkpoint(weight_file)))
    args._adapters = resolved
    args._adapter_scales = scales * len(specs) if len(scales) == 1 else scales
    args._adapter_images = [load_image(p) for p in args.adapter_image]
    args._adapter_digests = [sha256_file(p) for p in args.adapter_image]
    args._negative_adapter_image = load_image(args.negative_adapter_image) if args.negative_adapter_image else None


def check_embedding_options(args, count: int) -> None:
    """Step windows, embedding arithmetic and embedding files, checked before any model loads."""
    import math

    from imageprompt.cli.common import CommandError

    windows = args.adapter_window or []
    if len(windows) not in (0, 1, count):
        raise CommandError(f"{len(windows)} --adapter-window values for {count} adapters: give one, or one per adapter")
    args._adapter_windows = (windows * count if len(windows) == 1 else list(windows)) or None
    if args.adapter_combine is not None:
        from imageprompt.image_embeds import COMBINE_MODES

        if args.adapter_combine not in COMBINE_MODES:
            raise CommandError(f"--adapter-combine must be one of {', '.join(COMBINE_MODES)}, "
                               f"got {args.adapter_combine!r}")
    if args.adapter_subtract_text is not None and not args.adapter_subtract_text.strip():
        raise CommandError("--adapter-subtract-text is empty")
    if not math.isfinite(args.adapter_subtract_scale):
        raise CommandError(f"--adapter-subtract-scale must be a finite number, got {args.adapter_subtract_scale}")
    if args.adapter_text_encoder and not args.adapter_subtract_text:
        raise CommandError("--adapter-text-encoder is for --adapter-subtract-text")
    if args.adapter_text_encoder and not Path(args.adapter_text_encoder).expanduser().is_dir():
        raise CommandError(f"--adapter-text-encoder {args.adapter_text_encoder}: no such folder")
    if args.save_embeds and Path(args.save_embeds).suffix != ".safetensors":
        raise CommandError(f"--save-embeds {args.save_embeds}: must end in .safetensors")
    if args.embeds:
        clash = [o for o, v in (("--adapter-image", args.adapter_image), ("--adapter-combine", args.adapter_combine),
                                ("--adapter-subtract-text", args.adapter_subtract_text),
                                ("--negative-adapter-image", args.negative_adapter_image),
                                ("--save-embeds", args.save_embeds)) if v]
        if clash:
            raise CommandError(f"--embeds replaces the image prompts; leave out {', '.join(clash)}")
        from imageprompt.image_embeds import load_image_embeds

        load_image_embeds(args.embeds)  # a missing or foreign file fails here, before the model loads


def apply_adapter_options(pipe, args, image=None) -> dict:
    """Load the adapters into ``pipe``; returns ``{"pipeline": extra __call__ kwargs, "parameters": metadata}``.

    With adapters the reference image(s) go to the decoupled branch; the text
    branch reads the empty prompt (``vary``) or ``--prompt`` (``edit``).
    """
    if not getattr(args, "_adapters", None):
        return {"pipeline": {}, "parameters": {}}
    from imageprompt.cli.common import CommandError
    from imageprompt.families import is_sd3_pipeline

    if is_sd3_pipeline(pipe):
        raise CommandError("--adapter runs on UNet models; on SD3 load the SD3.5 IP-Adapter in Python (docs/sd3.md)")
    from imageprompt.adapter_files import bundled_image_encoder
    from imageprompt.ip_adapter import install_adapters
    from imageprompt.sdipc_branch import SDIPCBranch

    pipe.unload_ip_adapter()
    files = [a for a in args._adapters if a is not None]
    if files:  # one call, so several adapters load together (as in diffusers)
        pipe.load_ip_adapter([source for source, *_ in files], weight_name=[weight for _, weight, *_ in files],
                             image_encoder=args.image_encoder)
    order = list(args._adapters)
    if None in order:  # the SD-IPC branch sits where it was named
        adapters = list(pipe.image_adapters)
        adapters.insert(order.index(None), SDIPCBranch())
        install_adapters(pipe.unet, adapters)
    pipe.set_ip_adapter_scale(list(args._adapter_scales))
    if args._adapter_windows:
        pipe.set_ip_adapter_window(list(args._adapter_windows))

    references = ([image] if image is not None else []) + list(args._adapter_images)
    per_adapter = references if len(order) == 1 else [references] * len(order)
    negatives = None
    if args._negative_adapter_image is not None:
        negatives = [args._negative_adapter_image] if len(order) == 1 else [[args._negative_adapter_image]] * len(order)
    extra = {"image": None, "ip_adapter_image": per_adapter, "negative_ip_adapter_image": negatives}
    if args.embeds or args.save_embeds or args.adapter_combine or args.adapter_subtract_text:
        extra = {"image": None, "ip_adapter_image_embeds": _image_embeds(pipe, args, per_adapter, negatives)}
    if getattr(args, "prompt", None) is None:
        extra["prompt"] = ""
    parameters = {
        "method": args.method.replace("sdipc", "ip-adapter"),
        "alpha": None,
        "adapters": list(args.adapter),
        "adapter_scales": list(args._adapter_scales),
        "adapter_images": [Path(p).name for p in args.adapter_image],
        "adapter_images_sha256": list(args._adapter_digests),
        "negative_adapter_image": Path(args.negative_adapter_image).name if args.negative_adapter_image else None,
        # without --image-encoder the bundled adapter uses the bundled CLIP (adapter_files.find_image_encoder)
        "image_encoder": args.image_encoder or next(
            (str(found) for found in (bundled_image_encoder(f) for _, _, f, _ in files) if found), None),
    }
    parameters.update({k: v for k, v in (
        ("adapter_windows", [list(w) for w in args._adapter_windows or []]), ("adapter_combine", args.adapter_combine),
        ("adapter_subtract_text", args.adapter_subtract_text),
        ("adapter_subtract_scale", args.adapter_subtract_scale if args.adapter_subtract_text else None),
        ("adapter_embeds", Path(args.embeds).name if args.embeds else None),
        ("adapter_embeds_sha256", args._embeds_sha256 if args.embeds else None)) if v})
    return {"pipeline": extra, "parameters": parameters}


def _image_embeds(pipe, args, per_adapter, negatives) -> list:
    """``ip_adapter_image_embeds`` from --embeds, or encoded with --adapter-combine / --adapter-subtract-text
    (and saved with --save-embeds)."""
    from imageprompt.cli.common import CommandError
    from imageprompt.images import sha256_file

    guidance = args.guidance > 1.0
    if args.embeds:
        args._embeds_sha256 = sha256_file(args.embeds)
        return pipe.load_ip_adapter_image_embeds(args.embeds, guidance)
    texts = None
    if args.adapter_subtract_text:
        kinds = [a.kind for a in pipe.image_adapters]
        if "sd15" not in kinds:
            raise CommandError("--adapter-subtract-text needs an sd15-format adapter (it subtracts in CLIP's "
                               f"projected image space); loaded: {', '.join(kinds)}")
        texts = [args.adapter_subtract_text if kind == "sd15" else None for kind in kinds]
    text_encoder = tokenizer = None
    if args.adapter_text_encoder:
        from transformers import AutoConfig, CLIPTextModelWithProjection, CLIPTokenizer

        config = AutoConfig.from_pretrained(args.adapter_text_encoder)
        if config.model_type == "clip":  # a whole CLIPModel: its text tower and text_projection only
            text_config = config.text_config
            text_config.projection_dim = config.projection_dim
            text_encoder = CLIPTextModelWithProjection.from_pretrained(args.adapter_text_encoder, config=text_config)
        else:
            text_encoder = CLIPTextModelWithProjection.from_pretrained(args.adapter_text_encoder)
        text_encoder = text_encoder.to(pipe._execution_device).eval()
        tokenizer = CLIPTokenizer.from_pretrained(args.adapter_text_encoder)
    embeds = pipe.encode_ip_adapter_image(per_adapter, combine=args.adapter_combine or "concat",
                                          content_text=texts,
                                          content_scale=args.adapter_subtract_scale,
                                          negative_ip_adapter_image=negatives, do_classifier_free_guidance=guidance,
                                          text_encoder=text_encoder, tokenizer=tokenizer)
    if args.save_embeds:
        pipe.save_ip_adapter_image_embeds(args.save_embeds, embeds, guidance, extra={
            "combine": args.adapter_combine or "concat", "subtract_text": args.adapter_subtract_text,
            "subtract_scale": args.adapter_subtract_scale})
    return embeds


# ------------------------------------------------------------ train-adapter
def register(subparsers) -> None:
    from imageprompt.cli.common import add_model_options, positive_int, seed_number

    parser = subparsers.add_parser(
        "train-adapter", help="train an IP-Adapter on image-caption pairs",
        description="Train an IP-Adapter (sd15 format) with the paper's recipe; runs under `accelerate launch -m "
                    "imageprompt train-adapter ...` on several GPUs. Saves the official format.")
    parser.add_argument("data", help="folder of images with same-name .txt captions, or a .jsonl of "
                                     '{"image": path, "caption": text}')
    parser.add_argument("--out", required=True, help="output weights, .safetensors or .bin")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace --out if it exists (default: refuse, unless --resume continues its run)")
    parser.add_argument("--steps", type=positive_int, default=1000, help="optimiser steps (default 1000)")
    parser.add_argument("--batch-size", type=positive_int, default=4, help="per process")
    parser.add_argument("--resolution", type=positive_int,
                        help="side of the square training crops (default: the model's own size, e.g. 512 for "
                             "SD 1.5, 64 for the bundled model)")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--gradient-accumulation", type=positive_int, default=1)
    parser.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="no")
    parser.add_argument("--checkpoint-every", type=int, default=500, help="steps between checkpoints (0: none)")
    parser.add_argument("--resume", help="'latest' or a checkpoint folder (OUT-checkpoints/step-N)")
    parser.add_argument("--seed", type=seed_number, default=0)
    parser.add_argument("--image-encoder", metavar="PATH",
                        help="CLIP vision folder (default: the --clip model's vision tower, saved as image_encoder/ "
                             "next to --out, or as OUT-image_encoder/ when --out is in the current folder)")
    add_model_options(parser)
    parser.set_defaults(func=run_train)


def run_train(args) -> int:
    from imageprompt.cli.common import CommandError, load_pipeline_from_args
    from imageprompt.train_adapter import checkpoint_dir, latest_checkpoint, read_pairs, train

    out = Path(args.out)
    if out.suffix not in (".safetensors", ".bin"):
        raise CommandError(f"--out {args.out}: must end in .safetensors or .bin")
    if out.is_dir():
        raise CommandError(f"--out {args.out}: is a folder")
    if out.exists() and not args.overwrite and not args.resume:
        raise CommandError(f"--out {args.out}: exists; pass --overwrite to replace it, or choose another --out")
    pairs = read_pairs(args.data)
    if args.resume and args.resume != "latest" and not Path(args.resume, "state.json").exists():
        raise CommandError(f"--resume {args.resume}: not a checkpoint folder")
    if args.resume == "latest" and latest_checkpoint(out) is None:
        raise CommandError(f"--resume latest: no checkpoints in {checkpoint_dir(out)}")
    if args.image_encoder and not Path(args.image_encoder).is_dir():
        raise CommandError(f"--image-encoder {args.image_encoder}: no such folder")
    args.device, args.dtype = "cpu", "fp32"  # accelerate places the models; trained weights stay fp32
    pipe = load_pipeline_from_args(args)
    pipe.set_progress_bar_config(disable=True)
    encoder = processor = None
    if args.image_encoder:
        from imageprompt.adapter_files import load_image_encoder

        encoder, processor = load_image_encoder(args.image_encoder)
    resolution = args.resolution or native_resolution(pipe)
    result = train(pipe, pairs, out, steps=args.steps, batch_size=args.batch_size, resolution=resolution,
                   learning_rate=args.lr, weight_decay=args.weight_decay, checkpoint_every=args.checkpoint_every,
                   resume=args.resume, seed=args.seed, mixed_precision=args.mixed_precision,
                   gradient_accumulation_steps=args.gradient_accumulation, image_encoder=encoder,
                   feature_extractor=processor)
    from accelerate import PartialState

    if PartialState().is_main_process:
        if encoder is None:  # so the file loads as is, here and in diffusers
            encoder_dir = encoder_folder(out)
            if not encoder_dir.exists():
                pipe.sdipc_image_encoder.save_pretrained(encoder_dir, safe_serialization=True)
                pipe.feature_extractor.save_pretrained(encoder_dir)
            print(f"image encoder: {encoder_dir}", file=sys.stderr)
        losses = result["losses"]
        if losses:
            print(f"step {result['step']}: loss {losses[-1]:.4f} (first {losses[0]:.4f}), {resolution}x{resolution} "
                  "crops")
        print(out)
    return 0


def native_resolution(pipe) -> int:
    """The model's own image side: the UNet's sample size times the VAE's scale factor (512 for SD 1.5)."""
    return int(pipe.unet.config.sample_size * pipe.vae_scale_factor)


def encoder_folder(out: Path) -> Path:
    """Where ``train-adapter`` saves the image encoder of ``out``: ``image_encoder/`` beside it, as diffusers and
    :func:`imageprompt.adapter_files.find_image_encoder` look for it, unless that is the current folder; then
    ``OUT-image_encoder/`` (found there too), so a generic ``image_encoder/`` never lands where the command ran."""
    if out.parent.resolve() == Path.cwd().resolve():
        return out.with_name(f"{out.stem}-image_encoder")
    return out.parent / "image_encoder"
