"""Measurements of consistency on the shapes world: MasaCtrl and StyleAligned (issue 16).

Two rows of the shapes-world table, listed in :data:`imageprompt.world.evaluate.MEASUREMENTS`:

- ``MasaCtrl``: mutual self-attention (Cao et al. 2023) on a one-object source,
  "a large red circle on the left" -> "a large red square on the left" (shape
  change) or "... on the right" (position change); neither prompt names a
  background. Read from pixels: was the asked change made, and did the edit keep
  the source's identity (its object's colour class, its background, and how far
  its object's mean RGB lies from the source's)? The baseline is plain sampling
  of the same two prompts from the same noise (the same call with no step in
  MasaCtrl's window).
- ``StyleAligned``: shared attention (Hertz et al. 2024) over a set of four
  prompts, the first the reference ("a large red circle on the left", then other
  shapes and positions, same colour word, no background named). Read from pixels:
  does each other image have the reference's background, how far is its object's
  and its background's RGB from the reference's, and does it still show the
  shape its prompt asks for? The baseline is plain sampling of the same prompts
  from the same noise, one independent image each.

Run: ``imageprompt eval --only MasaCtrl --only StyleAligned --threads 1`` (see
``docs/techniques.md`` for the table, settings and wall time).
"""

from __future__ import annotations

import numpy as np

from imageprompt import world
from imageprompt.images import generators
from imageprompt.world import COLORS, POSITIONS, SHAPES, ObjectSpec
from imageprompt.world.measures import EvalSettings, Row, frac, largest


def _rgb_distance(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a, float) - np.asarray(b, float)))


def masactrl_cases(count: int) -> list[tuple[str, str, str, str]]:
    """``(source caption, target caption, changed attribute, new value)``; shape and position changes alternate."""
    colors, shapes, positions = list(COLORS), list(SHAPES), list(POSITIONS)
    cases = []
    for i in range(count):
        spec = ObjectSpec(shapes[i % 3], colors[(i // 3) % len(colors)], positions[(i // 2) % len(positions)],
                          "large")
        if i % 2 == 0:
            new = shapes[(shapes.index(spec.shape) + 1 + (i // 6) % 2) % 3]
            target = ObjectSpec(new, spec.color, spec.position, "large")
            cases.append((world.caption_for([spec]), world.caption_for([target]), "shape", new))
        else:
            new = positions[(positions.index(spec.position) + 1 + (i // 10) % 4) % len(positions)]
            target = ObjectSpec(spec.shape, spec.color, new, "large")
            cases.append((world.caption_for([spec]), world.caption_for([target]), "position", new))
    return cases


def masactrl_identity(pipe, settings: EvalSettings) -> list[Row]:
    """MasaCtrl vs plain sampling of the target: asked change made, identity (colour, background) kept.

    ``settings.extra`` may hold ``masactrl_start_step`` (4, the paper's S) and ``masactrl_start_layer``
    (None: the paper's L translated to the model, the decoder's two highest-resolution levels).
    """
    from imageprompt.pipelines import StableDiffusionMasaCtrlPipeline

    masactrl = StableDiffusionMasaCtrlPipeline.from_pipe(pipe)
    masactrl.set_progress_bar_config(disable=True)
    extra, per = settings.extra, settings.images_per_sample
    start_step, start_layer = extra.get("masactrl_start_step", 4), extra.get("masactrl_start_layer")
    found = {m: {"changed": [], "colour": [], "background": [], "all": [], "rgb": []} for m in ("masactrl", "plain")}
    for i, (source, target, attr, new) in enumerate(masactrl_cases(settings.samples)):
        for j in range(per):
            for method in ("masactrl", "plain"):
                generator = generators(settings.seed + 60_000 + i * per + j, 1)[0]
                step = start_step if method == "masactrl" else settings.steps  # no step in the window: plain
                out = masactrl(source, target, start_step=step, start_layer=start_layer,
                          num_inference_steps=settings.steps, guidance_scale=settings.guidance_scale,
                          generator=generator)
                src_image, edit_image = out.images
                src, edit = largest(src_image), largest(edit_image)
                got = found[method]
                changed = edit is not None and getattr(edit, attr) == new
                colour = src is not None and edit is not None and edit.color == src.color
                background = world.background_name(edit_image) == world.background_name(src_image)
                got["changed"].append(changed)
                got["colour"].append(colour)
                got["background"].append(background)
                got["all"].append(changed and colour and background)
                if src is not None and edit is not None:
                    got["rgb"].append(_rgb_distance(src.rgb, edit.rgb))
    rows = []
    for method, name in (("masactrl", "MasaCtrl"), ("plain", "MasaCtrl baseline: plain target")):
        got, n = found[method], len(found[method]["changed"])
        rows += [
            Row(name, "asked change made (shape or position)", frac(got["changed"]), n),
            Row(name, "colour kept", frac(got["colour"]), n),
            Row(name, "background kept", frac(got["background"]), n),
            Row(name, "change made and colour and background kept", frac(got["all"]), n),
            Row(name, "object RGB distance to the source", float(np.mean(got["rgb"] or [np.nan])), len(got["rgb"]),
                unit="rgb"),
        ]
    return rows


def style_sets(count: int, size: int = 4) -> list[list[str]]:
    """``count`` sets of ``size`` captions: one colour word per set, shapes and positions varying, no background."""
    colors, shapes, positions = list(COLORS), list(SHAPES), list(POSITIONS)
    sets = []
    for i in range(count):
        color = colors[i % len(colors)]
        specs = [ObjectSpec(shapes[(i + k) % 3], color, positions[(i + 2 * k) % len(positions)], "large")
                 for k in range(size)]
        sets.append([world.caption_for([s]) for s in specs])
    return sets


def style_aligned_consistency(pipe, settings: EvalSettings) -> list[Row]:
    """StyleAligned vs plain sampling: background and colour consistency with the reference across a set.

    ``settings.samples`` sets of four prompts (``images_per_sample`` is not used); ``settings.extra`` may hold
    ``style_share_group_norm`` (False).
    """
    from imageprompt.pipelines import StableDiffusionStyleAlignedPipeline

    aligned = StableDiffusionStyleAlignedPipeline.from_pipe(pipe)
    aligned.set_progress_bar_config(disable=True)
    share_norm = settings.extra.get("style_share_group_norm", False)
    found = {m: {"background": [], "shape": [], "object": [], "bg_rgb": []} for m in ("aligned", "plain")}
    for i, prompts in enumerate(style_sets(settings.samples)):
        kw = dict(num_inference_steps=settings.steps, guidance_scale=settings.guidance_scale)
        seeds = settings.seed + 70_000 + i * len(prompts)
        images = {
            "aligned": aligned(prompts, generator=generators(seeds, len(prompts)), share_group_norm=share_norm,
                               **kw).images,
            "plain": pipe(prompt=prompts, generator=generators(seeds, len(prompts)), **kw).images,
        }
        for method, ims in images.items():
            got = found[method]
            ref, ref_obj = ims[0], largest(ims[0])
            for prompt, image in zip(prompts[1:], ims[1:]):
                spec = world.parse_caption(prompt)[0][0]
                obj = largest(image)
                got["background"].append(world.background_name(image) == world.background_name(ref))
                got["shape"].append(obj is not None and obj.shape == spec.shape)
                got["bg_rgb"].append(_rgb_distance(world.background_rgb(image), world.background_rgb(ref)))
                if obj is not None and ref_obj is not None:
                    got["object"].append(_rgb_distance(obj.rgb, ref_obj.rgb))
    rows = []
    for method, name in (("aligned", "StyleAligned"), ("plain", "StyleAligned baseline: plain sampling")):
        got, n = found[method], len(found[method]["background"])
        rows += [
            Row(name, "background same as the reference's", frac(got["background"]), n),
            Row(name, "background RGB distance to the reference", float(np.mean(got["bg_rgb"])), n, unit="rgb"),
            Row(name, "object RGB distance to the reference's object", float(np.mean(got["object"] or [np.nan])),
                len(got["object"]), unit="rgb"),
            Row(name, "shape as its prompt asks", frac(got["shape"]), n),
        ]
    return rows


__all__ = ["masactrl_cases", "masactrl_identity", "style_aligned_consistency", "style_sets"]
