"""Batch jobs on Ray: the same names, records and pixels as one machine; a killed actor; reruns; the install hint.

The tests marked ``ray`` start a local Ray instance (2 CPUs, no dashboard) for the module and stop it at
the end; they are opt-in (``python -m pytest -m ray tests/test_ray.py``) because actors start slowly here.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imageprompt.images import read_parameters
from imageprompt.jobs import RESULTS, JobDefaults, JobError, JobOptions, RayOptions, run_job, run_job_ray

FAST = dict(steps=2, height=32, width=32, dtype="float32", attention="sdpa")


def write_jobs(path: Path, rows: list) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def results(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / RESULTS).read_text().splitlines()]


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


@pytest.fixture
def images(tmp_path):
    Image.new("RGB", (40, 40), (220, 30, 30)).save(tmp_path / "red.png")
    Image.new("RGB", (48, 32), (30, 30, 220)).save(tmp_path / "blue.jpg")
    return tmp_path


# --------------------------------------------------------------- loaders, run inside the actors
def _load(model_dir: str, clip_dir: str, device):
    from imageprompt.pipelines.loading import load_pipeline

    return load_pipeline(model_dir, clip_dir, device=device, dtype="fp32")


def _load_then_die_once(model_dir: str, clip_dir: str, marker: str, device):
    """The tiny pipeline, in an actor that SIGKILLs itself in its second batch, once for the whole job."""
    from imageprompt.jobs import sampling

    pipe = _load(model_dir, clip_dir, device)
    real, calls = sampling.SAMPLERS["vary"], []

    def vary(runner, settings, items):
        calls.append(len(items))
        if len(calls) == 2:
            try:
                with open(marker, "x") as handle:  # "x": only the first actor to get here dies
                    handle.write(str(os.getpid()))
            except FileExistsError:
                pass
            else:
                os.kill(os.getpid(), signal.SIGKILL)
        return real(runner, settings, items)

    sampling.SAMPLERS["vary"] = vary
    return pipe


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this test module
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield ray
    ray.shutdown()


# --------------------------------------------------------------- without Ray: fast, in the default suite
def test_without_ray_the_flag_says_how_to_install_it(images, monkeypatch, capsys):
    from imageprompt.cli.main import main

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails as if it were not installed
    jobs = write_jobs(images / "jobs.jsonl", [{"kind": "vary", "image": "red.png"}])
    assert main(["batch", str(jobs), "--out", str(images / "out"), "--ray", "--no-progress"]) == 1
    assert 'pip install "imageprompt[ray]"' in capsys.readouterr().err
    assert not (images / "out").exists()
    with pytest.raises(JobError, match=r'pip install "imageprompt\[ray\]"'):
        run_job_ray(jobs, images / "out", load_pipe=lambda device: None)


def test_the_driver_counts_each_batch_once_and_each_row_once(images):
    """A row split over batches is done when all its batches are; a batch that comes back twice counts once."""
    from imageprompt.jobs import Item, read_manifest, validate_rows
    from imageprompt.jobs.ray_backend import BatchTally

    jobs = write_jobs(images / "jobs.jsonl", [{"kind": "vary", "image": "red.png", "num": 3},
                                              {"kind": "vary", "image": "blue.jpg"}])
    two, one = validate_rows(read_manifest(jobs), JobDefaults(), images)
    first, second = [Item(two, 0), Item(two, 1)], [Item(two, 2), Item(one, 0)]
    written = []
    tally = BatchTally(first + second, type("W", (), {"write": lambda self, r: written.append(r)})())

    def done(row, images, seconds):
        return {"line": row.line, "status": "done", "images": images, "seconds": seconds}

    tally.add(0, first, [done(two, 2, 0.5)])
    assert written == []  # one image of the row is still out
    tally.add(0, first, [done(two, 2, 0.5)])  # the same batch again, from a retried task
    tally.add(1, second, [done(two, 1, 0.25), {"line": one.line, "status": "failed", "seconds": 0.1,
                                                "error": "boom"}])
    tally.close()
    assert [(r["line"], r["status"], r["images"], r["seconds"]) for r in written] == [
        (two.line, "done", 3, 0.75), (one.line, "failed", 0, 0.1)]
    assert written[0]["outputs"] == two.output_names() and written[1]["error"] == "boom"


# --------------------------------------------------------------- on a local Ray
@pytest.mark.ray
def test_same_names_records_and_pixels_as_one_machine_then_resume_and_rerun(images, tiny_model, tiny_pipe,
                                                                            local_ray):
    model_dir, clip_dir = map(str, tiny_model)
    jobs = write_jobs(images / "jobs.jsonl", [
        {"kind": "vary", "image": "red.png", "num": 3, "seed": 5},  # split over two batches of 2
        {"kind": "edit", "image": "blue.jpg", "prompt": "a dog on the beach", "id": "dog"},
        {"kind": "vary", "image": "missing.png"},
        {"kind": "vary", "image": "blue.jpg", "num": 2},
        "{not json",
        {"kind": "edit", "image": "red.png", "prompt": "   "},
    ])
    options = JobOptions(batch_size=2, progress=False)
    plain, ray_out = images / "plain", images / "ray"
    one = run_job(jobs, plain, pipe=tiny_pipe, defaults=JobDefaults(**FAST), options=options)
    load = functools.partial(_load, model_dir, clip_dir)
    summary = run_job_ray(jobs, ray_out, load, JobDefaults(**FAST), options, RayOptions(actors=2))
    assert (summary.rows, summary.done, summary.failed, summary.images) == (one.rows, one.done, one.failed,
                                                                           one.images) == (6, 3, 3, 6)

    def without_seconds(out):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in results(out)]

    assert without_seconds(ray_out) == without_seconds(plain)  # names, keys, statuses, errors, counts
    assert [r["line"] for r in results(ray_out)] == list(range(1, 7))
    names = sorted(p.name for p in plain.glob("*.png"))
    assert sorted(p.name for p in ray_out.glob("*.png")) == names and len(names) == 6
    for name in names:
        assert read_parameters(ray_out / name) == read_parameters(plain / name)
        assert np.abs(pixels(ray_out / name) - pixels(plain / name)).max() <= 1  # the documented tolerance
    assert not [p.name for p in ray_out.glob(".*") if p.name != ".imageprompt-parts"]  # no probe or temp files

    # a job started on one machine is finished on Ray: only the missing images are sampled
    stamps = {name: (plain / name).stat().st_mtime_ns for name in names}
    (plain / names[0]).unlink()
    (plain / names[3]).unlink()
    resumed = run_job_ray(jobs, plain, load, JobDefaults(**FAST), options, RayOptions(actors=2))
    assert resumed.images == 2 and resumed.failed == 3
    assert sorted(p.name for p in plain.glob("*.png")) == names
    assert [(plain / n).stat().st_mtime_ns == stamps[n] for n in names].count(False) == 2
    for name in (names[0], names[3]):
        assert np.abs(pixels(plain / name) - pixels(ray_out / name)).max() <= 1

    # a rerun skips everything: nothing sampled, nothing rewritten
    stamps = {name: (ray_out / name).stat().st_mtime_ns for name in names}
    again = run_job_ray(jobs, ray_out, load, JobDefaults(**FAST), options, RayOptions(actors=2))
    assert (again.done, again.skipped, again.images, again.failed) == (0, 3, 0, 3)
    assert {name: (ray_out / name).stat().st_mtime_ns for name in names} == stamps
    assert [r["line"] for r in results(ray_out)] == list(range(1, 7))


@pytest.mark.ray
def test_an_actor_killed_mid_job_still_gives_every_row_once(images, tiny_model, local_ray, capsys):
    model_dir, clip_dir = map(str, tiny_model)
    rows = [{"kind": "vary", "image": "red.png" if i % 2 else "blue.jpg", "seed": i} for i in range(8)]
    jobs, out, marker = write_jobs(images / "jobs.jsonl", rows), images / "out", images / "killed"
    load = functools.partial(_load_then_die_once, model_dir, clip_dir, str(marker))
    summary = run_job_ray(jobs, out, load, JobDefaults(**FAST), JobOptions(batch_size=1, progress=True),
                          RayOptions(actors=2))
    assert "8/8" in capsys.readouterr().err  # the driver's one bar counts rows
    pid = int(marker.read_text())  # an actor did kill itself part-way
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    records = results(out)
    assert [r["line"] for r in records] == list(range(1, 9))  # every row exactly once
    assert all(r["status"] == "done" and r["images"] == 1 for r in records)
    assert (summary.done, summary.images, summary.failed) == (8, 8, 0)
    assert sorted(p.name for p in out.glob("*.png")) == sorted(n for r in records for n in r["outputs"])
    assert not list(out.glob(".*.tmp"))


@pytest.mark.ray
def test_cli_ray_then_plain_rerun_skips_everything(images, tiny_model, local_ray, capsys):
    from imageprompt.cli.main import main

    model_dir, clip_dir = map(str, tiny_model)
    jobs = write_jobs(images / "jobs.jsonl", [{"kind": "vary", "image": "red.png", "num": 2},
                                              {"kind": "edit", "image": "blue.jpg", "prompt": "a cat"},
                                              {"kind": "vary", "image": "nope.png"}])
    common = [str(jobs), "--out", str(images / "out"), "--model", model_dir, "--clip", clip_dir, "--steps", "2",
              "--height", "32", "--width", "32", "--no-progress"]
    assert main(["batch", *common, "--ray", "--ray-actors", "2"]) == 1  # the bad row fails the job
    assert "3 rows: 2 done, 0 skipped (already complete), 1 failed; 3 images" in capsys.readouterr().err
    assert len(list((images / "out").glob("*.png"))) == 3
    # the same keys on one machine: a job run on Ray is resumed without it
    assert main(["batch", *common]) == 1
    assert "3 rows: 0 done, 2 skipped (already complete), 1 failed; 0 images" in capsys.readouterr().err


@pytest.mark.ray
def test_an_output_folder_the_workers_cannot_see_is_refused(images, tiny_model, local_ray, monkeypatch):
    from imageprompt.jobs import ray_backend

    # as if --out were a disk of this machine only: the token the driver writes never reaches the workers
    monkeypatch.setattr(ray_backend, "_write_token", lambda path, token: None)
    model_dir, clip_dir = map(str, tiny_model)
    jobs = write_jobs(images / "jobs.jsonl", [{"kind": "vary", "image": "red.png"}])
    with pytest.raises(JobError, match="is not shared with the Ray workers.*cannot read .*must be on storage"):
        run_job_ray(jobs, images / "out", functools.partial(_load, model_dir, clip_dir), JobDefaults(**FAST),
                    JobOptions(progress=False), RayOptions(actors=1))
    assert not list((images / "out").glob("*.png"))
    assert not list((images / "out").glob(".imageprompt-probe*"))


def _load_nothing(device):
    raise RuntimeError("no model at this path on this node")


@pytest.mark.ray
def test_actors_that_cannot_load_the_pipeline_stop_the_job_with_the_reason(images, local_ray):
    jobs = write_jobs(images / "jobs.jsonl", [{"kind": "vary", "image": "red.png"}, {"kind": "vary", "image": "x"}])
    with pytest.raises(JobError, match="could not load the pipeline: RuntimeError: no model at this path"):
        run_job_ray(jobs, images / "out", _load_nothing, JobDefaults(**FAST), JobOptions(progress=False),
                    RayOptions(actors=1))
    # the bad row keeps its record; row 1 has none, so a rerun samples it
    assert [(r["line"], r["status"]) for r in results(images / "out")] == [(2, "failed")]
