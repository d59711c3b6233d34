"""The p2p-replace and world IP-Adapter rows of the shapes-world table: cases, counts, values, files."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from imageprompt.checkpoints import BUNDLED_CLIP, BUNDLED_MODEL
from PIL import Image

from imageprompt import world
from imageprompt.world import evaluate, evaluate_edits
from imageprompt.world.evaluate import EvalSettings

BUNDLED = (BUNDLED_MODEL / "model_index.json").is_file() and (BUNDLED_CLIP / "config.json").is_file()
needs_bundled = pytest.mark.skipif(not BUNDLED, reason="the bundled shapes-world model is not in checkpoints/")


def check_rows(rows, measurement: str, metrics: list[str], n: int) -> None:
    assert [r.metric for r in rows] == metrics
    for row in rows:
        assert row.measurement == measurement
        assert row.n == n
        assert 0.0 <= row.value <= 1.0


P2P_METRICS = ["source has the named colour", "colour changed to the target", "object mask kept (IoU >= 0.7)",
               "mean mask IoU", "changed and mask kept"]
IPA_METRICS = ["keeps colour", "keeps shape", "keeps background", "keeps position", "keeps all three"]


def test_rows_are_in_the_suite():
    # a fresh interpreter: the suite is an explicit list, complete without importing anything else
    code = ("from imageprompt.world import evaluate\n"
            "try:\n    evaluate.run_suite(None, names=['?'])\nexcept ValueError as e:\n    print(e)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "p2p replace" in out and "IP-Adapter (world)" in out and "text-to-image" in out


def test_p2p_cases_swap_only_the_colour():
    cases = evaluate_edits.p2p_replace_cases(32)
    assert len(cases) == 32
    assert len({c[0] for c in cases}) == 15  # every (shape, colour) once per 15
    for source, target, old, new in cases:
        assert old != new
        (src,), _ = world.parse_caption(source)
        (tgt,), _ = world.parse_caption(target)
        assert (src.color, tgt.color) == (old, new)
        assert (src.shape, src.position) == (tgt.shape, tgt.position)
        assert len(source.split()) == len(target.split())  # replace needs equal word counts
    assert len({c[3] for c in cases[:15]}) > 1  # target colours vary


def test_write_adapter_data(tmp_path):
    from imageprompt.train_adapter import read_pairs

    evaluate_edits.write_adapter_data(tmp_path, 4, seed=1)
    pairs = read_pairs(tmp_path)
    assert [p.name for p, _ in pairs] == ["00000.png", "00001.png", "00002.png", "00003.png"]
    assert [c == "" for _, c in pairs] == [True, False, True, False]
    assert pairs[1][1] == world.sample_scene(1, 1).caption


def test_rows_on_the_tiny_model(tiny_pipe, tmp_path):
    from imageprompt.train_adapter import initial_state_dict, save_adapter

    settings = EvalSettings(samples=2, images_per_sample=1, steps=2)
    check_rows(evaluate_edits.p2p_replace(tiny_pipe, settings), "p2p replace", P2P_METRICS, 2)

    assert evaluate_edits.ip_adapter_world(tiny_pipe, EvalSettings(extra={"ip_adapter": str(tmp_path / "no")})) == []
    path = save_adapter(initial_state_dict(tiny_pipe.unet, tiny_pipe.sdipc_image_encoder.config.projection_dim),
                        tmp_path / "adapter.safetensors")
    settings.extra["ip_adapter"] = str(path)
    check_rows(evaluate_edits.ip_adapter_world(tiny_pipe, settings), "IP-Adapter (world)", IPA_METRICS, 2)
    assert tiny_pipe.image_adapters == []  # unloaded again: later measurements see the plain UNet


@pytest.fixture(scope="module")
def bundled_pipe():
    return evaluate.load_bundled("cpu")


@needs_bundled
def test_p2p_row_on_the_bundled_model(bundled_pipe):
    settings = EvalSettings(samples=2, images_per_sample=1, steps=6)
    rows = evaluate.run_suite(bundled_pipe, settings, names=["p2p replace"])
    check_rows(rows, "p2p replace", P2P_METRICS, 2)


@needs_bundled
@pytest.mark.skipif(not evaluate_edits.ADAPTER_FILE.is_file(), reason="no checkpoints/shapes-ip-adapter.safetensors")
def test_bundled_adapter_loads_and_measures(bundled_pipe):
    from safetensors import safe_open

    with safe_open(str(evaluate_edits.ADAPTER_FILE), "pt") as f:
        keys = set(f.keys())
    assert {"image_proj.proj.weight", "image_proj.norm.weight"} <= keys
    assert any(k.startswith("ip_adapter.") and k.endswith("to_k_ip.weight") for k in keys)
    assert evaluate_edits.ADAPTER_FILE.stat().st_size < 5_000_000

    bundled_pipe.load_ip_adapter(str(evaluate_edits.ADAPTER_FILE), image_encoder=bundled_pipe.sdipc_image_encoder)
    assert len(bundled_pipe.image_adapters) == 1
    bundled_pipe.unload_ip_adapter()
    rows = evaluate_edits.ip_adapter_world(bundled_pipe, EvalSettings(samples=2, images_per_sample=1, steps=6))
    check_rows(rows, "IP-Adapter (world)", IPA_METRICS, 2)


def test_real_image_edit_rows_cover_every_inversion(tiny_pipe):
    from imageprompt.inversion import METHODS

    rows = evaluate_edits.real_image_edits(tiny_pipe, EvalSettings(samples=1, images_per_sample=1, steps=2))
    assert {r.measurement for r in rows} == {f"real-image edit [{m}]" for m in METHODS}
    by = {(r.measurement, r.metric): r for r in rows}
    for method in METHODS:
        name = f"real-image edit [{method}]"
        assert 0 < by[name, "reconstruction PSNR"].value <= 60 and by[name, "reconstruction PSNR"].unit == "dB"
        assert 0 <= by[name, "background SSIM"].value <= 1 and by[name, "seconds per edit"].value > 0


def test_pie_bench_layout_runs_with_any_model(tiny_pipe, tmp_path, capsys):
    from imageprompt.inversion import METHODS
    from imageprompt.world.pie_bench import decode_mask, pie_bench

    mask = decode_mask([512 * 100 + 100, 50, 512 * 101 + 100, 50])  # two runs, plus the border
    assert mask.shape == (512, 512) and mask[100, 100:150].all() and mask[101, 120] and not mask[200, 200]
    assert mask[0].all() and mask[:, -1].all() and mask.sum() == 100 + 4 * 511
    (tmp_path / "annotation_images" / "0_random").mkdir(parents=True)
    Image.new("RGB", (60, 40), (200, 30, 30)).save(tmp_path / "annotation_images" / "0_random" / "0.jpg")
    (tmp_path / "mapping_file.json").write_text(json.dumps({"000": {
        "image_path": "0_random/0.jpg", "original_prompt": "a [red] circle", "editing_prompt": "a [blue] circle",
        "editing_instruction": "make it blue", "editing_type_id": "0", "blended_word": "red blue",
        "mask": [512 * 200, 512 * 100]}}))
    rows = pie_bench(tiny_pipe, tmp_path, EvalSettings(steps=2))
    assert {r.measurement for r in rows} == {f"PIE-Bench [{m}]" for m in METHODS}
    assert all(r.n == 1 for r in rows) and not any(r.metric == "edit success" for r in rows)

    from imageprompt.cli.main import main

    assert main(["eval", "--suite", "pie-bench", "--model", str(tiny_pipe.model_name)]) == 1
    assert "--data" in capsys.readouterr().err


@needs_bundled
def test_cross_attention_row_reads_the_16x16_maps():
    """The cross-attention row (issue 24): one-object captions, the shape and colour words' 16x16 maps."""
    from imageprompt.world.evaluate import load_bundled

    rows = evaluate.run_suite(load_bundled("cpu"), EvalSettings(samples=2, images_per_sample=1, steps=3),
                              names=["cross-attention"])
    check_rows(rows, "cross-attention", ["shape word's 16x16 map peaks inside the object",
                                         "shape word's 16x16 map peaks on the object (any overlap)",
                                         "colour word's 16x16 map peaks inside the object"], 2)
    assert rows[0].aim == 0.9 and rows[1].value >= rows[0].value
