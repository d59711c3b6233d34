"""What a new user meets, round 2 (issue 25): nothing overwritten, labelled progress, one inversion default,
a demo with the bundled adapter, subcommand usage, honest batch summaries, CPU memory, resize notices,
one Pillow range, the clone on the path, and quiet loads."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from imageprompt.checkpoints import BUNDLED_IP_ADAPTER, BUNDLED_MODEL
from PIL import Image
from test_new_user import REPO, run_cli  # the round-1 helpers

from imageprompt.cli.main import main
from imageprompt.images import read_parameters


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


# ------------------------------------------------ 1. nothing overwritten
@pytest.fixture
def tiny_args(tiny_model):
    model_dir, clip_dir = tiny_model
    return ["--model", str(model_dir), "--clip", str(clip_dir), "--steps", "2", "--device", "cpu"]


@pytest.fixture
def photo(tmp_path):
    path = tmp_path / "ref.png"
    Image.new("RGB", (48, 40), (220, 30, 30)).save(path)
    return path


def test_vary_names_carry_the_method_and_never_replace_a_file(tmp_path, photo, tiny_args, capsys):
    out = tmp_path / "out"
    code, first, err = run_cli(["vary", photo, "--seed", 9, "--out", out, *tiny_args], capsys)
    assert code == 0, err
    assert first.split() == [str(out / "ref-vary-9.png")]
    before = (out / "ref-vary-9.png").read_bytes()
    code, second, err = run_cli(["vary", photo, "--seed", 9, "--num", 2, "--out", out, *tiny_args], capsys)
    assert code == 0, err
    assert second.split() == [str(out / "ref-vary-9_2.png"), str(out / "ref-vary-10_2.png")]  # one suffix a run
    assert (out / "ref-vary-9.png").read_bytes() == before
    code, third, err = run_cli(["vary", photo, "--seed", 9, "--adapter", "sdipc", "--out", out, *tiny_args], capsys)
    assert code == 0, err
    assert third.split() == [str(out / "ref-adapter-vary-9.png")]
    code, fourth, err = run_cli(["vary", photo, "--seed", 9, "--steps", 1, "--overwrite", "--out", out,
                                 *tiny_args[:-4], "--device", "cpu"], capsys)
    assert code == 0, err
    assert fourth.split() == [str(out / "ref-vary-9.png")] and read_parameters(out / "ref-vary-9.png")["steps"] == 1
    assert sorted(p.name for p in out.iterdir()) == ["ref-adapter-vary-9.png", "ref-vary-10_2.png", "ref-vary-9.png",
                                                     "ref-vary-9_2.png"]


def test_a_second_p2p_edit_of_a_photo_keeps_the_first(tmp_path, photo, tiny_args, capsys):
    out = tmp_path / "out"
    edit = ["p2p", "--image", photo, "--source", "a red square", "--target", "a blue square", "--out", out,
            "--save-attention", out / "maps.png", "--height", 32, "--width", 32, *tiny_args]
    code, first, err = run_cli(edit, capsys)
    assert code == 0, err
    assert first.split() == [str(out / n) for n in ("ref-source.png", "ref-edit.png", "maps.png")]
    code, second, err = run_cli(edit, capsys)
    assert code == 0, err
    assert second.split() == [str(out / n) for n in ("ref-source_2.png", "ref-edit_2.png", "maps_2.png")]
    assert read_parameters(out / "ref-edit.png")["target"] == "a blue square"
    assert read_parameters(out / "ref-edit.png")["invert"] == "direct"  # 3. the default that measures best


def test_a_file_that_appears_while_writing_is_never_replaced(tmp_path):
    from imageprompt.cli.common import CommandError, write_outputs

    (tmp_path / "a.png").write_bytes(b"theirs")
    with pytest.raises(CommandError, match="a.png: written by something else while this command ran"):
        write_outputs([Image.new("RGB", (4, 4))], tmp_path, ["a.png"], [{}])
    assert (tmp_path / "a.png").read_bytes() == b"theirs" and sorted(p.name for p in tmp_path.iterdir()) == ["a.png"]
    write_outputs([Image.new("RGB", (4, 4))], tmp_path, ["a.png"], [{}], overwrite=True)
    assert read_parameters(tmp_path / "a.png") == {}


# ------------------------------- 3. the demo: bundled adapter, one inversion default
def test_one_inversion_default_everywhere():
    pytest.importorskip("gradio")
    from imageprompt import DEFAULT_INVERSION
    from imageprompt.cli.main import build_parser

    assert DEFAULT_INVERSION == "direct"
    p2p = build_parser()._subparsers._group_actions[0].choices["p2p"]
    assert "default direct" in p2p.format_help().replace("\n", " ").replace("  ", " ")


def test_the_demos_real_image_tab_defaults_to_direct_inversion(tiny_pipe):
    gr = pytest.importorskip("gradio")
    from imageprompt.demo.app import build_demo

    demo = build_demo(tiny_pipe, default_steps=2)
    try:
        radios = [b for b in demo.blocks.values() if isinstance(b, gr.Radio) and b.label == "Inversion"]
        assert [r.value for r in radios] == ["direct"] and radios[0].choices[0][0] == "direct"
    finally:
        demo.close()


def test_the_demo_loads_the_bundled_adapter_with_the_bundled_model(monkeypatch):
    pytest.importorskip("gradio")
    import imageprompt.demo.app as app
    import imageprompt.pipelines.loading
    from imageprompt.checkpoints import BUNDLED_CLIP

    import imageprompt.loading

    class Stop(Exception):
        pass

    def build_demo(pipe, adapter_names, **kwargs):
        raise Stop(adapter_names)

    loaded = []
    bundled = (str(BUNDLED_MODEL), str(BUNDLED_CLIP), None)
    monkeypatch.setattr(imageprompt.loading, "resolve_model", lambda model, clip: bundled)
    monkeypatch.setattr(imageprompt.pipelines.loading, "load_pipeline", lambda **kwargs: "pipe")
    monkeypatch.setattr(app, "load_adapters", lambda pipe, specs, encoder: loaded.append((specs, encoder)) or ["a"])
    monkeypatch.setattr(app, "build_demo", build_demo)
    with pytest.raises(Stop) as stop:
        app.launch(device="cpu", port=None)
    assert stop.value.args[0] == [str(BUNDLED_IP_ADAPTER)] and loaded == [([str(BUNDLED_IP_ADAPTER)], None)]
    assert app.default_adapters("stable-diffusion-v1-5/stable-diffusion-v1-5") == []
    assert app.default_adapters(str(BUNDLED_MODEL) + "/") == [str(BUNDLED_IP_ADAPTER)]


# ------------------------------------------------------------- 5. eval
def test_eval_help_lists_the_measurements_and_defaults(capsys):
    from imageprompt.world.evaluate import MEASUREMENTS

    with pytest.raises(SystemExit) as stop:
        main(["eval", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert stop.value.code == 0
    for name in MEASUREMENTS:
        assert f"'{name}'" in text, name
    for default in ("(default 30; --quick: 6)", "(default 2; --quick: 1)", "(default 25; --quick: 12)",
                    "(default 7.5)", "(default 0.5)"):
        assert default in text, default


def test_eval_refuses_an_unknown_measurement_before_loading(monkeypatch, capsys):
    import imageprompt.world.evaluate as evaluate

    def load(*args, **kwargs):
        raise AssertionError("loaded a model")

    monkeypatch.setattr(evaluate, "load_bundled", load)
    monkeypatch.setattr("imageprompt.pipelines.loading.load_pipeline", load)
    code, _, err = run_cli(["eval", "--only", "SD-IPC edit", "--only", "bogus"], capsys)
    assert code == 1 and err.startswith("imageprompt: error: --only 'bogus': no such measurement; known: ")
    assert "'SD-IPC variation'" in err


# ------------------------------------------------------- 2. labelled progress
def bar_labels(err: str) -> list[str]:
    """The labels of the tqdm bars in ``err``, in order of first appearance."""
    import re

    labels = []
    for label in re.findall(r"(?:^|\r|\n)([A-Za-z][A-Za-z ()-]*): +\d+%\|", err):
        if label not in labels:
            labels.append(label)
    return labels


def test_p2p_of_a_photo_says_what_each_phase_does(tmp_path, photo, tiny_args, capsys):
    code, _, err = run_cli(["p2p", "--image", photo, "--source", "a red square", "--target", "a blue square",
                            "--invert", "null-text", "--inner-steps", 1, "--out", tmp_path / "out", *tiny_args],
                           capsys)
    assert code == 0, err
    assert err.startswith(f"imageprompt: loading {tiny_args[1]} ...\n")
    assert bar_labels(err) == ["inverting (DDIM)", "inverting (null-text)", "sampling"], err


def test_vary_labels_its_sampling_bar(tmp_path, photo, tiny_args, capsys):
    code, _, err = run_cli(["vary", photo, "--out", tmp_path / "out", *tiny_args], capsys)
    assert code == 0, err
    assert bar_labels(err) == ["sampling"], err


def test_batch_labels_its_bar_with_the_phase(tmp_path, tiny_load, capsys):
    Image.new("RGB", (40, 40), (220, 30, 30)).save(tmp_path / "red.png")
    (tmp_path / "jobs.jsonl").write_text(json.dumps({"kind": "vary", "image": "red.png"}) + "\n")
    assert main(["batch", str(tmp_path / "jobs.jsonl"), "--out", str(tmp_path / "out"), "--steps", "2",
                 "--height", "32", "--width", "32"]) == 0
    err = capsys.readouterr().err
    assert "loading: " in err and "sampling: 100%" in err and "batch: " not in err.replace("imageprompt: batch: ", "")


def test_the_demos_pipelines_label_their_bars(tiny_pipe):
    pytest.importorskip("gradio")
    from imageprompt.demo.app import build_demo
    from imageprompt.demo.context import p2p_pipeline

    from imageprompt.progress import bar_settings

    demo = build_demo(tiny_pipe, default_steps=2)
    try:
        ctx = demo.imageprompt_context
        assert bar_settings(ctx.pipe) == {"disable": True, "desc": "sampling"}  # the test's settings are kept
        assert bar_settings(p2p_pipeline(ctx, ddim=True))["desc"] == "sampling"
    finally:
        demo.close()
        tiny_pipe.set_progress_bar_config(disable=True)


# ----------------------------------------------------- 8. resized or cropped
def test_resize_and_crop_notices_say_how():
    from types import SimpleNamespace

    from imageprompt.images import crop_notice, resize_notice

    assert resize_notice("--image a.png", (640, 480), (64, 64)) == (
        "--image a.png (640x480) is resized to 64x64, stretched from 4:3 to 1:1 (not cropped); give --width and "
        "--height in its proportions to keep its shape")
    assert resize_notice("a.png", (640, 480), (64, 48)) == "a.png (640x480) is resized to 64x48"
    assert resize_notice("a.png", (64, 64), (64, 64)) is None
    clip = SimpleNamespace(do_center_crop=True, size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    assert crop_notice("a.png", (640, 480), clip) == (
        "a.png (640x480): the image encoder sees its centre 480x480, scaled to 224x224; the left and right edges "
        "are cropped")
    assert "centre 300x300" in crop_notice("b.png", (300, 900), clip) and "top and bottom edges" in \
        crop_notice("b.png", (300, 900), clip)
    assert crop_notice("a.png", (64, 64), clip) is None


def test_the_cli_says_when_an_input_is_cropped_or_resized(tmp_path, photo, tiny_args, capsys):
    code, _, err = run_cli(["vary", photo, "--out", tmp_path / "out", *tiny_args], capsys)
    assert code == 0, err
    assert "imageprompt: warning: ref.png (48x40): the image encoder sees its centre 40x40, scaled to " in err
    assert "the left and right edges are cropped" in err
    code, _, err = run_cli(["p2p", "--image", photo, "--source", "a red square", "--target", "a blue square",
                            "--height", 32, "--width", 32, "--out", tmp_path / "out", *tiny_args], capsys)
    assert code == 0, err
    assert ("imageprompt: warning: --image ref.png (48x40) is resized to 32x32, stretched from 6:5 to 1:1 "
            "(not cropped)") in err


def test_the_demo_says_when_a_photo_is_resized(monkeypatch, tiny_pipe):
    pytest.importorskip("gradio")
    from types import SimpleNamespace

    import imageprompt.demo.validation as validation

    said = []
    monkeypatch.setattr(validation.gr, "Info", said.append)
    ctx = SimpleNamespace(pipe=tiny_pipe)
    validation.notify_fitted(ctx, Image.new("RGB", (48, 40)), {"input": "p.png"}, SimpleNamespace(width=32, height=32))
    assert said == ["p.png (48x40) is resized to 32x32, stretched from 6:5 to 1:1 (not cropped); set Width and "
                    "Height in its proportions to keep its shape"]


def test_batch_says_when_a_rows_image_is_cropped(tmp_path, tiny_load, capsys):
    Image.new("RGB", (48, 40), (220, 30, 30)).save(tmp_path / "wide.png")
    (tmp_path / "jobs.jsonl").write_text(json.dumps({"kind": "vary", "image": "wide.png"}) + "\n")
    assert batch(tmp_path / "jobs.jsonl", "--out", tmp_path / "out") == 0
    err = capsys.readouterr().err
    assert "imageprompt: warning: row 1: wide.png (48x40): the image encoder sees its centre 40x40" in err


# ------------------------------------------------------ 7. bench on the CPU
def test_cpu_bench_gives_the_peak_rss():
    import torch

    from imageprompt.bench.common import PEAK_RSS_MISSING, reset_peak_rss, timed
    from imageprompt.bench.main import build_context, format_table, run_rows

    torch.manual_seed(0)
    ctx = build_context("cpu", None, 1, None, tiny=True)
    measurable = reset_peak_rss()
    _, small = timed(ctx, lambda: None)
    _, large = timed(ctx, lambda: b"x" * (256 << 20))  # 256 MiB more, held for the call
    name = "plain diffusers, batch 1"
    table = format_table(ctx, run_rows(ctx, [name]))
    row = next(line for line in table.splitlines() if line.startswith(f"| {name} |"))
    peak = row.split("|")[4].strip()
    assert "peak: the process's resident set (RSS)" in table.splitlines()[0]
    if measurable:
        assert large - small > 0.2 and float(peak) > 0
        assert PEAK_RSS_MISSING not in table
    else:  # not Linux, or /proc/self/clear_refs not writable: the table says why there is no figure
        assert (small, large, peak) == (None, None, "-") and PEAK_RSS_MISSING in table


# ------------------------------------------------------- 11. quiet loads
def test_the_converter_casts_without_diffusers_float32_notice():
    import logging

    import diffusers.utils.logging as diffusers_logging
    import torch

    from imageprompt.conversion import SDIPCConverter

    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("diffusers.models.modeling_utils")  # diffusers' loggers do not propagate to caplog
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_warning()
    logger.addHandler(handler)
    try:
        converter = SDIPCConverter(text_hidden_size=8, projection_dim=4)
        for dtype in (torch.float32, torch.float16):
            assert converter.to(dtype=dtype) is converter and converter.to("cpu", dtype) is converter
    finally:
        logger.removeHandler(handler)
        diffusers_logging.set_verbosity(verbosity)
    assert converter.text_projection.weight.dtype == torch.float32  # it stays float32, as before
    assert not [r.getMessage() for r in records if "should be kept in float32" in r.getMessage()]


def test_trained_files_are_not_replaced_without_overwrite(tmp_path, photo, capsys):
    (tmp_path / "data").mkdir()
    Image.new("RGB", (40, 40)).save(tmp_path / "data" / "a.png")
    (tmp_path / "data" / "a.txt").write_text("a red square")
    for argv in (["tune", "online", photo, "--out", tmp_path / "t.safetensors"],
                 ["train-adapter", tmp_path / "data", "--out", tmp_path / "t.safetensors"]):
        (tmp_path / "t.safetensors").write_bytes(b"earlier run")
        code, _, err = run_cli([*argv, "--model", tmp_path / "no-model"], capsys)
        assert code == 1 and f"--out {tmp_path / 't.safetensors'}: exists; pass --overwrite to replace it" in err
        assert (tmp_path / "t.safetensors").read_bytes() == b"earlier run"
        code, _, err = run_cli([*argv, "--overwrite", "--model", tmp_path / "no-model"], capsys)
        assert code == 1 and "exists" not in err and "no-model" in err  # past the check: the model is missing
