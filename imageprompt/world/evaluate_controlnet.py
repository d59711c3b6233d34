"""The bundled ControlNet's measurement: ``imageprompt eval --suite world --only ControlNet``.

Held-out world scenes (``world.sample_scenes(HELD_OUT_SEED + seed, ...)``; the ControlNet
trained on seed 0's scenes) give a silhouette (:func:`~imageprompt.world.train_controlnet.silhouette`)
and a caption; diffusers' ``StableDiffusionControlNetPipeline``, built from the pipeline's
own components and the ControlNet, draws from both. Read back from the pixels
(:mod:`imageprompt.world.reader`):

- the mask IoU of the generated objects (their union) with the control's mask, and the
  fraction of images where it is at least 0.8;
- per scene object, the generated object that overlaps its mask most: is its shape the
  scene's (the shape right wherever the mask is), its colour the caption's?
- the same captions and seeds without the ControlNet, for comparison.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from imageprompt import world
from imageprompt.images import generators
from imageprompt.world.measures import EvalSettings, Row, frac

HELD_OUT_SEED = 2027  # the ControlNet trained on world.sample_scenes(0, 0, N)
IOU_AIM = 0.8


def controlnet_file() -> Path:
    from imageprompt.checkpoints import BUNDLED_CONTROLNET

    return BUNDLED_CONTROLNET


def controlnet_pipeline(pipe, controlnet, image_encoder=None):
    """diffusers' ControlNet pipeline on ``pipe``'s components (VAE, text encoder, tokenizer, UNet, scheduler,
    feature extractor); ``image_encoder`` for diffusers' ``load_ip_adapter``."""
    from diffusers import StableDiffusionControlNetPipeline

    parts = {name: getattr(pipe, name) for name in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")}
    out = StableDiffusionControlNetPipeline(**parts, controlnet=controlnet, safety_checker=None,
                                            feature_extractor=getattr(pipe, "feature_extractor", None),
                                            image_encoder=image_encoder, requires_safety_checker=False)
    out.set_progress_bar_config(disable=True)
    return out


def held_out_scenes(count: int, seed: int = 0, size: int = world.IMAGE_SIZE) -> list[world.Scene]:
    return world.sample_scenes(HELD_OUT_SEED + seed, 0, count, size=size)


def control_mask(scene: world.Scene) -> np.ndarray:
    mask = np.zeros(scene.objects[0].mask.shape, dtype=bool)
    for obj in scene.objects:
        mask |= obj.mask
    return mask


def score(image, scene: world.Scene) -> dict:
    """IoU of the generated objects with the control; per scene object, shape and colour of the best-overlapping one."""
    found = world.detect_objects(image)
    generated = np.zeros(control_mask(scene).shape, dtype=bool)
    for det in found:
        generated |= det.mask
    per_object = []
    for obj in scene.objects:
        best = max(found, key=lambda d: world.mask_iou(d.mask, obj.mask), default=None)
        hit = best is not None and world.mask_iou(best.mask, obj.mask) > 0
        per_object.append({"shape": hit and best.shape == obj.shape, "color": hit and best.color == obj.color})
    return {"iou": world.mask_iou(generated, control_mask(scene)), "objects": per_object}


def generate(pipe, scenes, settings: EvalSettings, offset: int = 60_000, controlnet_pipe=None,
             conditioning_scale: float = 1.0) -> list:
    """``images_per_sample`` images per scene from its caption (and its silhouette with ``controlnet_pipe``)."""
    from imageprompt.world.train_controlnet import silhouette

    per = settings.images_per_sample
    chunk = max(1, settings.batch // per)
    out = []
    for start in range(0, len(scenes), chunk):
        part = scenes[start : start + chunk]
        run = dict(prompt=[s.caption for s in part], num_inference_steps=settings.steps,
                   guidance_scale=settings.guidance_scale, num_images_per_prompt=per, output_type="pil",
                   generator=generators(settings.seed + offset + start * per, len(part) * per))
        if controlnet_pipe is None:
            out += pipe(**run).images
        else:
            controls = [silhouette(s) for s in part]  # one a prompt: diffusers repeats it per image
            out += controlnet_pipe(image=controls, controlnet_conditioning_scale=conditioning_scale, **run).images
    return out


def rows_for(label: str, scenes, images, per: int, aims: bool) -> list[Row]:
    scored = [score(im, scenes[k // per]) for k, im in enumerate(images)]
    ious = [s["iou"] for s in scored]
    objects = [o for s in scored for o in s["objects"]]
    n, m = len(scored), len(objects)
    return [
        Row(label, f"mask IoU with the control >= {IOU_AIM}", frac(i >= IOU_AIM for i in ious), n,
            aim=0.85 if aims else None),
        Row(label, "mean mask IoU with the control", float(np.mean(ious)) if ious else 0.0, n, unit=""),
        Row(label, "shape right where the mask is (per object)", frac(o["shape"] for o in objects), m,
            aim=0.85 if aims else None),
        Row(label, "colour right where the mask is (per object)", frac(o["color"] for o in objects), m),
    ]


def controlnet_world(pipe, settings: EvalSettings) -> list[Row]:
    """The bundled ControlNet from held-out scenes' silhouettes and captions, and the same captions without it.
    ``settings.extra["controlnet"]`` names another ControlNet folder (with none there, the rows are absent),
    ``settings.extra["controlnet_scale"]`` the conditioning scale (1.0)."""
    from diffusers import ControlNetModel

    folder = Path(settings.extra.get("controlnet") or controlnet_file())
    if not (folder / "config.json").is_file():
        return []
    controlnet = ControlNetModel.from_pretrained(folder, torch_dtype=pipe.unet.dtype).to(pipe.unet.device)
    scenes = held_out_scenes(settings.samples, settings.seed, int(pipe.unet.config.sample_size * pipe.vae_scale_factor))
    per = settings.images_per_sample
    scale = float(settings.extra.get("controlnet_scale", 1.0))
    with_control = generate(pipe, scenes, settings, controlnet_pipe=controlnet_pipeline(pipe, controlnet),
                            conditioning_scale=scale)
    without = generate(pipe, scenes, settings)
    return [*rows_for("ControlNet (world)", scenes, with_control, per, aims=True),
            *rows_for("same captions, no ControlNet", scenes, without, per, aims=False)]


__all__ = ["HELD_OUT_SEED", "controlnet_file", "controlnet_pipeline", "held_out_scenes", "control_mask", "score",
           "generate", "controlnet_world"]
