"""The command line end to end on tiny model folders, and every kind of bad input."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imageprompt.cli.main import main
from imageprompt.images import read_parameters, save_png


@pytest.fixture
def model_args(tiny_model):
    model_dir, clip_dir = tiny_model
    return ["--model", str(model_dir), "--clip", str(clip_dir), "--steps", "2"]


@pytest.fixture
def image_path(tmp_path, red_image):
    path = tmp_path / "ref.png"
    red_image.save(path)
    return path


def pixels(path):
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def run_cli(args, capsys):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_vary_writes_pngs_with_parameters_and_is_deterministic(tmp_path, image_path, model_args, capsys):
    out = tmp_path / "out"
    code, stdout, err = run_cli(["vary", image_path, "--num", 3, "--batch-size", 2, "--seed", 7, "--out", out,
                                 *model_args], capsys)
    assert code == 0, err
    files = sorted(out.glob("*.png"))
    assert [f.name for f in files] == ["ref-vary-7.png", "ref-vary-8.png", "ref-vary-9.png"]
    assert stdout.split() == [str(f) for f in files]
    meta = read_parameters(files[1])
    assert meta["method"] == "sdipc-variation" and meta["seed"] == 8 and meta["steps"] == 2
    assert meta["model"].endswith("tiny-sd") and meta["clip"].endswith("tiny-clip")
    assert meta["guidance"] == 7.5 and meta["prompt"] is None
    assert (meta["width"], meta["height"]) == (32, 32) == Image.open(files[1]).size
    import hashlib

    assert meta["input_sha256"] == hashlib.sha256(image_path.read_bytes()).hexdigest()
    assert not [p for p in out.iterdir() if p.suffix != ".png"]  # no temporary files left

    again = tmp_path / "again"
    assert run_cli(["vary", image_path, "--num", 3, "--batch-size", 2, "--seed", 7, "--out", again,
                    *model_args], capsys)[0] == 0
    for a, b in zip(files, sorted(again.glob("*.png"))):
        np.testing.assert_array_equal(pixels(a), pixels(b))
    assert not np.array_equal(pixels(files[0]), pixels(files[1]))


def test_one_image_reproduces_from_its_metadata(tmp_path, image_path, model_args, capsys):
    out = tmp_path / "out"
    assert run_cli(["vary", image_path, "--num", 2, "--seed", 3, "--out", out, *model_args], capsys)[0] == 0
    meta = read_parameters(out / "ref-vary-4.png")
    single = tmp_path / "single"
    assert run_cli(["vary", image_path, "--seed", meta["seed"], "--steps", meta["steps"], "--out", single,
                    *model_args], capsys)[0] == 0
    np.testing.assert_allclose(pixels(single / "ref-vary-4.png"), pixels(out / "ref-vary-4.png"), atol=1)


def test_edit_records_prompt_and_alpha(tmp_path, image_path, model_args, capsys):
    out = tmp_path / "out"
    code, _, err = run_cli(["edit", image_path, "--prompt", "a blue circle on the beach", "--alpha", 0.6,
                            "--seed", 1, "--out", out, *model_args], capsys)
    assert code == 0, err
    meta = read_parameters(out / "ref-edit-1.png")
    assert meta["method"] == "sdipc-edit"
    assert meta["prompt"] == "a blue circle on the beach" and meta["alpha"] == 0.6


def _truncated_png(path, red_image):
    red_image.resize((256, 256)).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("case", ["missing", "text", "truncated", "directory", "empty"])
def test_bad_image_is_one_line_error_and_no_files(tmp_path, model_args, capsys, case, red_image):
    path = tmp_path / f"input-{case}.png"
    if case == "text":
        path.write_text("not an image")
    elif case == "truncated":
        _truncated_png(path, red_image)
    elif case == "directory":
        path.mkdir()
    elif case == "empty":
        path.write_bytes(b"")
    out = tmp_path / "out"
    code, _, err = run_cli(["vary", path, "--out", out, *model_args], capsys)
    assert code == 1
    assert err.startswith("imageprompt: error: ") and str(path) in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "P", "CMYK", "I;16", "1"])
def test_image_modes_are_converted(tmp_path, model_args, capsys, mode):
    base = Image.new("RGB", (40, 40), (200, 40, 40))
    if mode == "I;16":
        image = Image.fromarray((np.arange(1600, dtype=np.uint16).reshape(40, 40) * 40), mode="I;16")
    else:
        image = base.convert(mode)
    suffix = ".tif" if mode == "CMYK" else ".png"
    path = tmp_path / f"in{suffix}"
    image.save(path)
    out = tmp_path / "out"
    code, _, err = run_cli(["vary", path, "--seed", 0, "--out", out, *model_args], capsys)
    assert code == 0, err
    assert Image.open(out / "in-vary-0.png").mode == "RGB"


def test_converted_modes_keep_content():
    from imageprompt.images import to_rgb

    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert to_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)  # transparent -> white background
    deep = Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16), mode="I;16")
    assert to_rgb(deep).getpixel((0, 0)) == (255, 255, 255)
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))
    assert to_rgb(cmyk).getpixel((0, 0)) == (255, 0, 0)


def test_huge_image_is_resized_with_notice(tmp_path, model_args, capsys):
    path = tmp_path / "huge.png"
    Image.new("RGB", (5000, 300), (0, 0, 200)).save(path)
    code, _, err = run_cli(["vary", path, "--seed", 0, "--out", tmp_path / "out", *model_args], capsys)
    assert code == 0, err
    assert "warning: input image 5000x300 resized to 2048x123" in err


def test_long_prompt_truncated_with_warning(tmp_path, image_path, model_args, capsys):
    prompt = " ".join(["a red circle on the left"] * 20)
    code, _, err = run_cli(["edit", image_path, "--prompt", prompt, "--seed", 0, "--out", tmp_path / "o",
                            *model_args], capsys)
    assert code == 0
    assert "warning: prompt has" in err and "only the first 75 are used" in err


@pytest.mark.parametrize("argv", [
    ["--num", "0"], ["--num", "-2"], ["--steps", "0"], ["--num", "two"], ["--frobnicate"], ["--dtype", "fp8"],
])
def test_bad_options_are_usage_errors(tmp_path, image_path, model_args, capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        main(["vary", str(image_path), "--out", str(tmp_path / "out"), *model_args, *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "usage:" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_empty_edit_prompt_is_refused(tmp_path, image_path, model_args, capsys):
    code, _, err = run_cli(["edit", image_path, "--prompt", "  ", "--out", tmp_path / "o", *model_args], capsys)
    assert code == 1 and "--prompt is empty" in err


def test_out_that_is_a_file_is_refused(tmp_path, image_path, model_args, capsys):
    target = tmp_path / "file.txt"
    target.write_text("x")
    code, _, err = run_cli(["vary", image_path, "--out", target, *model_args], capsys)
    assert code == 1 and "not a folder" in err


@pytest.mark.parametrize("which,value,expected", [
    ("--model", "nobody/no-such-model", "could not load the Stable Diffusion model from 'nobody/no-such-model'"),
    ("--model", "./missing/folder", "no such file or folder"),
    ("--clip", "nobody/no-such-clip", "could not load the CLIP model from 'nobody/no-such-clip'"),
])
def test_unreachable_weights_give_one_clear_message(tmp_path, image_path, tiny_model, capsys, which, value,
                                                    expected, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model_dir, clip_dir = tiny_model
    args = {"--model": str(model_dir), "--clip": str(clip_dir), which: value}
    code, _, err = run_cli(["vary", image_path, "--steps", "1", "--out", tmp_path / "o",
                            *[x for kv in args.items() for x in kv]], capsys)
    assert code == 1
    assert expected in err and "Traceback" not in err
    if "could not load" in expected:
        assert "--model" in err  # says how to point at local weights
    assert not (tmp_path / "o").exists()


def test_save_png_is_atomic(tmp_path, monkeypatch):
    image = Image.new("RGB", (8, 8))
    old_mask = os.umask(0o022)
    try:
        save_png(image, tmp_path / "a.png", {"seed": 1})
    finally:
        os.umask(old_mask)
    assert read_parameters(tmp_path / "a.png") == {"seed": 1}
    assert (tmp_path / "a.png").stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600

    def broken_save(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG partial")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_png(image, tmp_path / "b.png", {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png"]


def test_console_script_end_to_end(tmp_path, image_path, tiny_model):
    """The installed entry point, as a user runs it: success, then a bad input."""
    model_dir, clip_dir = tiny_model
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    exe = [sys.executable, "-m", "imageprompt"]
    ok = subprocess.run([*exe, "vary", str(image_path), "--num", "2", "--seed", "5", "--steps", "2",
                         "--out", str(tmp_path / "out"), "--model", str(model_dir), "--clip", str(clip_dir)],
                        capture_output=True, text=True, env=env, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert [Path(p).name for p in ok.stdout.split()] == ["ref-vary-5.png", "ref-vary-6.png"]
    assert "100%" in ok.stderr  # the progress bar
    bad = subprocess.run([*exe, "edit", str(tmp_path / "nope.png"), "--prompt", "x", "--out", str(tmp_path / "o")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == 1
    assert bad.stderr.strip() == f"imageprompt: error: {tmp_path / 'nope.png'}: no such file"


def test_exif_rotation_is_applied(tmp_path):
    from imageprompt.images import load_image

    image = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif)
    assert load_image(path).size == (20, 40)
