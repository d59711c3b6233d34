"""The row format of a batch job: fields of each ``kind``, parsing the JSONL manifest, validation, defaults.

Nothing here touches a model: a row is checked and hashed (:func:`row_key`)
before any pipeline is loaded, so a bad row is reported without sampling.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from imageprompt.jobs.toolbox_rows import FIELDS as TOOLBOX_FIELDS
from imageprompt.jobs.toolbox_rows import GROUPED as TOOLBOX_GROUPED
from imageprompt.jobs.toolbox_rows import check_toolbox_row

KEY_VERSION = 1  # bump when the meaning of a row changes, so old outputs are not taken as complete


class JobError(ValueError):
    """The job as a whole cannot run (missing manifest, bad options); the message is meant for the user."""


@dataclass(frozen=True)
class Kind:
    """What a row ``kind`` needs: its fields, their defaults, and the checks on them.

    How a kind is sampled is :data:`imageprompt.jobs.sampling.SAMPLERS`; ``grouped``
    names the fields that, with the sampling settings, decide which rows share a batch.
    """

    method: str
    fields: dict[str, type]
    required: tuple[str, ...] = ()
    defaults: dict = field(default_factory=dict)
    grouped: tuple[str, ...] = ()
    check: Callable[[dict], None] | None = None
    module: str | None = None  # the optional module this kind is built on


COMMON_FIELDS = {"kind": str, "id": str, "seed": int, "num": int, "steps": int, "guidance": float,
                 "negative_prompt": str, "height": int, "width": int}
SAMPLING = ("steps", "guidance", "negative_prompt", "height", "width")
PROMPT_FIELDS = ("prompt", "target", "negative_prompt")
MAX_SEED = 2**64 - 1  # torch generators take seeds in 0..2**64-1
MAX_LINE_BYTES = 64 << 20  # a longer manifest line is a failed row, not read into memory
BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class Limits:
    """Upper bounds on a row's size-like fields, so one row cannot exhaust memory or run for days.

    ``None`` lifts a bound (``imageprompt batch --allow-large``). The defaults suit one 24 GB GPU.
    """

    num: int | None = 64  # images per row
    side: int | None = 2048  # height and width, pixels
    steps: int | None = 500  # sampling steps

    @classmethod
    def unbounded(cls) -> Limits:
        return cls(None, None, None)


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
    image_encoder: str | None = None  # CLIP vision folder of the adapter rows (default: the adapter's own)
    dtype: str | None = None  # "float16", ...: goes into the row keys (None: left out, as before)
    attention: str | None = None  # attention backend, "sdpa" or "xformers": goes into the row keys
    limits: Limits = field(default_factory=Limits)


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
    truncated: list[str] = field(default_factory=list)  # prompt fields cut to MAX_PROMPT_CHARS

    @property
    def label(self) -> str:
        text = self.id or (self.image.stem if self.image else self.params.get("target") or self.params.get("prompt"))
        return re.sub(r"[^A-Za-z0-9._-]+", "_", text or "").strip("._")[:60] or "row"

    def output_name(self, index: int) -> str:
        """The file name of image ``index`` (seed ``seed + index``)."""
        return f"{self.label}-{self.kind}-{self.key[:12]}-{self.seed + index}.png"

    def output_names(self) -> list[str]:
        return [self.output_name(i) for i in range(self.num)]

    def settings(self) -> tuple:
        """Rows with equal settings are sampled in the same batches."""
        spec = KINDS[self.kind]
        hashable = {name: tuple(v) if isinstance(v := self.params.get(name), list) else v
                    for name in (*SAMPLING, *spec.grouped)}  # a window [begin, end] is a list in the JSON
        return (self.kind, *hashable.items())


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
    except Exception as err:  # noqa: BLE001 - MemoryError, RecursionError...: this row's failure, not the job's
        row.error = f"{type(err).__name__}: {err}"
    return row


def _check_image(path: Path, name: str) -> None:
    """Cheap check that ``path`` is an image (its header only), before its bytes are hashed."""
    from imageprompt.images import ImageInputError, check_image

    if not path.is_file():
        raise ValueError(f"{path}: no such file" + (f" (field {name!r})" if name != "image" else ""))
    try:
        check_image(path)
    except ImageInputError as err:
        raise ValueError(f"{err} (field {name!r})") from None


def _check_bounds(values: dict, limits: Limits) -> None:
    """Lower and upper bounds of the size-like fields; the message names the field and the override."""
    for name in ("num", "steps"):
        if values[name] < 1:
            raise ValueError(f"field {name!r} must be at least 1, got {values[name]}")
    bounds = {"num": (limits.num, "num"), "steps": (limits.steps, "steps"),
              "height": (limits.side, "side"), "width": (limits.side, "side")}
    for name, (bound, option) in bounds.items():
        if bound is not None and values[name] is not None and values[name] > bound:
            raise ValueError(f"field {name!r} must be at most {bound}, got {values[name]} "
                             f"(raise the bound with `imageprompt batch --max-{option} N` or --allow-large)")
    for name in ("height", "width"):
        if values[name] is not None and (values[name] < 8 or values[name] % 8):
            raise ValueError(f"field {name!r} must be a positive multiple of 8, got {values[name]}")
    if not 0 <= values["seed"] <= MAX_SEED - (values["num"] - 1):
        raise ValueError(f"field 'seed' must be between 0 and 2**64-1 for every image of the row "
                         f"(seed + num - 1), got {values['seed']}")


def _validate(row: Row, data, defaults: JobDefaults, base: Path) -> None:
    from imageprompt.images import MAX_PROMPT_CHARS, sha256_file

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
    _check_bounds(values, defaults.limits)
    if values["guidance"] < 0:
        raise ValueError(f"field 'guidance' must be >= 0, got {values['guidance']}")
    for name in PROMPT_FIELDS:  # cap before anything tokenizes it (a 28M-character prompt crashed the tokenizer)
        if isinstance(values.get(name), str) and len(values[name]) > MAX_PROMPT_CHARS:
            values[name] = values[name][:MAX_PROMPT_CHARS]
            row.truncated.append(name)
    if spec.check is not None:
        spec.check(values)

    row.seed, row.num = int(values.pop("seed")), int(values.pop("num"))
    values.pop("kind", None)
    values.pop("id", None)
    if "image" in values:
        row.image = (base / values["image"]).expanduser()
        _check_image(row.image, "image")  # before hashing: a huge file that is no image fails at once
        row.image_sha256 = sha256_file(row.image)
    if values.get("adapter"):
        values["adapter"] = resolve_adapter(values["adapter"], base)
    if values.get("adapter_image"):  # the image prompt of a p2p row's adapter: its bytes go into the key
        adapter_image = (base / values["adapter_image"]).expanduser()
        _check_image(adapter_image, "adapter_image")
        values["adapter_image"] = str(adapter_image.resolve())
        values["adapter_image_sha256"] = sha256_file(adapter_image)
    if set(TOOLBOX_FIELDS) <= set(spec.fields):  # ControlNet, img2img, inpainting (imageprompt.jobs.toolbox_rows)
        check_toolbox_row(values, base)
    row.params = values
    row.key = row_key(row, defaults)


def resolve_adapter(spec: str, base: Path) -> str:
    """An adapter ``PATH`` or ``PATH:WEIGHT_NAME`` relative to ``base`` made absolute; other specs as they are."""
    source, sep, weight = spec.rpartition(":") if not (base / spec).exists() else (spec, "", "")
    if sep and (base / source).exists():
        return f"{(base / source).resolve()}:{weight}"
    return str((base / spec).resolve()) if (base / spec).exists() else spec


def row_key(row: Row, defaults: JobDefaults) -> str:
    """sha256 of what decides a row's images: kind, settings, seed, input bytes, model, dtype, attention backend.

    ``num`` and ``id`` are left out (image ``i`` does not depend on them), so
    raising ``num`` on a rerun only samples the new images.
    """
    content = {
        "v": KEY_VERSION, "kind": row.kind, "seed": row.seed, "image_sha256": row.image_sha256,
        "params": {k: v for k, v in row.params.items() if k != "image"},
        "model": defaults.model, "clip": defaults.clip, "scheduler": defaults.scheduler,
    }
    if defaults.image_encoder is not None and row.params.get("adapter"):  # absent otherwise: earlier keys still match
        content["image_encoder"] = defaults.image_encoder
    for name in ("dtype", "attention"):  # the kernels change the pixels; absent when unknown, as in earlier keys
        if getattr(defaults, name) is not None:
            content[name] = getattr(defaults, name)
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def read_manifest(path: str | os.PathLike) -> list[tuple[int, object]]:
    """``(line number, parsed JSON or JSONError)`` for each non-blank line; raises :class:`JobError` for the file.

    Each line is read and parsed on its own, so a bad line (not UTF-8, not JSON, nested too deep,
    an integer too long, longer than :data:`MAX_LINE_BYTES`) is one failed row and the others still run.
    A UTF-8 byte-order mark at the start of the file is skipped.
    """
    path = Path(path)
    if not path.is_file():
        raise JobError(f"{path}: no such job file")
    entries = []
    with open(path, "rb") as handle:
        number = 0
        while True:
            raw = handle.readline(MAX_LINE_BYTES + 1)
            if not raw:
                break
            number += 1
            if number == 1 and raw.startswith(BOM):
                raw = raw[len(BOM):]
            if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                while raw and not raw.endswith(b"\n"):  # skip the rest of the line without holding it
                    raw = handle.readline(1 << 20)
                entries.append((number, JSONError(f"line longer than {MAX_LINE_BYTES >> 20} MiB")))
                continue
            entry = _parse_line(raw)
            if entry is not None:
                entries.append((number, entry))
    if not entries:
        raise JobError(f"{path}: no rows (expected one JSON object a line)")
    return entries


def _parse_line(raw: bytes):
    """One manifest line parsed; a :class:`JSONError` saying why it cannot be; None for a blank line."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return JSONError(f"line is not UTF-8 text ({err})")
    if not text.strip():
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        return JSONError(f"not valid JSON: {err}")
    except RecursionError:
        return JSONError("not valid JSON: nested too deep")
    except ValueError as err:  # e.g. an integer of more than 4300 digits
        return JSONError(f"not valid JSON: {err}")
    except MemoryError:
        return JSONError("not valid JSON: too large to parse in the memory available")
    if not isinstance(data, dict):
        return JSONError(f"a row must be a JSON object, got {type(data).__name__}")
    return data


class JSONError(str):
    """A manifest line that is not JSON (kept as a row so that it is recorded as failed)."""


def validate_rows(entries: list[tuple[int, object]], defaults: JobDefaults, base: Path) -> list[Row]:
    """Validate each entry of :func:`read_manifest`; one warning for all the prompts that were truncated."""
    from imageprompt.images import MAX_PROMPT_CHARS

    rows = []
    for line, data in entries:
        rows.append(Row(line, error=str(data)) if isinstance(data, JSONError) else
                    validate_row(line, data, defaults, base))
    cut = [f"line {row.line} {name}" for row in rows for name in row.truncated]
    if cut:
        import warnings

        shown = ", ".join(cut[:5]) + (f" and {len(cut) - 5} more" if len(cut) > 5 else "")
        warnings.warn(f"{len(cut)} prompt(s) longer than {MAX_PROMPT_CHARS} characters truncated to "
                      f"{MAX_PROMPT_CHARS}: {shown}", stacklevel=2)
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


def _check_edit(values: dict) -> None:
    if not values["prompt"].strip():
        raise ValueError("field 'prompt' is empty")


def _check_adapter_extras(values: dict) -> None:
    """``window`` ([begin, end] fractions of the steps) and ``subtract_text`` (InstantStyle's content words)."""
    window = values.get("window")
    if window is not None:
        if not (len(window) == 2 and all(_check_type("window", v, float) is None for v in window)
                and 0 <= window[0] < window[1] <= 1):
            raise ValueError(f"field 'window' must be [begin, end] with 0 <= begin < end <= 1, "
                             f"got {json.dumps(window)}")
        values["window"] = [float(v) for v in window]
    if values.get("subtract_text") is not None:
        if not values["subtract_text"].strip():
            raise ValueError("field 'subtract_text' is empty")
        values.setdefault("subtract_scale", 1.0)
    elif values.get("subtract_scale") is not None:
        raise ValueError("field 'subtract_scale' needs 'subtract_text'")
    named = [name for name in ("window", "subtract_text") if values.get(name) is not None]
    if named and not values.get("adapter"):
        raise ValueError(f"field(s) {', '.join(map(repr, named))} need 'adapter'")


def edit_settings(values: dict):
    """A p2p row's edit as one settings object: :class:`~imageprompt.masactrl.MasaCtrlSettings` for mode
    ``masactrl``, else :class:`~imageprompt.p2p.PromptToPromptSettings` (what checks it, and what the sampler runs)."""
    if values["mode"] == "masactrl":
        from imageprompt.masactrl import START_STEP, MasaCtrlSettings

        start = values.get("start_step")
        return MasaCtrlSettings(START_STEP if start is None else start, values.get("start_layer"), values.get("mask"))
    from imageprompt.p2p import PromptToPromptSettings

    given = {name: values[name] for name in ("blend_threshold", "blend_exclude", "blend_start")
             if values.get(name) is not None}
    return PromptToPromptSettings(values["mode"], values.get("weights"), values.get("blend"),
                                  cross_steps=values["cross_steps"], self_steps=values["self_steps"], **given)


def _check_p2p(values: dict) -> None:
    from imageprompt.inversion import METHODS
    from imageprompt.p2p import normalize_word

    for name in ("blend", "mask"):
        if not all(isinstance(word, str) for word in values.get(name) or ()):
            raise ValueError(f"field {name!r} must be a list of words, got {json.dumps(values[name])}")
    if values["mode"] == "masactrl":  # MasaCtrl (imageprompt.masactrl): its own fields, not p2p's word options
        named = [n for n in ("weights", "blend", "blend_exclude", "blend_threshold") if values.get(n) is not None]
        if named:
            raise ValueError(f"field(s) {', '.join(map(repr, named))} are prompt-to-prompt options, not 'masactrl''s")
        values.setdefault("start_step", 4)
    elif any(values.get(name) is not None for name in ("start_step", "start_layer", "mask")):
        raise ValueError("fields 'start_step', 'start_layer' and 'mask' belong to mode 'masactrl'")
    values["target"] = edit_settings(values).check(values["prompt"], values.get("target"))[0]
    if bool(values.get("adapter")) != bool(values.get("adapter_image")):
        raise ValueError("fields 'adapter' and 'adapter_image' go together: the adapter and its image prompt")
    _check_adapter_extras(values)
    if values.get("adapter"):
        values.setdefault("scale", 1.0)
    methods = (*METHODS, "dpl")  # dpl: Dynamic Prompt Learning (imageprompt.dpl), with the nouns in `dpl_words`
    if values.get("invert") is not None:
        if values["invert"] not in methods:
            raise ValueError(f"field 'invert' must be one of {', '.join(methods)}, got {values['invert']!r}")
        if not values.get("image"):
            raise ValueError("field 'invert' needs the photo to invert in field 'image'")
    words = values.get("dpl_words")
    if (values.get("invert") == "dpl") != bool(words):
        raise ValueError("fields 'invert': 'dpl' and 'dpl_words' (the nouns of 'prompt' whose tokens it learns) "
                         "go together")
    prompt_words = {normalize_word(w) for w in values["prompt"].split()}
    for word in words or ():
        if not isinstance(word, str) or normalize_word(word) not in prompt_words:
            raise ValueError(f"field 'dpl_words': {json.dumps(word)} is not a word of 'prompt'")


def _check_style(values: dict) -> None:
    """StyleAligned rows: ``prompt`` (this image) and ``reference`` (the reference's prompt) must say something."""
    for name in ("prompt", "reference"):
        if not values[name].strip():
            raise ValueError(f"field {name!r} is empty")
    if not values["keys_scale"] > 0:
        raise ValueError(f"field 'keys_scale' must be positive, got {values['keys_scale']}")
    if not 0 <= values["reference_seed"] <= MAX_SEED:
        raise ValueError(f"field 'reference_seed' must be between 0 and 2**64-1, got {values['reference_seed']}")


KINDS: dict[str, Kind] = {
    "vary": Kind("sdipc-variation", {"image": str, **TOOLBOX_FIELDS}, required=("image",), grouped=TOOLBOX_GROUPED),
    "edit": Kind("sdipc-edit", {"image": str, "prompt": str, "alpha": float, **TOOLBOX_FIELDS},
                 required=("image", "prompt"), defaults={"alpha": 0.5}, grouped=("alpha", *TOOLBOX_GROUPED),
                 check=_check_edit),
    "p2p": Kind("p2p",
                {"prompt": str, "target": str, "mode": str, "weights": dict, "blend": list, "blend_threshold": float,
                 "blend_exclude": list, "blend_start": float,
                 "cross_steps": (float, list), "self_steps": (float, list), "image": str, "alpha": float,
                 "invert": str, "adapter": str, "adapter_image": str, "scale": float, "window": list,
                 "subtract_text": str, "subtract_scale": float, "start_step": int, "start_layer": int,
                 "mask": list, "dpl_words": list, **TOOLBOX_FIELDS},
                required=("prompt",), defaults={"mode": "replace", "cross_steps": 0.8, "self_steps": 0.4, "alpha": 0.5},
                grouped=("adapter", "scale", "window", *TOOLBOX_GROUPED), check=_check_p2p,
                module="imageprompt.pipelines.pipeline_p2p"),
    "adapter": Kind("ip-adapter", {"image": str, "prompt": str, "adapter": str, "scale": float, "window": list,
                                   "subtract_text": str, "subtract_scale": float},
                    required=("image", "adapter"), defaults={"scale": 1.0}, grouped=("adapter", "scale", "window"),
                    check=_check_adapter_extras, module="imageprompt.ip_adapter"),
    # StyleAligned (imageprompt.style_aligned): this row's image shares the style of a reference sampled in the same
    # batch from `reference` (and `reference_seed`), or of the photo `image` (DDIM-inverted, `reference` describing it)
    "style-aligned": Kind("style-aligned", {"prompt": str, "reference": str, "reference_seed": int, "image": str,
                                            "keys_scale": float},
                          required=("prompt", "reference"), defaults={"reference_seed": 0, "keys_scale": 1.0},
                          grouped=("reference", "reference_seed", "image", "keys_scale"), check=_check_style,
                          module="imageprompt.pipelines.pipeline_style_aligned"),
}
