"""The rest of diffusers' toolbox with our techniques: ControlNet, img2img, inpainting, LoRA, textual inversion.

:class:`ToolboxSettings` is one frozen object, checked when made, that the pipelines, the command line, batch rows
and the demo share: the control image(s) with their conditioning scales and start/end, an init image with its
``strength`` (img2img), a ``mask`` (inpainting: only the white part changes). The pipelines run them through
diffusers' own ControlNet, img2img and inpainting pipelines (``pipelines/toolbox.py``). The ControlNet models are
components, given beside the settings; :func:`check_controlnet` says in one line when one was made for another UNet.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import PIL.Image
import torch


def _number(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"`{name}` must be a finite number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class ToolboxSettings:
    """Control images, img2img and inpainting for one call.

    Args:
        control_images: one image per ControlNet (the layout: edges, pose, a silhouette).
        control_scales: each ControlNet's ``controlnet_conditioning_scale`` (one value serves all).
        control_start / control_end: fractions of the steps between which the ControlNets apply (diffusers'
            ``control_guidance_start`` / ``control_guidance_end``).
        init_image: img2img's starting image; ``strength`` in (0, 1] is how much of it is redrawn.
        mask: inpainting's mask, the init image's size: white is redrawn, black kept.
    """

    control_images: tuple = ()
    control_scales: tuple = (1.0,)
    control_start: float = 0.0
    control_end: float = 1.0
    init_image: PIL.Image.Image | None = None
    strength: float = 0.8
    mask: PIL.Image.Image | None = None
    guess_mode: bool = False

    def __post_init__(self):
        images = self.control_images
        images = (images,) if isinstance(images, PIL.Image.Image) else tuple(images or ())
        if not all(isinstance(im, PIL.Image.Image) for im in images):
            raise TypeError("`control_images` must be PIL images")
        scales = self.control_scales
        scales = tuple(_number(s, "control_scales") for s in ((scales,) if not isinstance(scales, (list, tuple))
                                                              else scales))
        if not scales or (len(images) > 1 and len(scales) not in (1, len(images))):
            raise ValueError(f"{len(scales)} control scales for {len(images)} control images: give one or one each")
        start, end = _number(self.control_start, "control_start"), _number(self.control_end, "control_end")
        if not 0.0 <= start < end <= 1.0:
            raise ValueError(f"the ControlNet window needs 0 <= start < end <= 1, got ({start}, {end})")
        strength = _number(self.strength, "strength")
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"`strength` must be in (0, 1], got {strength}")
        for name in ("init_image", "mask"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), PIL.Image.Image):
                raise TypeError(f"`{name}` must be a PIL image")
        if self.mask is not None:
            if self.init_image is None:
                raise ValueError("a mask needs the image it masks: give an init image")
            if self.mask.size != self.init_image.size:
                raise ValueError(f"the mask is {self.mask.size[0]}x{self.mask.size[1]}; the init image is "
                                 f"{self.init_image.size[0]}x{self.init_image.size[1]}: give a mask of its size")
        sizes = {im.size for im in (*images, self.init_image) if im is not None}
        if len(sizes) > 1:
            listed = ", ".join(f"{w}x{h}" for w, h in sorted(sizes))
            raise ValueError(f"the control and init images differ in size ({listed}): give them one size")
        object.__setattr__(self, "control_images", images)
        object.__setattr__(self, "control_scales", scales)
        object.__setattr__(self, "control_start", start)
        object.__setattr__(self, "control_end", end)
        object.__setattr__(self, "strength", strength)

    @property
    def size(self) -> tuple[int, int] | None:
        """``(width, height)`` of the images given (all one size), or None."""
        for im in (*self.control_images, self.init_image):
            if im is not None:
                return im.size
        return None

    @property
    def active(self) -> bool:
        return bool(self.control_images) or self.init_image is not None

    def check_size(self, height: int | None, width: int | None) -> None:
        """One line when the images are not the size sampled."""
        size = self.size
        if size is not None and (height is not None and height != size[1] or width is not None and width != size[0]):
            raise ValueError(f"the control/init images are {size[0]}x{size[1]} but {width}x{height} is sampled: "
                             "give images of the output size (or leave height/width out)")

    def check_controlnets(self, controlnets: list, unet) -> None:
        if len(controlnets) != len(self.control_images):
            if not self.control_images:
                raise ValueError("a ControlNet needs its control image")
            raise ValueError(f"{len(self.control_images)} control images for {len(controlnets)} ControlNets: "
                             "give one each")
        for controlnet in controlnets:
            check_controlnet(controlnet, unet)


CHECKED = ("cross_attention_dim", "block_out_channels", "in_channels", "addition_embed_type")


def check_controlnet(controlnet, unet) -> None:
    """One line when ``controlnet`` was made for another UNet (its width, blocks, text or SDXL conditioning)."""
    for name in CHECKED:
        mine, theirs = getattr(controlnet.config, name, None), getattr(unet.config, name, None)
        if name == "in_channels" and theirs == 9:  # an inpainting UNet's: image and mask besides the latents
            theirs = 4
        mine, theirs = (list(v) if isinstance(v, (list, tuple)) else v for v in (mine, theirs))
        if mine != theirs:
            raise ValueError(f"this ControlNet was made for another UNet: its {name} is {mine}, the model's {theirs}")


def parse_lora(spec: str) -> tuple[str, float]:
    """``PATH[:WEIGHT]`` -> ``(path, weight)`` (weight 1 when left out; a Windows drive's colon is kept)."""
    path, sep, weight = spec.rpartition(":")
    if sep and path and not weight.startswith(("\\", "/")):
        try:
            return path, _number(float(weight), "LoRA weight")
        except ValueError as error:
            raise ValueError(f"--lora {spec!r}: the weight after ':' must be a number") from error
    return spec, 1.0


def same_noise_generators(generator, rows: int, device="cpu") -> list[torch.Generator]:
    """``rows`` generators in ``generator``'s state: the rows of an edit draw one noise (img2img's pipelines draw
    each row's noise themselves; diffusers takes one generator per row)."""
    if isinstance(generator, list):
        generator = generator[0]
    if generator is None:
        generator = torch.Generator(device).manual_seed(int(torch.randint(0, 2**31 - 1, ()).item()))
    state = generator.get_state()
    out = []
    for _ in range(rows):
        g = torch.Generator(generator.device)
        g.set_state(state)
        out.append(g)
    return out
