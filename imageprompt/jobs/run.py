"""Running a batch job: splitting rows across processes, skipping finished rows, batching, recording.

:func:`run_job` is the entry point; see :mod:`imageprompt.jobs` for what makes a job safe to kill and rerun.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from imageprompt.jobs.sampling import Item, Runner, apply_speed_options
from imageprompt.jobs.schema import JobDefaults, JobError, Row, read_manifest, validate_rows
from imageprompt.jobs.storage import (
    RESULTS,
    PartCounter,
    PartWriter,
    fold_parts,
    is_complete,
    merge_results,
    output_lock,
    output_parameters,
    remove_temporaries,
    row_record,
)
from imageprompt.progress import LOADING, SAMPLING


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
        rate = f"{self.images_per_second:.2f} images/s while sampling" if self.images else "nothing sampled"
        return (f"{self.rows} rows: {self.done} done, {self.skipped} skipped (already complete), "
                f"{self.failed} failed; {self.images} images, {rate}, {self.seconds:.1f} s in all; "
                f"results in {self.results}")


class _Progress:
    """One bar on the main process: rows done by every process (read from the part files), images/s, ETA."""

    def __init__(self, out: Path, total: int, enabled: bool):
        self.start = time.perf_counter()  # restarted when sampling starts
        self.parts = PartCounter(out)
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, unit="row", desc="checking rows", dynamic_ncols=True)

    def phase(self, label: str) -> None:
        """Label the bar with what the job does now (loading, sampling)."""
        if self.bar is not None:
            self.bar.set_description(label)

    def refresh(self) -> int:
        rows, images = self.parts.counts()
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
    sampler: Callable | None = None,
) -> JobSummary:
    """Run the rows of ``jobs`` (JSONL) into ``out`` and return the summary.

    Args:
        pipe: a loaded :class:`~imageprompt.pipelines.StableDiffusionImagePromptPipeline`, or
        load_pipe: ``fn(device) -> pipe``, called only when this process has images to sample.
        defaults: values for fields rows leave out, and the model identity hashed into output names.
        options: batch size, speed options, progress bar.
        device: where to sample (default: this process's accelerator; ``"cpu"`` makes a multi-process
            launch use gloo on the CPU).
        sampler: another engine for the images still to sample, ``fn(pending, out, writer, options, progress,
            image_encoder)``, which writes one record per row to ``writer`` (the Ray backend,
            :func:`imageprompt.jobs.ray_backend.run_job_ray`); ``pipe`` and ``load_pipe`` are then not used.

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
    if pipe is not None:
        defaults = _with_pipe_identity(defaults, pipe)
    entries = read_manifest(jobs)  # every process reads the whole file; it is small next to the images
    state = PartialState(cpu=_cpu_run(device))
    with contextlib.ExitStack() as held:
        if state.is_main_process:
            out.mkdir(parents=True, exist_ok=True)
            held.enter_context(output_lock(out))  # before anything is folded or written
        return _run(jobs, out, entries, state, pipe, load_pipe, defaults, options, device, sampler)


def _run(jobs, out, entries, state, pipe, load_pipe, defaults, options, device, sampler=None) -> JobSummary:
    history: dict[str, dict] = {}
    if state.is_main_process:
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
            _warn_unknown_words(rows, defaults.model or getattr(pipe, "model_name", None))
            pending = _record_finished_rows(rows, out, writer, summary)
            progress.refresh()
            if pending and sampler is not None:
                progress.start = time.perf_counter()
                progress.phase(SAMPLING)
                sampler(pending, out, writer, options, progress, defaults.image_encoder)
            elif pending:
                if pipe is None:
                    if load_pipe is None:
                        raise JobError("run_job needs `pipe` or `load_pipe`")
                    progress.phase(LOADING)
                    pipe = load_pipe(_process_device(device, state))
                apply_speed_options(pipe, options.compile, options.channels_last)
                progress.start = time.perf_counter()  # images/s of sampling, not of loading
                progress.phase(SAMPLING)
                sample_items(pipe, pending, out, writer, summary, options, progress, defaults.image_encoder)
    except BaseException:
        writer.close()
        if state.is_main_process and state.num_processes == 1:
            merge_results(out, history)  # the rows recorded so far are kept, whatever ended the job
        raise
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


def _with_pipe_identity(defaults: JobDefaults, pipe) -> JobDefaults:
    """``defaults`` with the dtype and attention backend of a loaded ``pipe`` where they are not given."""
    import dataclasses

    changes = {}
    unet = getattr(pipe, "unet", None)
    if defaults.dtype is None and getattr(unet, "dtype", None) is not None:
        changes["dtype"] = str(unet.dtype).replace("torch.", "")
    if defaults.attention is None and unet is not None:
        backends = {getattr(p, "backend", None) for p in getattr(unet, "attn_processors", {}).values()} - {None}
        if len(backends) == 1:
            changes["attention"] = backends.pop()
    return dataclasses.replace(defaults, **changes) if changes else defaults


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


def _warn_unknown_words(rows: list[Row], model: str | None) -> None:
    """For the bundled model: one warning per prompt with words outside its vocabulary (not per row)."""
    from imageprompt.vocabulary import warn_unknown_words

    seen: set[str] = set()
    for row in rows:
        if not row.error:
            warn_unknown_words(model, [(f"line {row.line} {name}", row.params.get(name))
                                       for name in ("prompt", "target", "negative_prompt")], seen)


def _record_finished_rows(rows: list[Row], out: Path, writer: PartWriter, summary: JobSummary) -> list[Item]:
    """Record bad rows and rows whose outputs are all complete; return the images still to sample."""
    pending = []
    for row in rows:
        summary.rows += 1
        if not row.error:
            try:
                missing = [i for i in range(row.num) if not is_complete(out / row.output_name(i), row.key)]
            except Exception as err:  # noqa: BLE001 - MemoryError included: this row fails, the job goes on
                row.error = _error_text(err)
        if row.error:
            writer.write(row_record(row, "failed", error=row.error))
            summary.failed += 1
            continue
        if not missing:
            writer.write(row_record(row, "done", row.output_names(), images=row.num, skipped=True))
            summary.skipped += 1
        pending += [Item(row, i) for i in missing]
    return pending


def plan_batches(items: list[Item], batch_size: int) -> list[list[Item]]:
    """Group items by settings (first-seen order), then cut each group into batches."""
    groups: dict[tuple, list[Item]] = {}
    for item in items:
        groups.setdefault(item.row.settings(), []).append(item)
    # groups of one adapter next to each other, so each adapter is loaded once
    order = sorted(groups, key=lambda settings: dict(settings[1:]).get("adapter") or "")
    return [groups[key][i : i + batch_size] for key in order for i in range(0, len(groups[key]), batch_size)]


def sample_items(pipe, pending: list[Item], out: Path, writer: PartWriter, summary: JobSummary,
                 options: JobOptions, progress: _Progress, image_encoder: str | None = None,
                 runner: Runner | None = None) -> None:
    """Sample every pending image; write each row's record when its last image is saved or it fails.

    A given ``runner`` (kept across calls by a Ray actor) is the caller's: its adapter stays loaded."""
    from imageprompt.images import save_png

    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    own = runner is None
    runner = runner or Runner(pipe, image_encoder)
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
            writer.write(row_record(row, "failed", seconds=took, error=error))
            summary.failed += 1
        else:
            writer.write(row_record(row, "done", row.output_names(), images=new_images.get(row.line, 0), seconds=took))
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
            save_png(image, out / row.output_name(item.index), output_parameters(pipe, row, item.seed, image))
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
        if own and runner.adapter is not None:
            pipe.unload_ip_adapter()  # hand the pipeline back as it came


def _error_text(err: BaseException) -> str:
    from imageprompt.images import ImageInputError

    return str(err) if isinstance(err, (ImageInputError, JobError)) else f"{type(err).__name__}: {err}"
