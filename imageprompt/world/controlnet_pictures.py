"""The pictures of "The bundled ControlNet" in ``docs/bundled-model.md``: the ControlNet in diffusers' own
``StableDiffusionControlNetPipeline`` (built from the bundled model's components), alone and with an image prompt.

    python -m imageprompt.world.controlnet_pictures --out docs/images

Three PNGs, each a grid of labelled rows (:mod:`imageprompt.world.pictures`), fixed seeds:

- ``bundled-controlnet.png``: held-out scenes' silhouettes with their captions; a silhouette with a caption
  naming another shape; a silhouette with the empty prompt;
- ``bundled-controlnet-ip-adapter.png``: a silhouette + the bundled IP-Adapter's image prompt (empty text),
  loaded with diffusers' own ``load_ip_adapter``;
- ``bundled-controlnet-sdipc.png``: a silhouette + SD-IPC's variation embeddings of an image as ``prompt_embeds``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image

from imageprompt import world
from imageprompt.images import generators
from imageprompt.world.evaluate_controlnet import controlnet_pipeline, held_out_scenes
from imageprompt.world.pictures import example, panel_row, stack
from imageprompt.world.train_controlnet import silhouette

SEEDS = 4
SEED_CAPTIONS = [f"seed {i}" for i in range(SEEDS)]


def control_of(specs: list[world.ObjectSpec], background: str = "black") -> Image.Image:
    return silhouette(world.render(specs, background, 0))


def alone(cn_pipe, steps: int, guidance: float) -> Image.Image:
    run = dict(num_images_per_prompt=SEEDS, num_inference_steps=steps, guidance_scale=guidance)
    rows = []
    for scene in held_out_scenes(6)[:4]:
        control = silhouette(scene)
        out = cn_pipe(prompt=scene.caption, image=control, generator=generators(0, SEEDS), **run).images
        rows.append(panel_row(f"'{scene.caption}'", [scene.image, control, *out], ["scene", "control", *SEED_CAPTIONS]))
    circle = control_of([world.ObjectSpec("circle", "red", "left", "large")])
    for prompt, label in (("a green square on the left", "circle silhouette, caption names a square"),
                          ("", "circle silhouette, empty prompt")):
        out = cn_pipe(prompt=prompt, image=circle, generator=generators(0, SEEDS), **run).images
        rows.append(panel_row(f"{label}: '{prompt}'", [circle, *out], ["control", *SEED_CAPTIONS]))
    return stack(rows)


LAYOUTS = (("triangle, left", [world.ObjectSpec("triangle", "red", "left", "large")]),
           ("square, top", [world.ObjectSpec("square", "red", "top", "large")]),
           ("circle + triangle",
            [world.ObjectSpec("circle", "red", "left"), world.ObjectSpec("triangle", "red", "right")]))


def with_image_prompt(cn_pipe, steps: int, guidance: float, conditioning) -> Image.Image:
    """``conditioning(reference) -> pipeline kwargs``; a row per (reference, silhouette)."""
    rows = []
    for name in ("red-circle", "blue-square"):
        ref = example(name)
        for label, specs in LAYOUTS:
            control = control_of(specs)
            out = cn_pipe(image=control, num_images_per_prompt=SEEDS, num_inference_steps=steps,
                          guidance_scale=guidance, generator=generators(0, SEEDS), **conditioning(ref)).images
            rows.append(panel_row(f"{name}.png + silhouette ({label})", [ref, control, *out],
                                  ["image", "control", *SEED_CAPTIONS]))
    return stack(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Regenerate the bundled ControlNet's pictures.")
    parser.add_argument("--out", default="docs/images")
    parser.add_argument("--controlnet", default=None, help="default: checkpoints/shapes-controlnet")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--only", action="append", help="alone, ip-adapter or sdipc")
    args = parser.parse_args(argv)

    from diffusers import ControlNetModel

    from imageprompt.checkpoints import BUNDLED_IP_ADAPTER
    from imageprompt.world.evaluate import load_bundled
    from imageprompt.world.evaluate_controlnet import controlnet_file

    pipe = load_bundled()
    controlnet = ControlNetModel.from_pretrained(args.controlnet or controlnet_file())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def ip_adapter():
        # diffusers' own pipeline and loader; the adapter's image encoder is the bundled CLIP's vision tower
        cn_pipe = controlnet_pipeline(pipe, controlnet, image_encoder=pipe.sdipc_image_encoder)
        cn_pipe.load_ip_adapter(str(BUNDLED_IP_ADAPTER.parent), subfolder="", weight_name=BUNDLED_IP_ADAPTER.name,
                                image_encoder_folder=None)
        try:
            return with_image_prompt(cn_pipe, args.steps, args.guidance,
                                     lambda ref: {"prompt": "", "ip_adapter_image": ref})
        finally:  # the UNet is shared with the other pictures
            cn_pipe.unload_ip_adapter()

    def sdipc():
        cn_pipe = controlnet_pipeline(pipe, controlnet)
        device = pipe.unet.device
        return with_image_prompt(cn_pipe, args.steps, args.guidance,
                                 lambda ref: {"prompt_embeds": pipe.image_prompt_embeds([ref], None, 0.0, device)})

    makers = {"alone": ("bundled-controlnet.png", lambda: alone(controlnet_pipeline(pipe, controlnet), args.steps,
                                                                  args.guidance)),
              "ip-adapter": ("bundled-controlnet-ip-adapter.png", ip_adapter),
              "sdipc": ("bundled-controlnet-sdipc.png", sdipc)}
    for name in args.only or list(makers):
        filename, make = makers[name]
        make().save(out / filename)
        print(out / filename)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
