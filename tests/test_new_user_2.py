"""What a new user meets, round 2 (issue 25): nothing overwritten, labelled progress, one inversion default,
a demo with the bundled adapter, subcommand usage, honest batch summaries, CPU memory, resize notices,
one Pillow range, the clone on the path, and quiet loads."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from imageprompt.checkpoints import BUNDLED_MODEL

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
