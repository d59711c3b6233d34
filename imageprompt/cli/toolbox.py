"""Command-line options for the rest of diffusers' toolbox: ControlNet, img2img, inpainting, LoRA, embeddings.

``add_toolbox_options(parser)`` adds the group; :func:`check_toolbox_options` reads and checks the images before
any model loads (:class:`~imageprompt.toolbox.ToolboxSettings`, one-line errors); :func:`apply_toolbox_options`
loads the ControlNets, LoRAs and embeddings on the pipeline and returns the call's arguments and the parameters
the outputs record.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from imageprompt.cli.common import CommandError, finite_float, fraction


def add_toolbox_options(parser: argparse.ArgumentParser, init_image: bool = True) -> None:
    group = parser.add_argument_group("ControlNet, img2img, inpainting, LoRA")
    group.add_argument("--controlnet", action="append", metavar="FOLDER",
                       help="a diffusers ControlNet (hub id or folder); repeat for several, one --control-image each")
    group.add_argument("--control-image", action="append", metavar="IMAGE",
                       help="the layout for each --controlnet, in order (edges, pose, a silhouette)")
    group.add_argument("--control-scale", action="append", type=finite_float, metavar="SCALE",
                       help="each ControlNet's conditioning scale (one serves all; default 1)")
    group.add_argument("--control-start", type=fraction, default=0.0,
                       help="fraction of the steps where the ControlNets start (default 0)")
    group.add_argument("--control-end", type=fraction, default=1.0,
                       help="fraction of the steps where they stop (default 1)")
    if init_image:
        group.add_argument("--init-image", metavar="IMAGE",
                           help="img2img: start from this image (it sets the output size)")
        group.add_argument("--strength", type=finite_float, default=0.8,
                           help="img2img: how much of --init-image is redrawn, in (0, 1] (default 0.8)")
        group.add_argument("--inpaint-mask", metavar="IMAGE",
                           help="inpainting: white is redrawn, black kept; the size of --init-image")
    group.add_argument("--lora", action="append", metavar="PATH[:WEIGHT]",
                       help="a LoRA (.safetensors or a diffusers LoRA folder) with its weight (default 1); repeatable")
    group.add_argument("--embedding", action="append", metavar="FILE",
                       help="a textual-inversion embedding (.safetensors) with the token it names (SDXL's: "
                            "<FILE-STEM>); repeatable")


def check_toolbox_options(args):
    """The :class:`~imageprompt.toolbox.ToolboxSettings` of ``args`` (None when no image option is given), checked
    before any model loads."""
    from imageprompt.images import load_image
    from imageprompt.toolbox import ToolboxSettings

    nets, controls = args.controlnet or [], args.control_image or []
    if nets and not controls:
        raise CommandError("--controlnet needs its --control-image")
    if controls and not nets:
        raise CommandError("--control-image needs a --controlnet")
    if len(nets) != len(controls):
        raise CommandError(f"{len(controls)} --control-image for {len(nets)} --controlnet: give one each, in order")
    init, mask = getattr(args, "init_image", None), getattr(args, "inpaint_mask", None)
    if mask and not init:
        raise CommandError("--inpaint-mask needs --init-image: the image it masks")
    if not nets and not init:
        if args.control_scale:
            raise CommandError("--control-scale needs a --controlnet")
        return None
    try:
        settings = ToolboxSettings(control_images=tuple(load_image(p) for p in controls),
                                   control_scales=tuple(args.control_scale or (1.0,)),
                                   control_start=args.control_start, control_end=args.control_end,
                                   init_image=load_image(init) if init else None,
                                   strength=getattr(args, "strength", 0.8),
                                   mask=load_image(mask).convert("L") if mask else None)
        settings.check_size(args.height, args.width)
    except ValueError as error:
        raise CommandError(str(error).replace("`strength`", "--strength").replace("a mask", "--inpaint-mask")) \
            from None
    return settings


def apply_toolbox_options(pipe, args, settings) -> dict:
    """Load ``args``' LoRAs, embeddings and ControlNets for ``pipe``; ``{"pipeline": call arguments,
    "parameters": what the outputs record}``."""
    from imageprompt.pipelines.toolbox import load_controlnets, load_embeddings, load_loras
    from imageprompt.toolbox import check_controlnet

    load_loras(pipe, args.lora or [])
    load_embeddings(pipe, args.embedding or [])
    params = {"lora": args.lora or None, "embedding": [Path(p).name for p in args.embedding] if args.embedding
              else None}
    if settings is None:
        return {"pipeline": {}, "parameters": params}
    nets = load_controlnets(args.controlnet or [], pipe.unet.dtype, pipe.unet.device)
    for path, net in zip(args.controlnet or [], nets):
        try:
            check_controlnet(net, pipe.unet)
        except ValueError as error:
            raise CommandError(f"--controlnet {path}: {error}") from None
    params.update(controlnet=args.controlnet, control_image=[Path(p).name for p in args.control_image or []] or None,
                  control_scale=list(settings.control_scales) if nets else None,
                  control_window=[settings.control_start, settings.control_end] if nets else None)
    if settings.init_image is not None:
        params.update(init_image=Path(args.init_image).name, strength=settings.strength,
                      inpaint_mask=Path(args.inpaint_mask).name if args.inpaint_mask else None)
    return {"pipeline": {"toolbox": settings, "controlnet": nets or None}, "parameters": params}
