"""Batch rows with a ControlNet, img2img or inpainting (``vary``, ``edit`` and ``p2p`` rows).

Fields: ``controlnet`` (a diffusers ControlNet folder or hub id) with ``control_image``, ``control_scale``,
``control_start``, ``control_end``; ``init_image`` with ``strength``; ``inpaint_mask``. :func:`check_toolbox_row`
checks them before any model loads (the images' headers: their sizes) and puts the images' bytes into the row's key;
:func:`toolbox_call` gives the pipeline's ``toolbox`` and ``controlnet`` arguments when the rows are sampled.
"""

from __future__ import annotations

import math
from pathlib import Path

FIELDS = {"controlnet": str, "control_image": str, "control_scale": float, "control_start": float,
          "control_end": float, "init_image": str, "strength": float, "inpaint_mask": str}
IMAGES = ("control_image", "init_image", "inpaint_mask")
# rows share a batch only with rows of the same toolbox inputs
GROUPED = ("controlnet", "control_scale", "control_start", "control_end", "strength",
           *(f"{name}_sha256" for name in IMAGES))


def _size(path: Path, name: str) -> tuple[int, int]:
    from PIL import Image

    from imageprompt.images import ImageInputError, check_image

    if not path.is_file():
        raise ValueError(f"{path}: no such file (field {name!r})")
    try:
        check_image(path)
    except ImageInputError as err:
        raise ValueError(f"{err} (field {name!r})") from None
    with Image.open(path) as image:  # the header only
        return image.size


def check_toolbox_row(values: dict, base: Path) -> None:
    """Check a row's toolbox fields (in place: image paths made absolute, their sha256 added, defaults set)."""
    from imageprompt.images import sha256_file

    given = [name for name in FIELDS if values.get(name) is not None]
    if not given:
        return
    if bool(values.get("controlnet")) != bool(values.get("control_image")):
        raise ValueError("fields 'controlnet' and 'control_image' go together: the ControlNet and its layout")
    for name in ("control_scale", "control_start", "control_end"):
        if values.get(name) is not None and not values.get("controlnet"):
            raise ValueError(f"field {name!r} needs 'controlnet'")
    if values.get("inpaint_mask") and not values.get("init_image"):
        raise ValueError("field 'inpaint_mask' needs 'init_image': the image it masks")
    if values.get("strength") is not None and not values.get("init_image"):
        raise ValueError("field 'strength' needs 'init_image'")
    strength = values.setdefault("strength", 0.8) if values.get("init_image") else None
    if strength is not None and not (math.isfinite(strength) and 0 < strength <= 1):
        raise ValueError(f"field 'strength' must be in (0, 1], got {strength}")
    if values.get("controlnet"):
        start, end = values.setdefault("control_start", 0.0), values.setdefault("control_end", 1.0)
        values.setdefault("control_scale", 1.0)
        if not 0 <= start < end <= 1:
            raise ValueError(f"fields 'control_start' and 'control_end' need 0 <= start < end <= 1, got {start}, {end}")
        local = (base / values["controlnet"]).expanduser()
        if local.exists():
            values["controlnet"] = str(local.resolve())
    sizes = {}
    for name in IMAGES:
        if values.get(name):
            path = (base / values[name]).expanduser()
            sizes[name] = _size(path, name)
            values[name] = str(path.resolve())
            values[f"{name}_sha256"] = sha256_file(path)
    if "inpaint_mask" in sizes and sizes["inpaint_mask"] != sizes["init_image"]:
        raise ValueError(f"field 'inpaint_mask' is {'x'.join(map(str, sizes['inpaint_mask']))}, 'init_image' "
                         f"{'x'.join(map(str, sizes['init_image']))}: give a mask of the image's size")
    if "control_image" in sizes and "init_image" in sizes and sizes["control_image"] != sizes["init_image"]:
        raise ValueError("fields 'control_image' and 'init_image' differ in size: give them one size")
    for name, (width, height) in sizes.items():
        if values.get("height") not in (None, height) or values.get("width") not in (None, width):
            raise ValueError(f"field {name!r} is {width}x{height} but the row samples "
                             f"{values.get('width')}x{values.get('height')}: give images of the output size")


def toolbox_call(runner, params: dict) -> dict:
    """The pipeline arguments of a row's toolbox fields (images and ControlNets loaded once per job)."""
    from imageprompt.toolbox import ToolboxSettings, check_controlnet

    if not params.get("controlnet") and not params.get("init_image"):
        return {}
    nets = []
    if params.get("controlnet"):
        cache = runner.__dict__.setdefault("controlnets", {})
        if params["controlnet"] not in cache:
            from imageprompt.pipelines.toolbox import load_controlnets

            cache[params["controlnet"]] = load_controlnets([params["controlnet"]], runner.pipe.unet.dtype,
                                                           runner.pipe.unet.device)[0]
        nets = [cache[params["controlnet"]]]
        check_controlnet(nets[0], runner.pipe.unet)
    mask = runner.load(params["inpaint_mask"]).convert("L") if params.get("inpaint_mask") else None
    settings = ToolboxSettings(
        control_images=tuple(runner.load(params["control_image"]) for _ in nets),
        control_scales=(params.get("control_scale") or 1.0,), control_start=params.get("control_start") or 0.0,
        control_end=params.get("control_end") or 1.0,
        init_image=runner.load(params["init_image"]) if params.get("init_image") else None,
        strength=params.get("strength") or 0.8, mask=mask)
    return {"toolbox": settings, "controlnet": nets or None}
