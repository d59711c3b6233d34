"""SD3 through the loader and the command line (``--model`` detects SD3 from ``model_index.json``), and SD-IPC's
image-to-prompt on SD3 (the CLIP parts by the closed form, the T5 part filled as chosen)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from test_sdxl_cli import run  # the SDXL command-line tests' runner

from imageprompt.images import read_parameters


@pytest.fixture(scope="module")
def sd3_pipe(tiny_sd3):
    from imageprompt.pipelines.loading import load_pipeline

    model, clip_l, clip_g = tiny_sd3
    pipe = load_pipeline(str(model), str(clip_l), device="cpu", dtype="fp32", clip_2=str(clip_g))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def model_args(tiny_sd3):
    model, clip_l, clip_g = tiny_sd3
    return ["--model", str(model), "--clip", str(clip_l), "--clip-2", str(clip_g), "--steps", "2",
            "--height", "32", "--width", "32"]


def test_loader_detects_sd3_and_builds_the_conversion(sd3_pipe, tiny_sd3):
    from imageprompt.pipelines import StableDiffusion3ImagePromptPipeline

    from imageprompt.conversion_sd3 import SD3Converter
    from imageprompt.families import is_sd3_model, is_sd3_pipeline

    assert is_sd3_model(str(tiny_sd3[0])) and not is_sd3_model(str(tiny_sd3[1]))
    assert isinstance(sd3_pipe, StableDiffusion3ImagePromptPipeline) and is_sd3_pipeline(sd3_pipe)
    assert isinstance(sd3_pipe.converter, SD3Converter)


def test_sdipc_conditioning_layout(sd3_pipe, red_path):
    image = Image.open(red_path)
    cond = sd3_pipe.image_conditioning([image], None, 0.5, torch.device("cpu"), "zeros", None, 16)
    embeds, pooled = cond["prompt_embeds"], cond["pooled_prompt_embeds"]
    assert embeds.shape == (1, 77 + 16, 96) and pooled.shape == (1, 24 + 40)
    h, converted_pooled = sd3_pipe.convert_images([image], torch.device("cpu"))
    torch.testing.assert_close(embeds[0, 1:77, :80], h[0].expand(76, -1))  # h at positions 1..76, both towers
    assert embeds[0, :77, 80:].abs().max() == 0 and embeds[0, 77:].abs().max() == 0  # padding; T5 zeros
    torch.testing.assert_close(pooled, converted_pooled)
    stats = sd3_pipe.converter.config.stats
    assert pooled[0, :24].norm().item() == pytest.approx(stats[0]["pooled_norm"], rel=1e-5)  # ViT-L's pooled half
    assert pooled[0, 24:].norm().item() == pytest.approx(stats[1]["pooled_norm"], rel=1e-5)  # bigG's
    empty = sd3_pipe.image_conditioning([image], None, 0.5, torch.device("cpu"), "empty", None, 16)
    text = sd3_pipe.encode_joint([""], torch.device("cpu"), 16)[1]
    torch.testing.assert_close(empty["prompt_embeds"][:, 77:], text)
    with pytest.raises(ValueError, match="caption"):
        sd3_pipe.image_conditioning([image], None, 0.5, torch.device("cpu"), "caption", None, 16)
    caption = sd3_pipe.image_conditioning([image], None, 0.5, torch.device("cpu"), "caption", "a red cat", 16)
    torch.testing.assert_close(caption["prompt_embeds"][:, 77:], sd3_pipe.encode_joint(["a red cat"], "cpu", 16)[1])


def test_vary_and_edit_on_sd3(model_args, red_path, tmp_path):
    out = tmp_path / "out"
    assert run(["vary", red_path, *model_args, "--seed", "3", "--out", out]) == 0
    image = out / "red-vary-3.png"
    params = read_parameters(image)
    assert Image.open(image).size == (32, 32)
    assert params["method"] == "sdipc-variation" and params["scheduler"] == "flow-match-euler"
    assert params["dtype"] == "float32"
    assert run(["edit", red_path, "--prompt", "a red cat", *model_args, "--seed", "3", "--out", out]) == 0
    assert (out / "red-edit-3.png").exists()


def test_p2p_on_sd3_from_text_and_from_a_photo(model_args, red_path, tmp_path):
    out = tmp_path / "p2p"
    assert run(["p2p", "--source", "a red cat", "--target", "a blue cat", *model_args, "--seed", "1", "--out", out,
                "--blend", "cat", "--save-attention", tmp_path / "maps.png"]) == 0
    assert (out / "p2p-source-1.png").exists() and (out / "p2p-edit-1.png").exists()
    assert (tmp_path / "maps.png").exists()
    assert run(["p2p", "--source", "a red cat", "--target", "a red dog", "--image", red_path, *model_args,
                "--guidance", "1", "--out", out]) == 0
    assert read_parameters(out / "red-edit.png")["invert"] == "flow"


def test_sd3_refusals(model_args, red_path, tmp_path, capsys):
    assert run(["p2p", "--source", "a red cat", "--target", "a red dog", "--image", red_path, "--invert", "ddim",
                *model_args, "--out", tmp_path]) != 0
    assert "--invert flow" in capsys.readouterr().err
    assert run(["p2p", "--source", "a red cat", "--target", "a red dog", "--mode", "masactrl", *model_args,
                "--out", tmp_path]) != 0
    assert "masactrl is not available on SD3" in capsys.readouterr().err
    assert run(["vary", red_path, "--adapter", "sdipc", *model_args, "--out", tmp_path]) != 0
    assert "on SD3 load the SD3.5 IP-Adapter in Python" in capsys.readouterr().err


def test_t5_fill_report_on_the_tiny_model(sd3_pipe):
    from imageprompt.bench.sd3_t5 import t5_fill_report

    image = Image.new("RGB", (40, 40), (20, 200, 90))
    report = t5_fill_report(sd3_pipe, image, prompts=("a red cat", "a blue square"), steps=2)
    assert set(report["text"]) == {"zeros", "empty"} and len(report["variation"]) == 3
    assert all(0 < v < 10 for part in report.values() for v in part.values())
    assert report["text"]["zeros"] != report["text"]["empty"]


def test_bench_sd3_rows(capsys):
    from imageprompt.cli.main import main

    assert main(["bench", "--sd3", "--tiny", "--steps", "2", "--device", "cpu", "--rows",
                 "sd3 plain diffusers, batch 1", "sd3 p2p replace + local blend"]) == 0
    table = capsys.readouterr().out
    assert "| sd3 p2p replace + local blend |" in table and "flow-match Euler 2 steps" in table
    assert main(["bench", "--sd3", "--device", "cpu", "--steps", "2"]) != 0
    assert "need a CUDA GPU" in capsys.readouterr().err


def test_batch_rows_on_sd3(model_args, red_path, tmp_path):
    import json

    jobs = tmp_path / "jobs.jsonl"
    rows = [{"kind": "vary", "image": str(red_path)},
            {"kind": "edit", "image": str(red_path), "prompt": "a red cat"},
            {"kind": "p2p", "prompt": "a red cat", "target": "a blue cat", "blend": ["cat"]},
            {"kind": "p2p", "prompt": "a red cat", "target": "a blue cat", "image": str(red_path)}]  # SD-IPC source
    jobs.write_text("\n".join(json.dumps({**r, "steps": 2, "height": 32, "width": 32}) for r in rows))
    assert run(["batch", jobs, *model_args[:6], "--out", tmp_path / "out"]) == 0
    results = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert [r.get("error") for r in results] == [None] * 4
    pictures = sorted((tmp_path / "out").glob("*.png"))
    assert len(pictures) == 4
    assert read_parameters(pictures[0])["scheduler"] == "FlowMatchEulerDiscreteScheduler"


def test_from_pipe_shares_modules_without_casting(tiny_sd3):
    from imageprompt.pipelines import StableDiffusion3PromptToPromptPipeline
    from imageprompt.pipelines.loading import load_pipeline, prompt_to_prompt_from

    model, clip_l, clip_g = tiny_sd3
    pipe = load_pipeline(str(model), str(clip_l), device="cpu", dtype="bf16", clip_2=str(clip_g))
    p2p = prompt_to_prompt_from(pipe)
    assert isinstance(p2p, StableDiffusion3PromptToPromptPipeline) and p2p.transformer is pipe.transformer
    assert pipe.transformer.dtype == torch.bfloat16 and p2p.converter is pipe.converter  # diffusers' would cast
    assert p2p.model_name == str(model) and p2p.scheduler_name == "flow-match-euler"


def test_saved_sd3_folder_needs_no_clip(sd3_pipe, red_path, tmp_path):
    from imageprompt.pipelines import StableDiffusion3ImagePromptPipeline
    from imageprompt.pipelines.loading import load_pipeline

    sd3_pipe.save_pretrained(tmp_path / "saved", safe_serialization=True)
    again = load_pipeline(str(tmp_path / "saved"), device="cpu", dtype="fp32")  # converter and encoders inside
    assert isinstance(again, StableDiffusion3ImagePromptPipeline)
    image = Image.open(red_path)
    args = dict(num_inference_steps=2, height=32, width=32, max_sequence_length=16, output_type="latent")
    first = sd3_pipe(image=image, generator=torch.Generator().manual_seed(0), **args).images
    second = again(image=image, generator=torch.Generator().manual_seed(0), **args).images
    torch.testing.assert_close(first, second, atol=1e-5, rtol=0)
