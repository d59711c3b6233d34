"""``imageprompt p2p``: prompt-to-prompt editing of a generated image or a real photo."""

from __future__ import annotations

import argparse
import math
import random
from pathlib import Path

from imageprompt import DEFAULT_INVERSION
from imageprompt.cli.adapter import add_adapter_options, apply_adapter_options, check_adapter_options
from imageprompt.cli.common import (
    CommandError,
    adapter_inputs,
    add_model_options,
    add_sampling_options,
    base_parameters,
    cap_prompt_options,
    check_out_dir,
    finite_float,
    fraction,
    free_names,
    load_pipeline_from_args,
    positive_int,
    warn_fitted,
    warn_unknown_words,
    write_outputs,
)
from imageprompt.cli.toolbox import add_toolbox_options, apply_toolbox_options, check_toolbox_options
from imageprompt.images import generators
from imageprompt.progress import INVERTING, SAMPLING, labelled

INVERSIONS = ("direct", "null-text", "negative-prompt", "ddim", "dpl", "flow")  # flow: SD3's (the flow ODE)
REPLACE_NEGATIVE = ("null-text", "negative-prompt", "dpl")  # inversions that replace the unconditional branch


def register(subparsers) -> None:
    p2p = subparsers.add_parser(
        "p2p", help="edit an image by editing its prompt (prompt-to-prompt)",
        description="Prompt-to-prompt editing: the target prompt is sampled with the source's attention, so the "
                    "layout is kept. The source is a text prompt, an SD-IPC image prompt (--image-prompt) or a "
                    "real photo (--image, inverted first).",
    )
    p2p.add_argument("--source", required=True, help="source prompt (for --image: a description of the photo)")
    p2p.add_argument("--target", help="edited prompt (not used by --mode reweight)")
    p2p.add_argument("--mode", default="replace", help="replace (same word count), refine (add/remove words), "
                                                        "reweight (only --weight) or masactrl (MasaCtrl mutual "
                                                        "self-attention: pose/shape/position changes keep the "
                                                        "subject); default replace")
    p2p.add_argument("--blend", nargs="+", action="extend", metavar="WORD",
                     help="local blend: only the region of these words changes")
    p2p.add_argument("--blend-threshold", type=fraction, default=0.3, help="mask threshold (default 0.3)")
    p2p.add_argument("--blend-exclude", nargs="+", action="extend", metavar="WORD",
                     help="take these words' region out of the blend mask (the authors' substruct_words)")
    p2p.add_argument("--blend-start", type=fraction, default=0.0,
                     help="fraction of the steps before blending starts (the authors' start_blend; default 0)")
    p2p.add_argument("--weight", nargs="+", action="extend", metavar="WORD=VALUE",
                     help="scale a target word's cross-attention, e.g. --weight snow=2")
    p2p.add_argument("--cross-steps", action="append", metavar="F|WORD=F",
                     help="fraction of the steps with cross-attention control (default 0.8); WORD=F sets one word")
    p2p.add_argument("--self-steps", type=fraction, default=0.4,
                     help="fraction of the steps with self-attention replacement (default 0.4)")
    p2p.add_argument("--self-res", type=positive_int,
                     help="replace self-attention in layers with at most this many latent rows (default 16 at 512)")
    p2p.add_argument("--map-res", type=positive_int,
                     help="latent rows of the layers whose attention maps are used (default 16 at 512)")
    p2p.add_argument("--start-step", type=int, default=4,
                     help="--mode masactrl: first step (from 0) with mutual self-attention (the paper's S; default 4)")
    p2p.add_argument("--start-layer", type=int,
                     help="--mode masactrl: first self-attention layer, counted as they run from 0 (the paper's L; "
                          "default: SD 1.x's 10, translated to the model)")
    p2p.add_argument("--mask", nargs="+", action="extend", metavar="WORD",
                     help="--mode masactrl: foreground masks from these words' cross-attention maps")
    p2p.add_argument("--image", metavar="PHOTO", help="a real photo to edit; --source should describe it")
    p2p.add_argument("--invert", choices=INVERSIONS,
                     help=f"how to invert --image (default {DEFAULT_INVERSION}: measured best; SD3: flow)")
    p2p.add_argument("--inner-steps", type=positive_int, default=10,
                     help="null-text (and dpl) inner steps (default 10)")
    p2p.add_argument("--dpl-words", nargs="+", action="extend", metavar="NOUN",
                     help="with --invert dpl: the nouns of --source whose tokens Dynamic Prompt Learning learns")
    p2p.add_argument("--image-prompt", metavar="IMAGE", help="SD-IPC reference: every prompt is image + text")
    p2p.add_argument("--alpha", type=finite_float, default=0.5,
                     help="SD-IPC text weight with --image-prompt (default 0.5)")
    p2p.add_argument("--variation-source", action="store_true",
                     help="with --image-prompt: the source is the SD-IPC variation of the image (the image alone); "
                          "the targets are image + text")
    p2p.add_argument("--save-attention", metavar="FILE.png", help="write the per-token attention maps here")
    add_sampling_options(p2p, num=False)
    add_model_options(p2p)
    add_adapter_options(p2p, reference="the image prompt of every prompt (required with --adapter)")
    add_toolbox_options(p2p)
    p2p.set_defaults(func=run_p2p, method="p2p")


def parse_weights(items: list[str] | None) -> dict[str, float]:
    from imageprompt.p2p import parse_word_weights  # torch: not at start-up

    try:
        return parse_word_weights(items)
    except ValueError as err:
        raise CommandError(f"--weight {err}") from None


def parse_cross_steps(items: list[str] | None) -> tuple[float, dict[str, float]]:
    default, per_word = 0.8, {}
    for item in items or []:
        word, sep, value = item.rpartition("=")
        try:
            number = fraction(value)
        except argparse.ArgumentTypeError as err:
            raise CommandError(f"--cross-steps {item!r}: {err}") from None
        if sep:
            if not word.strip():
                raise CommandError(f"--cross-steps expects F or WORD=F, got {item!r}")
            per_word[word.strip()] = number
        else:
            default = number
    return default, per_word


def run_p2p(args) -> int:
    from imageprompt.images import load_image, sha256_file
    from imageprompt.p2p import PromptToPromptSettings, normalize_word

    # 1. Everything about the input is checked before any model loads.
    cap_prompt_options(args, "source", "target", "negative_prompt")
    weights = parse_weights(args.weight)
    cross_steps, word_cross_steps = parse_cross_steps(args.cross_steps)
    from imageprompt.families import is_sd3_model

    sd3 = is_sd3_model(args.model)  # SD3 / 3.5: joint-attention prompt-to-prompt, photos by the flow ODE
    if sd3 and args.mode == "masactrl":
        raise CommandError("--mode masactrl is not available on SD3 (prompt-to-prompt is)")
    if sd3 and args.invert not in (None, "flow"):
        raise CommandError("SD3 inverts photos with --invert flow (the flow ODE); the DDIM inversions are for "
                           "SD 1.x and SDXL")
    if args.invert == "flow" and not sd3:
        raise CommandError("--invert flow is for SD3 models (model_index.json names StableDiffusion3Pipeline)")
    if args.mode == "masactrl":
        from imageprompt.masactrl import MasaCtrlSettings

        if weights or args.blend or args.cross_steps:
            raise CommandError("--weight, --blend and --cross-steps are prompt-to-prompt options; "
                               "--mode masactrl takes --start-step, --start-layer and --mask")
        if args.save_attention:
            raise CommandError("--save-attention: --mode masactrl records no attention maps to write")
        settings = MasaCtrlSettings(args.start_step, args.start_layer, args.mask, map_res=args.map_res)
    else:
        if args.mask:
            raise CommandError("--mask belongs to --mode masactrl (use --blend for a prompt-to-prompt local blend)")
        settings = PromptToPromptSettings(args.mode, weights or None, args.blend, args.blend_threshold,
                                          args.blend_exclude, args.blend_start, cross_steps,
                                          word_cross_steps or None, args.self_steps, args.self_res, args.map_res)
    target = settings.check(args.source, args.target)[0]
    if args.invert and not args.image:
        raise CommandError("--invert needs --image PHOTO")
    if args.invert == "dpl" and not args.dpl_words:
        raise CommandError("--invert dpl needs --dpl-words NOUN ...: the nouns of --source whose tokens it learns")
    if args.dpl_words and args.invert != "dpl":
        raise CommandError("--dpl-words needs --invert dpl")
    source_words = {normalize_word(w) for w in args.source.split()}
    for word in args.dpl_words or ():
        if normalize_word(word) not in source_words:
            raise CommandError(f"--dpl-words {word!r} is not in --source {args.source!r}")
    if args.image and args.image_prompt:
        raise CommandError("give --image (a photo to edit) or --image-prompt (an SD-IPC reference), not both")
    if args.image and args.scheduler != "ddim":
        raise CommandError(f"inverting --image needs --scheduler ddim, not {args.scheduler}")
    method = (args.invert or ("flow" if sd3 else DEFAULT_INVERSION)) if args.image else None
    if method in REPLACE_NEGATIVE and args.negative_prompt:
        raise CommandError(f"--negative-prompt is replaced by the {method} inversion; leave it out")
    if args.save_attention and Path(args.save_attention).suffix.lower() != ".png":
        raise CommandError(f"--save-attention must name a .png file, got {args.save_attention!r}")
    if not math.isfinite(args.alpha):
        raise CommandError(f"--alpha must be a finite number, got {args.alpha}")
    if args.variation_source and not args.image_prompt:
        raise CommandError("--variation-source needs --image-prompt IMAGE")
    check_adapter_options(args)
    if args.adapter and not args.adapter_image and not args.embeds:
        raise CommandError("--adapter needs --adapter-image IMAGE (or --embeds FILE): the image prompt of the edit")
    if args.image and args.init_image:
        raise CommandError("give --image (a photo to invert and edit) or --init-image (img2img), not both")
    photo_mask, mask_path = None, args.inpaint_mask  # with --image: a mask of the photo plays the local blend's role
    if args.image and args.inpaint_mask:
        photo_mask, args.inpaint_mask = load_image(args.inpaint_mask).convert("L"), None
    toolbox = check_toolbox_options(args)
    out_dir = check_out_dir(args.out)
    photo = load_image(args.image) if args.image else None
    reference = load_image(args.image_prompt) if args.image_prompt else None
    seed = args.seed if args.seed is not None else random.randrange(2**31)

    # 2. Model
    from imageprompt.pipelines.loading import edit_pipeline_from

    base = load_pipeline_from_args(args)
    warn_fitted(base, encoded=[*([("--image-prompt", args.image_prompt, reference)] if reference else []),
                               *adapter_inputs(args)],
                resized=[("--image", args.image, photo)] if photo else [], size=(args.width, args.height))
    warn_unknown_words(base, [("--source", args.source), ("--target", target),
                              ("--negative-prompt", args.negative_prompt)])
    pipe = edit_pipeline_from(base, "masactrl" if args.mode == "masactrl" else "p2p")  # SD 1.x or SDXL
    adapter = apply_adapter_options(pipe, args)
    adapter["pipeline"] = {k: v for k, v in adapter["pipeline"].items() if k.startswith(("ip_", "negative_ip_"))}
    params = base_parameters(base, args, "p2p")
    params.update(source=args.source, target=target, mode=args.mode, weights=weights or None, blend=args.blend,
                  blend_threshold=args.blend_threshold, blend_exclude=args.blend_exclude,
                  blend_start=args.blend_start, cross_steps=cross_steps,
                  word_cross_steps=word_cross_steps or None, self_steps=args.self_steps, self_res=args.self_res,
                  map_res=args.map_res, seed=seed)
    if args.mode == "masactrl":
        params.update(start_step=args.start_step, start_layer=args.start_layer, mask=args.mask)
    if photo is not None:
        params.update(input=Path(args.image).name, input_sha256=sha256_file(args.image), invert=method,
                      inner_steps=args.inner_steps if method in ("null-text", "dpl") else None,
                      dpl_words=args.dpl_words if method == "dpl" else None)
    if reference is not None:
        params.update(image_prompt=Path(args.image_prompt).name, image_prompt_sha256=sha256_file(args.image_prompt),
                      alpha=args.alpha, image_mode="variation" if args.variation_source else "edit")
    params.update({k: v for k, v in adapter["parameters"].items() if k not in ("method", "alpha")})
    extras = apply_toolbox_options(pipe, args, toolbox)
    params.update(extras["parameters"])

    if photo_mask is not None:
        toolbox = photo_mask_toolbox(pipe, args, photo, photo_mask, toolbox)
        params.update(inpaint_mask=Path(mask_path).name, strength=1.0)

    # 3. Inversion of a real photo, then the edit
    inversion = None
    if photo is not None:
        with labelled(pipe, INVERTING):
            inversion = pipe.invert(photo, args.source, method, args.steps, args.guidance, args.height, args.width,
                                    num_inner_steps=args.inner_steps, words=args.dpl_words)
    with labelled(pipe, SAMPLING):
        result = pipe(args.source, None if args.mode == "reweight" else target, settings=settings,
                      image=reference, alpha=args.alpha, inversion=inversion,
                      image_mode="variation" if args.variation_source else "edit",
                      negative_prompt=args.negative_prompt, height=args.height, width=args.width,
                      num_inference_steps=args.steps, guidance_scale=args.guidance,
                      generator=None if inversion is not None else generators(seed, 1), **adapter["pipeline"],
                      **{**extras["pipeline"], **({"toolbox": toolbox} if photo_mask is not None else {})})

    # 4. Outputs
    stem = Path(args.image).stem if args.image else "p2p"
    suffix = "" if inversion is not None else f"-{seed}"
    names = free_names(out_dir, [f"{stem}-source{suffix}.png", f"{stem}-edit{suffix}.png"], args.overwrite)
    metas = [dict(params, role=role, width=im.size[0], height=im.size[1])
             for role, im in zip(("source", "edit"), result.images)]
    done = write_outputs(result.images, out_dir, names, metas, args.overwrite)
    if args.save_attention:
        if result.attention_maps is None:
            raise CommandError("no attention maps were recorded: --map-res names no cross-attention layer")
        from imageprompt.attention_maps import render_attention_maps

        picture = render_attention_maps(result.attention_maps, result.tokens, result.images)
        maps = Path(args.save_attention)
        maps = maps.with_name(free_names(maps.parent, [maps.name], args.overwrite)[0])
        done += write_outputs([picture], maps.parent, [maps.name], [dict(params, role="attention")], args.overwrite)
    for path in done:
        print(path)
    return 0


def photo_mask_toolbox(pipe, args, photo, mask, toolbox):
    """The photo and its --inpaint-mask at the size it is inverted to, strength 1 (with any ControlNet's images)."""
    import dataclasses

    from imageprompt.toolbox import ToolboxSettings

    if mask.size != photo.size:
        raise CommandError(f"--inpaint-mask is {mask.size[0]}x{mask.size[1]}, --image {photo.size[0]}x"
                           f"{photo.size[1]}: give a mask of the photo's size")
    native = pipe.unet.config.sample_size * pipe.vae_scale_factor
    size = (args.width or native, args.height or native)
    return dataclasses.replace(toolbox or ToolboxSettings(), init_image=photo.resize(size), mask=mask.resize(size),
                               strength=1.0)
