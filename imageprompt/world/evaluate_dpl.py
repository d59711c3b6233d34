"""Dynamic Prompt Learning against null-text inversion on two-object world scenes (issue 18).

The measurement ``"DPL vs null-text"`` of :data:`imageprompt.world.evaluate.MEASUREMENTS`
(``imageprompt eval --only "DPL vs null-text"``). Each case is a rendered scene of two objects
(different colours and shapes, one of the world's pair layouts) used as the photo. It is
inverted under its caption with null-text inversion (Mokady et al. 2023) and with DPL
(Wang et al. 2023, :mod:`imageprompt.dpl`, learning the two shape words), then one object is
edited by a prompt-to-prompt word swap: its colour in even cases, its shape in odd ones; the
first object in cases 0, 1, 4, 5, ..., the second in the others. Read from pixels:

- the other object kept: a detected object overlaps its ground-truth mask with IoU >= 0.7 and
  has its colour and shape;
- the edit took: the object detected over the edited object's place has the new colour/shape;
- background PSNR: the edit against the photo outside the edited object's region (its
  ground-truth mask and the object detected there, dilated by two pixels; identical is 60 dB);
- seconds per edit: inversion plus edit.
"""

from __future__ import annotations

import time

import numpy as np

from imageprompt import world
from imageprompt.world.measures import EvalSettings, Row, frac

IOU_KEPT = 0.7
NAME = "DPL vs null-text"


def two_object_cases(count: int) -> list[tuple[world.Scene, str, str, int, str, str]]:
    """``(scene, source caption, target caption, edited index, attribute, new value)`` for ``count`` scenes."""
    colors, shapes, backgrounds = list(world.COLORS), list(world.SHAPES), list(world.BACKGROUNDS)
    rng = np.random.default_rng(18)
    cases = []
    for i in range(count):
        layout = world.PAIR_LAYOUTS[i % len(world.PAIR_LAYOUTS)]
        pair_shapes = rng.choice(shapes, 2, replace=False)
        pair_colors = rng.choice(colors, 2, replace=False)
        specs = [world.ObjectSpec(str(s), str(c), p, "large") for s, c, p in zip(pair_shapes, pair_colors, layout)]
        background = backgrounds[i % len(backgrounds)]
        scene = world.render(specs, background, np.random.default_rng([18, i]))
        k = (i // 2) % 2
        edited = specs[k]
        if i % 2 == 0:
            attr, new = "colour", next(c for c in colors[colors.index(edited.color) + 1:] + colors
                                       if c not in pair_colors)
            changed = world.ObjectSpec(edited.shape, new, edited.position, edited.size)
        else:
            attr, new = "shape", next(s for s in shapes if s not in pair_shapes)
            changed = world.ObjectSpec(new, edited.color, edited.position, edited.size)
        target_specs = [changed if j == k else s for j, s in enumerate(specs)]
        cases.append((scene, world.caption_for(specs, background), world.caption_for(target_specs, background),
                      k, attr, new))
    return cases


def _best_match(detections, mask):
    scored = [(world.mask_iou(d.mask, mask), d) for d in detections]
    return max(scored, key=lambda x: x[0], default=(0.0, None))


def judge_edit(scene: world.Scene, edit_image, edited: int, attr: str, new: str) -> dict[str, float | bool]:
    """The figures of one edit, read from its pixels against the scene's ground truth."""
    detections = world.detect_objects(edit_image)
    other = scene.objects[1 - edited]
    iou, found = _best_match(detections, other.mask)
    kept = found is not None and iou >= IOU_KEPT and found.color == other.color and found.shape == other.shape
    _, target = _best_match(detections, scene.objects[edited].mask)
    took = target is not None and (target.color if attr == "colour" else target.shape) == new
    region = scene.objects[edited].mask | (target.mask if target is not None else False)
    for _ in range(2):
        region = world.reader._dilate(region)
    photo, edit = np.asarray(scene.image.convert("RGB")), np.asarray(edit_image.convert("RGB"))
    outside = ~region
    if np.array_equal(photo[outside], edit[outside]):
        psnr = 60.0
    else:
        from skimage.metrics import peak_signal_noise_ratio

        psnr = min(60.0, float(peak_signal_noise_ratio(photo[outside], edit[outside], data_range=255)))
    return {"kept": kept, "iou": iou, "took": took, "psnr": psnr}


def dpl_vs_null_text(pipe, settings: EvalSettings) -> list[Row]:
    """Null-text + P2P and DPL + P2P on :func:`two_object_cases` (``settings.samples`` scenes).

    ``settings.extra["dpl"]`` may hold :class:`~imageprompt.dpl.DPLSettings` fields (a dict; none:
    the paper's settings); ``settings.extra["dpl_outputs"]``, a list, receives
    ``(method, source, target, photo, reconstruction, edit)`` per edit."""
    from diffusers import DDIMScheduler

    from imageprompt.dpl import DPLSettings
    from imageprompt.pipelines import StableDiffusionPromptToPromptPipeline

    p2p = StableDiffusionPromptToPromptPipeline.from_pipe(
        pipe, scheduler=DDIMScheduler.from_config(pipe.scheduler.config))
    p2p.set_progress_bar_config(disable=True)
    extra = settings.extra
    dpl_settings = DPLSettings(**extra.get("dpl", {}))
    cases = two_object_cases(settings.samples)
    rows = []
    for method in ("null-text", "dpl"):
        results, seconds = [], []
        for scene, source, target, edited, attr, new in cases:
            start = time.perf_counter()
            words = [o.shape for o in scene.objects] if method == "dpl" else None
            inversion = p2p.invert(scene.image, source, method, num_inference_steps=settings.steps,
                                   guidance_scale=settings.guidance_scale, words=words, dpl_settings=dpl_settings)
            out = p2p(source, target, mode="replace", inversion=inversion, num_inference_steps=settings.steps,
                      guidance_scale=settings.guidance_scale)
            seconds.append(time.perf_counter() - start)
            results.append(judge_edit(scene, out.images[1], edited, attr, new))
            if extra.get("dpl_outputs") is not None:
                extra["dpl_outputs"].append((method, source, target, scene.image, *out.images))
        label, n = f"{NAME} [{method}]", len(results)
        rows += [Row(label, f"other object kept (colour, shape, IoU >= {IOU_KEPT})", frac(r["kept"] for r in results),
                     n),
                 Row(label, "other object: mean mask IoU", float(np.mean([r["iou"] for r in results])), n, unit=""),
                 Row(label, "edit took", frac(r["took"] for r in results), n),
                 Row(label, "background PSNR outside the edited object", float(np.mean([r["psnr"] for r in results])),
                     n, unit="dB"),
                 Row(label, "seconds per edit", float(np.mean(seconds)), n, unit="s")]
    return rows


__all__ = ["two_object_cases", "judge_edit", "dpl_vs_null_text"]
