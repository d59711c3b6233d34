"""Batch jobs: good and bad rows, reruns, a SIGKILL part-way, two processes under accelerate."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from imageprompt.images import read_parameters
from imageprompt.jobs import RESULTS, JobDefaults, JobOptions, is_complete, read_manifest, run_job, validate_rows

FAST = dict(steps=2, height=32, width=32)  # the tiny VAE has 2 blocks: 32 px images from 16 px latents


def write_jobs(path: Path, rows: list) -> Path:
    lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def results(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / RESULTS).read_text().splitlines()]


@pytest.fixture
def images(tmp_path):
    """Two good inputs, one file that is not an image."""
    Image.new("RGB", (40, 40), (220, 30, 30)).save(tmp_path / "red.png")
    Image.new("RGB", (48, 32), (30, 30, 220)).save(tmp_path / "blue.jpg")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return tmp_path


@pytest.fixture
def fake_load(monkeypatch, tiny_pipe):
    """The CLI's model loading answers with the session's tiny pipeline and counts its calls."""
    calls = []

    def load_pipeline(**kwargs):
        calls.append(kwargs)
        return tiny_pipe

    monkeypatch.setattr("imageprompt.pipelines.loading.load_pipeline", load_pipeline)
    return calls


def cli(*args) -> int:
    from imageprompt.cli.main import main

    return main(["batch", *map(str, args), "--steps", "2", "--height", "32", "--width", "32", "--no-progress"])


def test_good_and_bad_rows(images, fake_load, capsys):
    jobs = write_jobs(images / "jobs.jsonl", [
        {"kind": "vary", "image": "red.png", "num": 2, "seed": 5},
        {"kind": "edit", "image": "blue.jpg", "prompt": "a dog on the beach", "alpha": 0.6, "id": "dog/1"},
        {"kind": "edit", "image": "blue.jpg", "prompt": "   "},
        {"kind": "vary", "image": "missing.png"},
        {"kind": "morph", "image": "red.png"},
        {"kind": "vary", "image": "broken.png"},  # passes the checks, fails to decode inside a batch
        "{not json",
        {"kind": "vary", "image": "red.png", "promt": "typo"},
        {"kind": "vary", "image": "blue.jpg", "steps": "many"},
    ])
    out = images / "out"
    assert cli(jobs, "--out", out, "--batch-size", "4") == 1
    assert "2 done, 0 skipped" in capsys.readouterr().err and len(fake_load) == 1

    records = results(out)
    assert [r["line"] for r in records] == list(range(1, 10))  # every row once, in manifest order
    status = {r["line"]: r["status"] for r in records}
    assert [line for line, s in status.items() if s == "done"] == [1, 2]
    errors = {r["line"]: r["error"] for r in records}
    assert "empty" in errors[3]
    assert "missing.png: no such file" in errors[4]
    assert "unknown kind 'morph'" in errors[5]
    assert "not an image file" in errors[6]
    assert "not valid JSON" in errors[7]
    assert "unknown field(s) 'promt'" in errors[8]
    assert "'steps' must be an integer" in errors[9]

    vary, edit = records[0], records[1]
    assert len(vary["outputs"]) == 2 and vary["images"] == 2 and vary["seconds"] > 0
    for name, seed in zip(vary["outputs"], (5, 6)):
        params = read_parameters(out / name)
        assert params["method"] == "sdipc-variation" and params["seed"] == seed and params["steps"] == 2
        assert params["job_key"] == vary["key"] and params["input"] == "red.png"
        with Image.open(out / name) as im:
            assert im.size == (32, 32)
    params = read_parameters(out / edit["outputs"][0])
    assert (params["method"], params["prompt"], params["alpha"]) == ("sdipc-edit", "a dog on the beach", 0.6)
    assert edit["outputs"][0].startswith("dog_1-edit-")
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".png") == sorted(vary["outputs"] + edit["outputs"])
    assert not list(out.glob(".*.tmp")) and not list(out.glob(".imageprompt-parts/*"))


def test_all_rows_bad_loads_no_model(images, fake_load, capsys):
    jobs = write_jobs(images / "jobs.jsonl", [{"kind": "vary", "image": "nope.png"}])
    assert cli(jobs, "--out", images / "out") == 1
    assert fake_load == [] and "1 failed" in capsys.readouterr().err


def test_job_file_errors_before_anything(images, fake_load, capsys):
    assert cli(images / "absent.jsonl", "--out", images / "out") == 1
    assert "absent.jsonl: no such job file" in capsys.readouterr().err
    write_jobs(images / "empty.jsonl", ["", "  "])
    assert cli(images / "empty.jsonl", "--out", images / "out") == 1
    assert "no rows" in capsys.readouterr().err
    assert fake_load == [] and not (images / "out").exists()


def test_rerun_skips_complete_rows_and_samples_only_what_is_missing(images, tiny_pipe, capsys):
    rows = [{"kind": "vary", "image": "red.png", "num": 2}, {"kind": "edit", "image": "blue.jpg", "prompt": "a cat"}]
    jobs, out = write_jobs(images / "jobs.jsonl", rows), images / "out"
    options = JobOptions(batch_size=3, progress=False)
    first = run_job(jobs, out, pipe=tiny_pipe, defaults=JobDefaults(**FAST), options=options)
    assert (first.done, first.skipped, first.images) == (2, 0, 3)
    names = [n for r in results(out) for n in r["outputs"]]
    stamps = {n: (out / n).stat().st_mtime_ns for n in names}

    again = run_job(jobs, out, pipe=tiny_pipe, defaults=JobDefaults(**FAST), options=JobOptions(progress=True))
    assert (again.done, again.skipped, again.images) == (0, 2, 0)
    assert "2/2" in capsys.readouterr().err  # the one bar counts rows
    assert {n: (out / n).stat().st_mtime_ns for n in names} == stamps
    records = results(out)
    assert all(r["skipped"] and r["status"] == "done" and r["seconds"] > 0 for r in records)  # first run's seconds

    # one more image for row 1 and a deleted output for row 2: only those two are sampled
    rows[0]["num"] = 3
    write_jobs(jobs, rows)
    (out / names[2]).unlink()
    third = run_job(jobs, out, pipe=tiny_pipe, defaults=JobDefaults(**FAST), options=options)
    assert (third.done, third.images) == (2, 2)
    assert (out / names[0]).stat().st_mtime_ns == stamps[names[0]]
    assert len(results(out)[0]["outputs"]) == 3 and (out / names[2]).exists()

    # other settings are other outputs: a changed step count is not taken as complete
    fourth = run_job(jobs, out, pipe=tiny_pipe, defaults=JobDefaults(**{**FAST, "steps": 3}), options=options)
    assert (fourth.done, fourth.images) == (2, 4)


def test_output_names_follow_content(images):
    rows = [{"kind": "vary", "image": "red.png"}, {"kind": "vary", "image": "red.png", "id": "x"},
            {"kind": "vary", "image": "red.png", "seed": 1}]
    jobs = write_jobs(images / "jobs.jsonl", rows)
    first = validate_rows(read_manifest(jobs), JobDefaults(), images)
    assert first[0].key == first[1].key != first[2].key  # the id names the file, it does not change the image
    assert first[1].output_names()[0].startswith("x-vary-")
    Image.new("RGB", (40, 40), (220, 30, 31)).save(images / "red.png")  # one channel of one colour changed
    second = validate_rows(read_manifest(jobs), JobDefaults(), images)
    assert second[0].key != first[0].key
    other_model = validate_rows(read_manifest(jobs), JobDefaults(model="other/model"), images)
    assert other_model[0].key != second[0].key


def test_rows_with_equal_settings_share_batches(images):
    from imageprompt.jobs import Item, plan_batches

    jobs = write_jobs(images / "jobs.jsonl", [
        {"kind": "vary", "image": "red.png", "num": 2},
        {"kind": "edit", "image": "red.png", "prompt": "a cat"},
        {"kind": "vary", "image": "blue.jpg"},
        {"kind": "edit", "image": "blue.jpg", "prompt": "a dog", "alpha": 0.6},
        {"kind": "edit", "image": "blue.jpg", "prompt": "a tree"},
        {"kind": "vary", "image": "blue.jpg", "steps": 3},
    ])
    rows = validate_rows(read_manifest(jobs), JobDefaults(), images)
    items = [Item(row, i) for row in rows for i in range(row.num)]
    batches = [[(item.row.line, item.index) for item in batch] for batch in plan_batches(items, 2)]
    assert batches == [[(1, 0), (1, 1)], [(3, 0)], [(2, 0), (5, 0)], [(4, 0)], [(6, 0)]]


def test_is_complete_rejects_truncated_and_foreign_pngs(tmp_path):
    from imageprompt.images import save_png

    path = save_png(Image.new("RGB", (32, 32), (1, 2, 3)), tmp_path / "a.png", {"job_key": "k"})
    assert is_complete(path, "k") and not is_complete(path, "other")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 20])
    assert not is_complete(path, "k")
    assert not is_complete(tmp_path / "missing.png", "k")


# --------------------------------------------------------------- killed part-way
def _run_in_child(jobs, out, pipe, defaults):
    run_job(jobs, out, pipe=pipe, defaults=defaults, options=JobOptions(batch_size=1, progress=False))
    os._exit(0)


def test_sigkill_part_way_then_rerun_does_every_row_once(images, tiny_pipe):
    rows = [{"kind": "vary", "image": "red.png" if i % 2 else "blue.jpg", "seed": i} for i in range(12)]
    jobs, out = write_jobs(images / "jobs.jsonl", rows), images / "out"
    defaults = JobDefaults(**{**FAST, "steps": 3})
    # a forked child shares the loaded tiny pipeline, so the test spends its time sampling, not importing
    child = multiprocessing.get_context("fork").Process(target=_run_in_child, args=(jobs, out, tiny_pipe, defaults))
    child.start()
    deadline = time.monotonic() + 60
    while not list(out.glob("*.png")) and time.monotonic() < deadline and child.is_alive():
        time.sleep(0.005)
    os.kill(child.pid, signal.SIGKILL)
    child.join()
    assert child.exitcode == -signal.SIGKILL
    written = len(list(out.glob("*.png")))
    assert 0 < written < len(rows) and not (out / RESULTS).exists()  # really killed part-way

    summary = run_job(jobs, out, pipe=tiny_pipe, defaults=defaults, options=JobOptions(batch_size=4, progress=False))
    records = results(out)
    assert sorted(r["line"] for r in records) == list(range(1, 13))
    assert all(r["status"] == "done" for r in records)
    assert summary.skipped >= written - 1 and summary.done + summary.skipped == 12
    pngs = sorted(out.glob("*.png"))
    assert sorted(p.name for p in pngs) == sorted(n for r in records for n in r["outputs"])
    for path, record in ((out / r["outputs"][0], r) for r in records):
        assert is_complete(path, record["key"])
        with Image.open(path) as im:
            im.load()  # decodes: not truncated
    assert not list(out.glob(".*")) or [p.name for p in out.glob(".*")] == [".imageprompt-parts"]
    assert not list((out / ".imageprompt-parts").glob("*"))


# --------------------------------------------------------------- p2p and adapter rows
def _tiny_sd15_adapter(pipe, folder: Path) -> Path:
    """An official-format sd15 IP-Adapter for the tiny UNet, with a tiny image encoder next to it."""
    import torch
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from imageprompt.testing import ip_adapter_state_dict

    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=48, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8, projection_dim=40)
    CLIPVisionModelWithProjection(config).save_pretrained(folder / "image_encoder")
    nested = ip_adapter_state_dict(pipe.unet, "sd15", config)
    state = {f"{part}.{k}": v for part in nested for k, v in nested[part].items()}
    save_file(state, str(folder / "ip-adapter.safetensors"))
    return folder / "ip-adapter.safetensors"


def test_p2p_and_adapter_rows(images, tiny_pipe):
    (images / "adapter").mkdir()
    _tiny_sd15_adapter(tiny_pipe, images / "adapter")
    jobs = write_jobs(images / "jobs.jsonl", [
        {"kind": "p2p", "prompt": "a red circle", "target": "a blue circle", "blend": ["circle"]},
        {"kind": "p2p", "prompt": "a red circle", "target": "a big blue circle"},  # replace needs equal word counts
        {"kind": "p2p", "prompt": "a photo of a cat", "target": "a photo of a dog", "image": "red.png",
         "invert": "negative-prompt"},
        {"kind": "adapter", "image": "red.png", "adapter": "adapter/ip-adapter.safetensors", "prompt": "a cat"},
        {"kind": "adapter", "image": "blue.jpg", "adapter": "adapter/ip-adapter.safetensors", "scale": 0.5},
        {"kind": "adapter", "image": "blue.jpg", "adapter": "adapter/absent.safetensors"},
        {"kind": "vary", "image": "red.png"},  # after the adapter rows in the file: the adapter must be unloaded
    ])
    out = images / "out"
    summary = run_job(jobs, out, pipe=tiny_pipe, defaults=JobDefaults(**FAST),
                      options=JobOptions(batch_size=4, progress=False))
    records = {r["line"]: r for r in results(out)}
    assert {line for line, r in records.items() if r["status"] == "done"} == {1, 3, 4, 5, 7}, records
    assert "the source has 3 words and the target 4; use mode refine" in records[2]["error"]
    assert "absent.safetensors" in records[6]["error"]
    assert summary.failed == 2
    assert read_parameters(out / records[1]["outputs"][0])["target"] == "a blue circle"
    assert read_parameters(out / records[5]["outputs"][0])["scale"] == 0.5
    assert tiny_pipe.image_adapters == []  # the pipeline is handed back without the adapter


def test_p2p_rows_take_blend_start_and_exclude(images):
    rows = validate_rows(list(enumerate([
        {"kind": "p2p", "prompt": "a red square and a blue circle", "target": "a red square and a green circle",
         "blend": ["circle"], "blend_exclude": ["square"], "blend_start": 0.3},
        {"kind": "p2p", "prompt": "a red circle", "target": "a blue circle", "blend": ["circle"],
         "blend_exclude": ["dog"]},
    ], start=1)), JobDefaults(**FAST), images)
    assert rows[0].error is None and rows[0].params["blend_exclude"] == ["square"]
    assert rows[0].params["blend_start"] == 0.3
    assert rows[1].error and "dog" in rows[1].error


def test_p2p_rows_with_an_adapter(images, tiny_pipe):
    (images / "adapter").mkdir()
    _tiny_sd15_adapter(tiny_pipe, images / "adapter")
    adapter = "adapter/ip-adapter.safetensors"
    jobs = write_jobs(images / "jobs.jsonl", [
        {"kind": "p2p", "prompt": "a red circle", "target": "a blue circle", "adapter": adapter,
         "adapter_image": "blue.jpg", "scale": 0.6},
        {"kind": "p2p", "prompt": "a red circle", "target": "a blue circle"},  # the same edit, plain UNet
        {"kind": "p2p", "prompt": "a red circle", "target": "a blue circle", "adapter": adapter},  # no image
    ])
    out = images / "out"
    run_job(jobs, out, pipe=tiny_pipe, defaults=JobDefaults(**FAST), options=JobOptions(batch_size=4, progress=False))
    records = {r["line"]: r for r in results(out)}
    assert [records[i]["status"] for i in (1, 2)] == ["done", "done"], records
    assert "adapter_image" in records[3]["error"]
    with_adapter, plain = (Image.open(out / records[i]["outputs"][0]) for i in (1, 2))
    assert read_parameters(out / records[1]["outputs"][0])["scale"] == 0.6
    assert list(with_adapter.getdata()) != list(plain.getdata())  # the image branch acted
    assert tiny_pipe.image_adapters == []


def test_a_second_run_on_the_same_folder_is_refused(images, tiny_pipe):
    from imageprompt.jobs import JobError, output_lock

    jobs = write_jobs(images / "jobs.jsonl", [{"kind": "vary", "image": "red.png", "num": 2}])
    out = images / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\n"
                               "from imageprompt.jobs import output_lock\n"
                               "with output_lock(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(60)",
                               str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(JobError, match=f"in use by another batch run \\(pid {holder.pid}\\)"):
            run_job(jobs, out, pipe=tiny_pipe, defaults=JobDefaults(**FAST), options=JobOptions(progress=False))
        assert not (out / RESULTS).exists() and not list(out.glob("*.png"))  # nothing touched
    finally:
        holder.kill()
        holder.wait()
    # the holder died: the operating system released its lock, so the next run goes ahead
    summary = run_job(jobs, out, pipe=tiny_pipe, defaults=JobDefaults(**FAST), options=JobOptions(progress=False))
    assert summary.done == 1 and len(results(out)) == 1
    with output_lock(out), pytest.raises(JobError, match="in use"):  # also within one process
        run_job(jobs, out, pipe=tiny_pipe, defaults=JobDefaults(**FAST), options=JobOptions(progress=False))


# --------------------------------------------------------------- two processes
@pytest.mark.slow  # about 50 s here: two fresh processes import torch and load the model
def test_two_processes_with_accelerate(images, tiny_model, tmp_path):
    model_dir, clip_dir = tiny_model
    rows = [{"kind": "vary", "image": "red.png", "seed": i} for i in range(5)] + [{"kind": "vary", "image": "no.png"}]
    jobs, out = write_jobs(images / "jobs.jsonl", rows), images / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
               "-m", "imageprompt", "batch", str(jobs), "--out", str(out), "--model", str(model_dir),
               "--clip", str(clip_dir), "--device", "cpu", "--steps", "2", "--height", "32", "--width", "32"]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0  # the bad row fails the job
    assert "6 rows: 5 done, 0 skipped (already complete), 1 failed;" in proc.stderr, proc.stderr[-3000:]
    records = results(out)
    assert [r["line"] for r in records] == list(range(1, 7))
    assert [r["status"] for r in records] == ["done"] * 5 + ["failed"]
    assert len(list(out.glob("*.png"))) == 5
    assert {r["process"] for r in records} == {0, 1}  # the rows were split


# --------------------------------------------------------------- hostile rows: bounds, parsing, isolation
def test_size_fields_have_upper_bounds_and_an_override(images):
    from imageprompt.jobs import Limits

    rows = [{"kind": "vary", "image": "red.png", "num": 1_000_000_000},
            {"kind": "vary", "image": "red.png", "width": 100_000},
            {"kind": "vary", "image": "red.png", "height": 100_000},
            {"kind": "vary", "image": "red.png", "steps": 10**9},
            {"kind": "vary", "image": "red.png", "seed": 2**64},
            {"kind": "vary", "image": "red.png", "num": 64, "width": 2048, "height": 2048, "steps": 500}]
    checked = validate_rows(list(enumerate(rows, start=1)), JobDefaults(), images)
    errors = [row.error for row in checked]
    for error, field in zip(errors, ("num", "width", "height", "steps", "seed")):
        assert error and f"field {field!r}" in error, error
    assert "--max-num" in errors[0] and "--max-side" in errors[1] and "--allow-large" in errors[3]
    assert errors[5] is None  # at the bounds
    assert (checked[0].num, checked[0].key) == (1, "")  # nothing built for a refused row
    big = validate_rows(list(enumerate(rows[:4], start=1)), JobDefaults(limits=Limits.unbounded()), images)
    assert [row.error for row in big] == [None] * 4
    assert big[0].output_name(999_999_999).endswith("-999999999.png")  # one name, not a billion


def test_cli_bounds_flags(images, fake_load, capsys):
    jobs = write_jobs(images / "jobs.jsonl", [{"kind": "vary", "image": "red.png", "num": 3}])
    assert cli(jobs, "--out", images / "a", "--max-num", "2") == 1
    assert fake_load == []
    error = results(images / "a")[0]["error"]
    assert "field 'num' must be at most 2" in error
    assert cli(jobs, "--out", images / "b", "--max-num", "2", "--allow-large") == 0
    assert results(images / "b")[0]["images"] == 3


def test_manifest_lines_are_parsed_one_by_one(tmp_path):
    path = tmp_path / "jobs.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b'{"kind": "vary", "image": "a.png"}\n'
                     + b"[" * 100_000 + b"]" * 100_000 + b"\n"
                     + b'{"kind": "vary", "image": "a.png", "seed": ' + b"9" * 5000 + b"}\n"
                     + b'{"kind": "vary", "image": "caf\xe9.png"}\n'
                     + b"[1, 2]\n\n"
                     + b'"just a string"\n'
                     + b'{"kind": "vary", "image": "b.png"}')
    entries = dict(read_manifest(path))
    assert entries[1] == {"kind": "vary", "image": "a.png"}  # the byte-order mark is skipped
    assert "nested too deep" in entries[2]
    assert "not valid JSON" in entries[3] and "digits" in entries[3]
    assert "not UTF-8" in entries[4]
    assert "must be a JSON object, got list" in entries[5]
    assert 6 not in entries  # blank
    assert "got str" in entries[7]
    assert entries[8] == {"kind": "vary", "image": "b.png"}
    rows = validate_rows(list(entries.items()), JobDefaults(), tmp_path)
    assert all(row.error for row in rows[1:6])


def test_overlong_line_is_a_failed_row(tmp_path, monkeypatch):
    monkeypatch.setattr("imageprompt.jobs.schema.MAX_LINE_BYTES", 1000)
    path = tmp_path / "jobs.jsonl"
    path.write_text('{"kind": "vary", "prompt": "' + "x" * 5000 + '"}\n{"kind": "vary", "image": "a.png"}\n')
    entries = read_manifest(path)
    assert [line for line, _ in entries] == [1, 2]
    assert "longer than" in entries[0][1] and entries[1][1] == {"kind": "vary", "image": "a.png"}


def test_long_prompts_are_truncated_with_one_warning(images):
    from imageprompt.images import MAX_PROMPT_CHARS

    rows = [{"kind": "edit", "image": "red.png", "prompt": "a dog " * 1000},
            {"kind": "edit", "image": "red.png", "prompt": "on the beach", "negative_prompt": "x" * 100_000}]
    with pytest.warns(UserWarning, match="2 prompt\\(s\\) longer than") as caught:
        checked = validate_rows(list(enumerate(rows, start=1)), JobDefaults(), images)
    assert len(caught) == 1
    assert [row.error for row in checked] == [None, None]
    assert len(checked[0].params["prompt"]) == MAX_PROMPT_CHARS
    assert len(checked[1].params["negative_prompt"]) == MAX_PROMPT_CHARS
    assert checked[1].params["prompt"] == "on the beach"


def test_input_is_checked_to_be_an_image_before_it_is_hashed(images, monkeypatch):
    big = images / "big.png"
    with open(big, "wb") as handle:
        handle.truncate(4 << 30)  # sparse: 4 GB of zeros
    hashed = []
    monkeypatch.setattr("imageprompt.images.sha256_file", lambda path: hashed.append(path) or "0" * 64)
    row, = validate_rows([(1, {"kind": "vary", "image": "big.png"})], JobDefaults(), images)
    assert hashed == []
    assert "not an image file" in row.error and "field 'image'" in row.error
    row, = validate_rows([(1, {"kind": "vary", "image": "red.png"})], JobDefaults(), images)
    assert row.error is None and hashed == [images / "red.png"]


def test_row_key_includes_dtype_and_attention(images, tiny_pipe):
    def key(**kwargs):
        row, = validate_rows([(1, {"kind": "vary", "image": "red.png"})], JobDefaults(**kwargs), images)
        return row.key

    keys = {key(), key(dtype="float32"), key(dtype="float16"), key(dtype="float32", attention="xformers"),
            key(dtype="float32", attention="sdpa")}
    assert len(keys) == 5
    jobs, out = write_jobs(images / "jobs.jsonl", [{"kind": "vary", "image": "red.png"}]), images / "out"
    run_job(jobs, out, pipe=tiny_pipe, defaults=JobDefaults(**FAST), options=JobOptions(progress=False))
    # a given pipeline fills in its own dtype and backend
    assert results(out)[0]["key"] == key(**FAST, dtype="float32", attention="sdpa")


def test_an_exception_while_sampling_fails_only_its_row(images, tiny_pipe, monkeypatch):
    from imageprompt.jobs import sampling

    real = sampling.SAMPLERS["vary"]

    def vary(runner, settings, items):
        if any(item.row.id == "boom" for item in items):
            raise MemoryError("cannot allocate")
        return real(runner, settings, items)

    monkeypatch.setitem(sampling.SAMPLERS, "vary", vary)
    jobs = write_jobs(images / "jobs.jsonl", [{"kind": "vary", "image": "red.png", "seed": 1},
                                              {"kind": "vary", "image": "red.png", "id": "boom"},
                                              {"kind": "vary", "image": "blue.jpg", "seed": 3}])
    out = images / "out"
    summary = run_job(jobs, out, pipe=tiny_pipe, defaults=JobDefaults(**FAST),
                      options=JobOptions(batch_size=4, progress=False))
    records = results(out)
    assert [r["status"] for r in records] == ["done", "failed", "done"]
    assert "MemoryError: cannot allocate" in records[1]["error"] and summary.failed == 1


def test_an_exception_while_checking_a_row_fails_only_that_row(images, tiny_pipe, monkeypatch):
    import imageprompt.jobs.run as run_module

    real = run_module.is_complete

    def is_complete(path, key):
        if path.name.startswith("boom-"):
            raise MemoryError("cannot allocate")
        return real(path, key)

    monkeypatch.setattr(run_module, "is_complete", is_complete)
    jobs = write_jobs(images / "jobs.jsonl", [{"kind": "vary", "image": "red.png", "id": "boom"},
                                              {"kind": "vary", "image": "red.png"}])
    out = images / "out"
    run_job(jobs, out, pipe=tiny_pipe, defaults=JobDefaults(**FAST), options=JobOptions(progress=False))
    records = results(out)
    assert [r["status"] for r in records] == ["failed", "done"]
    assert "MemoryError" in records[0]["error"]


def test_results_of_done_rows_are_written_when_the_job_dies(images, tiny_pipe, monkeypatch):
    import imageprompt.jobs.run as run_module

    real = run_module.sample_items

    def dies(pipe, pending, out, writer, summary, *args):
        real(pipe, pending[:1], out, writer, summary, *args)
        raise KeyboardInterrupt

    monkeypatch.setattr(run_module, "sample_items", dies)
    jobs = write_jobs(images / "jobs.jsonl", [{"kind": "vary", "image": "red.png"}, {"kind": "vary", "image": "x"}])
    out = images / "out"
    with pytest.raises(KeyboardInterrupt):
        run_job(jobs, out, pipe=tiny_pipe, defaults=JobDefaults(**FAST), options=JobOptions(progress=False))
    assert [r["status"] for r in results(out)] == ["done", "failed"]


def _hostile_job_in_child(jobs, out, pipe, report):
    import resource

    limit = 4 << 30
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:
        summary = run_job(jobs, out, pipe=pipe, defaults=JobDefaults(**FAST),
                          options=JobOptions(batch_size=4, progress=False))
        report.write_text(json.dumps({"done": summary.done, "failed": summary.failed}))
    except BaseException as err:  # noqa: BLE001 - reported to the parent
        report.write_text(json.dumps({"error": repr(err)}))
    os._exit(0)


def test_hostile_rows_under_a_4_gib_memory_limit(images, tiny_pipe):
    big = images / "sparse.png"
    with open(big, "wb") as handle:
        handle.truncate(4 << 30)
    good = {"kind": "vary", "image": "red.png"}
    lines = [
        json.dumps(good).encode(),  # line 1, after a byte-order mark
        json.dumps({"kind": "vary", "image": "red.png", "num": 1_000_000_000}).encode(),
        json.dumps({"kind": "vary", "image": "red.png", "width": 100_000}).encode(),
        json.dumps({"kind": "vary", "image": "red.png", "height": 100_000}).encode(),
        json.dumps({"kind": "vary", "image": "red.png", "steps": 10**9}).encode(),
        json.dumps({"kind": "vary", "image": "red.png", "seed": 2**64}).encode(),
        b"[" * 100_000 + b"]" * 100_000,
        b'{"kind": "vary", "image": "red.png", "seed": ' + b"9" * 5000 + b"}",
        b'{"kind": "vary", "image": "r\xffed.png"}',
        b"[1, 2, 3]",
        json.dumps({"kind": "vary", "image": "sparse.png"}).encode(),
        json.dumps({"kind": "edit", "image": "blue.jpg", "prompt": "a dog " * 5_000_000}).encode(),  # 30M characters
        json.dumps({"kind": "vary", "image": "blue.jpg", "seed": 2}).encode(),
    ]
    jobs = images / "jobs.jsonl"
    jobs.write_bytes(b"\xef\xbb\xbf" + b"\n".join(lines) + b"\n")
    out, report = images / "out", images / "report.json"
    child = multiprocessing.get_context("fork").Process(target=_hostile_job_in_child,
                                                        args=(jobs, out, tiny_pipe, report))
    child.start()
    child.join(120)  # a guard against a hang, not a measurement
    if child.is_alive():
        child.kill()
        child.join()
    assert report.exists(), f"the job died (exit {child.exitcode})"
    assert json.loads(report.read_text()) == {"done": 3, "failed": 10}
    records = {r["line"]: r for r in results(out)}
    assert sorted(records) == list(range(1, 14))
    assert {line for line, r in records.items() if r["status"] == "done"} == {1, 12, 13}
    reasons = {line: records[line]["error"] for line in range(2, 12)}
    for line, field in ((2, "num"), (3, "width"), (4, "height"), (5, "steps"), (6, "seed"), (11, "image")):
        assert f"field {field!r}" in reasons[line], reasons[line]
    assert "nested too deep" in reasons[7] and "digits" in reasons[8]
    assert "not UTF-8" in reasons[9] and "JSON object" in reasons[10]
