"""Measurements of meaning on the shapes world: ``imageprompt eval --suite world``.

Every figure is read from pixels against the world's ground truth with the
functions of :mod:`imageprompt.world` (colour of the object region, shape class
of its mask, position of its centroid, mask IoU): nothing here looks at the
model's internals, except the text-encoder probe, which says why a figure is what it is.

The suite is :data:`MEASUREMENTS`, an explicit dict of named measurements; each
takes a pipeline and an :class:`~imageprompt.world.measures.EvalSettings` and
returns :class:`~imageprompt.world.measures.Row` s. This module's measurements
are text-to-image and SD-IPC; prompt-to-prompt and the world IP-Adapter are in
:mod:`imageprompt.world.evaluate_edits`. Run the table with
``imageprompt eval --suite world`` (``--quick`` for the subset the tests use).
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from collections.abc import Callable

from imageprompt import world
from imageprompt.world import COLORS, SHAPES
from imageprompt.world.evaluate_consistency import masactrl_identity, style_aligned_consistency
from imageprompt.world.evaluate_controlnet import controlnet_world
from imageprompt.world.evaluate_dpl import dpl_vs_null_text
from imageprompt.world.evaluate_edits import (
    cross_attention_peak,
    ip_adapter_world,
    p2p_blend_background,
    p2p_replace,
    real_image_edits,
)
from imageprompt.world.measures import (
    EvalSettings,
    Measurement,
    Row,
    caption_background,
    caption_set,
    frac,
    kept_rows,
    largest,
    reference_scenes,
    sample,
)

# ----------------------------------------------------------------------------- measurements


def text_to_image(pipe, settings: EvalSettings) -> list[Row]:
    """Colour, shape and position of each named object over the fixed caption set; for one
    object also the named background; for two, whether both named colours are there."""
    cases = list(itertools.islice(itertools.cycle(caption_set()), settings.samples))
    backgrounds = [caption_background(i % len(caption_set()), specs) for i, specs in enumerate(cases)]
    captions = [world.caption_for(specs, bg) for specs, bg in zip(cases, backgrounds)]
    images = sample(pipe, settings, prompts=captions)
    per = settings.images_per_sample
    scores = {"all": [], "single": [], "pair": []}
    background, both_colours = [], []
    for i, specs in enumerate(cases):
        for image in images[i * per : (i + 1) * per]:
            found = world.score_image(image, specs)
            for r in found:
                scores["all"].append(r)
                scores["single" if len(specs) == 1 else "pair"].append(r)
            if len(specs) == 1:
                background.append(found[0]["found"] and world.background_name(image) == backgrounds[i])
            else:
                colours = {d.color for d in world.detect_objects(image)}
                both_colours.append(all(s.color in colours for s in specs))
    name = "text-to-image"
    single, pair = scores["single"], scores["pair"]
    rows = [
        Row(name, "colour", frac(r["color"] for r in scores["all"]), len(scores["all"])),
        Row(name, "shape", frac(r["shape"] for r in scores["all"]), len(scores["all"])),
        Row(name, "position", frac(r["position"] for r in scores["all"]), len(scores["all"])),
    ]
    if single:
        rows += [Row(name, "single object: colour", frac(r["color"] for r in single), len(single), aim=0.95),
                 Row(name, "single object: shape", frac(r["shape"] for r in single), len(single), aim=0.9),
                 Row(name, "single object: named background", frac(background), len(background), aim=0.9),
                 Row(name, "single object: all three right",
                     frac(r["color"] and r["shape"] and r["position"] for r in single), len(single))]
    if pair:
        rows += [Row(name, "two objects: both named colours present", frac(both_colours), len(both_colours),
                     aim=0.8),
                 Row(name, "two objects: all three right",
                     frac(r["color"] and r["shape"] and r["position"] for r in pair), len(pair))]
    return rows


def _has_image_prompting(pipe) -> bool:
    return getattr(pipe, "sdipc_image_encoder", None) is not None and getattr(pipe, "converter", None) is not None


def sdipc_variation(pipe, settings: EvalSettings) -> list[Row]:
    """Does the variation of a one-object image keep its colour, shape and position?"""
    if not _has_image_prompting(pipe):
        return []
    refs = reference_scenes(settings.samples, settings.seed)
    images = sample(pipe, settings, images=[s.image for s in refs], offset=10_000)
    return kept_rows("SD-IPC variation", refs, images, settings.images_per_sample)


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


def sdipc_edit(pipe, settings: EvalSettings) -> list[Row]:
    """Does the edit change the named attribute and keep the others?"""
    if not _has_image_prompting(pipe):
        return []
    cases = edit_cases(reference_scenes(settings.samples, settings.seed + 1))
    images = sample(pipe, settings, images=[c[0].image for c in cases], prompts=[c[3] for c in cases],
                     offset=20_000)
    per = settings.images_per_sample
    changed, kept, kept_pos = [], [], []
    for i, (ref, attr, new, _) in enumerate(cases):
        obj = ref.objects[0]
        for image in images[i * per : (i + 1) * per]:
            det = largest(image)
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
        Row(name, "named attribute changed", frac(changed), n, aim=0.7),
        Row(name, "other attribute kept", frac(kept), n, aim=0.8),
        Row(name, "position kept", frac(kept_pos), n),
        Row(name, "changed and both kept", frac(a and b and c for a, b, c in zip(changed, kept, kept_pos)), n),
    ]


def text_encoder_probe(pipe, settings: EvalSettings) -> list[Row]:
    """Do the states from EOS on carry the sentence, as SD-IPC needs? (:mod:`imageprompt.world.probe`)

    - cosine of the padding states to the EOS state, over the single-object captions;
    - cosine of SD-IPC's converted image state ``h`` to the EOS state of the image's caption;
    - text-to-image with the caption's EOS state broadcast over positions 1..76 (SD-IPC's
      conditioning shape, from text alone): colour and shape right, as a fraction of the
      figures with the full caption on the same captions and seeds.
    """
    import torch

    from imageprompt.world.probe import caption_states, eos_broadcast, padding_cosine

    device = pipe._execution_device
    singles = [specs for specs in caption_set() if len(specs) == 1]
    cases = list(itertools.islice(itertools.cycle(singles), settings.samples))
    captions = [world.caption_for(specs) for specs in cases]
    states, eos = caption_states(pipe.text_encoder, pipe.tokenizer, captions, device)
    name = "text encoder probe"
    rows = [Row(name, "padding states: cosine to the EOS state", padding_cosine(states, eos), len(captions),
                unit="cos")]
    if _has_image_prompting(pipe):
        refs = reference_scenes(settings.samples, settings.seed)
        ref_states, ref_eos = caption_states(pipe.text_encoder, pipe.tokenizer,
                                             [world.caption_for(world.specs_of(r)) for r in refs], device)
        h = pipe.convert_images([r.image for r in refs], device).float()
        target = ref_states[torch.arange(len(refs)), ref_eos].float()
        cos = torch.nn.functional.cosine_similarity(h, target, dim=-1).mean().item()
        rows.append(Row(name, "SD-IPC h: cosine to the caption's EOS state", cos, len(refs), unit="cos"))
    full = sample(pipe, settings, prompts=captions, offset=50_000)
    broadcast = sample(pipe, settings, embeds=eos_broadcast(states, eos).to(pipe.unet.dtype), offset=50_000)
    per = settings.images_per_sample
    for attr, key in (("colour", "color"), ("shape", "shape")):
        right = {}
        for which, images in (("full", full), ("broadcast", broadcast)):
            right[which] = frac(world.score_image(im, specs)[0][key]
                                for i, specs in enumerate(cases) for im in images[i * per:(i + 1) * per])
        rows.append(Row(name, f"EOS state broadcast: {attr} right (full caption {right['full']:.0%})",
                        right["broadcast"] / max(right["full"], 1e-9), len(full), unit="x full"))
    return rows


# ----------------------------------------------------------------------------- suite and table


MEASUREMENTS: dict[str, Measurement] = {
    "text-to-image": text_to_image,
    "SD-IPC variation": sdipc_variation,
    "SD-IPC edit": sdipc_edit,
    "p2p replace": p2p_replace,
    "cross-attention": cross_attention_peak,
    "IP-Adapter (world)": ip_adapter_world,
    "p2p local blend": p2p_blend_background,
    "real-image edit": real_image_edits,
    "DPL vs null-text": dpl_vs_null_text,
    "text encoder probe": text_encoder_probe,
    "MasaCtrl": masactrl_identity,
    "StyleAligned": style_aligned_consistency,
    "ControlNet": controlnet_world,
}


def run_suite(pipe, settings: EvalSettings | None = None, names: list[str] | None = None,
              progress: Callable[[str], None] | None = None) -> list[Row]:

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
        (r.measurement, r.metric, r.show(), str(r.n),
         "" if r.aim is None else f">= {r.show(r.aim)} {'ok' if r.meets_aim else 'MISSED'}")
        for r in rows
    ]
    widths = [max(len(x[i]) for x in [header, *body]) for i in range(len(header))]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, body)])


def load_bundled(device: str | None = "cpu"):
    """The bundled model through the project's own loader (SD-IPC ready)."""
    from imageprompt.checkpoints import BUNDLED_CLIP, BUNDLED_MODEL
    from imageprompt.pipelines.loading import load_pipeline

    pipe = load_pipeline(model=str(BUNDLED_MODEL), clip=str(BUNDLED_CLIP), device=device, dtype="fp32")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    full, quick = EvalSettings(), EvalSettings.quick()

    def default(key: str) -> str:
        value, small = getattr(full, key), getattr(quick, key)
        return f"default {value:g}" + (f"; --quick: {small:g}" if small != value else "")

    parser.add_argument("--suite", default="world", choices=["world", "pie-bench"],
                        help="world (the default): the shapes world (the bundled model by default); pie-bench: "
                             "real-photo editing on a folder in PIE-Bench's layout (--data), any model")
    parser.add_argument("--data", help="with --suite pie-bench: the folder holding mapping_file.json")
    parser.add_argument("--limit", type=int, help="with --suite pie-bench: the first N cases only (default: all)")
    parser.add_argument("--only", action="append", metavar="NAME",
                        help="run only this measurement (repeatable; default: all): "
                             + ", ".join(f"'{name}'" for name in MEASUREMENTS))
    parser.add_argument("--quick", action="store_true", help="the small subset the tests run")
    parser.add_argument("--samples", type=int, help=f"captions / references per measurement ({default('samples')})")
    parser.add_argument("--images-per-sample", type=int, help=f"images per caption ({default('images_per_sample')})")
    parser.add_argument("--steps", type=int, help=f"sampling steps ({default('steps')})")
    parser.add_argument("--guidance-scale", type=float, help=f"classifier-free guidance ({default('guidance_scale')})")
    parser.add_argument("--alpha", type=float,
                        help=f"SD-IPC edit: weight of the text at positions EOS..76 ({default('alpha')})")
    parser.add_argument("--seed", type=int, help=f"random seed ({default('seed')})")
    parser.add_argument("--model", help="default: the bundled shapes-world model")
    parser.add_argument("--clip", help="default: the bundled shapes-world CLIP")
    parser.add_argument("--device", default="cpu", help="default cpu")
    parser.add_argument("--threads", type=int, help="torch CPU threads (1 is fastest on a small shared CPU; "
                                                    "default: torch's)")


def _run(args) -> int:
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    if args.suite == "pie-bench" and not args.data:
        raise ValueError("--suite pie-bench needs --data DIR (a folder holding mapping_file.json)")
    unknown = [name for name in args.only or [] if name not in MEASUREMENTS]
    if unknown:  # before any model loads
        raise ValueError(f"--only {unknown[0]!r}: no such measurement; known: "
                         + ", ".join(f"'{name}'" for name in MEASUREMENTS))
    settings = EvalSettings.quick() if args.quick else EvalSettings()
    for key in ("samples", "images_per_sample", "steps", "guidance_scale", "seed", "alpha"):
        if getattr(args, key, None) is not None:
            setattr(settings, key, getattr(args, key))
    if args.model or args.clip:
        from imageprompt.checkpoints import BUNDLED_CLIP, BUNDLED_MODEL
        from imageprompt.pipelines.loading import load_pipeline

        pipe = load_pipeline(model=args.model or str(BUNDLED_MODEL), clip=args.clip or str(BUNDLED_CLIP),
                             device=args.device, dtype="fp32")
        pipe.set_progress_bar_config(disable=True)
    else:
        pipe = load_bundled(args.device)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    if args.suite == "pie-bench":
        from imageprompt.world.pie_bench import pie_bench

        rows = pie_bench(pipe, args.data, settings, args.limit)
    else:
        rows = run_suite(pipe, settings, args.only, progress=log)
    print(format_table(rows))
    return 0


def register(subparsers) -> None:
    """``imageprompt eval --suite world``: add to the command line's COMMAND_MODULES."""
    parser = subparsers.add_parser(
        "eval", help="measure meaning on the shapes world (prints a table)",
        description="Measure what each technique does on the shapes world: images are sampled from the bundled "
                    "model (or --model/--clip) and read back from their pixels against the world's ground truth "
                    "(colour, shape and position kept; mask IoU), one table row per measurement. --quick runs the "
                    "small subset the tests use; --only NAME runs one measurement.")
    _add_arguments(parser)
    parser.set_defaults(func=_run)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Measurements of meaning on the shapes world.")
    _add_arguments(parser)
    return _run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
