"""The tabs' "ControlNet, img2img, inpainting" inputs: an init image with its strength, an inpainting mask, and a
control image when the demo was started with a ControlNet (``imageprompt demo --controlnet FOLDER``).

The images are checked here (a mask not the init image's size, control and init images of different sizes, a
strength outside (0, 1] are readable errors), then fitted to the size sampled, and passed to the pipeline as its
``toolbox`` (:class:`~imageprompt.toolbox.ToolboxSettings`) and ``controlnet``.
"""

from __future__ import annotations

import gradio as gr
from imageprompt.demo.components import image_input
from imageprompt.demo.context import DemoContext, Sampling
from imageprompt.demo.validation import checked_number, page_error, read_image


def toolbox_controls(ctx: DemoContext, name: str) -> list:
    """The accordion's components, in the order :func:`toolbox_inputs` takes them (append them last: API callers)."""
    with gr.Accordion("ControlNet, img2img, inpainting", open=False):
        with gr.Row():
            init = image_input("Init image (img2img: start from it)", elem_id=f"{name}-init-image")
            mask = image_input("Inpainting mask (white is redrawn)", elem_id=f"{name}-mask")
        strength = gr.Slider(0.05, 1.0, value=0.8, step=0.05, label="Strength (how much of the init image changes)")
        control = image_input("Control image (the ControlNet's layout)", elem_id=f"{name}-control")
        scale = gr.Slider(0.0, 2.0, value=1.0, step=0.05, label="ControlNet conditioning scale")
        control.visible = scale.visible = ctx.controlnet is not None
    return [init, strength, mask, control, scale]


def toolbox_inputs(ctx: DemoContext, sampling: Sampling, init=None, strength=0.8, mask=None, control=None,
                   scale=1.0) -> tuple[dict, dict]:
    """``(pipeline arguments, parameters the PNGs record)`` of the accordion's inputs; empty when none is given."""
    from imageprompt.toolbox import ToolboxSettings

    if mask and not init:
        raise page_error("An inpainting mask needs the init image it masks.")
    if control and ctx.controlnet is None:
        raise page_error("This demo has no ControlNet: start it with --controlnet FOLDER.")
    if not init and not control:
        return {}, {}
    images, params = {}, {}
    for key, path, what in (("init_image", init, "an init image"), ("mask", mask, "a mask"),
                            ("control", control, "a control image")):
        if path:
            images[key], source = read_image(ctx, path, what)
            params[f"{key}_sha256"] = source["input_sha256"]
    if "mask" in images and images["mask"].size != images["init_image"].size:
        raise page_error(f"The mask is {images['mask'].size[0]}x{images['mask'].size[1]}, the init image "
                         f"{images['init_image'].size[0]}x{images['init_image'].size[1]}: give a mask of its size.")
    if "control" in images and "init_image" in images and images["control"].size != images["init_image"].size:
        raise page_error("The control image and the init image differ in size: give them one size.")
    size = (sampling.width, sampling.height)  # fitted to the size sampled
    fitted = {k: im.resize(size) for k, im in images.items()}
    strength = checked_number("Strength", strength, float, 0.0, 1.0)
    if init and not 0.0 < strength <= 1.0:
        raise page_error(f"Strength must be in (0, 1], got {strength}.")
    settings = ToolboxSettings(
        control_images=(fitted["control"],) if "control" in fitted else (),
        control_scales=(checked_number("ControlNet conditioning scale", scale, float, 0.0, 2.0),),
        init_image=fitted.get("init_image"), strength=strength if init else 0.8,
        mask=fitted["mask"].convert("L") if "mask" in fitted else None)
    if init:
        params["strength"] = settings.strength
    if control:
        params["control_scale"] = settings.control_scales[0]
    return {"toolbox": settings, "controlnet": ctx.controlnet if control else None}, params
