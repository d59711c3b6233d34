"""Batch jobs: a JSONL manifest of rows in, PNGs and a results manifest out.

One row a line, ``kind`` choosing what it does (see :data:`KINDS`)::

    {"kind": "vary", "image": "cat.jpg", "num": 4, "seed": 1}
    {"kind": "edit", "image": "cat.jpg", "prompt": "on the beach", "alpha": 0.55}

What makes a long job safe to run, kill and run again:

- Each output's name is derived from a hash of the row's content, the input
  image's bytes and the model settings (:func:`row_key`), so a rerun knows
  which outputs it already has; a PNG counts only if it decodes and carries that
  hash (:func:`is_complete`). Image ``i`` of a row uses seed ``seed + i`` and
  its own generator, so it is the same whatever it was batched with.
- PNGs are written to a temporary name and renamed (:func:`imageprompt.images.save_png`).
- Each process appends one record per row to its own part file, synced line by
  line; the main process merges the parts into ``results.jsonl`` at the end
  (and folds in the parts a killed run left behind at the start).
- A bad row (unreadable image, empty edit prompt, unknown kind) is recorded as
  failed and the job goes on; a failing batch is retried row by row so one bad
  row does not fail its neighbours.

Rows are split across processes with accelerate (``accelerate launch -m
imageprompt batch ...``); rows that share a kind and sampling settings are
sampled together, ``batch_size`` images per forward pass.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

RESULTS = "results.jsonl"
PARTS = ".imageprompt-parts"  # per-process results of the current run, inside the output folder
KEY_VERSION = 1  # bump when the meaning of a row changes, so old outputs are not taken as complete


class JobError(ValueError):
    """The job as a whole cannot run (missing manifest, bad options); the message is meant for the user."""


# ------------------------------------------------------------------ row schema
@dataclass(frozen=True)
class Kind:
    """What a row ``kind`` needs and the function that samples a batch of its images.

    ``run(runner, settings, items) -> list[PIL.Image]``: one image per item, all
    items sharing ``settings`` (the sampling settings plus the ``grouped`` fields).
    """

    method: str
    run: Callable
    fields: dict[str, type]
    required: tuple[str, ...] = ()
    defaults: dict = field(default_factory=dict)
    grouped: tuple[str, ...] = ()
    check: Callable[[dict], None] | None = None
    module: str | None = None  # the optional module this kind is built on


COMMON_FIELDS = {"kind": str, "id": str, "seed": int, "num": int, "steps": int, "guidance": float,
                 "negative_prompt": str, "height": int, "width": int}
SAMPLING = ("steps", "guidance", "negative_prompt", "height", "width")


@dataclass
class JobDefaults:
    """Values for fields a row leaves out, and the model identity that goes into every row's hash."""

    seed: int = 0
    num: int = 1
    steps: int = 50
    guidance: float = 7.5
    negative_prompt: str | None = None
    height: int | None = None
    width: int | None = None
    model: str | None = None
    clip: str | None = None
    scheduler: str | None = "ddim"
    adapter: str | None = None


@dataclass
class Row:
    """One line of the manifest, validated; ``error`` is set when the row cannot run."""

    line: int
    kind: str | None = None
    id: str | None = None
    params: dict = field(default_factory=dict)
    seed: int = 0
    num: int = 1
    image: Path | None = None
    image_sha256: str | None = None
    key: str = ""
    error: str | None = None

    @property
    def label(self) -> str:
        text = self.id or (self.image.stem if self.image else self.params.get("target") or self.params.get("prompt"))
        return re.sub(r"[^A-Za-z0-9._-]+", "_", text or "").strip("._")[:60] or "row"

    def output_names(self) -> list[str]:
        return [f"{self.label}-{self.kind}-{self.key[:12]}-{self.seed + i}.png" for i in range(self.num)]

    def settings(self) -> tuple:
        """Rows with equal settings are sampled in the same batches."""
        spec = KINDS[self.kind]
        return (self.kind, *[(name, self.params.get(name)) for name in (*SAMPLING, *spec.grouped)])


def _check_type(name: str, value, expected: type | tuple[type, ...]) -> str | None:
    """None when ``value`` (parsed JSON) has the ``expected`` type(s); else the message."""
    def fits(kind: type) -> bool:
        if kind is float:
            return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if kind is int:
            return isinstance(value, int) and not isinstance(value, bool)
        return isinstance(value, kind)

    kinds = expected if isinstance(expected, tuple) else (expected,)
    if any(fits(kind) for kind in kinds):
        return None
    names = " or ".join({float: "a number", int: "an integer", str: "a string", list: "a list",
                         dict: "an object"}[kind] for kind in kinds)
    return f"field {name!r} must be {names}, got {json.dumps(value)}"


def validate_row(line: int, data, defaults: JobDefaults, base: Path) -> Row:
    """Check one parsed line against its kind's schema and fill in defaults; never raises."""
    row = Row(line)
    try:
        _validate(row, data, defaults, base)
    except (ValueError, TypeError, OSError) as err:
        row.error = str(err)
    return row


def _validate(row: Row, data, defaults: JobDefaults, base: Path) -> None:
    from imageprompt.images import sha256_file

    if not isinstance(data, dict):
        raise ValueError(f"a row must be a JSON object, got {type(data).__name__}")
    row.kind, row.id = data.get("kind"), data.get("id")
    if row.id is not None:
        row.id = str(row.id)
    if row.kind not in KINDS:
        raise ValueError(f"unknown kind {row.kind!r}; choose from {', '.join(KINDS)}")
    spec = KINDS[row.kind]
    allowed = {**COMMON_FIELDS, **spec.fields}
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join(map(repr, unknown))} for kind {row.kind!r}; "
                         f"allowed: {', '.join(sorted(allowed))}")
    missing = [name for name in spec.required if data.get(name) is None and getattr(defaults, name, None) is None]
    if missing:
        raise ValueError(f"kind {row.kind!r} needs field(s) {', '.join(map(repr, missing))}")
    for name, value in data.items():
        problem = value is not None and name != "id" and _check_type(name, value, allowed[name])
        if problem:
            raise ValueError(problem)
    if spec.module is not None:
        reason = kind_unavailable(row.kind)
        if reason:
            raise ValueError(reason)

    values = {name: getattr(defaults, name, None) for name in ("seed", "num", *SAMPLING)}
    values.update({name: getattr(defaults, name, None) for name in spec.fields if hasattr(defaults, name)})
    values.update(spec.defaults)
    values.update({k: v for k, v in data.items() if v is not None})
    for name in ("num", "steps"):
        if values[name] < 1:
            raise ValueError(f"field {name!r} must be at least 1, got {values[name]}")
    if values["guidance"] < 0:
        raise ValueError(f"field 'guidance' must be >= 0, got {values['guidance']}")
    for name in ("height", "width"):
        if values[name] is not None and (values[name] < 8 or values[name] % 8):
            raise ValueError(f"field {name!r} must be a positive multiple of 8, got {values[name]}")
    if spec.check is not None:
        spec.check(values)

    row.seed, row.num = int(values.pop("seed")), int(values.pop("num"))
    values.pop("kind", None)
    values.pop("id", None)
    if "image" in values:
        row.image = (base / values["image"]).expanduser()
        if not row.image.is_file():
            raise ValueError(f"{row.image}: no such file")
        row.image_sha256 = sha256_file(row.image)
    if values.get("adapter"):
        values["adapter"] = resolve_adapter(values["adapter"], base)
    row.params = values
    row.key = row_key(row, defaults)


def resolve_adapter(spec: str, base: Path) -> str:
    """An adapter ``PATH`` or ``PATH:WEIGHT_NAME`` relative to ``base`` made absolute; other specs as they are."""
    source, sep, weight = spec.rpartition(":") if not (base / spec).exists() else (spec, "", "")
    if sep and (base / source).exists():
        return f"{(base / source).resolve()}:{weight}"
    return str((base / spec).resolve()) if (base / spec).exists() else spec


def row_key(row: Row, defaults: JobDefaults) -> str:
    """sha256 of what decides a row's images: kind, settings, seed, input bytes, model.

    ``num`` and ``id`` are left out (image ``i`` does not depend on them), so
    raising ``num`` on a rerun only samples the new images.
    """
    content = {
        "v": KEY_VERSION, "kind": row.kind, "seed": row.seed, "image_sha256": row.image_sha256,
        "params": {k: v for k, v in row.params.items() if k != "image"},
        "model": defaults.model, "clip": defaults.clip, "scheduler": defaults.scheduler,
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def read_manifest(path: str | os.PathLike) -> list[tuple[int, object]]:
    """``(line number, parsed JSON or JSONError)`` for each non-blank line; raises :class:`JobError` for the file."""
    path = Path(path)
    if not path.is_file():
        raise JobError(f"{path}: no such job file")
    entries = []
    try:
        with open(path, encoding="utf-8") as handle:
            for number, text in enumerate(handle, start=1):
                if not text.strip():
                    continue
                try:
                    entries.append((number, json.loads(text)))
                except json.JSONDecodeError as err:
                    entries.append((number, JSONError(f"not valid JSON: {err}")))
    except UnicodeDecodeError as err:
        raise JobError(f"{path}: not a UTF-8 text file ({err})") from None
    if not entries:
        raise JobError(f"{path}: no rows (expected one JSON object a line)")
    return entries


class JSONError(str):
    """A manifest line that is not JSON (kept as a row so that it is recorded as failed)."""


def validate_rows(entries: list[tuple[int, object]], defaults: JobDefaults, base: Path) -> list[Row]:
    rows = []
    for line, data in entries:
        rows.append(Row(line, error=str(data)) if isinstance(data, JSONError) else
                    validate_row(line, data, defaults, base))
    return rows


# --------------------------------------------------------------- kinds
def kind_unavailable(kind: str) -> str | None:
    """Why ``kind`` cannot run in this installation, or None."""
    import importlib.util

    module = KINDS[kind].module
    if module is None:
        return None
    try:
        found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        found = False
    return None if found else f"kind {kind!r} is not available: this installation has no {module}"


def _generator(seed: int):
    import torch

    return torch.Generator("cpu").manual_seed(seed)


def _sampling_kwargs(settings: dict, items) -> dict:
    return dict(num_inference_steps=settings["steps"], guidance_scale=settings["guidance"],
                negative_prompt=settings["negative_prompt"], height=settings["height"], width=settings["width"],
                generator=[_generator(item.seed) for item in items])


def run_vary(runner, settings: dict, items) -> list:
    """SD-IPC variation: the converted image prompt alone, one batch for all items."""
    images = [runner.image(item.row) for item in items]
    return runner.pipe(image=images, **_sampling_kwargs(settings, items)).images


def run_edit(runner, settings: dict, items) -> list:
    """SD-IPC editing: the image prompt blended with each row's text at positions EOS..76."""
    images = [runner.image(item.row) for item in items]
    prompts = [item.row.params["prompt"] for item in items]
    kwargs = _sampling_kwargs(settings, items)
    return runner.pipe(image=images, prompt=prompts, alpha=settings["alpha"], **kwargs).images


def _check_edit(values: dict) -> None:
    if not values["prompt"].strip():
        raise ValueError("field 'prompt' is empty")


def run_p2p(runner, settings: dict, items) -> list:
    """Prompt-to-prompt (Hertz et al. 2022): each item's source and edit in one call; returns the edits."""
    pipe = runner.p2p_pipeline()
    edits = []
    for item in items:
        p = item.row.params
        kwargs = dict(source_prompt=p["prompt"], target_prompt=p.get("target"), mode=p["mode"],
                      weights=p.get("weights"), blend_words=p.get("blend"), cross_steps=p["cross_steps"],
                      self_steps=p["self_steps"], **_sampling_kwargs(settings, [item]))
        kwargs["generator"] = kwargs["generator"][0]
        if p.get("blend_threshold") is not None:
            kwargs["blend_threshold"] = p["blend_threshold"]
        if p.get("image") and p.get("invert"):
            kwargs["inversion"] = runner.inversion(item.row, pipe)
        elif p.get("image"):
            kwargs.update(image=runner.image(item.row), alpha=p["alpha"])
        edits.append(pipe(**kwargs).images[-1])
    return edits


def _check_p2p(values: dict) -> None:
    from imageprompt.inversion import METHODS
    from imageprompt.p2p import validate_edit

    if not all(isinstance(word, str) for word in values.get("blend") or ()):
        raise ValueError(f"field 'blend' must be a list of words, got {json.dumps(values['blend'])}")
    values["target"] = validate_edit(values["prompt"], values.get("target"), values["mode"], values.get("weights"),
                                     values.get("blend"), values["cross_steps"], None, values["self_steps"],
                                     **({"blend_threshold": values["blend_threshold"]}
                                        if values.get("blend_threshold") is not None else {}))
    if values.get("invert") is not None:
        if values["invert"] not in METHODS:
            raise ValueError(f"field 'invert' must be one of {', '.join(METHODS)}, got {values['invert']!r}")
        if not values.get("image"):
            raise ValueError("field 'invert' needs the photo to invert in field 'image'")


def run_adapter(runner, settings: dict, items) -> list:
    """IP-Adapter (Ye et al. 2023, Eq. 5): each row's image through the decoupled cross-attention, plus its text."""
    import torch

    pipe = runner.use_adapter(settings["adapter"], settings["scale"])
    device, cfg = pipe._execution_device, settings["guidance"] > 1.0
    # one image prompt per row (a list of images would be several prompts of the *same* row in diffusers' format)
    per_row = [pipe.prepare_ip_adapter_image_embeds(runner.image(item.row), None, device, 1, cfg)[0] for item in items]
    if cfg:
        negative, positive = zip(*(embeds.chunk(2) for embeds in per_row))
        embeds = torch.cat([*negative, *positive])
    else:
        embeds = torch.cat(per_row)
    prompts = [item.row.params.get("prompt") or "" for item in items]
    return pipe(prompt=prompts, ip_adapter_image_embeds=[embeds], **_sampling_kwargs(settings, items)).images


KINDS: dict[str, Kind] = {
    "vary": Kind("sdipc-variation", run_vary, {"image": str}, required=("image",)),
    "edit": Kind("sdipc-edit", run_edit, {"image": str, "prompt": str, "alpha": float},
                 required=("image", "prompt"), defaults={"alpha": 0.5}, grouped=("alpha",), check=_check_edit),
    "p2p": Kind("p2p", run_p2p,
                {"prompt": str, "target": str, "mode": str, "weights": dict, "blend": list, "blend_threshold": float,
                 "cross_steps": (float, list), "self_steps": (float, list), "image": str, "alpha": float,
                 "invert": str},
                required=("prompt",), defaults={"mode": "replace", "cross_steps": 0.8, "self_steps": 0.4, "alpha": 0.5},
                check=_check_p2p, module="imageprompt.pipelines.pipeline_p2p"),
    "adapter": Kind("ip-adapter", run_adapter, {"image": str, "prompt": str, "adapter": str, "scale": float},
                    required=("image", "adapter"), defaults={"scale": 1.0}, grouped=("adapter", "scale"),
                    module="imageprompt.ip_adapter"),
}


# --------------------------------------------------------------- outputs
def is_complete(path: Path, key: str) -> bool:
    """True when ``path`` is a whole PNG written for the row with hash ``key``."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            parameters = json.loads(image.info.get("parameters", "{}"))
            image.verify()  # reads every chunk and checks its CRC: catches truncated files
    except (OSError, ValueError, SyntaxError):
        return False
    return parameters.get("job_key") == key


def remove_temporaries(out: Path) -> int:
    """Delete temporary files a killed run left (``save_png`` and results writes); returns how many."""
    count = 0
    for folder in (out, out / PARTS):
        for path in folder.glob(".*.tmp") if folder.is_dir() else ():
            path.unlink(missing_ok=True)
            count += 1
    return count


def _atomic_write_lines(path: Path, records: list[dict]) -> None:
    from imageprompt.images import atomic_write

    atomic_write(path, lambda handle: handle.writelines(json.dumps(r) + "\n" for r in records), mode="w")


def read_records(path: Path) -> list[dict]:
    """Records of a results file; a line cut short by a kill is skipped."""
    records = []
    if path.is_file():
        with open(path, encoding="utf-8") as handle:
            for text in handle:
                try:
                    record = json.loads(text)
                except json.JSONDecodeError:
                    continue
                if isinstance(record, dict) and "line" in record:
                    records.append(record)
    return records


class PartWriter:
    """Appends this process's records to its part file, one synced line each."""

    def __init__(self, out: Path, rank: int):
        self.rank = rank
        (out / PARTS).mkdir(parents=True, exist_ok=True)
        self.path = out / PARTS / f"part-{rank:05d}.jsonl"
        self.handle = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self.handle.write(json.dumps({**record, "process": self.rank}) + "\n")
        self.handle.flush()
        os.fsync(self.handle.fileno())

    def close(self) -> None:
        self.handle.close()


# a record that sampled the row beats one that found it complete, which beats a failure
_PREFERENCE = {("done", False): 3, ("done", True): 2, ("failed", False): 1, ("failed", True): 1}


def _score(record: dict) -> int:
    return _PREFERENCE.get((record.get("status"), bool(record.get("skipped"))), 0)


def _better(old: dict | None, new: dict) -> dict:
    """Which of two records of the same row to keep: done beats failed, a sampled one beats a skip, newer wins ties."""
    return new if old is None or _score(new) >= _score(old) else old


def fold_parts(out: Path) -> dict[str, dict]:
    """Merge leftover part files into ``results.jsonl`` (best record per row key); returns that history."""
    history: dict[str, dict] = {}
    parts = sorted((out / PARTS).glob("part-*.jsonl")) if (out / PARTS).is_dir() else []
    for path in [out / RESULTS, *parts]:
        for record in read_records(path):
            key = record.get("key") or f"line-{record['line']}"
            history[key] = _better(history.get(key), record)
    if parts:
        _atomic_write_lines(out / RESULTS, sorted(history.values(), key=lambda r: r["line"]))
        for path in parts:
            path.unlink()
    return history


def merge_results(out: Path, history: dict[str, dict]) -> list[dict]:
    """Write ``results.jsonl``: one record per row of this run, in manifest order.

    A row whose outputs were already complete keeps the record of the run that
    sampled it (its seconds), marked ``skipped``.
    """
    current: dict[int, dict] = {}
    for path in sorted((out / PARTS).glob("part-*.jsonl")):
        for record in read_records(path):
            current[record["line"]] = _better(current.get(record["line"]), record)
    merged = []
    for line in sorted(current):
        record = current[line]
        earlier = history.get(record.get("key") or "")
        if record.get("skipped") and earlier and earlier.get("status") == "done":
            record = {**earlier, "line": line, "id": record.get("id"), "outputs": record["outputs"],
                      "skipped": True}
        merged.append(record)
    _atomic_write_lines(out / RESULTS, merged)
    for path in (out / PARTS).glob("part-*.jsonl"):
        path.unlink()
    return merged


# --------------------------------------------------------------- sampling
@dataclass
class Item:
    """One image to sample: image ``index`` of ``row``."""

    row: Row
    index: int

    @property
    def seed(self) -> int:
        return self.row.seed + self.index


def plan_batches(items: list[Item], batch_size: int) -> list[list[Item]]:
    """Group items by settings (first-seen order), then cut each group into batches."""
    groups: dict[tuple, list[Item]] = {}
    for item in items:
        groups.setdefault(item.row.settings(), []).append(item)
    # groups of one adapter next to each other, so each adapter is loaded once
    order = sorted(groups, key=lambda settings: dict(settings[1:]).get("adapter") or "")
    return [groups[key][i : i + batch_size] for key in order for i in range(0, len(groups[key]), batch_size)]


class Runner:
    """Samples batches with one loaded pipeline: input images loaded once per row, adapters loaded when needed."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.images: dict[int, object] = {}
        self.inversions: dict[int, object] = {}
        self.adapter: str | None = None
        self.adapter_errors: dict[str, Exception] = {}
        self._p2p = None

    def image(self, row: Row):
        from imageprompt.images import load_image

        if row.line not in self.images:
            self.images[row.line] = load_image(row.image)
        return self.images[row.line]

    def inversion(self, row: Row, pipe):
        """The row's photo inverted once for all its seeds (it does not depend on them)."""
        if row.line not in self.inversions:
            p = row.params
            self.inversions[row.line] = pipe.invert(self.image(row), p["prompt"], p["invert"], p["steps"],
                                                    p["guidance"], p["height"], p["width"])
        return self.inversions[row.line]

    def forget(self, row: Row) -> None:
        self.images.pop(row.line, None)
        self.inversions.pop(row.line, None)

    def p2p_pipeline(self):
        """The prompt-to-prompt pipeline on the same components (no weights are copied)."""
        if self._p2p is None:
            from imageprompt.attention import imageprompt_processors
            from imageprompt.pipelines.pipeline_p2p import StableDiffusionPromptToPromptPipeline

            backend = next(iter(imageprompt_processors(self.pipe.unet).values())).backend
            self._p2p = StableDiffusionPromptToPromptPipeline(**self.pipe.components)
            self._p2p.set_attention(backend)  # keep the backend the job was loaded with
            self._p2p.set_progress_bar_config(disable=True)
        return self._p2p

    def use_adapter(self, spec: str, scale: float):
        """Load IP-Adapter ``spec`` (once; a failure is remembered so each row does not retry it) at ``scale``."""
        from imageprompt.adapter_files import parse_adapter_spec

        if self.adapter != spec:
            if spec in self.adapter_errors:
                raise self.adapter_errors[spec]
            source, weight_name = parse_adapter_spec(spec)
            try:
                self.pipe.load_ip_adapter(source, weight_name=weight_name)
            except Exception as err:
                self.adapter_errors[spec] = err
                raise
            self.adapter = spec
        self.pipe.set_ip_adapter_scale(scale)
        return self.pipe

    def sample(self, items: list[Item]) -> list:
        row = items[0].row
        if row.kind != "adapter" and self.adapter is not None:
            self.pipe.unload_ip_adapter()  # the other kinds run the plain UNet
            self.adapter = None
        images = KINDS[row.kind].run(self, dict(row.params), items)
        if len(images) != len(items):
            raise RuntimeError(f"kind {row.kind!r} returned {len(images)} images for {len(items)}")
        return images


def apply_speed_options(pipe, compile: bool = False, channels_last: bool = False) -> None:
    """channels-last memory format for the UNet and VAE; torch.compile of the UNet and VAE decoder."""
    import torch

    if channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    if compile:
        pipe.unet = torch.compile(pipe.unet)
        pipe.vae.decoder = torch.compile(pipe.vae.decoder)


def _error_text(err: BaseException) -> str:
    from imageprompt.images import ImageInputError

    return str(err) if isinstance(err, (ImageInputError, JobError)) else f"{type(err).__name__}: {err}"


def output_parameters(pipe, row: Row, seed: int, image) -> dict:
    import imageprompt

    return {
        "method": KINDS[row.kind].method, "model": getattr(pipe, "model_name", None),
        "clip": getattr(pipe, "clip_name", None), "scheduler": type(pipe.scheduler).__name__,
        "dtype": str(pipe.unet.dtype).replace("torch.", ""), "imageprompt": imageprompt.__version__,
        **{k: v for k, v in row.params.items() if k != "image"},
        "input": row.image.name if row.image else None, "input_sha256": row.image_sha256,
        "seed": seed, "width": image.size[0], "height": image.size[1],
        "job_key": row.key, "job_line": row.line, "job_id": row.id,
    }


# --------------------------------------------------------------- the job
@dataclass
class JobOptions:
    batch_size: int = 8
    compile: bool = False
    channels_last: bool = False
    progress: bool = True


@dataclass
class JobSummary:
    rows: int = 0
    done: int = 0
    skipped: int = 0
    failed: int = 0
    images: int = 0
    seconds: float = 0.0  # the whole run, model loading included
    sampling_seconds: float = 0.0  # from the first batch to the end
    results: Path | None = None

    @property
    def images_per_second(self) -> float:
        return self.images / self.sampling_seconds if self.sampling_seconds > 0 else 0.0

    def __str__(self) -> str:
        return (f"{self.rows} rows: {self.done} done, {self.skipped} skipped (already complete), "
                f"{self.failed} failed; {self.images} images, {self.images_per_second:.2f} images/s while sampling, "
                f"{self.seconds:.1f} s in all; results in {self.results}")


class _Progress:
    """One bar on the main process: rows done by every process (read from the part files), images/s, ETA."""

    def __init__(self, out: Path, total: int, enabled: bool):
        self.out, self.start = out, time.perf_counter()  # restarted when sampling starts
        self.offsets: dict[Path, int] = {}
        self.rows = self.images = 0
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, unit="row", desc="batch", dynamic_ncols=True)

    def counts(self) -> tuple[int, int]:
        """Rows and sampled images recorded so far; reads only what the part files gained since last time."""
        for path in (self.out / PARTS).glob("part-*.jsonl"):
            offset = self.offsets.get(path, 0)
            with open(path, "rb") as handle:
                handle.seek(offset)
                chunk = handle.read()
            end = chunk.rfind(b"\n") + 1  # a line still being written is read next time
            for text in chunk[:end].splitlines():
                try:
                    record = json.loads(text)
                except json.JSONDecodeError:
                    continue
                self.rows += 1
                self.images += 0 if record.get("skipped") else record.get("images", 0)
            self.offsets[path] = offset + end
        return self.rows, self.images

    def refresh(self) -> int:
        rows, images = self.counts()
        if self.bar is not None:
            rate = images / max(time.perf_counter() - self.start, 1e-9)
            self.bar.set_postfix_str(f"{rate:.2f} images/s", refresh=False)
            self.bar.update(rows - self.bar.n)
        return rows

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_job(
    jobs: str | os.PathLike,
    out: str | os.PathLike,
    pipe=None,
    load_pipe: Callable[[object], object] | None = None,
    defaults: JobDefaults | None = None,
    options: JobOptions | None = None,
    device: str | None = None,
) -> JobSummary:
    """Run the rows of ``jobs`` (JSONL) into ``out`` and return the summary.

    Args:
        pipe: a loaded :class:`~imageprompt.pipelines.StableDiffusionImagePromptPipeline`, or
        load_pipe: ``fn(device) -> pipe``, called only when this process has images to sample.
        defaults: values for fields rows leave out, and the model identity hashed into output names.
        options: batch size, speed options, progress bar.
        device: where to sample (default: this process's accelerator; ``"cpu"`` makes a multi-process
            launch use gloo on the CPU).

    Under ``accelerate launch`` the rows are split across processes
    (:meth:`accelerate.PartialState.split_between_processes`); every process
    appends its records to its own part file in ``out``, which must be one folder
    shared by all of them. The main process waits for every row's record, merges
    them into ``results.jsonl`` and returns counts for the whole job; the others
    return their own share's counts as soon as they are done.
    """
    from accelerate import PartialState

    defaults, options = defaults or JobDefaults(), options or JobOptions()
    if options.batch_size < 1:
        raise JobError(f"batch size must be at least 1, got {options.batch_size}")
    jobs, out = Path(jobs), Path(out)
    entries = read_manifest(jobs)  # every process reads the whole file; it is small next to the images
    state = PartialState(cpu=_cpu_run(device))
    history: dict[str, dict] = {}
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        remove_temporaries(out)
        history = fold_parts(out)
    state.wait_for_everyone()  # nobody writes before the leftovers of a killed run are folded

    progress = _Progress(out, len(entries), options.progress and state.is_main_process)
    writer = PartWriter(out, state.process_index)
    summary = JobSummary(results=out / RESULTS)
    start = time.perf_counter()
    try:
        with state.split_between_processes(entries) as mine:
            rows = validate_rows(mine, defaults, jobs.parent)
            pending = _record_finished_rows(rows, out, writer, summary)
            progress.refresh()
            if pending:
                if pipe is None:
                    if load_pipe is None:
                        raise JobError("run_job needs `pipe` or `load_pipe`")
                    pipe = load_pipe(_process_device(device, state))
                apply_speed_options(pipe, options.compile, options.channels_last)
                progress.start = time.perf_counter()  # images/s of sampling, not of loading
                _sample(pipe, pending, out, writer, summary, options, progress)
    finally:
        writer.close()
    summary.seconds = time.perf_counter() - start
    summary.sampling_seconds = time.perf_counter() - progress.start
    if not state.is_main_process:
        return summary  # no barrier: the main process knows from the part files when everyone is done
    while state.num_processes > 1 and progress.refresh() < len(entries):
        time.sleep(0.5)  # the others are still sampling: keep the bar moving
    progress.close()
    merged = merge_results(out, history)
    summary.rows = len(merged)
    summary.failed = sum(r["status"] == "failed" for r in merged)
    summary.skipped = sum(r["status"] == "done" and bool(r.get("skipped")) for r in merged)
    summary.done = sum(r["status"] == "done" for r in merged) - summary.skipped
    summary.images = sum(r.get("images", 0) for r in merged if r["status"] == "done" and not r.get("skipped"))
    summary.seconds = time.perf_counter() - start
    summary.sampling_seconds = time.perf_counter() - progress.start
    return summary


def _cpu_run(device: str | None) -> bool:
    """Whether processes run on the CPU: accelerate then joins them with gloo instead of an accelerator backend."""
    import torch

    from imageprompt.loading import default_device

    if device is not None:
        return torch.device(device).type == "cpu"
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"):
        return True
    return default_device().type == "cpu"


def _process_device(device: str | None, state):
    """This process's device: accelerate's, unless an explicit one is given (``cuda`` means this process's GPU)."""
    import torch

    chosen = torch.device(device) if device is not None else state.device
    if chosen.index is None and chosen.type == state.device.type:
        chosen = state.device
    return chosen


def _record(row: Row, status: str, outputs=(), images=0, seconds=None, error=None, skipped=False) -> dict:
    return {"line": row.line, "id": row.id, "kind": row.kind, "key": row.key or None, "status": status,
            "outputs": list(outputs), "images": images, "seconds": seconds, "error": error, "skipped": skipped}


def _record_finished_rows(rows: list[Row], out: Path, writer: PartWriter, summary: JobSummary) -> list[Item]:
    """Record bad rows and rows whose outputs are all complete; return the images still to sample."""
    pending = []
    for row in rows:
        summary.rows += 1
        if row.error:
            writer.write(_record(row, "failed", error=row.error))
            summary.failed += 1
            continue
        names = row.output_names()
        missing = [i for i, name in enumerate(names) if not is_complete(out / name, row.key)]
        if not missing:
            writer.write(_record(row, "done", names, images=len(names), skipped=True))
            summary.skipped += 1
        pending += [Item(row, i) for i in missing]
    return pending


def _sample(pipe, pending: list[Item], out: Path, writer: PartWriter, summary: JobSummary,
            options: JobOptions, progress: _Progress) -> None:
    """Sample every pending image; write each row's record when its last image is saved or it fails."""
    from imageprompt.images import save_png

    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    runner = Runner(pipe)
    left: dict[int, int] = {}
    for item in pending:
        left[item.row.line] = left.get(item.row.line, 0) + 1
    seconds: dict[int, float] = {}
    new_images: dict[int, int] = {}
    saved: set[tuple[int, int]] = set()
    finished: set[int] = set()

    def finish(row: Row, error: str | None = None) -> None:
        if row.line in finished:
            return
        runner.forget(row)
        took = round(seconds.get(row.line, 0.0), 3)
        if error is not None:
            writer.write(_record(row, "failed", seconds=took, error=error))
            summary.failed += 1
        else:
            writer.write(_record(row, "done", row.output_names(), images=new_images.get(row.line, 0), seconds=took))
            summary.done += 1
        finished.add(row.line)  # only once recorded: every row of the share must end up in the part file

    def attempt(batch: list[Item]) -> None:
        batch = [item for item in batch if (item.row.line, item.index) not in saved]
        if not batch:
            return
        tic = time.perf_counter()
        images = runner.sample(batch)
        share = (time.perf_counter() - tic) / len(batch)
        for item, image in zip(batch, images):
            row = item.row
            save_png(image, out / row.output_names()[item.index], output_parameters(pipe, row, item.seed, image))
            saved.add((row.line, item.index))
            seconds[row.line] = seconds.get(row.line, 0.0) + share
            new_images[row.line] = new_images.get(row.line, 0) + 1
            summary.images += 1
            left[row.line] -= 1
            if left[row.line] == 0:
                finish(row)

    try:
        for batch in plan_batches(pending, options.batch_size):
            batch = [item for item in batch if item.row.line not in finished]
            if not batch:
                continue
            try:
                attempt(batch)
            except Exception as err:  # noqa: BLE001 - a failing batch must not end the job
                by_row: dict[int, list[Item]] = {}
                for item in batch:
                    by_row.setdefault(item.row.line, []).append(item)
                if len(by_row) == 1:
                    finish(batch[0].row, _error_text(err))
                else:  # find the bad row: retry each row's images on its own
                    for items in by_row.values():
                        try:
                            attempt(items)
                        except Exception as row_err:  # noqa: BLE001
                            finish(items[0].row, _error_text(row_err))
            progress.refresh()
    finally:
        if runner.adapter is not None:
            pipe.unload_ip_adapter()  # hand the pipeline back as it came
