"""The pictures of ``docs/ip-adapter.md``: step windows and embedding arithmetic, bundled model and adapter.

    python -m imageprompt.world.adapter_pictures --out docs/images

Two PNGs (``bundled-adapter-window.png``, ``bundled-adapter-arithmetic.png``), each a grid of labelled rows
(:mod:`imageprompt.world.pictures`), 64-pixel images at 2x, fixed seeds (reproducible on the CPU).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image

from imageprompt.images import generators
from imageprompt.world.pictures import example, panel_row, stack

SEEDS = 4


def windows(pipe, steps: int, guidance: float, prompt: str = "a red circle on the left") -> Image.Image:
    """The text ``prompt`` with the blue square as the image prompt, the adapter applied in different windows."""
    ref = example("blue-square")
    captions = ["input", *[f"seed {i}" for i in range(SEEDS)]]
    run = dict(prompt=prompt, num_images_per_prompt=SEEDS, num_inference_steps=steps, guidance_scale=guidance)
    rows = [panel_row(f"text only: {prompt!r}", [ref, *pipe(generator=generators(0, SEEDS), **run).images],
                      captions)]
    from imageprompt.world.evaluate_edits import load_world_adapter

    load_world_adapter(pipe)
    try:
        for window in ((0.0, 1.0), (0.0, 0.5), (0.5, 1.0), (0.8, 1.0)):
            pipe.set_ip_adapter_window(window)
            out = pipe(ip_adapter_image=ref, generator=generators(0, SEEDS), **run).images
            rows.append(panel_row(f"+ IP-Adapter (scale 1), window {window[0]:g}-{window[1]:g} of the steps",
                                  [ref, *out], captions))
    finally:
        pipe.unload_ip_adapter()
    return stack(rows)


def arithmetic(pipe, steps: int, guidance: float) -> Image.Image:
    """Two references combined five ways (empty text), and InstantStyle's content subtraction on one."""
    from imageprompt.world.evaluate_edits import load_world_adapter

    red, blue = example("red-circle"), example("blue-square")
    captions = ["", *[f"seed {i}" for i in range(SEEDS)]]  # after the input panel(s)
    run = dict(prompt="", num_images_per_prompt=SEEDS, num_inference_steps=steps, guidance_scale=guidance)
    load_world_adapter(pipe)
    rows = []
    try:
        for mode in ("concat", "average", "norm-average", "add", "subtract"):
            embeds = pipe.encode_ip_adapter_image([red, blue], combine=mode)
            out = pipe(ip_adapter_image_embeds=embeds, generator=generators(0, SEEDS), **run).images
            rows.append(panel_row(f"red-circle.png and blue-square.png, combine={mode}", [red, blue, *out],
                                  ["image 1", "image 2", *captions[1:]]))
        for words in (None, "square", "a blue square"):
            embeds = pipe.encode_ip_adapter_image(blue, content_text=words)
            out = pipe(ip_adapter_image_embeds=embeds, generator=generators(0, SEEDS), **run).images
            label = "no subtraction" if words is None else f"minus CLIP text embedding of {words!r}"
            rows.append(panel_row(f"blue-square.png, {label}", [blue, *out], ["image", *captions[1:]]))
    finally:
        pipe.unload_ip_adapter()
    return stack(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Regenerate the step-window and arithmetic pictures.")
    parser.add_argument("--out", default="docs/images")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--only", action="append", help="window or arithmetic")
    args = parser.parse_args(argv)

    from imageprompt.world.evaluate import load_bundled

    pipe = load_bundled()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    makers = {"window": lambda: windows(pipe, args.steps, args.guidance),
              "arithmetic": lambda: arithmetic(pipe, args.steps, args.guidance)}
    for name in args.only or list(makers):
        path = out / f"bundled-adapter-{name}.png"
        makers[name]().save(path)
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
