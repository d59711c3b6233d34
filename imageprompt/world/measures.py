"""What the measurements of meaning share: settings, result rows, the fixed scene sets and
the sampling helpers (:mod:`imageprompt.world.evaluate` and :mod:`.evaluate_edits` use them)."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from imageprompt import world
from imageprompt.images import generators
from imageprompt.world import COLORS, POSITIONS, SHAPES, ObjectSpec

# ----------------------------------------------------------------------------- settings and rows


@dataclass
class EvalSettings:
    """How much to sample. ``quick()`` is the subset the default tests run."""

    samples: int = 30  # captions / references per measurement (cycled through the fixed sets)
    images_per_sample: int = 2
    steps: int = 25
    guidance_scale: float = 7.5
    alpha: float = 0.5  # SD-IPC editing weight of the text
    seed: int = 0
    batch: int = 16  # images per pipeline call
    extra: dict = field(default_factory=dict)  # free-form options for added measurements

    @classmethod
    def quick(cls) -> EvalSettings:
        return cls(samples=6, images_per_sample=1, steps=12)


@dataclass
class Row:
    measurement: str
    metric: str
    value: float
    n: int
    aim: float | None = None
    unit: str = "%"  # "%": a fraction shown as a percentage; anything else: the number, then the unit

    @property
    def meets_aim(self) -> bool | None:
        return None if self.aim is None else self.value >= self.aim

    def show(self, value: float | None = None) -> str:
        value = self.value if value is None else value
        return f"{value:.0%}" if self.unit == "%" else f"{value:.2f} {self.unit}".rstrip()


Measurement = Callable[..., list[Row]]


# ----------------------------------------------------------------------------- fixed sets


def single_object_specs() -> list[ObjectSpec]:
    """Every (shape, colour) once, positions cycled: 15 one-object scenes."""
    positions = list(POSITIONS)
    pairs = list(itertools.product(SHAPES, COLORS))
    return [ObjectSpec(s, c, positions[i % len(positions)]) for i, (s, c) in enumerate(pairs)]


def caption_set() -> list[list[ObjectSpec]]:
    """The fixed scenes of the text-to-image measurement: 15 single, 10 pairs, interleaved."""
    singles = [[s] for s in single_object_specs()]
    rng = np.random.default_rng(1234)
    pairs, seen = [], set()
    while len(pairs) < 10:  # distinct captions; the two objects differ in colour and shape
        layout = world.PAIR_LAYOUTS[len(pairs) % len(world.PAIR_LAYOUTS)]
        shapes = rng.choice(SHAPES, 2, replace=False)
        colors = rng.choice(list(COLORS), 2, replace=False)
        pair = [ObjectSpec(str(s), str(c), p) for s, c, p in zip(shapes, colors, layout)]
        if world.caption_for(pair) not in seen:
            seen.add(world.caption_for(pair))
            pairs.append(pair)
    out = []
    for i in range(max(len(singles), len(pairs))):
        if i < len(singles):
            out.append(singles[i])
        if i < len(pairs):
            out.append(pairs[i])
    return out


def caption_background(index: int, specs: list[ObjectSpec]) -> str | None:
    """The background named in the ``index``-th text-to-image caption: single objects cycle
    through the backgrounds; pairs name none."""
    return list(world.BACKGROUNDS)[index % len(world.BACKGROUNDS)] if len(specs) == 1 else None


def reference_scenes(count: int, seed: int = 0) -> list[world.Scene]:
    """One-object reference images for variation and editing (sizes large, backgrounds cycled)."""
    specs = single_object_specs()
    backgrounds = list(world.BACKGROUNDS)
    scenes = []
    for i in range(count):
        spec = specs[(i * 7) % len(specs)]  # 7 is coprime with 15: spreads shapes/colours/positions
        spec = ObjectSpec(spec.shape, spec.color, spec.position, "large")
        scenes.append(world.render([spec], backgrounds[i % len(backgrounds)], np.random.default_rng([seed, i])))
    return scenes


# ----------------------------------------------------------------------------- sampling helpers


def sample(pipe, settings: EvalSettings, *, prompts=None, images=None, embeds=None, offset: int = 0) -> list:
    """Run the pipeline over prompts, images, both, or ready conditionings (``embeds``, one row
    each) in batches; ``images_per_sample`` each."""
    n = len(next(x for x in (prompts, images, embeds) if x is not None))
    per = settings.images_per_sample
    chunk = max(1, settings.batch // per)
    out = []
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        kwargs = dict(
            num_inference_steps=settings.steps,
            guidance_scale=settings.guidance_scale,
            num_images_per_prompt=per,
            generator=generators(settings.seed + offset + start * per, (stop - start) * per),
            output_type="pil",
        )
        if prompts is not None:
            kwargs["prompt"] = prompts[start:stop]
        if embeds is not None:
            kwargs["prompt_embeds"] = embeds[start:stop]
        if images is not None:
            kwargs["image"] = images[start:stop]
            if prompts is not None:
                kwargs["alpha"] = settings.alpha
        out.extend(pipe(**kwargs).images)
    return out


def frac(flags) -> float:
    flags = list(flags)
    return float(np.mean(flags)) if flags else 0.0


def largest(image) -> world.DetectedObject | None:
    found = world.detect_objects(image)
    return found[0] if found else None


def kept_rows(name: str, refs, images, per: int, aims=(0.9, 0.8, 0.8)) -> list[Row]:
    """Does each image keep its one-object reference's colour, shape, background and position?
    (``per`` images a reference; the background counts only where an object was found.)"""
    keep = {"colour": [], "shape": [], "background": [], "position": []}
    for i, ref in enumerate(refs):
        obj = ref.objects[0]
        for image in images[i * per : (i + 1) * per]:
            det = largest(image)
            keep["colour"].append(det is not None and det.color == obj.color)
            keep["shape"].append(det is not None and det.shape == obj.shape)
            keep["background"].append(det is not None and world.background_name(image) == ref.background)
            keep["position"].append(det is not None and det.position == obj.position)
    n = len(keep["colour"])
    colour, shape, background = aims
    return [
        Row(name, "keeps colour", frac(keep["colour"]), n, aim=colour),
        Row(name, "keeps shape", frac(keep["shape"]), n, aim=shape),
        Row(name, "keeps background", frac(keep["background"]), n, aim=background),
        Row(name, "keeps position", frac(keep["position"]), n),
    ]
