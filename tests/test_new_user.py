"""What a new user meets (issue 15): the bundled model's vocabulary, the bundled IP-Adapter, file modes,
the smoke benchmark, train-adapter's outputs, start-up, and the messages on the way."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from imageprompt.checkpoints import BUNDLED_CLIP, BUNDLED_IP_ADAPTER, BUNDLED_MODEL
from PIL import Image

from imageprompt.cli.main import main
from imageprompt.images import read_parameters

REPO = Path(__file__).resolve().parents[1]
RED_CIRCLE = REPO / "demo" / "examples" / "red-circle.png"
BUNDLED = ["--model", str(BUNDLED_MODEL), "--steps", "1", "--device", "cpu"]


def run_cli(args, capsys):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ------------------------------------------------------------ unknown words
def test_the_bundled_vocabulary_is_the_worlds():
    from imageprompt.vocabulary import bundled_vocabulary
    from imageprompt.world.scenes import vocabulary

    assert set(bundled_vocabulary()) == set(vocabulary())


def test_unknown_words_are_named_for_the_bundled_model_only():
    from imageprompt.vocabulary import unknown_words_message

    message = unknown_words_message(BUNDLED_MODEL, "a photo of a Cat on the beach, a cat", "--prompt")
    assert "'cat', 'beach'" in message and "'photo'" not in message and "imageprompt words" in message
    assert unknown_words_message(BUNDLED_MODEL, "a red circle on the left", "--prompt") is None
    assert unknown_words_message("stable-diffusion-v1-5/stable-diffusion-v1-5", "a cat", "--prompt") is None
    assert unknown_words_message(BUNDLED_MODEL, None, "--negative-prompt") is None


def test_cli_warns_once_per_prompt_with_unknown_words(tmp_path, capsys):
    code, _, err = run_cli(["edit", RED_CIRCLE, "--prompt", "a cat on the beach", "--negative-prompt",
                            "a cat on the beach", "--out", tmp_path, *BUNDLED], capsys)
    assert code == 0, err
    warnings = [line for line in err.splitlines() if "does not know" in line]
    assert len(warnings) == 1, err  # the same text as --prompt and --negative-prompt: one warning
    assert warnings[0].startswith("imageprompt: warning: ") and "'cat', 'beach'" in warnings[0]

    code, _, err = run_cli(["edit", RED_CIRCLE, "--prompt", "a blue square", "--out", tmp_path, *BUNDLED], capsys)
    assert code == 0 and "does not know" not in err


def test_words_command_lists_the_vocabulary(capsys):
    code, out, _ = run_cli(["words"], capsys)
    assert code == 0
    for word in ("circle", "red", "left", "background"):
        assert f" {word} " in f" {out.replace(chr(10), ' ')} "
    assert "a red circle on the left" in out


def test_demo_warns_in_the_page_about_unknown_words():
    pytest.importorskip("gradio")
    from types import SimpleNamespace

    from imageprompt.demo.validation import check_words

    with pytest.warns(UserWarning, match="'dog'"):
        check_words(SimpleNamespace(model_name=str(BUNDLED_MODEL)), [("the edit text", "a red dog")])


# ------------------------------------------------------- bundled IP-Adapter
def test_vary_uses_the_bundled_adapter_without_image_encoder(tmp_path, capsys):
    code, out, err = run_cli(["vary", RED_CIRCLE, "--adapter", BUNDLED_IP_ADAPTER, "--seed", 3, "--out", tmp_path,
                              *BUNDLED], capsys)
    assert code == 0, err
    params = read_parameters(out.split()[0])
    assert params["method"] == "ip-adapter-variation" and params["image_encoder"] == str(BUNDLED_CLIP)


def test_batch_uses_the_bundled_adapter_without_image_encoder(tmp_path, capsys):
    shutil.copy(RED_CIRCLE, tmp_path / "red.png")
    rows = [{"kind": "adapter", "image": "red.png", "adapter": str(BUNDLED_IP_ADAPTER), "prompt": "a red cat"},
            {"kind": "adapter", "image": "red.png", "prompt": "a red cat", "seed": 1},
            {"kind": "vary", "image": "red.png"}]
    (tmp_path / "jobs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, _, err = run_cli(["batch", tmp_path / "jobs.jsonl", "--out", tmp_path / "out", "--adapter",
                            BUNDLED_IP_ADAPTER, "--no-progress", *BUNDLED], capsys)
    assert code == 0, err
    records = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert [r["status"] for r in records] == ["done"] * 3, records
    assert sum("does not know 'cat'" in line for line in err.splitlines()) == 1, err  # one prompt, two rows


def test_batch_image_encoder_option(tmp_path, capsys):
    from imageprompt.jobs import JobDefaults, Row, row_key

    (tmp_path / "jobs.jsonl").write_text('{"kind": "vary", "image": "x.png"}\n')
    code, _, err = run_cli(["batch", tmp_path / "jobs.jsonl", "--out", tmp_path / "out", "--image-encoder",
                            tmp_path / "none"], capsys)
    assert code == 1 and "--image-encoder" in err and "no such folder" in err
    # the encoder is part of an adapter row's key; other rows keep theirs
    adapter, vary = Row(1, kind="adapter", params={"adapter": "a"}), Row(2, kind="vary")
    plain, chosen = JobDefaults(), JobDefaults(image_encoder="/enc")
    assert row_key(adapter, plain) != row_key(adapter, chosen)
    assert row_key(vary, plain) == row_key(vary, chosen)


def test_missing_image_encoder_message_ends_cleanly(tmp_path):
    from imageprompt.adapter_files import find_image_encoder
    from imageprompt.loading import ModelLoadError

    weights = tmp_path / "copy.safetensors"
    shutil.copy(BUNDLED_IP_ADAPTER, weights)
    with pytest.raises(ModelLoadError) as info:
        find_image_encoder(str(weights), weights, None, "image_encoder")
    message = str(info.value)
    assert f"{tmp_path / 'image_encoder'} (no such folder). Pass the CLIP vision folder" in message
    assert "repo_type" not in message and ".." not in message


def test_hub_errors_are_quoted_by_whole_sentences():
    from imageprompt.adapter_files import first_sentence, resolve_weight_file
    from imageprompt.loading import ModelLoadError

    long = ("Repo id must be in the form 'repo_name' or 'namespace/repo_name': '/x/image_encoder'. Use `repo_type` "
            "argument if needed.")
    assert first_sentence(ValueError(long)) == "Repo id must be in the form 'repo_name' or 'namespace/repo_name': " \
                                               "'/x/image_encoder'"
    assert first_sentence("One sentence.") == "One sentence"
    assert first_sentence("word " * 100, limit=20).endswith(" ...")
    with pytest.raises(ModelLoadError) as info:  # HF_HUB_OFFLINE is set for the tests
        resolve_weight_file("someone/adapters", "ip.safetensors")
    message = str(info.value)
    assert "HF_HUB_OFFLINE is set. Download them" in message and ".." not in message


# --------------------------------------------------------------- file modes
@pytest.mark.parametrize("umask, expected", [(0o022, 0o644), (0o077, 0o600)])
def test_outputs_get_the_mode_of_a_plain_open(tmp_path, umask, expected):
    from imageprompt.images import atomic_write, save_png

    seen = []
    old = os.umask(umask)
    try:
        atomic_write(tmp_path / "a.bin", lambda h: (seen.append(os.fstat(h.fileno()).st_mode & 0o777), h.write(b"x")))
        atomic_write(tmp_path / "a.txt", lambda h: h.write("x"), mode="w")
        save_png(Image.new("RGB", (8, 8)), tmp_path / "a.png", {"x": 1})
        with open(tmp_path / "plain", "w") as handle:
            handle.write("x")
    finally:
        os.umask(old)
    assert (tmp_path / "plain").stat().st_mode & 0o777 == expected
    assert seen == [expected]  # the temporary file already has it: the rename changes nothing
    for name in ("a.bin", "a.txt", "a.png"):
        assert (tmp_path / name).stat().st_mode & 0o777 == expected, name


# ------------------------------------------------------------ smoke bench
def test_tiny_bench_runs_the_smoke_rows(capsys):
    from imageprompt.bench.main import SMOKE_ROWS, all_rows

    code, out, _ = run_cli(["bench", "--tiny", "--list"], capsys)
    smoke = out.split("\n")[:-1]
    assert code == 0 and smoke == [name for name in all_rows() if name in SMOKE_ROWS] and len(smoke) == len(SMOKE_ROWS)
    assert not any(part in name for name in smoke for part in ("--compile", "null-text", "batch job", "1.5x"))
    code, out, _ = run_cli(["bench", "--tiny", "--all", "--list"], capsys)
    assert out.split("\n")[:-1] == list(all_rows())
    assert not any("512" in name or "768" in name for name in all_rows())


def test_bench_labels_sizes_truthfully():
    import torch

    from imageprompt.bench.main import build_context, format_table, run_rows

    torch.manual_seed(0)
    ctx = build_context("cpu", None, 1, None, tiny=True)
    name = "plain diffusers, 2 prompts, 1.5x size"
    table = format_table(ctx, run_rows(ctx, [name]))
    assert "64x64" in table.splitlines()[0] and "512" not in table and "768" not in table
    row = next(line for line in table.splitlines() if line.startswith(f"| {name} |"))
    assert row.rstrip(" |").endswith("96x96")


# ----------------------------------------------------------- train-adapter
@pytest.fixture
def captioned(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    for i, color in enumerate(("red", "blue")):
        Image.new("RGB", (40, 40), color).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a {color} square")
    return folder


def test_train_adapter_writes_only_beside_out_at_the_models_size(tiny_model, captioned, tmp_path, monkeypatch,
                                                                  capsys):
    import imageprompt.train_adapter as train_adapter

    sizes = []
    real_train = train_adapter.train
    monkeypatch.setattr(train_adapter, "train", lambda *a, **k: sizes.append(k["resolution"]) or real_train(*a, **k))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    common = ["--model", tiny_model[0], "--clip", tiny_model[1], "--steps", 1, "--batch-size", 2,
              "--checkpoint-every", 0]
    code, out, err = run_cli(["train-adapter", captioned, "--out", "runs/a.safetensors", *common], capsys)
    assert code == 0, err
    assert sizes == [32]  # the tiny model's own size: sample_size 16 x VAE scale factor 2
    assert (work / "runs" / "image_encoder" / "config.json").exists()
    code, out, err = run_cli(["train-adapter", captioned, "--out", "b.safetensors", *common], capsys)
    assert code == 0, err
    assert sorted(p.name for p in work.iterdir()) == ["b-image_encoder", "b.safetensors", "runs"]
    assert "image encoder: b-image_encoder" in err

    from imageprompt.pipelines.loading import load_pipeline

    pipe = load_pipeline(str(tiny_model[0]), str(tiny_model[1]), device="cpu", dtype="fp32")
    pipe.load_ip_adapter("b.safetensors")  # finds b-image_encoder by itself
    assert len(pipe.image_adapters) == 1


# ---------------------------------------------------------------- start-up
def test_help_does_not_import_torch():
    code = "import sys; from imageprompt.cli.main import build_parser; build_parser(); print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_no_hub_probe_for_local_folders_or_offline(tiny_model, monkeypatch):
    import socket

    from imageprompt.pipelines.loading import load_pipeline

    import imageprompt.loading as loading

    def no_network(*args, **kwargs):
        raise AssertionError("the hub was probed")

    monkeypatch.setattr(socket, "create_connection", no_network)
    loading.hub_reachable.cache_clear()
    monkeypatch.setattr(loading, "env_offline", lambda: False)
    pipe = load_pipeline(str(tiny_model[0]), str(tiny_model[1]), device="cpu")  # local folders
    assert pipe.model_name == str(tiny_model[0])
    monkeypatch.setattr(loading, "env_offline", lambda: True)
    with pytest.raises(loading.ModelLoadError, match="HF_HUB_OFFLINE is set"):
        load_pipeline("someone/not-cached", str(tiny_model[1]), device="cpu")
    loading.hub_reachable.cache_clear()


def test_torchvision_notices_are_silenced():
    import logging

    from imageprompt.loading import quiet_torchvision_notices

    quiet_torchvision_notices()
    quiet_torchvision_notices()
    source = logging.getLogger("transformers.utils.import_utils")
    make = lambda text: source.makeRecord(source.name, logging.WARNING, __file__, 1, text, (), None)  # noqa: E731
    assert not source.filter(make("`CLIPImageProcessor` requires torchvision (not installed); falling back"))
    assert source.filter(make("something else"))
    assert len(source.filters) == len({type(f) for f in source.filters})


# ---------------------------------------------------------- smaller points
def test_help_describes_bench_and_eval_and_shows_defaults(capsys):
    from imageprompt.cli.main import build_parser

    parser = build_parser()
    for command in ("bench", "eval"):
        assert parser._subparsers._group_actions[0].choices[command].description
    vary_help = parser._subparsers._group_actions[0].choices["vary"].format_help()
    assert "(default 50)" in vary_help and "(default 7.5)" in vary_help


def test_vary_online_steps_prints_the_loss(tiny_model, tmp_path, capsys, red_image):
    red_image.save(tmp_path / "red.png")
    code, _, err = run_cli(["vary", tmp_path / "red.png", "--online-steps", 2, "--steps", 1, "--out", tmp_path / "o",
                            "--model", tiny_model[0], "--clip", tiny_model[1]], capsys)
    assert code == 0, err
    assert "online tuning, steps 1-2: training loss" in err
