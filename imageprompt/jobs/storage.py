"""What a job leaves in its output folder, and reading it back to resume.

- output PNGs, each carrying its row's hash (:func:`output_parameters`, :func:`is_complete`);
- one part file per process under :data:`PARTS`, one synced record a line (:class:`PartWriter`);
- ``results.jsonl``, the parts merged, one record per row (:func:`fold_parts`, :func:`merge_results`),
  written atomically with :func:`imageprompt.images.atomic_write`;
- ``.imageprompt-lock``: one run per folder (:func:`output_lock`).
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from imageprompt.images import loaded_extras
from imageprompt.jobs.schema import KINDS, JobError, Row

LOCK = ".imageprompt-lock"
RESULTS = "results.jsonl"
PARTS = ".imageprompt-parts"  # per-process results of the current run, inside the output folder


# --------------------------------------------------------------- one run per folder
class output_lock:  # noqa: N801 - used as a context manager, like open()
    """An exclusive lock on ``out`` for one run (``fcntl.flock`` on ``out/.imageprompt-lock``).

    The operating system releases it when the holder exits, however it exits, so a
    killed run never leaves a stale lock. A second run on the folder gets a
    :class:`JobError` naming the holder's pid instead of mixing its parts with the
    first run's. Under ``accelerate launch`` only the main process takes it: one lock per run.
    """

    def __init__(self, out: Path):
        self.path = Path(out) / LOCK
        self.handle = None

    def __enter__(self):
        import fcntl

        self.handle = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 - held for the whole run
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.handle.seek(0)
            holder = self.handle.read().strip() or "unknown"
            self.handle.close()
            raise JobError(f"{self.path.parent} is in use by another batch run (pid {holder}); "
                           "run one job per output folder, or wait for it to finish") from None
        self.handle.seek(0)
        self.handle.truncate()
        self.handle.write(str(os.getpid()))
        self.handle.flush()
        return self

    def __exit__(self, *exc):
        self.path.unlink(missing_ok=True)  # a finished run leaves nothing behind
        self.handle.close()  # releases the lock


# --------------------------------------------------------------- outputs
def output_parameters(pipe, row: Row, seed: int, image) -> dict:
    """What an output PNG records about itself (``job_key`` is what :func:`is_complete` checks)."""
    import imageprompt
    from imageprompt.families import denoiser

    return {
        "method": KINDS[row.kind].method, "model": getattr(pipe, "model_name", None),
        "clip": getattr(pipe, "clip_name", None), **loaded_extras(pipe), "scheduler": type(pipe.scheduler).__name__,
        "dtype": str(denoiser(pipe).dtype).replace("torch.", ""), "imageprompt": imageprompt.__version__,
        **{k: v for k, v in row.params.items() if k != "image"},
        "input": row.image.name if row.image else None, "input_sha256": row.image_sha256,
        "seed": seed, "width": image.size[0], "height": image.size[1],
        "job_key": row.key, "job_line": row.line, "job_id": row.id,
    }


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


# --------------------------------------------------------------- records
def row_record(row: Row, status: str, outputs=(), images=0, seconds=None, error=None, skipped=False) -> dict:
    """The results record of one row."""
    return {"line": row.line, "id": row.id, "kind": row.kind, "key": row.key or None, "status": status,
            "outputs": list(outputs), "images": images, "seconds": seconds, "error": error, "skipped": skipped}


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


class PartCounter:
    """Rows and sampled images recorded so far in the part files of ``out``, by every process."""

    def __init__(self, out: Path):
        self.out = out
        self.offsets: dict[Path, int] = {}
        self.rows = self.images = 0

    def counts(self) -> tuple[int, int]:
        """Reads only what the part files gained since last time."""
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


# --------------------------------------------------------------- merging
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
    with contextlib.suppress(OSError):  # gone once empty; a part another process still writes keeps it
        (out / PARTS).rmdir()
    return merged
