"""``imageprompt batch JOBS.jsonl --out DIR``: run a manifest of variation and editing rows.

Many GPUs or machines: ``accelerate launch -m imageprompt batch JOBS.jsonl --out DIR``;
on a Ray cluster: ``imageprompt batch JOBS.jsonl --out DIR --ray [ADDRESS]``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from imageprompt.cli.common import (
    EXIT_FAILURE,
    STARTED,
    CommandError,
    add_model_options,
    finite_float,
    positive_int,
    seed_number,
)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "batch", help="run a JSONL job file of vary/edit/p2p/adapter rows (resumable; many GPUs with accelerate)",
        description="Run one job a line from a JSONL file into --out. Reruns skip complete outputs; "
                    "results.jsonl records each row's status. Under `accelerate launch -m imageprompt batch ...` "
                    "the rows are split across processes; with --ray they run on a Ray cluster's actors.",
    )
    parser.add_argument("jobs", help="JSONL file, one row a line (relative image paths are read from its folder)")
    parser.add_argument("--out", required=True, help="output folder (shared by all processes)")
    rows = parser.add_argument_group("row defaults (a row's own fields win)")
    rows.add_argument("--seed", type=seed_number, default=0,
                      help="seed of a row's first image; image i: seed+i (default 0)")
    rows.add_argument("--num", type=positive_int, default=1, help="images per row (default 1)")
    rows.add_argument("--steps", type=positive_int, default=50, help="denoising steps (default 50)")
    rows.add_argument("--guidance", type=finite_float, default=7.5, help="classifier-free guidance scale (default 7.5)")
    rows.add_argument("--negative-prompt", default=None)
    rows.add_argument("--height", type=positive_int)
    rows.add_argument("--width", type=positive_int)
    rows.add_argument("--adapter", help="IP-Adapter checkpoint for adapter rows that name none")
    rows.add_argument("--image-encoder", metavar="PATH",
                      help="CLIP vision folder for the adapter rows (default: image_encoder next to the weights; "
                           "for the bundled checkpoints/shapes-ip-adapter.safetensors, the bundled CLIP)")
    bounds = parser.add_argument_group("bounds (a row above one fails, naming the field)")
    bounds.add_argument("--max-num", type=positive_int, default=64, help="most images per row (default 64)")
    bounds.add_argument("--max-side", type=positive_int, default=2048,
                        help="largest height or width in pixels (default 2048)")
    bounds.add_argument("--max-steps", type=positive_int, default=500, help="most sampling steps (default 500)")
    bounds.add_argument("--allow-large", action="store_true",
                        help="no upper bounds on num, height, width and steps (for big GPUs and trusted job files)")
    speed = parser.add_argument_group("speed")
    speed.add_argument("--batch-size", type=positive_int, default=8, help="images per forward pass (default 8)")
    speed.add_argument("--compile", action="store_true", help="torch.compile the UNet and the VAE decoder")
    speed.add_argument("--channels-last", action="store_true", help="channels-last memory format for UNet and VAE")
    cluster = parser.add_argument_group("Ray (several machines; pip install \"imageprompt[ray]\")")
    cluster.add_argument("--ray", nargs="?", const="", metavar="ADDRESS",
                         help="sample on Ray actors: the cluster at ADDRESS (auto, HOST:6379, ray://HOST:10001; "
                              "local: a new local Ray), or without one RAY_ADDRESS, a cluster started here, "
                              "else a local Ray; --out must be shared storage. Put JOBS before --ray")
    cluster.add_argument("--ray-actors", type=positive_int, metavar="N",
                         help="pipeline replicas (default: one per GPU of the cluster, else 1)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (the summary is still printed)")
    add_model_options(parser)
    parser.set_defaults(func=run_batch)


def run_batch(args) -> int:
    from imageprompt.jobs import JobDefaults, JobOptions, Limits, resolve_adapter, run_job

    if args.ray is not None:
        from imageprompt.jobs.ray_backend import import_ray

        import_ray()  # without Ray, say how to install it before torch and diffusers load
    from imageprompt.loading import resolve_model
    from imageprompt.pipelines.loading import load_pipeline

    if args.image_encoder and not Path(args.image_encoder).expanduser().is_dir():
        raise CommandError(f"--image-encoder {args.image_encoder}: no such folder")
    model, clip, _ = resolve_model(args.model, args.clip)  # the names that go into every row's hash
    adapter = resolve_adapter(args.adapter, Path.cwd()) if args.adapter else None
    encoder = str(Path(args.image_encoder).expanduser().resolve()) if args.image_encoder else None
    # on Ray the actors' device decides the default dtype (filled in by run_job_ray), not this machine's
    dtype = None if args.ray is not None and not (args.dtype or args.device) else _dtype_name(args.dtype, args.device)
    defaults = JobDefaults(seed=args.seed, num=args.num, steps=args.steps, guidance=args.guidance,
                           negative_prompt=args.negative_prompt, height=args.height, width=args.width,
                           model=model, clip=clip, scheduler=args.scheduler, adapter=adapter, image_encoder=encoder,
                           dtype=dtype, attention=args.attention,
                           limits=Limits.unbounded() if args.allow_large else
                           Limits(num=args.max_num, side=args.max_side, steps=args.max_steps))
    options = JobOptions(batch_size=args.batch_size, compile=args.compile, channels_last=args.channels_last,
                         progress=not args.no_progress)

    def load(device):
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()  # one bar: the job's
        return load_pipeline(model=args.model, clip=args.clip, dtype=args.dtype, device=device,
                             attention=args.attention, scheduler=args.scheduler, config=args.config,
                             vae=args.vae, clip_2=args.clip_2)

    if args.ray is not None:
        from imageprompt.jobs import RayOptions, run_job_ray

        summary = run_job_ray(args.jobs, args.out, load_pipe=load, defaults=defaults, options=options,
                              ray=RayOptions(address=args.ray or None, actors=args.ray_actors), device=args.device)
    else:
        summary = run_job(args.jobs, args.out, load_pipe=load, defaults=defaults, options=options,
                          device=args.device)
    from accelerate import PartialState

    if not PartialState().is_main_process:
        return 0  # the main process reports for everyone
    summary.seconds = max(summary.seconds, time.perf_counter() - STARTED)  # the whole command, imports included
    print(f"imageprompt: batch: {summary}", file=sys.stderr)
    if summary.failed:
        for line in failure_lines(summary.results):
            print(f"imageprompt: error: {line}", file=sys.stderr)
        print(f"imageprompt: error: {summary.failed} row(s) failed; see the 'error' fields in {summary.results}",
              file=sys.stderr)
        return EXIT_FAILURE
    return 0


def failure_lines(results: Path, most: int = 3) -> list[str]:
    """The reasons of the first ``most`` failed rows of ``results.jsonl``, one line each, then how many more."""
    failed = []
    for text in Path(results).read_text(encoding="utf-8").splitlines():
        record = json.loads(text)
        if record.get("status") == "failed":
            failed.append(record)
    lines = []
    for record in failed[:most]:
        name = f" ({record['id']})" if record.get("id") is not None else ""
        lines.append(f"row {record['line']}{name}: {record.get('error') or 'failed'}")
    if len(failed) > most:
        lines.append(f"... and {len(failed) - most} more")
    return lines


def _dtype_name(dtype: str | None, device: str | None) -> str:
    """The dtype the pipeline will load with ("float16", ...), as the row keys record it."""
    import torch

    from imageprompt.loading import default_device, resolve_dtype

    where = torch.device(device) if device else default_device()
    return str(resolve_dtype(dtype, where)).replace("torch.", "")
