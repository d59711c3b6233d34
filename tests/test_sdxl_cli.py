"""SDXL through the front ends: ``imageprompt vary|edit|p2p|batch`` and the demo, on tiny SDXL folders,
and prompt-to-prompt on SDXL (both tokenizers, pooled embeddings, inversions)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from imageprompt.images import read_parameters


@pytest.fixture(scope="module")
def xl_p2p(sdxl_pipe):
    from imageprompt.pipelines.loading import prompt_to_prompt_from

    pipe = prompt_to_prompt_from(sdxl_pipe)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def model_args(tiny_sdxl):
    model, clip_l, clip_g = tiny_sdxl
    return ["--model", str(model), "--clip", str(clip_l), "--clip-2", str(clip_g), "--steps", "2"]


def run(args) -> int:
    from imageprompt.cli.main import main

    return main([str(a) for a in args])


# -------------------------------------------------------------- p2p on SDXL
def test_p2p_on_sdxl_carries_pooled_and_time_ids_and_edits(xl_p2p):
    from imageprompt.pipelines import StableDiffusionXLPromptToPromptPipeline

    assert isinstance(xl_p2p, StableDiffusionXLPromptToPromptPipeline)
    seen = []
    hook = xl_p2p.unet.register_forward_pre_hook(
        lambda m, a, k: seen.append({n: t.clone() for n, t in k["added_cond_kwargs"].items()}), with_kwargs=True)
    try:
        out = xl_p2p("a red cat", "a blue cat", num_inference_steps=2, guidance_scale=5.0,
                     generator=torch.Generator().manual_seed(0), blend_words=["cat"], output_type="np")
    finally:
        hook.remove()
    assert out.images.shape == (2, 32, 32, 3) and out.attention_maps.shape == (2, 8, 8, 77)
    assert out.tokens == [["a", "red", "cat"], ["a", "blue", "cat"]]
    added = seen[0]
    _, pooled, _ = xl_p2p.encode_text_pooled(["a red cat", "a blue cat"], torch.device("cpu"))
    _, empty, _ = xl_p2p.encode_text_pooled(["", ""], torch.device("cpu"))
    torch.testing.assert_close(added["text_embeds"], torch.cat([empty, pooled]))  # [uncond rows, prompt rows]
    assert added["time_ids"].tolist() == [[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]] * 4
    assert not np.allclose(out.images[0], out.images[1])


def test_p2p_on_sdxl_refuses_prompts_the_tokenizers_split_differently(xl_p2p, monkeypatch):
    original = xl_p2p.tokenizer_2.encode

    def split_cat(text, **kwargs):  # a second tokenizer that cuts "cat" in two
        ids = original(text, **kwargs)
        return ids + ids if text == "cat" else ids

    monkeypatch.setattr(xl_p2p.tokenizer_2, "encode", split_cat)
    with pytest.raises(ValueError, match="two tokenizers split 'cat'"):
        xl_p2p("a red cat", "a blue cat", num_inference_steps=2)


@pytest.mark.parametrize("method", ["null-text", "negative-prompt", "ddim", "direct"])
def test_inversions_on_sdxl(xl_p2p, method):
    photo = Image.fromarray(np.random.default_rng(1).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    inversion = xl_p2p.invert(photo, "a red cat", method=method, num_inference_steps=2, num_inner_steps=2,
                              guidance_scale=5.0)
    assert inversion.latents.shape == (1, 4, 16, 16)
    out = xl_p2p("a red cat", "a blue cat", inversion=inversion, num_inference_steps=2, guidance_scale=5.0,
                 output_type="np")
    assert out.images.shape == (2, 32, 32, 3) and np.isfinite(out.images).all()
    with pytest.raises(ValueError, match="not available on SDXL"):
        xl_p2p.invert(photo, "a red cat", method="dpl", num_inference_steps=2)


def test_sdxl_inversion_feeds_each_branch_its_pooled_embedding(xl_p2p):
    """Null-text inversion on SDXL: conditional calls get the prompt's pooled embedding, the optimised null
    states the empty prompt's; direct inversion then puts the source row back on the photo exactly."""
    photo = Image.fromarray(np.random.default_rng(2).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    cpu = torch.device("cpu")
    cond, pooled, _ = xl_p2p.encode_text_pooled(["a red cat"], cpu)
    _, empty, _ = xl_p2p.encode_text_pooled([""], cpu)
    calls = []

    def record(module, args, kwargs, output):  # after the pre-hooks: what the UNet really got
        own = torch.equal(kwargs["encoder_hidden_states"], cond.to(kwargs["encoder_hidden_states"]))
        calls.append((own, kwargs["added_cond_kwargs"]["text_embeds"].detach().clone()))

    hook = xl_p2p.unet.register_forward_hook(record, with_kwargs=True)
    try:
        xl_p2p.invert(photo, "a red cat", method="null-text", num_inference_steps=2, num_inner_steps=2,
                      guidance_scale=5.0)
    finally:
        hook.remove()
    assert {own for own, _ in calls} == {True, False}
    for own, text_embeds in calls:
        torch.testing.assert_close(text_embeds, pooled if own else empty)
    inversion = xl_p2p.invert(photo, "a red cat", method="direct", num_inference_steps=3, guidance_scale=5.0)
    out = xl_p2p("a red cat", "a blue cat", inversion=inversion, num_inference_steps=3, guidance_scale=5.0,
                 output_type="latent")
    assert (out.images[:1] - inversion.trajectory[0]).abs().max().item() < 1e-4


# ------------------------------------------------------------ command line
def test_cli_vary_edit_p2p_on_sdxl(tmp_path, red_path, model_args):
    assert run(["vary", red_path, "--out", tmp_path / "v", *model_args]) == 0
    assert run(["edit", red_path, "--prompt", "a red cat", "--out", tmp_path / "e", *model_args]) == 0
    assert run(["p2p", "--source", "a red cat", "--target", "a blue cat", "--out", tmp_path / "p", *model_args]) == 0
    for folder, count in (("v", 1), ("e", 1), ("p", 2)):
        pngs = sorted((tmp_path / folder).glob("*.png"))
        assert len(pngs) == count, folder
        with Image.open(pngs[0]) as image:
            assert image.size == (32, 32)  # the tiny SDXL's own size
    assert read_parameters(sorted((tmp_path / "e").glob("*.png"))[0])["prompt"] == "a red cat"
    clip_2 = model_args[model_args.index("--clip-2") + 1]
    for folder in ("v", "p"):  # the second CLIP is recorded, also by the pipelines made with from_pipe
        assert read_parameters(sorted((tmp_path / folder).glob("*.png"))[0])["clip_2"] == clip_2


def test_cli_batch_on_sdxl(tmp_path, red_path, model_args):
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("\n".join(json.dumps(row) for row in [
        {"kind": "vary", "image": "red.png"},
        {"kind": "edit", "image": "red.png", "prompt": "a cat"},
        {"kind": "p2p", "prompt": "a red cat", "target": "a blue cat", "blend": ["cat"]},
        {"kind": "p2p", "prompt": "a red cat", "target": "a blue cat", "image": "red.png", "invert": "negative-prompt"},
    ]) + "\n")
    assert run(["batch", jobs, "--out", tmp_path / "out", "--no-progress", *model_args]) == 0
    records = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert [r["status"] for r in records] == ["done"] * 4, records


def test_demo_on_sdxl(sdxl_pipe, tmp_path):
    pytest.importorskip("gradio")
    from gradio_client import Client, handle_file
    from imageprompt.demo.app import build_demo, serve

    Image.new("RGB", (40, 40), (220, 30, 30)).save(tmp_path / "red.png")
    demo = build_demo(sdxl_pipe, scheduler="ddim", output_dir=tmp_path / "out", max_steps=4, default_steps=2)
    serve(demo, port=None, block=False, quiet=True)
    try:
        client = Client(demo.local_url, verbose=False)
        sample = dict(steps=2, guidance=2.0, width=32, height=32, negative_prompt="")
        gallery, _ = client.predict(handle_file(tmp_path / "red.png"), num_images=1, seed=1, **sample,
                                    api_name="/variation")
        assert len(gallery) == 1
        gallery, maps, _ = client.predict(source="a red cat", target="a blue cat", mode="replace", blend="cat",
                                          weights="", cross_steps=0.8, self_steps=0.4, blend_threshold=0.3,
                                          seed=3, **sample, api_name="/p2p")
        assert [item["caption"] for item in gallery] == ["source", "edit"] and maps is not None
    finally:
        demo.close()


def test_sdxl_bench_rows_smoke(capsys):
    from imageprompt.cli.main import main

    rows = ["sdxl plain diffusers, batch 1", "sdxl ip-adapter-plus_sdxl_vit-h (imageprompt), batch 1"]
    assert main(["bench", "--sdxl", "--tiny", "--device", "cpu", "--steps", "2", "--rows", *rows]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("tiny random SDXL components, float32, 32x32, DDIM 2 steps, CFG 5.0")
    for name in rows:
        assert any(line.startswith(f"| {name} | ") for line in table), name
    assert main(["bench", "--sdxl", "--tiny", "--list"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert "sdxl null-text inversion, 10 inner steps" not in listed and len(listed) == 10


def test_sd1_only_commands_say_so_on_sdxl(tmp_path, red_path, model_args, capsys):
    assert run(["vary", red_path, "--online-steps", "2", "--out", tmp_path / "t", *model_args]) == 1
    assert "not available on SDXL" in capsys.readouterr().err
    assert run(["style-aligned", "--prompts", "a red cat", "a blue cat", "--out", tmp_path / "s", *model_args]) == 1
    assert "not available on SDXL" in capsys.readouterr().err
