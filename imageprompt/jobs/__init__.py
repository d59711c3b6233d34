"""Batch jobs: a JSONL manifest of rows in, PNGs and a results manifest out.

The row format is :mod:`~imageprompt.jobs.schema`, the output folder :mod:`~imageprompt.jobs.storage`,
the pipeline calls of each kind :mod:`~imageprompt.jobs.sampling`, and :func:`run_job`
(:mod:`~imageprompt.jobs.run`) ties them together. This module only re-exports them.

One row a line, ``kind`` choosing what it does (see :data:`~imageprompt.jobs.schema.KINDS`)::

    {"kind": "vary", "image": "cat.jpg", "num": 4, "seed": 1}
    {"kind": "edit", "image": "cat.jpg", "prompt": "on the beach", "alpha": 0.55}

What makes a long job safe to run, kill and run again:

- Each output's name is derived from a hash of the row's content, the input
  image's bytes and the model settings (:func:`row_key`), so a rerun knows
  which outputs it already has; a PNG counts only if it decodes and carries that
  hash (:func:`is_complete`). Image ``i`` of a row uses seed ``seed + i`` and
  its own generator and starts from the same noise whatever it was batched with. The
  pixels are not bit-identical across batch sizes: batched kernels round differently
  (on CPU about 1e-6 in the latents, up to 1/255 in the PNG). The row key holds what
  changes images more than that: the dtype and the attention backend, besides the model
  and the row's fields.
- PNGs are written to a temporary name and renamed (:func:`imageprompt.images.save_png`).
- Each process appends one record per row to its own part file, synced line by
  line; the main process merges the parts into ``results.jsonl`` at the end
  (and folds in the parts a killed run left behind at the start).
- A bad row (unreadable image, empty edit prompt, unknown kind, a line that does
  not parse, a size above :class:`Limits`) is recorded as failed and the job goes
  on; a failing batch is retried row by row so one bad row does not fail its
  neighbours, and any exception while sampling a row (``MemoryError`` included)
  fails that row only.

Rows are split across processes with accelerate (``accelerate launch -m
imageprompt batch ...``), or sampled on Ray actors across a cluster
(:func:`run_job_ray`, :mod:`~imageprompt.jobs.ray_backend`, the optional ``ray`` extra);
rows that share a kind and sampling settings are sampled together, ``batch_size``
images per forward pass.
"""

from imageprompt.jobs.ray_backend import RayOptions, run_job_ray
from imageprompt.jobs.run import JobOptions, JobSummary, plan_batches, run_job
from imageprompt.jobs.sampling import SAMPLERS, Item, Runner, apply_speed_options
from imageprompt.jobs.schema import (
    KEY_VERSION,
    KINDS,
    JobDefaults,
    JobError,
    JSONError,
    Kind,
    Limits,
    Row,
    kind_unavailable,
    read_manifest,
    resolve_adapter,
    row_key,
    validate_row,
    validate_rows,
)
from imageprompt.jobs.storage import (
    LOCK,
    PARTS,
    RESULTS,
    PartWriter,
    fold_parts,
    is_complete,
    merge_results,
    output_lock,
    output_parameters,
    read_records,
    remove_temporaries,
)

__all__ = [
    "KEY_VERSION", "KINDS", "LOCK", "PARTS", "RESULTS", "SAMPLERS", "Item", "JSONError", "JobDefaults", "JobError",
    "JobOptions", "JobSummary", "Kind", "Limits", "PartWriter", "RayOptions", "Row", "Runner", "apply_speed_options",
    "fold_parts", "is_complete", "kind_unavailable", "merge_results", "output_lock", "output_parameters",
    "plan_batches", "read_manifest", "read_records", "remove_temporaries", "resolve_adapter", "row_key", "run_job",
    "run_job_ray", "validate_row", "validate_rows",
]
