"""Measurements of meaning on the shapes world (issue 3, item 4).

Every figure is read from pixels against the world's ground truth with the
functions of :mod:`imageprompt.world` (colour of the object region, shape class
of its mask, position of its centroid, mask IoU): nothing here looks at the
model's internals.

The suite is a dict of named measurements, :data:`MEASUREMENTS`; each takes a
pipeline and an :class:`EvalSettings` and returns :class:`Row` s. Other
techniques add their rows with :func:`register_measurement` (for example
prompt-to-prompt replace, or an IP-Adapter trained on the world)::

    from imageprompt.evaluate import register_measurement, Row

    @register_measurement("p2p replace")
    def p2p_replace(pipe, settings):
        ...
        return [Row("p2p replace", "colour changed", 0.9, 20, aim=0.8)]

Run the table with ``python -m imageprompt.evaluate`` (``--quick`` for the
subset the tests use), or ``imageprompt eval --suite world`` once the command
module is registered.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from imageprompt import world
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

    @property
    def meets_aim(self) -> bool | None:
        return None if self.aim is None else self.value >= self.aim


Measurement = Callable[..., list[Row]]
MEASUREMENTS: dict[str, Measurement] = {}


def register_measurement(name: str) -> Callable[[Measurement], Measurement]:
    """Decorator: add ``fn(pipe, settings) -> list[Row]`` to the suite under ``name``."""

    def deco(fn: Measurement) -> Measurement:
        MEASUREMENTS[name] = fn
        return fn

    return deco


# ----------------------------------------------------------------------------- fixed sets


def single_object_specs() -> list[ObjectSpec]:
    """Every (shape, colour) once, positions cycled: 15 one-object scenes."""
    positions = list(POSITIONS)
    pairs = list(itertools.product(SHAPES, COLORS))
    return [ObjectSpec(s, c, positions[i % len(positions)]) for i, (s, c) in enumerate(pairs)]


def caption_set() -> list[list[ObjectSpec]]:
    """The fixed captions of the text-to-image measurement: 15 single, 10 pairs, interleaved."""
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


def _generators(seed: int, count: int):
    import torch

    return [torch.Generator("cpu").manual_seed(seed + i) for i in range(count)]


def _sample(pipe, settings: EvalSettings, *, prompts=None, images=None, offset: int = 0) -> list:
    """Run the pipeline over prompts and/or images in batches; ``images_per_sample`` each."""
    n = len(prompts if prompts is not None else images)
    per = settings.images_per_sample
    chunk = max(1, settings.batch // per)
    out = []
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        kwargs = dict(
            num_inference_steps=settings.steps,
            guidance_scale=settings.guidance_scale,
            num_images_per_prompt=per,
            generator=_generators(settings.seed + offset + start * per, (stop - start) * per),
            output_type="pil",
        )
        if prompts is not None:
            kwargs["prompt"] = prompts[start:stop]
        if images is not None:
            kwargs["image"] = images[start:stop]
            if prompts is not None:
                kwargs["alpha"] = settings.alpha
        out.extend(pipe(**kwargs).images)
    return out


def _frac(flags) -> float:
    flags = list(flags)
    return float(np.mean(flags)) if flags else 0.0


def _largest(image) -> world.DetectedObject | None:
    found = world.detect_objects(image)
    return found[0] if found else None


# ----------------------------------------------------------------------------- measurements


@register_measurement("text-to-image")
def text_to_image(pipe, settings: EvalSettings) -> list[Row]:
    """Colour, shape and position of each named object, over the fixed caption set."""
    cases = list(itertools.islice(itertools.cycle(caption_set()), settings.samples))
    captions = [world.caption_for(specs) for specs in cases]
    images = _sample(pipe, settings, prompts=captions)
    per = settings.images_per_sample
    scores = {"all": [], "single": [], "pair": []}
    for i, specs in enumerate(cases):
        for image in images[i * per : (i + 1) * per]:
            for r in world.score_image(image, specs):
                scores["all"].append(r)
                scores["single" if len(specs) == 1 else "pair"].append(r)
    name = "text-to-image"
    rows = [
        Row(name, "colour", _frac(r["color"] for r in scores["all"]), len(scores["all"]), aim=0.9),
        Row(name, "shape", _frac(r["shape"] for r in scores["all"]), len(scores["all"]), aim=0.8),
        Row(name, "position", _frac(r["position"] for r in scores["all"]), len(scores["all"])),
    ]
    for part in ("single", "pair"):
        if scores[part]:
            rows.append(Row(name, f"all three right ({part})",
                            _frac(r["color"] and r["shape"] and r["position"] for r in scores[part]),
                            len(scores[part])))
    return rows


def _has_image_prompting(pipe) -> bool:
    return getattr(pipe, "image_encoder", None) is not None and getattr(pipe, "converter", None) is not None


@register_measurement("SD-IPC variation")
def sdipc_variation(pipe, settings: EvalSettings) -> list[Row]:
    """Does the variation of a one-object image keep its colour, shape and position?"""
    if not _has_image_prompting(pipe):
        return []
    refs = reference_scenes(settings.samples, settings.seed)
    images = _sample(pipe, settings, images=[s.image for s in refs], offset=10_000)
    per = settings.images_per_sample
    keep = {"colour": [], "shape": [], "position": []}
    for i, ref in enumerate(refs):
        obj = ref.objects[0]
        for image in images[i * per : (i + 1) * per]:
            det = _largest(image)
            keep["colour"].append(det is not None and det.color == obj.color)
            keep["shape"].append(det is not None and det.shape == obj.shape)
            keep["position"].append(det is not None and det.position == obj.position)
    name = "SD-IPC variation"
    n = len(keep["colour"])
    return [
        Row(name, "keeps colour", _frac(keep["colour"]), n, aim=0.8),
        Row(name, "keeps shape", _frac(keep["shape"]), n),
        Row(name, "keeps position", _frac(keep["position"]), n),
    ]


def edit_cases(refs: list[world.Scene]) -> list[tuple[world.Scene, str, str, str]]:
    """(reference, attribute, new value, edit prompt): colour and shape edits alternate.

    The prompt names the new value and the other of (colour, shape), as SD-IPC's
    editing prompts name the subject; the position is left to the image.
    """
    colors, shapes = list(COLORS), list(SHAPES)
    cases = []
    for i, ref in enumerate(refs):
        obj = ref.objects[0]
        if i % 2 == 0:
            new = colors[(colors.index(obj.color) + 1 + (i // 2) % (len(colors) - 1)) % len(colors)]
            cases.append((ref, "colour", new, f"a {new} {obj.shape}"))
        else:
            new = shapes[(shapes.index(obj.shape) + 1 + (i // 2) % (len(shapes) - 1)) % len(shapes)]
            cases.append((ref, "shape", new, f"a {obj.color} {new}"))
    return cases


@register_measurement("SD-IPC edit")
def sdipc_edit(pipe, settings: EvalSettings) -> list[Row]:
    """Does the edit change the named attribute and keep the others?"""
    if not _has_image_prompting(pipe):
        return []
    cases = edit_cases(reference_scenes(settings.samples, settings.seed + 1))
    images = _sample(pipe, settings, images=[c[0].image for c in cases], prompts=[c[3] for c in cases],
                     offset=20_000)
    per = settings.images_per_sample
    changed, kept, kept_pos = [], [], []
    for i, (ref, attr, new, _) in enumerate(cases):
        obj = ref.objects[0]
        for image in images[i * per : (i + 1) * per]:
            det = _largest(image)
            if det is None:
                changed.append(False), kept.append(False), kept_pos.append(False)
                continue
            if attr == "colour":
                changed.append(det.color == new)
                kept.append(det.shape == obj.shape)
            else:
                changed.append(det.shape == new)
                kept.append(det.color == obj.color)
            kept_pos.append(det.position == obj.position)
    name = "SD-IPC edit"
    n = len(changed)
    return [
        Row(name, "named attribute changed", _frac(changed), n),
        Row(name, "other attribute kept", _frac(kept), n),
        Row(name, "position kept", _frac(kept_pos), n),
        Row(name, "changed and both kept", _frac(a and b and c for a, b, c in zip(changed, kept, kept_pos)), n),
    ]


# ----------------------------------------------------------------------------- suite and table


def run_suite(pipe, settings: EvalSettings | None = None, names: list[str] | None = None,
              progress: Callable[[str], None] | None = None) -> list[Row]:
    import imageprompt.evaluate_edits  # noqa: F401  (registers "p2p replace" and "IP-Adapter (world)")

    settings = settings or EvalSettings()
    rows: list[Row] = []
    for name in names or list(MEASUREMENTS):
        if name not in MEASUREMENTS:
            raise ValueError(f"unknown measurement {name!r}; known: {', '.join(MEASUREMENTS)}")
        t = time.time()
        got = MEASUREMENTS[name](pipe, settings)
        if progress:
            progress(f"{name}: {len(got)} rows in {time.time() - t:.0f}s")
        rows.extend(got)
    return rows


def format_table(rows: list[Row]) -> str:
    header = ("measurement", "metric", "value", "n", "aim")
    body = [
        (r.measurement, r.metric, f"{r.value:.0%}", str(r.n),
         "" if r.aim is None else f">= {r.aim:.0%} {'ok' if r.meets_aim else 'MISSED'}")
        for r in rows
    ]
    widths = [max(len(x[i]) for x in [header, *body]) for i in range(len(header))]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, body)])


def load_bundled(device: str | None = "cpu"):
    """The bundled model through the project's own loader (SD-IPC ready)."""
    from imageprompt.checkpoints import BUNDLED_CLIP, BUNDLED_MODEL
    from imageprompt.loading import load_pipeline

    pipe = load_pipeline(model=str(BUNDLED_MODEL), clip=str(BUNDLED_CLIP), device=device, dtype="fp32")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--suite", default="world", choices=["world"], help="measurement suite")
    parser.add_argument("--only", action="append", help="run only this measurement (repeatable)")
    parser.add_argument("--quick", action="store_true", help="the small subset the tests run")
    parser.add_argument("--samples", type=int, help="captions / references per measurement")
    parser.add_argument("--images-per-sample", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--guidance-scale", type=float)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--model", help="default: the bundled shapes-world model")
    parser.add_argument("--clip", help="default: the bundled shapes-world CLIP")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, help="torch CPU threads (1 is fastest on a small shared CPU)")


def _run(args) -> int:
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    settings = EvalSettings.quick() if args.quick else EvalSettings()
    for key in ("samples", "images_per_sample", "steps", "guidance_scale", "seed"):
        if getattr(args, key, None) is not None:
            setattr(settings, key, getattr(args, key))
    if args.model or args.clip:
        from imageprompt.checkpoints import BUNDLED_CLIP, BUNDLED_MODEL
        from imageprompt.loading import load_pipeline

        pipe = load_pipeline(model=args.model or str(BUNDLED_MODEL), clip=args.clip or str(BUNDLED_CLIP),
                             device=args.device, dtype="fp32")
        pipe.set_progress_bar_config(disable=True)
    else:
        pipe = load_bundled(args.device)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    rows = run_suite(pipe, settings, args.only, progress=log)
    print(format_table(rows))
    return 0


def register(subparsers) -> None:
    """``imageprompt eval --suite world``: add to the command line's COMMAND_MODULES."""
    parser = subparsers.add_parser("eval", help="measure meaning on the shapes world (prints a table)")
    _add_arguments(parser)
    parser.set_defaults(func=_run)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Measurements of meaning on the shapes world.")
    _add_arguments(parser)
    return _run(parser.parse_args(argv))


if __name__ == "__main__":
    # run the imported module's main: measurements registered elsewhere add to *its* suite
    from imageprompt.evaluate import main as _main

    raise SystemExit(_main())
