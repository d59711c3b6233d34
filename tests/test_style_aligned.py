"""StyleAligned (Hertz et al., CVPR 2024) against a textbook reference written out here.

The reference writes AdaIN out (mean and unbiased variance over the tokens, per head
and channel, eps 1e-5 inside the square root, as the authors' ``calc_mean_std``),
concatenates the reference's keys (scaled for the other rows) and values after each
row's own, and forms every attention matrix ``softmax(Q K^T / sqrt(d)) V`` in full.
It imports nothing of :mod:`imageprompt.style_aligned` but the controller under test.
fp32, atol 1e-4.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import Attention
from imageprompt.pipelines import StableDiffusionStyleAlignedPipeline
from PIL import Image

from imageprompt.attention import ImagePromptAttnProcessor, Layer
from imageprompt.style_aligned import StyleAlignedController

PROMPTS = ["a red circle", "a blue square", "a green triangle"]
SAMPLE = dict(num_inference_steps=2, guidance_scale=7.5, height=32, width=32, output_type="np")
HEADS, DIM_HEAD, WIDTH, TOKENS = 2, 8, 16, 12


# ------------------------------------------------------------------ textbook
def split_heads(x, w):
    y = x @ w.T
    return y.reshape(x.shape[0], x.shape[1], HEADS, DIM_HEAD).permute(0, 2, 1, 3)


def textbook_adain(x, ref):
    """x, ref: (heads, tokens, dim). Normalise x per (head, channel) over tokens, then take ref's statistics."""
    def stats(t):
        mean = t.sum(1, keepdim=True) / t.shape[1]
        var = ((t - mean) ** 2).sum(1, keepdim=True) / (t.shape[1] - 1)
        return mean, torch.sqrt(var + 1e-5)

    mx, sx = stats(x)
    mr, sr = stats(ref)
    return (x - mx) / sx * sr + mr


def textbook_shared(attn, x, prompts, keys_scale=1.0, adain_values=False, shift=0.0):
    q, k, v = (split_heads(x, w) for w in (attn.to_q.weight, attn.to_k.weight, attn.to_v.weight))
    out = []
    for row in range(x.shape[0]):
        ref = row - row % prompts
        qa = textbook_adain(q[row], q[ref])
        ka, kr = textbook_adain(k[row], k[ref]), k[ref]  # AdaIN of the reference to itself: itself (to 1e-6)
        va, vr = (textbook_adain(v[row], v[ref]), v[ref]) if adain_values else (v[row], v[ref])
        scale = 1.0 if row == ref else keys_scale
        keys = torch.cat([ka, scale * kr], dim=1)
        values = torch.cat([va, vr], dim=1)
        scores = qa @ keys.transpose(-1, -2) / np.sqrt(DIM_HEAD)
        scores[:, :, TOKENS:] += shift  # the authors' shared_score_shift, on every row's reference keys
        probs = scores.softmax(-1)
        out.append(probs @ values)
    out = torch.stack(out).permute(0, 2, 1, 3).reshape(x.shape[0], x.shape[1], WIDTH)
    return attn.to_out[0](out)


@pytest.fixture
def attention():
    torch.manual_seed(0)
    attn = Attention(query_dim=WIDTH, heads=HEADS, dim_head=DIM_HEAD)
    name = "up_blocks.1.attentions.0.transformer_blocks.0.attn1.processor"
    attn.set_processor(ImagePromptAttnProcessor(name, layer=Layer(name, False, "up", 1, 0)))
    return attn


@pytest.mark.parametrize("halves", [1, 2])
@pytest.mark.parametrize("keys_scale, adain_values, shift", [(1.0, False, 0.0), (1.7, False, 0.0), (1.0, True, 0.0),
                                                              (1.0, False, float(np.log(2))), (0.8, False, -1.0)])
def test_shared_attention_matches_the_textbook(attention, halves, keys_scale, adain_values, shift):
    prompts = 3
    x = torch.randn(prompts * halves, TOKENS, WIDTH) * 2 + 0.5
    attention.processor.editors = (StyleAlignedController(prompts, keys_scale=keys_scale, adain_values=adain_values,
                                                          score_shift=shift),)
    with torch.no_grad():
        got = attention(x)
        want = textbook_shared(attention, x, prompts, keys_scale, adain_values, shift)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_the_reference_row_is_plain_attention(attention):
    x = torch.randn(6, TOKENS, WIDTH)
    with torch.no_grad():
        plain = attention(x)
        attention.processor.editors = (StyleAlignedController(3),)
        shared = attention(x)
    torch.testing.assert_close(shared[[0, 3]], plain[[0, 3]], atol=1e-4, rtol=0)
    assert (shared[[1, 2, 4, 5]] - plain[[1, 2, 4, 5]]).abs().max() > 1e-3


@pytest.mark.parametrize("kwargs, message", [(dict(num_prompts=1), "at least one more"),
                                             (dict(num_prompts=3, keys_scale=0), "keys_scale"),
                                             (dict(num_prompts=3, score_shift=float("nan")), "score_shift")])
def test_bad_settings_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        StyleAlignedController(**kwargs)


# ------------------------------------------------------------------- pipeline level
@pytest.fixture(scope="module")
def sa_pipe(tiny_pipe):
    pipe = StableDiffusionStyleAlignedPipeline.from_pipe(tiny_pipe)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def noise(pipe, rows, seed=0):
    side = SAMPLE["height"] // pipe.vae_scale_factor
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, pipe.unet.config.in_channels, side, side, generator=gen)


def test_pipeline_keeps_the_reference_and_aligns_the_others(sa_pipe, tiny_pipe):
    latents = noise(sa_pipe, 3)
    plain = tiny_pipe(prompt=PROMPTS, latents=latents, **SAMPLE).images
    shared = sa_pipe(PROMPTS, latents=latents, **SAMPLE).images
    assert shared.shape == (3, 32, 32, 3)
    np.testing.assert_allclose(shared[0], plain[0], atol=1e-4)  # the reference samples as it would alone
    assert np.abs(shared[1:] - plain[1:]).max() > 1e-3
    norm = sa_pipe(PROMPTS, latents=latents, share_group_norm=True, **SAMPLE).images
    np.testing.assert_allclose(norm[0], plain[0], atol=1e-4)
    assert np.abs(norm[1:] - shared[1:]).max() > 1e-4
    assert all(p.editors == () for p in sa_pipe.unet.attn_processors.values())
    assert not any(m._forward_hooks for m in sa_pipe.unet.modules() if isinstance(m, torch.nn.GroupNorm))


@pytest.mark.parametrize("kwargs, error", [
    (dict(prompt=["only one"]), ValueError),
    (dict(prompt="a red circle"), TypeError),
    (dict(prompt=PROMPTS, keys_scale=-1.0), ValueError),
])
def test_pipeline_bad_inputs(sa_pipe, kwargs, error):
    with pytest.raises(error):
        sa_pipe(**kwargs, **SAMPLE)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_half_precision_pipeline_runs(tiny_model, dtype):
    from imageprompt.pipelines.loading import load_pipeline

    half = StableDiffusionStyleAlignedPipeline.from_pipe(
        load_pipeline(str(tiny_model[0]), str(tiny_model[1]), device="cpu", dtype=dtype))
    half.set_progress_bar_config(disable=True)
    out = half(PROMPTS, latents=noise(half, 3).to(half.unet.dtype), **SAMPLE).images
    assert out.shape == (3, 32, 32, 3) and np.isfinite(out).all()


# ------------------------------------------------------------------- composition
def test_an_sdipc_variation_as_the_reference(sa_pipe, tiny_pipe, red_image):
    latents = noise(sa_pipe, 3)
    shared = sa_pipe(["", *PROMPTS[1:]], image=red_image, latents=latents, **SAMPLE).images
    variation = tiny_pipe(image=red_image, latents=latents[:1], **SAMPLE).images
    np.testing.assert_allclose(shared[0], variation[0], atol=1e-4)  # row 0 is the SD-IPC variation
    text_only = sa_pipe(PROMPTS, latents=latents, **SAMPLE).images
    assert np.abs(shared[1:] - text_only[1:]).max() > 1e-3  # and the others take its style


def test_a_real_photo_reference_through_ddim_inversion(sa_pipe, noise_image):
    inversion = sa_pipe.invert_reference(noise_image, PROMPTS[0], num_inference_steps=2)
    latents = noise(sa_pipe, 3)
    out = sa_pipe(PROMPTS, inversion=inversion, latents=latents, **SAMPLE)
    with torch.no_grad():
        recon = sa_pipe.decode(inversion.trajectory[0].to(sa_pipe.unet.dtype), "np")
    np.testing.assert_allclose(out.images[0], recon[0], atol=1e-5)  # row 0 ends on the photo's own latent
    ahead = sa_pipe(PROMPTS, inversion=inversion, reference_offset=1, latents=latents, **SAMPLE).images
    np.testing.assert_allclose(ahead[0], recon[0], atol=1e-5)  # offset: ahead on the same path, same end
    with pytest.raises(ValueError, match="same num_inference_steps"):
        sa_pipe(PROMPTS, inversion=inversion, **{**SAMPLE, "num_inference_steps": 3})


def test_style_aligned_with_an_ip_adapter(sa_pipe):
    from test_ip_adapter import TINY_ENCODER, two_images
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from imageprompt.testing import ip_adapter_state_dict

    torch.manual_seed(1)
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY_ENCODER)).eval()
    latents = noise(sa_pipe, 3)
    plain = sa_pipe(PROMPTS, latents=latents, **SAMPLE).images
    sa_pipe.load_ip_adapter(ip_adapter_state_dict(sa_pipe.unet, "sd15", encoder.config), image_encoder=encoder)
    try:
        image, _ = two_images()
        assert np.abs(sa_pipe(PROMPTS, latents=latents, ip_adapter_image=image, **SAMPLE).images - plain).max() > 1e-3
        sa_pipe.set_ip_adapter_scale(0.0)
        zero = sa_pipe(PROMPTS, latents=latents, ip_adapter_image=image, **SAMPLE).images
        np.testing.assert_allclose(zero, plain, atol=1e-5)
    finally:
        sa_pipe.unload_ip_adapter()


# ------------------------------------------------------------------- command line
def test_cli_style_aligned_end_to_end(tiny_model, tmp_path, noise_image, capsys):
    from imageprompt.cli.main import main
    from imageprompt.images import read_parameters

    model = ["--model", str(tiny_model[0]), "--clip", str(tiny_model[1]), "--steps", "2", "--seed", "5"]
    code = main(["style-aligned", "--prompts", *PROMPTS, "--out", str(tmp_path / "a"), *model])
    out = capsys.readouterr().out.split()
    assert code == 0 and len(out) == 3
    meta = read_parameters(out[0])
    assert meta["role"] == "reference" and meta["prompt"] == PROMPTS[0] and meta["prompts"] == PROMPTS
    photo = tmp_path / "photo.png"
    noise_image.save(photo)
    code = main(["style-aligned", "--reference", str(photo), "--reference-prompt", "a red circle", "--prompts",
                 *PROMPTS[1:], "--scheduler", "ddim", "--out", str(tmp_path / "b"), *model])
    out = capsys.readouterr().out.split()
    assert code == 0 and len(out) == 3 and read_parameters(out[0])["reference"] == "photo.png"
    code = main(["style-aligned", "--prompts", "alone", "--out", str(tmp_path / "c"), *model])
    assert code == 1 and "at least one more" in capsys.readouterr().err


# ------------------------------------------------------------------- batch rows
def test_batch_rows_share_a_reference(tmp_path, tiny_pipe, noise_image):
    import json

    from imageprompt.jobs import JobDefaults, JobOptions, run_job

    noise_image.save(tmp_path / "photo.png")
    rows = [{"kind": "style-aligned", "prompt": p, "reference": PROMPTS[0], "num": 2} for p in PROMPTS[1:]]
    rows.append({"kind": "style-aligned", "prompt": PROMPTS[1], "reference": PROMPTS[0], "image": "photo.png"})
    rows.append({"kind": "style-aligned", "prompt": " ", "reference": PROMPTS[0]})
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    defaults = JobDefaults(steps=2, height=32, width=32)
    report = run_job(jobs, tmp_path / "out", pipe=tiny_pipe, defaults=defaults,
                     options=JobOptions(batch_size=4, progress=False))
    assert (report.done, report.images) == (3, 5)
    # an image does not depend on its batch: row 1 alone gives the same pixels
    alone = tmp_path / "alone.jsonl"
    alone.write_text(json.dumps(rows[0]) + "\n")
    run_job(alone, tmp_path / "out2", pipe=tiny_pipe, defaults=defaults, options=JobOptions(progress=False))
    first = sorted((tmp_path / "out2").glob("*.png"))
    for path in first:
        a = np.asarray(Image.open(path), float)
        b = np.asarray(Image.open(tmp_path / "out" / path.name), float)
        assert np.abs(a - b).max() <= 1


# ------------------------------------------------------------------- eval rows
def test_eval_rows_of_masactrl_and_style_aligned():
    from imageprompt.world import evaluate
    from imageprompt.world.evaluate_consistency import masactrl_cases, style_sets

    assert {"MasaCtrl", "StyleAligned"} <= set(evaluate.MEASUREMENTS)
    cases = masactrl_cases(4)
    assert [c[2] for c in cases] == ["shape", "position", "shape", "position"]
    assert all(s != t for s, t, _, _ in cases)
    assert all(len({p.split()[2] for p in prompts}) == 1 for prompts in style_sets(3))  # one colour word a set
    pipe = evaluate.load_bundled("cpu")
    settings = evaluate.EvalSettings(samples=1, images_per_sample=1, steps=3)
    rows = evaluate.run_suite(pipe, settings, names=["MasaCtrl", "StyleAligned"])
    by = {(r.measurement, r.metric): r for r in rows}
    assert by["MasaCtrl", "background kept"].n == by["MasaCtrl baseline: plain target", "background kept"].n == 1
    assert by["StyleAligned", "background same as the reference's"].n == 3
    assert all(0.0 <= r.value <= 1.0 for r in rows if r.unit == "%")
