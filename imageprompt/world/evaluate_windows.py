"""What an IP-Adapter step window does on the bundled model: who sets colour, position and background,
the text or the image prompt, when the adapter applies only in part of the steps.

    python -m imageprompt.world.evaluate_windows --samples 20 --threads 1

Each sample pairs a one-object reference image (:func:`~imageprompt.world.measures.reference_scenes`) with a
caption that names the same shape in another colour and position, and no background. Every image is read back
(:mod:`imageprompt.world.reader`) and counted as following the text or the image in each attribute.
"""

from __future__ import annotations

import argparse
import time

from imageprompt import world
from imageprompt.world.measures import EvalSettings, frac, largest, reference_scenes, sample

WINDOWS = (None, (0.0, 1.0), (0.0, 0.5), (0.5, 1.0), (0.8, 1.0))  # None: text only, no adapter
KEYS = ("text colour", "text position", "image colour", "image position", "image background")


def conflicting_caption(scene: world.Scene, index: int) -> tuple[world.ObjectSpec, str]:
    """``(spec, caption)``: same shape as the reference, another colour and position, no background named
    (so the background is the image prompt's to set)."""
    obj = scene.objects[0]
    colours = [c for c in world.COLORS if c != obj.color]
    positions = [p for p in world.POSITIONS if p != obj.position]
    spec = world.ObjectSpec(obj.shape, colours[index % len(colours)], positions[index % len(positions)])
    return spec, world.caption_for([spec], None, with_size=False)


def measure(pipe, settings: EvalSettings, windows=WINDOWS) -> list[dict]:
    """One dict per window: the fraction of images following the text / the image in each attribute."""
    from imageprompt.world.evaluate_edits import load_world_adapter

    refs = reference_scenes(settings.samples, settings.seed)
    texts = [conflicting_caption(ref, i) for i, ref in enumerate(refs)]
    prompts = [caption for _, caption in texts]
    per = settings.images_per_sample
    rows = []
    for window in windows:
        if window is None:
            pipe.unload_ip_adapter()
            images = sample(pipe, settings, prompts=prompts)
        else:
            load_world_adapter(pipe)
            pipe.set_ip_adapter_window(window)
            images = []
            for i, ref in enumerate(refs):  # one image prompt per reference; image j of sample i: seed i*per+j
                images += sample_with_adapter(pipe, settings, prompts[i], ref.image, offset=i * per)
        follow = {key: [] for key in KEYS}
        for i, ref in enumerate(refs):
            spec, _ = texts[i]
            for image in images[i * per:(i + 1) * per]:
                det, bg = largest(image), world.background_name(image)
                follow["text colour"].append(det is not None and det.color == spec.color)
                follow["text position"].append(det is not None and det.position == spec.position)
                follow["image colour"].append(det is not None and det.color == ref.objects[0].color)
                follow["image position"].append(det is not None and det.position == ref.objects[0].position)
                follow["image background"].append(bg == ref.background)
        rows.append({"window": "text only" if window is None else f"{window[0]:g}-{window[1]:g}",
                     "images": len(images), **{k: frac(v) for k, v in follow.items()}})
    pipe.unload_ip_adapter()
    return rows


def sample_with_adapter(pipe, settings: EvalSettings, prompt: str, reference, offset: int) -> list:
    from imageprompt.images import generators

    per = settings.images_per_sample
    return pipe(prompt=prompt, ip_adapter_image=reference, num_images_per_prompt=per,
                num_inference_steps=settings.steps, guidance_scale=settings.guidance_scale,
                generator=generators(settings.seed + offset, per)).images


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--images-per-sample", type=int, default=2)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance-scale", type=float, default=7.5)
    parser.add_argument("--threads", type=int)
    args = parser.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from imageprompt.world.evaluate import load_bundled

    start = time.perf_counter()
    pipe = load_bundled()
    settings = EvalSettings(samples=args.samples, images_per_sample=args.images_per_sample, steps=args.steps,
                            guidance_scale=args.guidance_scale)
    rows = measure(pipe, settings)
    print("| adapter window | " + " | ".join(KEYS) + " |")
    print("|---|" + "---|" * len(KEYS))
    for row in rows:
        print(f"| {row['window']} | " + " | ".join(f"{row[k]:.0%}" for k in KEYS) + " |")
    print(f"({rows[0]['images']} images a row, {time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
