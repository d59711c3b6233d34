"""Hostile input to the command line, the demo and weight files (issue 13, points 4-7): refused or bounded,
with a message that names what is wrong."""

from __future__ import annotations

import os
import shutil
import struct
import warnings
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from imageprompt.cli.main import build_parser, main
from imageprompt.images import MAX_PROMPT_CHARS
from imageprompt.loading import ModelLoadError


class Payload:
    """A pickle that would run a command if it were ever unpickled without ``weights_only``."""

    def __reduce__(self):
        return (os.system, ("echo PWNED",))


@pytest.fixture
def image_path(tmp_path):
    path = tmp_path / "ref.png"
    Image.new("RGB", (48, 40), (220, 30, 30)).save(path)
    return path


class Stop(Exception):
    """Raised in place of loading a model: everything before it ran."""


# ------------------------------------------------------- 5. weight files
def _safetensors_bytes():
    from safetensors.torch import save

    return save({"image_proj.proj.weight": torch.zeros(8, 4), "ip_adapter.1.to_k_ip.weight": torch.zeros(4, 4)})


def _write_malformed(tmp_path, kind):
    path = tmp_path / f"{kind}.safetensors"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "huge-header":
        path.write_bytes(struct.pack("<Q", 2**62) + b"{}")
    elif kind == "pickle":
        torch.save({"x": Payload()}, path)
    elif kind == "truncated":
        path.write_bytes(_safetensors_bytes()[:-40])
    elif kind == "bad-json":
        path.write_bytes(struct.pack("<Q", 5) + b"{oops" + b"\0" * 16)
    return path


@pytest.mark.parametrize("kind, reason", [
    ("empty", "empty"),
    ("huge-header", "header claims"),
    ("pickle", "pickle renamed .safetensors"),
    ("truncated", "truncated or corrupt"),
    ("bad-json", "not valid JSON"),
])
def test_malformed_safetensors_adapters_name_the_file_and_the_fault(tmp_path, kind, reason):
    from imageprompt.adapter_files import read_checkpoint

    path = _write_malformed(tmp_path, kind)
    with pytest.raises(ModelLoadError) as caught:
        read_checkpoint(path)
    message = str(caught.value)
    assert str(path) in message and reason in message
    assert "SafetensorError" not in message


def test_a_good_safetensors_adapter_still_reads(tmp_path):
    from imageprompt.adapter_files import read_checkpoint

    path = tmp_path / "ok.safetensors"
    path.write_bytes(_safetensors_bytes())
    state = read_checkpoint(path)
    assert set(state) == {"image_proj", "ip_adapter"} and "proj.weight" in state["image_proj"]


@pytest.mark.parametrize("content", ["payload", "junk", "empty"])
def test_bin_refusal_is_whole_sentences_without_the_unsafe_hint(tmp_path, content):
    from imageprompt.adapter_files import read_checkpoint

    path = tmp_path / "adapter.bin"
    if content == "payload":
        torch.save({"x": Payload()}, path)
    else:
        path.write_bytes(b"hello world" if content == "junk" else b"")
    with pytest.raises(ModelLoadError) as caught:
        read_checkpoint(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: refused: not a plain tensor archive")
    assert message.endswith("prefer .safetensors.") and " ..." not in message
    assert "weights_only" not in message
    if content == "payload":
        assert "system" in message  # what it asked for


def test_clip_bin_refusal_never_suggests_weights_only_false(tmp_path, tiny_model):
    from imageprompt.loading import load_clip_parts

    _, clip_dir = tiny_model
    bad = tmp_path / "clip"
    bad.mkdir()
    shutil.copy(clip_dir / "config.json", bad / "config.json")
    torch.save({"x": Payload()}, bad / "pytorch_model.bin")
    with pytest.raises(ModelLoadError) as caught:
        load_clip_parts(str(bad), torch.float32)
    message = str(caught.value)
    assert "refused" in message and str(bad) in message
    assert "weights_only" not in message and "Weights only" not in message


# ----------------------------------------------------------- 6. numbers
COMMANDS = [
    ["vary", "ref.png"],
    ["edit", "ref.png", "--prompt", "a red circle"],
    ["p2p", "--source", "a red circle", "--target", "a blue circle"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c[0])
@pytest.mark.parametrize("option, value", [
    ("--seed", str(2**64)), ("--seed", "-1"), ("--seed", "1.5"),
    ("--guidance", "nan"), ("--guidance", "inf"), ("--guidance", "-inf"),
    ("--alpha", "nan"),
])
def test_cli_numbers_are_checked_at_parse_time(command, option, value, capsys):
    with pytest.raises(SystemExit) as caught:
        build_parser().parse_args([*command, "--out", "out", f"{option}={value}"])
    assert caught.value.code == 2
    assert option in capsys.readouterr().err


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c[0])
def test_cli_accepts_the_whole_seed_range(command):
    args = build_parser().parse_args([*command, "--out", "out", "--seed", str(2**64 - 1), "--guidance", "0"])
    assert args.seed == 2**64 - 1 and args.guidance == 0.0
    assert build_parser().parse_args([*command, "--out", "out", "--seed", "0"]).seed == 0


def test_seed_plus_image_index_must_stay_in_range(image_path, tmp_path, monkeypatch, capsys):
    import imageprompt.cli.main as cli_main

    monkeypatch.setattr(cli_main, "load_pipeline_from_args", lambda args: (_ for _ in ()).throw(Stop()))
    code = main(["vary", str(image_path), "--out", str(tmp_path / "out"), "--seed", str(2**64 - 1), "--num", "2"])
    assert code == 1 and "--seed" in capsys.readouterr().err


# ----------------------------------------------------------- 7. --out
@pytest.mark.parametrize("command", ["vary", "p2p"])
def test_unwritable_out_is_refused_before_the_model_loads(image_path, tmp_path, monkeypatch, capsys, command):
    import imageprompt.cli.main as cli_main
    import imageprompt.cli.p2p as cli_p2p

    def never(args):
        raise AssertionError("the model loaded")

    monkeypatch.setattr(cli_main, "load_pipeline_from_args", never)
    monkeypatch.setattr(cli_p2p, "load_pipeline_from_args", never)
    out = "/proc/imageprompt-out/results"  # nothing can be created under /proc, not even by root
    args = ["vary", str(image_path)] if command == "vary" else ["p2p", "--source", "a red circle", "--target",
                                                               "a blue circle"]
    assert main([*args, "--out", out]) == 1
    err = capsys.readouterr().err
    assert f"--out {out}" in err and "not writable" in err and "unexpected" not in err


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_out_folder_is_refused(tmp_path):
    from imageprompt.cli.common import CommandError, check_out_dir

    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(CommandError, match="not writable"):
            check_out_dir(str(folder))
        with pytest.raises(CommandError, match="not writable"):
            check_out_dir(str(folder / "new"))
    finally:
        folder.chmod(0o700)


def test_out_under_a_file_is_refused(tmp_path):
    from imageprompt.cli.common import CommandError, check_out_dir

    (tmp_path / "file").write_text("x")
    with pytest.raises(CommandError, match="not a folder"):
        check_out_dir(str(tmp_path / "file" / "out"))
    assert check_out_dir(str(tmp_path / "new" / "deeper")) == tmp_path / "new" / "deeper"  # created when writing


# ------------------------------------------------------ 4. prompt length
def _cap_warnings(records):
    return [r for r in records if "characters; only the first" in str(r.message)]


@pytest.mark.parametrize("command, options", [
    (["vary", "IMAGE"], ["negative_prompt"]),
    (["edit", "IMAGE", "--prompt", "a red circle " * 1000], ["prompt", "negative_prompt"]),
    (["p2p", "--source", "a red circle " * 1000, "--target", "a blue circle " * 1000, "--mode", "refine"],
     ["source", "target", "negative_prompt"]),
])
def test_cli_prompts_are_capped_with_one_warning_each(image_path, tmp_path, monkeypatch, capsys, command, options):
    import imageprompt.cli.main as cli_main
    import imageprompt.cli.p2p as cli_p2p

    seen = []

    def load(args):
        seen.append(args)
        raise Stop

    monkeypatch.setattr(cli_main, "load_pipeline_from_args", load)
    monkeypatch.setattr(cli_p2p, "load_pipeline_from_args", load)
    argv = ["--debug"] + [str(image_path) if a == "IMAGE" else a for a in command]
    argv += ["--negative-prompt", "blurry " * 1000, "--out", str(tmp_path / "out")]
    with pytest.raises(Stop):
        main(argv)  # the command line shows each warning as one "imageprompt: warning: ..." line
    (args,) = seen
    for name in options:
        assert len(getattr(args, name)) == MAX_PROMPT_CHARS
    lines = [line for line in capsys.readouterr().err.splitlines() if "characters; only the first" in line]
    assert len(lines) == len(options)
    assert all(line.startswith("imageprompt: warning: --") for line in lines)


def test_pipeline_tokenize_cuts_the_text_before_tokenizing():
    from imageprompt.pipelines import StableDiffusionImagePromptPipeline

    lengths = []

    def tokenizer(prompts, **kwargs):
        lengths.extend(len(p) for p in prompts)
        if kwargs.get("return_tensors") == "pt":
            return SimpleNamespace(input_ids=torch.zeros(len(prompts), 77, dtype=torch.long))
        return SimpleNamespace(input_ids=[[0] * 10 for _ in prompts])

    fake = SimpleNamespace(model_max_length=77, tokenizer=tokenizer, maybe_convert_prompt=lambda prompts, tok: prompts)
    ids = StableDiffusionImagePromptPipeline.tokenize(fake, ["a " * 5_000_000, "short"])
    assert ids.shape == (2, 77)
    assert max(lengths) == MAX_PROMPT_CHARS


# ------------------------------------------------------------- the demo
gr = pytest.importorskip("gradio")


def _demo_ctx():
    return SimpleNamespace(size_range=(16, 64), max_images=4, max_steps=20, pipe=SimpleNamespace(vae_scale_factor=8),
                           model_name="some/model")


def test_demo_prompts_are_capped_with_one_warning():
    from imageprompt.demo.validation import check_edit, check_prompt, check_sampling, optional_prompt

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert len(check_prompt("a red circle " * 100_000, "the edit text")) <= MAX_PROMPT_CHARS
        assert len(optional_prompt("x" * 10_000, "the text prompt")) == MAX_PROMPT_CHARS
        sampling = check_sampling(_demo_ctx(), steps=2, guidance=2.0, width=32, height=32,
                                  negative_prompt="blurry " * 10_000)
        settings = check_edit("a red circle " * 1000, "a blue circle " * 1000, "refine", "blue=2, " * 1000,
                              "circle " * 1000, 0.8, 0.4, 0.3)
    assert len(sampling.negative_prompt) <= MAX_PROMPT_CHARS
    assert len(settings["source_prompt"]) <= MAX_PROMPT_CHARS and len(settings["target_prompt"]) <= MAX_PROMPT_CHARS
    # edit text, text prompt, negative prompt, source, target, word weights, blend words: one warning each
    assert len(_cap_warnings(caught)) == 7


@pytest.mark.parametrize("weights", ["red=1e30", "red=-1e6", "red=101"])
def test_demo_huge_word_weight_is_a_readable_error(weights):
    from imageprompt.demo.validation import check_edit

    with pytest.raises(gr.Error, match="too large"):
        check_edit("a red circle", None, "reweight", weights, "", 0.8, 0.4, 0.3)


@pytest.mark.parametrize("name, value", [("steps", "abc"), ("guidance", "nan"), ("guidance", "inf"),
                                         ("seed", "1e400"), ("width", None)])
def test_demo_numbers_that_are_not_numbers_are_readable_errors(name, value):
    from imageprompt.demo.validation import check_sampling

    values = dict(steps=2, guidance=2.0, width=32, height=32, negative_prompt="", seed=0)
    values[name] = value
    with pytest.raises(gr.Error, match=f"{name.title()} must be"):
        check_sampling(_demo_ctx(), **values)


def test_demo_sliders_refuse_text_readably():
    from imageprompt.demo.validation import readable_numbers

    with gr.Blocks() as blocks:
        steps = gr.Slider(1, 20, value=2, step=1, label="Steps")
        seed = gr.Number(value=0, precision=0, label="Seed")
    readable_numbers(blocks)
    with pytest.raises(gr.Error, match="Steps must be a number"):
        steps.preprocess("abc")
    with pytest.raises(gr.Error, match="Seed must be a finite number"):
        seed.preprocess(float("nan"))
    assert steps.preprocess("3") == 3 and seed.preprocess(7) == 7


def test_demo_refusals_log_one_line_and_no_traceback(caplog):
    from imageprompt.demo.validation import page_error, set_debug

    with caplog.at_level("WARNING"):
        error = page_error("Steps must be a number, got 'abc'")
    assert error.print_exception is False  # gradio prints no traceback
    lines = [r for r in caplog.records if "request refused" in r.getMessage()]
    assert len(lines) == 1 and lines[0].exc_info is None
    set_debug(True)
    try:
        assert page_error("again").print_exception is True
    finally:
        set_debug(False)


def test_cli_demo_passes_debug(monkeypatch):
    import imageprompt.demo.app as app_module

    calls = []
    monkeypatch.setattr(app_module, "launch", lambda **kwargs: calls.append(kwargs) or 0)
    assert main(["--debug", "demo", "--model", "m"]) == 0
    assert calls[0]["debug"] is True
