"""Batch jobs on a Ray cluster: the same rows, output names, records and resume as :func:`run_job`.

:func:`run_job_ray` is :func:`~imageprompt.jobs.run.run_job` with another engine for the images still
to sample. The driver (the process that calls it) reads and validates the manifest, records bad rows
and complete rows, takes the folder's lock and writes ``results.jsonl``, all exactly as on one machine.
The pending images, cut into the same batches (:func:`~imageprompt.jobs.run.plan_batches`), become a
Ray Dataset, one batch a row; Ray Data's ``map_batches`` hands them to a fixed pool of actors
(:class:`PipelineActor`) that each load the pipeline once, one GPU each when the cluster has GPUs.
An actor samples a batch with the single-machine code and saves its PNGs into ``out`` with the same
atomic write, so ``out`` must be a folder every node sees at the same path (probed before sampling,
:func:`probe_storage`). The actor sends back the batch's row records; the driver adds up the records
of a row split over several batches and writes one record per row, ignoring a batch it has already
counted, so an actor killed mid-batch (Ray restarts it and retries the batch) neither loses nor
duplicates a row.

Ray is optional (``pip install "imageprompt[ray]"``) and imported only when a Ray job runs.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import secrets
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from imageprompt.jobs.run import JobOptions, JobSummary, plan_batches, run_job, sample_items
from imageprompt.jobs.sampling import Item, Runner, apply_speed_options
from imageprompt.jobs.schema import JobDefaults, JobError, read_manifest
from imageprompt.jobs.storage import row_record

RAY_HINT = 'the Ray backend needs Ray: pip install "imageprompt[ray]"'
PROBE = ".imageprompt-probe"  # token files of the shared-storage probe, removed when it ends


@dataclass
class RayOptions:
    """Where and how a Ray job runs.

    ``address``: ``None`` connects to ``RAY_ADDRESS`` or a cluster started on this machine with
    ``ray start``, else starts a local instance; ``"auto"``, ``"HOST:6379"`` or ``"ray://HOST:10001"``
    as :func:`ray.init` takes them. A Ray already initialised in this process is used as it is.
    ``actors``: pipeline replicas (default: one per ``gpus_per_actor`` GPUs of the cluster, else 1).
    ``cpus_per_actor``: CPUs each actor reserves; on CPU actors also their torch threads.
    """

    address: str | None = None
    actors: int | None = None
    gpus_per_actor: float = 1.0
    cpus_per_actor: float = 1.0
    probe_timeout: float = 300.0  # seconds for every node to answer the shared-storage probe


def import_ray():
    """``ray`` with Ray Data, or a :class:`JobError` that says how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401 - the Data extra, not only the core
    except ImportError as err:
        raise JobError(RAY_HINT) from err
    return ray


def run_job_ray(
    jobs: str | os.PathLike,
    out: str | os.PathLike,
    load_pipe: Callable[[object], object],
    defaults: JobDefaults | None = None,
    options: JobOptions | None = None,
    ray: RayOptions | None = None,
    device: str | None = None,
) -> JobSummary:
    """Run the rows of ``jobs`` into ``out`` on Ray actors; the summary and the folder are those of :func:`run_job`.

    Args:
        load_pipe: ``fn(device) -> pipe``, called once in each actor (it is pickled to the workers:
            a function of an installed module, or a closure over picklable values).
        defaults: as for :func:`run_job`. A ``dtype`` left ``None`` is the actors' default
            (fp16 on GPU actors, fp32 on CPU actors), so it goes into the row keys; ``load_pipe``
            should then load with its default dtype.
        ray: address and actors (:class:`RayOptions`).
        device: ``"cpu"`` for CPU actors on a cluster with GPUs; default: GPU actors when the cluster has GPUs.
    """
    import_ray()
    defaults, options, ray = defaults or JobDefaults(), options or JobOptions(), ray or RayOptions()
    if options.batch_size < 1:
        raise JobError(f"batch size must be at least 1, got {options.batch_size}")
    if ray.actors is not None and ray.actors < 1:
        raise JobError(f"--ray-actors must be at least 1, got {ray.actors}")
    jobs, out = Path(jobs).resolve(), Path(out).resolve()  # the workers do not share this process's folder
    read_manifest(jobs)  # a missing or empty job file is reported before Ray starts
    sampler = RaySampler(load_pipe, ray, device)
    try:
        if defaults.dtype is None:  # the row keys hold the dtype the actors will load with: ask the cluster now
            import torch

            from imageprompt.loading import resolve_dtype

            dtype = resolve_dtype(None, torch.device(sampler.cluster()[0]))
            defaults = dataclasses.replace(defaults, dtype=str(dtype).replace("torch.", ""))
        sampler.dtype = defaults.dtype  # otherwise Ray starts only when there is something to sample
        return run_job(jobs, out, defaults=defaults, options=options, device="cpu", sampler=sampler)
    finally:
        sampler.disconnect()


def connect(ray, address: str | None) -> bool:
    """Join (or start) the Ray cluster; True when this call initialised Ray (the caller then shuts it down)."""
    if ray.is_initialized():
        return False
    ray.init(address=address, include_dashboard=False, logging_level=logging.ERROR)
    return True


# --------------------------------------------------------------- shared storage
def probe_storage(out: Path, inputs: list[str], timeout: float = 300.0) -> None:
    """Check that every alive Ray node with CPUs or GPUs reads and writes ``out`` and reads ``inputs``.

    The driver writes a token file into ``out``; a task pinned to each node reads it, writes a reply
    beside it and opens the input images; the driver then reads the replies. Raises :class:`JobError`
    naming the nodes that fail, before anything is sampled.
    """
    ray = import_ray()
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    token = secrets.token_hex(8)
    probe = out / f"{PROBE}-{token}"
    _write_token(probe, token)
    try:
        nodes = [n for n in ray.nodes() if n.get("Alive") and (n["Resources"].get("CPU") or n["Resources"].get("GPU"))]
        check = ray.remote(num_cpus=0, max_retries=0)(_check_node)
        refs = [check.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                .remote(str(probe), token, inputs) for n in nodes]
        problems = []
        deadline = time.monotonic() + timeout
        for node, ref in zip(nodes, refs):
            where = f"node {node.get('NodeManagerAddress', '?')} ({node['NodeID'][:8]})"
            try:
                error, reply = ray.get(ref, timeout=max(deadline - time.monotonic(), 1.0))
            except ray.exceptions.GetTimeoutError:
                error = f"no answer within {timeout:.0f} s"
            except ray.exceptions.RayError as err:
                error = f"the check failed there ({type(err).__name__})"
            if error:
                problems.append(f"{where}: {error}")
            elif not _reads_token(out / reply, token):
                problems.append(f"{where}: what it writes into {out} does not reach this machine")
        if problems:
            raise JobError(f"--out {out} is not shared with the Ray workers; "
                           + "; ".join(problems) + ". On a cluster, the output folder and the job's input images "
                           "must be on storage every node mounts at the same path (NFS, Lustre, a mounted bucket)")
    finally:
        for path in out.glob(f"{PROBE}-{token}*"):
            path.unlink(missing_ok=True)


def _write_token(path: Path, token: str) -> None:
    path.write_text(token, encoding="utf-8")


def _reads_token(path: Path, token: str) -> bool:
    try:
        return path.read_text(encoding="utf-8") == token
    except OSError:
        return False


def _check_node(probe: str, token: str, inputs: list[str]) -> tuple[str | None, str | None]:
    """Runs on a node: ``(error, reply file name)``."""
    import ray

    path = Path(probe)
    if not _reads_token(path, token):
        return f"cannot read {path}", None
    reply = path.with_name(f"{path.name}-{ray.get_runtime_context().get_node_id()[:16]}")
    try:
        reply.write_text(token, encoding="utf-8")
    except OSError as err:
        return f"cannot write into {path.parent} ({err.strerror or err})", None
    for image in inputs:
        if not os.access(image, os.R_OK):
            return f"cannot read the input image {image}", None
    return None, reply.name


# --------------------------------------------------------------- the actors
class PipelineActor:
    """A Ray Data actor: loads the pipeline once, then samples one planned batch per dataset row.

    Each batch runs through the single-machine sampling code (the same retries of a failing batch
    row by row, the same PNGs and metadata); its row records are returned, not written.
    """

    def __init__(self, load_pipe, out: str, options: JobOptions, batches: list[list[Item]],
                 image_encoder: str | None = None, device: str = "cpu", threads: int | None = None,
                 dtype: str | None = None):
        import torch

        if threads:
            torch.set_num_threads(threads)
        _quiet_loading()
        from imageprompt.families import denoiser

        self.pipe = load_pipe(torch.device(device))
        loaded = str(denoiser(self.pipe).dtype).replace("torch.", "")
        if dtype is not None and loaded != dtype:
            raise JobError(f"the actors' pipeline is {loaded} but the row keys say {dtype}: "
                           "load_pipe must load with the job's dtype")
        apply_speed_options(self.pipe, options.compile, options.channels_last)
        self.runner = Runner(self.pipe, image_encoder)
        self.out, self.options, self.batches = Path(out), options, batches

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        replies = []
        for index in batch["batch"]:
            items = self.batches[int(index)]
            records = _Collected()
            options = dataclasses.replace(self.options, batch_size=len(items))  # the batch the driver planned
            sample_items(self.pipe, items, self.out, records, JobSummary(), options, records, runner=self.runner)
            replies.append(json.dumps(records.records))
        return {"batch": np.asarray(batch["batch"]), "records": np.asarray(replies, dtype=object)}


def _quiet_loading() -> None:
    """No loading bars from the actors: the driver's bar is the job's one."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


class _Collected:
    """Stands in for the part writer and the progress bar inside an actor: keeps the records."""

    def __init__(self):
        self.records: list[dict] = []

    def write(self, record: dict) -> None:
        self.records.append(record)

    def refresh(self) -> int:
        return len(self.records)


# --------------------------------------------------------------- the driver
class RaySampler:
    """The ``sampler`` of :func:`run_job` that runs the pending images on Ray Data actors."""

    def __init__(self, load_pipe, ray: RayOptions, device: str | None = None, dtype: str | None = None):
        self.load_pipe, self.ray, self.device, self.dtype = load_pipe, ray, device, dtype
        self.started = False
        self._cluster: tuple[str, int] | None = None

    def cluster(self) -> tuple[str, int]:
        """``(actor device, actors)``, joining or starting the cluster on the first call."""
        if self._cluster is None:
            kind = None if self.device is None else _device_type(self.device)
            if kind not in (None, "cuda", "cpu"):
                raise JobError(f"--device {self.device}: Ray actors run on cuda or cpu")
            ray = import_ray()
            self.started = connect(ray, self.ray.address)
            gpus = ray.cluster_resources().get("GPU", 0) if kind != "cpu" else 0
            if kind == "cuda" and not gpus:
                raise JobError(f"--device {self.device}: the Ray cluster has no GPUs")
            actors = self.ray.actors or (max(1, int(gpus // self.ray.gpus_per_actor)) if gpus else 1)
            self._cluster = ("cuda" if gpus else "cpu", actors)
        return self._cluster

    def disconnect(self) -> None:
        if self.started:
            import_ray().shutdown()
            self.started = False

    def __call__(self, pending: list[Item], out: Path, writer, options: JobOptions, progress,
                 image_encoder: str | None) -> None:
        device, actors = self.cluster()
        ray = import_ray()
        inputs = sorted({str(item.row.image) for item in pending if item.row.image})[:1]
        probe_storage(out, inputs, self.ray.probe_timeout)
        batches = plan_batches(pending, options.batch_size)
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # one bar: the job's
        context.print_on_execution_start = False
        logging.getLogger("ray.data").setLevel(logging.ERROR)
        # the rows carry batch numbers; the batches travel once, with the actors' constructor arguments
        dataset = ray.data.from_items([{"batch": i} for i in range(len(batches))], override_num_blocks=len(batches))
        gpu = device == "cuda"
        resources = dict(num_gpus=self.ray.gpus_per_actor, num_cpus=self.ray.cpus_per_actor) if gpu else \
            dict(num_cpus=self.ray.cpus_per_actor)
        constructor = dict(load_pipe=self.load_pipe, out=str(out), options=options, batches=batches,
                           image_encoder=image_encoder,
                           device=device, threads=None if gpu else max(1, int(self.ray.cpus_per_actor)),
                           dtype=self.dtype)
        # Ray Data's actors default to max_restarts=-1 and max_task_retries=-1: a dead actor is
        # restarted and its batches are run again; the driver counts each batch once
        results = dataset.map_batches(
            PipelineActor, batch_size=1, fn_constructor_kwargs=constructor,
            compute=ray.data.ActorPoolStrategy(size=min(actors, len(batches)), max_tasks_in_flight_per_actor=1),
            **resources)
        tally = BatchTally(pending, writer)
        try:
            for reply in results.iter_rows():
                batch = int(reply["batch"])
                tally.add(batch, batches[batch], json.loads(reply["records"]))
                progress.refresh()
        except ray.exceptions.ActorDiedError as err:
            if not getattr(err, "_actor_init_failed", False):
                raise
            # an actor whose constructor fails (the model does not load there) ends the job, as on one machine
            raise JobError(f"a Ray actor could not load the pipeline: {_last_line(err.error_msg)}") from None
        tally.close()


def _device_type(device) -> str:
    import torch

    return torch.device(device).type


def _last_line(text: str) -> str:
    """The exception line at the end of a remote traceback, without colour codes."""
    lines = [line.strip() for line in re.sub(r"\x1b\[[0-9;]*m", "", text or "").splitlines() if line.strip()]
    return lines[-1] if lines else "unknown error"


class BatchTally:
    """Adds up the records of each row over its batches; writes one record per row, once."""

    def __init__(self, pending: list[Item], writer):
        self.writer = writer
        self.rows = {item.row.line: item.row for item in pending}
        self.left = Counter(item.row.line for item in pending)
        self.images: Counter = Counter()
        self.seconds: dict[int, float] = {}
        self.counted: set[int] = set()
        self.finished: set[int] = set()

    def add(self, batch_id: int, batch: list[Item], records: list[dict]) -> None:
        if batch_id in self.counted:
            return  # a batch that came back twice (a retried task): counted once
        self.counted.add(batch_id)
        in_batch = Counter(item.row.line for item in batch)
        for record in records:
            line = record["line"]
            if line in self.finished or line not in in_batch:
                continue
            self.seconds[line] = self.seconds.get(line, 0.0) + (record.get("seconds") or 0.0)
            if record["status"] != "done":
                self._finish(line, record.get("error") or "failed")
                continue
            self.images[line] += record.get("images", 0)
            self.left[line] -= in_batch[line]
            if self.left[line] <= 0:
                self._finish(line)

    def _finish(self, line: int, error: str | None = None) -> None:
        row, took = self.rows[line], round(self.seconds.get(line, 0.0), 3)
        if error is None:
            self.writer.write(row_record(row, "done", row.output_names(), images=self.images[line], seconds=took))
        else:
            self.writer.write(row_record(row, "failed", seconds=took, error=error))
        self.finished.add(line)

    def close(self) -> None:
        """Every batch came back: a row still without a record (not expected) fails rather than going missing."""
        for line in sorted(set(self.rows) - self.finished):
            self._finish(line, "no result came back from the Ray workers")
