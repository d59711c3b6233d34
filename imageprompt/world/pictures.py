"""The pictures of ``docs/bundled-model.md``: every technique on the demo's examples, bundled model.

    python -m imageprompt.world.pictures --out docs/images

One PNG per technique, each a grid of labelled panels (inputs left, outputs right), the
64-pixel images shown at 2x. Seeds are fixed, so the pictures are reproducible on the CPU.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from imageprompt.images import generators

EXAMPLES = Path(__file__).resolve().parents[2] / "demo" / "examples"
SCALE = 2
LABEL = 14


def panel_row(label: str, images: list[Image.Image], captions: list[str]) -> Image.Image:
    """One labelled row: a title line, then the images side by side with a caption each."""
    font = ImageFont.load_default()
    side = images[0].width * SCALE
    width = max(len(images) * (side + 4) + 4, 8 * len(label) + 8)
    row = Image.new("RGB", (width, LABEL + side + LABEL + 8), (255, 255, 255))
    draw = ImageDraw.Draw(row)
    draw.text((4, 1), label, fill=(0, 0, 0), font=font)
    for i, (image, caption) in enumerate(zip(images, captions)):
        x = 4 + i * (side + 4)
        row.paste(image.convert("RGB").resize((side, side), Image.Resampling.NEAREST), (x, LABEL + 2))
        draw.text((x, LABEL + side + 4), caption[: side // 6], fill=(60, 60, 60), font=font)
    return row


def stack(rows: list[Image.Image]) -> Image.Image:
    out = Image.new("RGB", (max(r.width for r in rows), sum(r.height for r in rows)), (255, 255, 255))
    y = 0
    for r in rows:
        out.paste(r, (0, y))
        y += r.height
    return out


def example(name: str) -> Image.Image:
    return Image.open(EXAMPLES / f"{name}.png").convert("RGB")


def variations(pipe, steps: int, guidance: float) -> Image.Image:
    rows = []
    for name in ("blue-triangle", "yellow-triangle", "blue-square", "red-circle", "green-triangle-yellow-circle"):
        ref = example(name)
        out = pipe(image=ref, num_images_per_prompt=4, num_inference_steps=steps, guidance_scale=guidance,
                   generator=generators(0, 4)).images
        rows.append(panel_row(f"SD-IPC variation of {name}.png", [ref, *out],
                              ["input", *[f"seed {i}" for i in range(4)]]))
    return stack(rows)


EDITS = [("red-circle", ["a blue circle", "a red square", "a green triangle"]),
         ("blue-square", ["a yellow square", "a blue triangle", "a purple circle"])]


def edits(pipe, steps: int, guidance: float, alpha: float) -> Image.Image:
    rows = []
    for name, prompts in EDITS:
        ref = example(name)
        out = [pipe(image=ref, prompt=p, alpha=alpha, num_inference_steps=steps, guidance_scale=guidance,
                    generator=generators(0, 1)).images[0] for p in prompts]
        rows.append(panel_row(f"SD-IPC edit of {name}.png, alpha {alpha}", [ref, *out], ["input", *prompts]))
    return stack(rows)


def ip_adapter(pipe, steps: int, guidance: float) -> Image.Image:
    from imageprompt.world.evaluate_edits import load_world_adapter

    load_world_adapter(pipe)
    rows = []
    try:
        for name in ("red-circle", "blue-square", "green-triangle-yellow-circle"):
            ref = example(name)
            out = pipe(prompt="", ip_adapter_image=ref, num_images_per_prompt=4, num_inference_steps=steps,
                       guidance_scale=guidance, generator=generators(0, 4)).images
            rows.append(panel_row(f"IP-Adapter (bundled), image prompt {name}.png", [ref, *out],
                                  ["input", *[f"seed {i}" for i in range(4)]]))
    finally:
        pipe.unload_ip_adapter()
    return stack(rows)


P2P = [("a red circle on the left", "a green circle on the left", ["red", "green"]),
       ("a blue square at the top and a yellow triangle at the bottom",
        "a blue square at the top and a purple triangle at the bottom", ["yellow", "purple"])]


def prompt_to_prompt(pipe, steps: int, guidance: float) -> Image.Image:
    from imageprompt.attention_maps import render_attention_maps
    from imageprompt.pipelines import StableDiffusionPromptToPromptPipeline

    p2p = StableDiffusionPromptToPromptPipeline.from_pipe(pipe)
    p2p.set_progress_bar_config(disable=True)
    rows = []
    for source, target, blend in P2P:
        plain = p2p(source, target, num_inference_steps=steps, guidance_scale=guidance, generator=generators(0, 1)[0])
        blended = p2p(source, target, blend_words=blend, num_inference_steps=steps, guidance_scale=guidance,
                      generator=generators(0, 1)[0])
        rows.append(panel_row(f"prompt-to-prompt: '{source}' -> '{target}'",
                              [plain.images[0], plain.images[1], blended.images[1]],
                              ["source", "replace", "replace + blend"]))
        rows.append(render_attention_maps(plain.attention_maps, plain.tokens, plain.images, size=96))
    return stack(rows)


def real_image_edit(pipe, steps: int, guidance: float) -> Image.Image:
    from diffusers import DDIMScheduler

    from imageprompt.pipelines import StableDiffusionPromptToPromptPipeline

    p2p = StableDiffusionPromptToPromptPipeline.from_pipe(pipe, scheduler=DDIMScheduler.from_config(
        pipe.scheduler.config))
    p2p.set_progress_bar_config(disable=True)
    photo = example("red-circle")
    source = "a large red circle in the center on a white background"
    targets = ["a large blue circle in the center on a white background",
               "a large red square in the center on a white background"]
    rows = []
    for method in ("null-text", "negative-prompt"):
        inversion = p2p.invert(photo, source, method, num_inference_steps=steps, guidance_scale=guidance)
        out = [p2p(source, t, inversion=inversion, num_inference_steps=steps, guidance_scale=guidance).images
               for t in targets]
        rows.append(panel_row(f"real-image edit of red-circle.png, {method} inversion",
                              [photo, out[0][0], out[0][1], out[1][1]],
                              ["photo", "reconstruction", "-> blue", "-> square"]))
    return stack(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Regenerate the pictures of docs/bundled-model.md.")
    parser.add_argument("--out", default="docs/images")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--only", action="append", help="one of: variation, edit, ip-adapter, p2p, real-edit")
    args = parser.parse_args(argv)

    from imageprompt.world.evaluate import load_bundled

    pipe = load_bundled()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    makers = {
        "variation": lambda: variations(pipe, args.steps, args.guidance),
        "edit": lambda: edits(pipe, args.steps, args.guidance, args.alpha),
        "ip-adapter": lambda: ip_adapter(pipe, args.steps, args.guidance),
        "p2p": lambda: prompt_to_prompt(pipe, args.steps, args.guidance),
        "real-edit": lambda: real_image_edit(pipe, args.steps, args.guidance),
    }
    for name in args.only or list(makers):
        path = out / f"bundled-{name}.png"
        makers[name]().save(path)
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
