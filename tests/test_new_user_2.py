"""What a new user meets, round 2 (issue 25): nothing overwritten, labelled progress, one inversion default,
a demo with the bundled adapter, subcommand usage, honest batch summaries, CPU memory, resize notices,
one Pillow range, the clone on the path, and quiet loads."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from imageprompt.checkpoints import BUNDLED_MODEL
from PIL import Image

from imageprompt.cli.main import main

REPO = Path(__file__).resolve().parents[1]
RED_CIRCLE = REPO / "demo" / "examples" / "red-circle.png"
BUNDLED = ["--model", str(BUNDLED_MODEL), "--steps", "1", "--device", "cpu"]


def run_cli(args, capsys):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ------------------------------------------------- 4. a subcommand's own usage
@pytest.mark.parametrize("argv, usage", [
    (["vary", "x.png", "--nmu", "2", "--out", "o"], "imageprompt vary"),
    (["tune", "online", "x.png", "--out", "o.safetensors", "--nmu", "2"], "imageprompt tune online"),
])
def test_a_mistyped_option_shows_the_subcommands_usage(argv, usage, capsys):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2
    assert err.startswith(f"usage: {usage} ") and f"{usage}: error: unrecognized arguments: --nmu 2" in err


# ------------------------------------------------------ 9. one Pillow range
def _pillow_specifier(requirements):
    from packaging.requirements import Requirement

    found = [Requirement(r) for r in requirements]
    specs = [r.specifier for r in found if r.name.lower() == "pillow" and (r.marker is None or r.marker.evaluate())]
    assert len(specs) == 1, requirements
    return specs[0]


def test_the_core_pillow_range_is_one_every_extra_accepts():
    from importlib.metadata import PackageNotFoundError, requires

    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    ours = _pillow_specifier(project["dependencies"])
    candidates = ["12.3.0", "12.3.1", "12.9.0", "13.0.0", "13.1.0", "14.0.0", "15.0.0"]
    checked = 0
    for dist in ("gradio", "scikit-image", "transformers", "diffusers"):  # the extras' packages that read Pillow
        try:
            theirs = [r for r in requires(dist) or [] if r.lower().startswith("pillow") and "extra ==" not in r]
        except PackageNotFoundError:
            continue
        if theirs:
            spec = _pillow_specifier(theirs)
            assert all(spec.contains(v) for v in candidates if ours.contains(v)), (dist, str(spec), str(ours))
            checked += 1
    assert checked, "no installed package to check against"
    assert not ours.contains("13.0.0")  # gradio 6 pins pillow<13: the quick start and the tests share a Pillow


# ------------------------------------------- 10. the clone's parent folder
def test_python_m_imageprompt_beside_a_clone_says_what_to_do(tmp_path):
    (tmp_path / "imageprompt").symlink_to(REPO, target_is_directory=True)  # a clone named like the package
    probe = subprocess.run([sys.executable, "-c", "import imageprompt; print(getattr(imageprompt, '__file__', None))"],
                           cwd=tmp_path, capture_output=True, text=True)
    if probe.stdout.strip() != "None":
        pytest.skip("the installed package wins here (not an editable install)")
    done = subprocess.run([sys.executable, "-m", "imageprompt", "--version"], cwd=tmp_path, capture_output=True,
                          text=True)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.startswith(f"imageprompt: error: the folder {tmp_path / 'imageprompt'} (a clone?) hides")
    assert "run the command from another folder" in done.stderr


# --------------------------------------------------- 6. batch summaries
@pytest.fixture
def tiny_load(monkeypatch, tiny_pipe):
    monkeypatch.setattr("imageprompt.pipelines.loading.load_pipeline", lambda **kwargs: tiny_pipe)


def batch(*args) -> int:
    return main(["batch", *map(str, args), "--steps", "2", "--height", "32", "--width", "32", "--no-progress"])


def test_batch_says_why_rows_failed_and_leaves_no_parts_folder(tmp_path, tiny_load, capsys):
    Image.new("RGB", (40, 40), (220, 30, 30)).save(tmp_path / "red.png")
    rows = [{"kind": "vary", "image": "red.png"}, {"kind": "vary", "image": "missing.png", "id": "gone"},
            {"kind": "edit", "image": "red.png", "prompt": " "}, {"kind": "morph", "image": "red.png"},
            {"kind": "vary", "image": "red.png", "promt": "typo"}]
    (tmp_path / "jobs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert batch(tmp_path / "jobs.jsonl", "--out", tmp_path / "out") == 1
    err = capsys.readouterr().err.splitlines()
    reasons = [line for line in err if line.startswith("imageprompt: error: row ")]
    assert [line.split(":")[2] for line in reasons] == [" row 2 (gone)", " row 3", " row 4"], err
    assert "missing.png" in reasons[0] and "imageprompt: error: ... and 1 more" in err
    assert not (tmp_path / "out" / ".imageprompt-parts").exists()
    left = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert len(left) == 2 and left[0].endswith(".png") and left[1] == "results.jsonl", left


def test_a_rerun_that_skips_every_row_reports_its_time_and_no_rate(tmp_path, tiny_load, capsys):
    Image.new("RGB", (40, 40), (220, 30, 30)).save(tmp_path / "red.png")
    (tmp_path / "jobs.jsonl").write_text(json.dumps({"kind": "vary", "image": "red.png"}) + "\n")
    assert batch(tmp_path / "jobs.jsonl", "--out", tmp_path / "out") == 0
    capsys.readouterr()
    assert batch(tmp_path / "jobs.jsonl", "--out", tmp_path / "out") == 0
    summary = capsys.readouterr().err.strip().splitlines()[-1]
    assert "0 done, 1 skipped (already complete)" in summary and "0 images, nothing sampled, " in summary
    assert "images/s" not in summary
    seconds = float(summary.split(" s in all")[0].rsplit(" ", 1)[1])
    assert seconds > 0.0  # the command's time (imports, reading, checking), not the time after them
    assert not (tmp_path / "out" / ".imageprompt-parts").exists()
