"""MasaCtrl (Cao et al., ICCV 2023) against a textbook reference written out here.

The reference forms every attention matrix ``softmax(Q K^T / sqrt(d)) V`` in full,
per head, with the target rows' keys and values taken from their half's source row
(Sec. 3.2) and, for the mask variant, the source's foreground / background keys
masked with ``-inf`` and the two results mixed by the target's mask (Sec. 3.3).
It imports nothing of :mod:`imageprompt.masactrl` but the controller under test.
fp32, atol 1e-4.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import Attention
from imageprompt.pipelines import StableDiffusionMasaCtrlPipeline

from imageprompt.attention import ImagePromptAttnProcessor, Layer
from imageprompt.masactrl import (
    MutualSelfAttentionController,
    default_start_layer,
    mutual_self_attention,
    self_attention_layers,
    validate_masactrl,
)

SOURCE, TARGET = "a red circle", "a red square"
SAMPLE = dict(num_inference_steps=2, guidance_scale=7.5, height=32, width=32, output_type="np")
HEADS, DIM_HEAD, WIDTH, TOKENS = 2, 8, 16, 16
LAYER = "up_blocks.1.attentions.0.transformer_blocks.0.attn1.processor"


# ------------------------------------------------------------------ textbook
def heads(x, w):
    """(rows, tokens, width) @ w^T -> (rows, heads, tokens, dim_head)."""
    y = x @ w.T
    return y.reshape(x.shape[0], x.shape[1], HEADS, DIM_HEAD).permute(0, 2, 1, 3)


def full_attention(q, k, v, key_mask=None):
    """softmax(q k^T / sqrt(d)) v with every probability written out; ``key_mask`` (keys,) bool keeps keys."""
    scores = q @ k.transpose(-1, -2) / np.sqrt(q.shape[-1])
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask, float("-inf"))
    return scores.softmax(-1) @ v


def textbook_mutual(attn, x, prompts, active, fg_keys=None, fg_queries=None):
    q, k, v = heads(x, attn.to_q.weight), heads(x, attn.to_k.weight), heads(x, attn.to_v.weight)
    out = []
    for row in range(x.shape[0]):
        src = row - row % prompts
        if not active or row == src:
            out.append(full_attention(q[row], k[row], v[row]))
        elif fg_keys is None:
            out.append(full_attention(q[row], k[src], v[src]))
        else:
            fg = full_attention(q[row], k[src], v[src], fg_keys)
            bg = full_attention(q[row], k[src], v[src], ~fg_keys)
            m = fg_queries[row % prompts - 1][None, :, None]
            out.append(fg * m + bg * (1 - m))
    out = torch.stack(out).permute(0, 2, 1, 3).reshape(x.shape[0], x.shape[1], WIDTH)
    return attn.to_out[0](out)


@pytest.fixture
def attention():
    torch.manual_seed(0)
    attn = Attention(query_dim=WIDTH, heads=HEADS, dim_head=DIM_HEAD)
    attn.set_processor(ImagePromptAttnProcessor(LAYER, layer=Layer(LAYER, False, "up", 1, 5)))  # runs sixth
    return attn


def controller(tokenizer, targets=TARGET, **kwargs):
    c = MutualSelfAttentionController(tokenizer, SOURCE, targets, **kwargs)
    c.setup(10, (4, 4))
    return c


# -------------------------------------------------------------- processor level
@pytest.mark.parametrize("targets", [TARGET, [TARGET, "a blue square"]])
@pytest.mark.parametrize("halves", [1, 2])
def test_mutual_self_attention_matches_the_textbook(attention, p2p_pipe, targets, halves):
    prompts = 2 if isinstance(targets, str) else 3
    x = torch.randn(prompts * halves, TOKENS, WIDTH)
    c = controller(p2p_pipe.tokenizer, targets, start_step=2, start_layer=5)
    attention.processor.editors = (c,)
    for step, active in ((0, False), (2, True), (7, True)):
        c.set_step(step)
        with torch.no_grad():
            got = attention(x)
            want = textbook_mutual(attention, x, prompts, active)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_layers_before_the_start_layer_are_plain(attention, p2p_pipe):
    x = torch.randn(4, TOKENS, WIDTH)
    c = controller(p2p_pipe.tokenizer, start_step=0, start_layer=6)
    c.set_step(3)
    attention.processor.editors = (c,)
    with torch.no_grad():
        torch.testing.assert_close(attention(x), textbook_mutual(attention, x, 2, False), atol=1e-4, rtol=0)


def test_masked_mutual_attention_matches_the_textbook():
    torch.manual_seed(1)
    prompts, halves = 3, 2
    q, k, v = (torch.randn(prompts * halves, HEADS, TOKENS, DIM_HEAD) for _ in range(3))
    fg_keys = torch.zeros(TOKENS, dtype=torch.bool)
    fg_keys[[1, 2, 5, 6]] = True
    fg_queries = (torch.rand(prompts - 1, TOKENS) > 0.5).float()
    got = mutual_self_attention(q, k, v, prompts, fg_keys, fg_queries)
    for row in range(prompts * halves):
        src = row - row % prompts
        if row == src:
            want = full_attention(q[row], k[row], v[row])
        else:
            m = fg_queries[row % prompts - 1][None, :, None]
            want = (full_attention(q[row], k[src], v[src], fg_keys) * m
                    + full_attention(q[row], k[src], v[src], ~fg_keys) * (1 - m))
        torch.testing.assert_close(got[row], want, atol=1e-4, rtol=0)


def test_an_empty_foreground_falls_back_to_all_source_keys():
    q, k, v = (torch.randn(2, HEADS, TOKENS, DIM_HEAD) for _ in range(3))
    none = torch.zeros(TOKENS, dtype=torch.bool)
    got = mutual_self_attention(q, k, v, 2, none, torch.ones(1, TOKENS))
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got[1], full_attention(q[1], k[0], v[0]), atol=1e-4, rtol=0)


# ------------------------------------------------------------------- layers and checks
def test_layers_are_counted_as_they_run(p2p_pipe):
    names = self_attention_layers(p2p_pipe.unet)
    assert [n.split(".")[0] for n in names] == ["down_blocks", "mid_block", "up_blocks", "up_blocks"]
    assert default_start_layer(p2p_pipe.unet) == 2  # the tiny UNet's decoder has one attention level
    from diffusers import UNet2DConditionModel

    from imageprompt.testing import SD15_UNET

    sd15 = UNet2DConditionModel(**{**SD15_UNET, "block_out_channels": (32, 32, 32, 32), "cross_attention_dim": 32,
                                   "norm_num_groups": 8})  # SD 1.5's layout, narrow
    order = self_attention_layers(sd15)
    assert len(order) == 16 and order[:6] == [f"down_blocks.{b}.attentions.{a}.transformer_blocks.0.attn1.processor"
                                              for b in range(3) for a in range(2)]
    assert order[6] == "mid_block.attentions.0.transformer_blocks.0.attn1.processor"
    assert order.index("up_blocks.2.attentions.0.transformer_blocks.0.attn1.processor") == 10  # the paper's L
    assert default_start_layer(sd15) == 10


@pytest.mark.parametrize("kwargs, message", [
    (dict(targets=None), "needs a target"),
    (dict(start_step=-1), "start_step"),
    (dict(start_layer=1.5), "start_layer"),
    (dict(mask_words=["dog"]), "mask words"),
    (dict(mask_threshold=2.0), "mask_threshold"),
])
def test_bad_edits_are_clear_errors(kwargs, message):
    args = dict(targets=TARGET, start_step=4, start_layer=None)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        validate_masactrl(SOURCE, **args)


# ------------------------------------------------------------------- pipeline level
@pytest.fixture(scope="module")
def masa_pipe(tiny_pipe):
    """MasaCtrl's own pipeline over the tiny model's modules."""
    pipe = StableDiffusionMasaCtrlPipeline.from_pipe(tiny_pipe)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def noise(pipe, seed=0):
    side = SAMPLE["height"] // pipe.vae_scale_factor
    return torch.randn(1, pipe.unet.config.in_channels, side, side, generator=torch.Generator().manual_seed(seed))


def test_pipeline_keeps_the_source_and_edits_the_target(masa_pipe, tiny_pipe):
    latents = noise(masa_pipe)
    plain = tiny_pipe(prompt=[SOURCE, TARGET], latents=latents.expand(2, -1, -1, -1), **SAMPLE).images
    off = masa_pipe(SOURCE, TARGET, start_step=2, start_layer=0, latents=latents, **SAMPLE).images
    on = masa_pipe(SOURCE, TARGET, start_step=0, start_layer=0, latents=latents, **SAMPLE).images
    np.testing.assert_allclose(off, plain, atol=1e-5)  # no step in the window: plain sampling of both
    np.testing.assert_allclose(on[0], plain[0], atol=1e-5)  # the source is never changed
    assert np.abs(on[1] - plain[1]).max() > 1e-3
    masked = masa_pipe(SOURCE, TARGET, start_step=0, start_layer=0, mask_words=["circle", "square"],
                      latents=latents, **SAMPLE).images
    np.testing.assert_allclose(masked[0], plain[0], atol=1e-5)
    assert np.isfinite(masked).all() and np.abs(masked[1] - on[1]).max() > 1e-4
    assert all(p.editors == () for p in masa_pipe.unet.attn_processors.values())  # detached after the call


def test_a_start_layer_past_the_last_layer_is_refused(masa_pipe):
    with pytest.raises(ValueError, match="4 self-attention layers"):
        masa_pipe(SOURCE, TARGET, start_layer=4, latents=noise(masa_pipe), **SAMPLE)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_half_precision_pipeline_runs(tiny_model, dtype):
    from imageprompt.pipelines.loading import load_pipeline

    half = StableDiffusionMasaCtrlPipeline.from_pipe(
        load_pipeline(str(tiny_model[0]), str(tiny_model[1]), device="cpu", dtype=dtype))
    half.set_progress_bar_config(disable=True)
    out = half(SOURCE, TARGET, start_step=0, mask_words=["circle", "square"],
               latents=noise(half).to(half.unet.dtype), **SAMPLE).images
    assert out.shape == (2, 32, 32, 3) and np.isfinite(out).all()


# ------------------------------------------------------------------- composition
def test_masactrl_on_a_direct_inversion_keeps_the_photo(masa_pipe, noise_image):
    inversion = masa_pipe.invert(noise_image, SOURCE, "direct", num_inference_steps=2)
    edit = masa_pipe(SOURCE, TARGET, start_step=0, start_layer=0, inversion=inversion,
                    **SAMPLE).images
    recon = masa_pipe(SOURCE, TARGET, start_step=2, inversion=inversion, **SAMPLE).images
    np.testing.assert_allclose(edit[0], recon[0], atol=1e-5)  # direct inversion pins the source
    assert np.abs(edit[1] - recon[1]).max() > 1e-3


def test_masactrl_with_an_ip_adapter(masa_pipe):
    from test_ip_adapter import TINY_ENCODER, two_images
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from imageprompt.testing import ip_adapter_state_dict

    torch.manual_seed(1)
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY_ENCODER)).eval()
    latents = noise(masa_pipe)
    plain = masa_pipe(SOURCE, TARGET, start_step=0, latents=latents, **SAMPLE).images
    masa_pipe.load_ip_adapter(ip_adapter_state_dict(masa_pipe.unet, "sd15", encoder.config), image_encoder=encoder)
    try:
        image, _ = two_images()
        with_image = masa_pipe(SOURCE, TARGET, start_step=0, latents=latents,
                              ip_adapter_image=image, **SAMPLE).images
        assert np.abs(with_image - plain).max() > 1e-3  # the image branch acts with mutual self-attention
        masa_pipe.set_ip_adapter_scale(0.0)
        zero = masa_pipe(SOURCE, TARGET, start_step=0, latents=latents, ip_adapter_image=image,
                        **SAMPLE).images
        np.testing.assert_allclose(zero, plain, atol=1e-5)
    finally:
        masa_pipe.unload_ip_adapter()


# ------------------------------------------------------------------- command line
def test_cli_masactrl_end_to_end(tiny_model, tmp_path, capsys):
    from imageprompt.cli.main import main
    from imageprompt.images import read_parameters

    model = ["--model", str(tiny_model[0]), "--clip", str(tiny_model[1]), "--steps", "2", "--seed", "3"]
    code = main(["p2p", "--source", SOURCE, "--target", TARGET, "--mode", "masactrl", "--start-step", "0",
                 "--start-layer", "2", "--mask", "circle", "square", "--out", str(tmp_path), *model])
    out = capsys.readouterr().out.split()
    assert code == 0 and len(out) == 2
    meta = read_parameters(out[1])
    got = (meta["mode"], meta["start_step"], meta["start_layer"], meta["mask"])
    assert got == ("masactrl", 0, 2, ["circle", "square"])
    code = main(["p2p", "--source", SOURCE, "--target", TARGET, "--mode", "masactrl", "--blend", "circle",
                 "--out", str(tmp_path / "x"), *model])
    assert code == 1 and "prompt-to-prompt options" in capsys.readouterr().err
    code = main(["p2p", "--source", SOURCE, "--target", TARGET, "--mask", "circle", "--out", str(tmp_path / "x"),
                 *model])
    assert code == 1 and "--mode masactrl" in capsys.readouterr().err


def test_cli_masactrl_on_an_inverted_photo(tiny_model, tmp_path, noise_image, capsys):
    from imageprompt.cli.main import main

    photo = tmp_path / "photo.png"
    noise_image.save(photo)
    code = main(["p2p", "--image", str(photo), "--invert", "direct", "--source", SOURCE, "--target", TARGET,
                 "--mode", "masactrl", "--start-step", "1", "--scheduler", "ddim", "--out", str(tmp_path / "o"),
                 "--model", str(tiny_model[0]), "--clip", str(tiny_model[1]), "--steps", "2"])
    assert code == 0 and len(capsys.readouterr().out.split()) == 2


def test_the_same_prompt_as_target_reproduces_the_source(masa_pipe):
    # Q_tgt == Q_src when the prompts match, so Attn(Q_tgt, K_src, V_src) is the source's own attention
    out = masa_pipe(SOURCE, SOURCE, start_step=0, start_layer=0, latents=noise(masa_pipe),
                   **SAMPLE).images
    np.testing.assert_allclose(out[1], out[0], atol=1e-5)


# ------------------------------------------------------------------- batch rows
def test_batch_rows_of_masactrl(tmp_path, tiny_pipe):
    import json

    from imageprompt.jobs import JobDefaults, JobOptions, run_job, validate_rows

    rows = [{"kind": "p2p", "mode": "masactrl", "prompt": SOURCE, "target": TARGET, "start_step": 0,
             "mask": ["circle", "square"]},
            {"kind": "p2p", "mode": "masactrl", "prompt": SOURCE, "target": TARGET, "blend": ["circle"]},
            {"kind": "p2p", "prompt": SOURCE, "target": "a blue circle", "start_layer": 2}]
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    checked = validate_rows([(i + 1, r) for i, r in enumerate(rows)], JobDefaults(), tmp_path)
    assert checked[0].error is None and "not 'masactrl''s" in checked[1].error
    assert "belong to mode 'masactrl'" in checked[2].error
    report = run_job(jobs, tmp_path / "out", pipe=tiny_pipe, defaults=JobDefaults(steps=2, height=32, width=32),
                     options=JobOptions(progress=False))
    assert (report.done, report.images) == (1, 1)


def test_masactrl_on_sdxl(sdxl_pipe):
    from imageprompt.pipelines.loading import edit_pipeline_from

    p2p = edit_pipeline_from(sdxl_pipe, "masactrl")
    assert type(p2p).__name__ == "StableDiffusionXLMasaCtrlPipeline"
    p2p.set_progress_bar_config(disable=True)
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    kw = dict(num_inference_steps=2, output_type="np", latents=latents)
    off = p2p("a red cat", "a red dog", start_step=2, **kw).images
    on = p2p("a red cat", "a red dog", start_step=0, mask_words=["cat", "dog"], **kw).images
    np.testing.assert_allclose(on[0], off[0], atol=1e-5)  # the source is never changed
    assert np.isfinite(on).all() and np.abs(on[1] - off[1]).max() > 1e-4


def test_masactrl_is_not_a_prompt_to_prompt_mode(p2p_pipe):
    with pytest.raises(ValueError, match="StableDiffusionMasaCtrlPipeline"):
        p2p_pipe(SOURCE, TARGET, mode="masactrl", latents=noise(p2p_pipe), **SAMPLE)
