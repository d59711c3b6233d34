"""``imageprompt style-aligned``: a set of images in one style (StyleAligned, Hertz et al. CVPR 2024)."""

from __future__ import annotations

import random
from pathlib import Path

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
    free_names,
    load_pipeline_from_args,
    positive_float,
    warn_fitted,
    warn_unknown_words,
    write_outputs,
)
from imageprompt.cli.toolbox import add_toolbox_options, apply_toolbox_options, check_toolbox_options
from imageprompt.images import generators
from imageprompt.progress import INVERTING, SAMPLING, labelled


def register(subparsers) -> None:
    style = subparsers.add_parser(
        "style-aligned", help="a set of images sharing one reference's style (StyleAligned)",
        description="StyleAligned: every image's self-attention also attends to the reference's keys and values, "
                    "after AdaIN of its queries and keys to the reference's. The reference is the first prompt, "
                    "or a real photo (--reference, DDIM-inverted; --reference-prompt describes it), or an SD-IPC "
                    "image prompt (--reference-sdipc).",
    )
    style.add_argument("--prompts", nargs="+", required=True, metavar="PROMPT",
                       help="one prompt per image; without --reference the first is the reference")
    style.add_argument("--reference", metavar="IMAGE", help="a photo as the style reference (DDIM inversion)")
    style.add_argument("--reference-prompt", default="",
                       help="with --reference: a description of the photo (default empty); with --reference-sdipc: "
                            "SD-IPC edit text (default empty: the variation)")
    style.add_argument("--reference-sdipc", metavar="IMAGE",
                       help="an image as the reference through SD-IPC's conversion (no inversion)")
    style.add_argument("--alpha", type=finite_float, default=0.5, help="SD-IPC text weight (default 0.5)")
    style.add_argument("--keys-scale", type=positive_float, default=1.0,
                       help="scale of the reference's keys for the other images (default 1, the authors')")
    style.add_argument("--score-shift", type=finite_float, default=0.0,
                       help="added to the images' attention scores of the reference's keys (default 0; the authors' "
                            "transfer notebook uses 0.69 = log 2)")
    style.add_argument("--reference-offset", type=int, default=0,
                       help="with --reference: start the reference this many steps ahead on its inverted path "
                            "(default 0; the authors' transfer notebook uses 5)")
    style.add_argument("--no-adain", action="store_true", help="share attention without AdaIN of queries and keys")
    style.add_argument("--share-group-norm", action="store_true",
                       help="also share group-norm statistics (the authors' SD 1.x notebook; off by default)")
    add_sampling_options(style, num=False)
    add_model_options(style)
    add_adapter_options(style, reference="the image prompt of every image (required with --adapter)")
    add_toolbox_options(style)
    style.set_defaults(func=run_style_aligned, method="style-aligned")


def run_style_aligned(args) -> int:
    from imageprompt.images import load_image, sha256_file

    # 1. Inputs, before any model loads
    args.prompts = [p.strip() for p in args.prompts]
    if any(not p for p in args.prompts):
        raise CommandError("--prompts: a prompt is empty")
    if args.reference and args.reference_sdipc:
        raise CommandError("give --reference (a photo, inverted) or --reference-sdipc (an image prompt), not both")
    external = args.reference or args.reference_sdipc
    if not external and len(args.prompts) < 2:
        raise CommandError("--prompts needs the reference's prompt and at least one more (or give --reference)")
    if args.reference_offset and not args.reference:
        raise CommandError("--reference-offset needs --reference PHOTO")
    if args.reference and args.scheduler != "ddim":
        raise CommandError(f"inverting --reference needs --scheduler ddim, not {args.scheduler}")
    cap_prompt_options(args, "reference_prompt", "negative_prompt")
    check_adapter_options(args)
    toolbox = check_toolbox_options(args)
    if args.adapter and not args.adapter_image:
        raise CommandError("--adapter needs --adapter-image IMAGE: the image prompt of every image")
    out_dir = check_out_dir(args.out)
    photo = load_image(args.reference) if args.reference else None
    sdipc = load_image(args.reference_sdipc) if args.reference_sdipc else None
    seed = args.seed if args.seed is not None else random.randrange(2**31)
    prompts = [args.reference_prompt, *args.prompts] if external else list(args.prompts)

    # 2. Model
    from imageprompt.pipelines import StableDiffusionStyleAlignedPipeline

    base = load_pipeline_from_args(args)
    warn_fitted(base, encoded=[*([("--reference-sdipc", args.reference_sdipc, sdipc)] if sdipc else []),
                               *adapter_inputs(args)],
                resized=[("--reference", args.reference, photo)] if photo else [], size=(args.width, args.height))
    if hasattr(base, "text_encoder_2"):
        raise CommandError("style-aligned runs on SD 1.x models; it is not available on SDXL yet")
    warn_unknown_words(base, [("--prompts", " ".join(args.prompts)), ("--reference-prompt", args.reference_prompt)])
    pipe = StableDiffusionStyleAlignedPipeline.from_pipe(base)
    adapter = apply_adapter_options(pipe, args)
    adapter["pipeline"] = {k: v for k, v in adapter["pipeline"].items() if k.startswith(("ip_", "negative_ip_"))}
    params = base_parameters(base, args, "style-aligned")
    params.update(prompts=prompts, keys_scale=args.keys_scale, score_shift=args.score_shift, adain=not args.no_adain,
                  share_group_norm=args.share_group_norm, seed=seed)
    for option, path in (("reference", args.reference), ("reference_sdipc", args.reference_sdipc)):
        if path:
            params.update({option: Path(path).name, f"{option}_sha256": sha256_file(path)})
    if sdipc is not None:
        params.update(alpha=args.alpha)
    params.update({k: v for k, v in adapter["parameters"].items() if k not in ("method", "alpha")})
    extras = apply_toolbox_options(pipe, args, toolbox)
    params.update(extras["parameters"])

    # 3. Inversion of the reference photo, then the set
    inversion = None
    if photo is not None:
        with labelled(pipe, INVERTING):
            inversion = pipe.invert_reference(photo, args.reference_prompt, args.steps, args.height, args.width)
    with labelled(pipe, SAMPLING):
        result = pipe(prompts, image=sdipc, alpha=args.alpha, inversion=inversion, adain_queries=not args.no_adain,
                      adain_keys=not args.no_adain, keys_scale=args.keys_scale, score_shift=args.score_shift,
                      share_group_norm=args.share_group_norm, reference_offset=args.reference_offset,
                      negative_prompt=args.negative_prompt, height=args.height, width=args.width,
                      num_inference_steps=args.steps, guidance_scale=args.guidance,
                      generator=generators(seed, len(prompts)), **adapter["pipeline"],
                      **extras["pipeline"])

    # 4. Outputs: the reference (reconstruction, for a photo) first, then one image per prompt
    names = [f"style-reference-{seed}.png"] + [f"style-{i}-{seed}.png" for i in range(1, len(prompts))]
    names = free_names(out_dir, names, args.overwrite)
    metas = [dict(params, role="reference" if i == 0 else "image", prompt=p, index=i, width=im.size[0],
                  height=im.size[1]) for i, (p, im) in enumerate(zip(prompts, result.images))]
    for path in write_outputs(result.images, out_dir, names, metas, args.overwrite):
        print(path)
    return 0
