"""Stable Diffusion XL: loading, IP-Adapter (equal to diffusers'), SD-IPC on two text encoders.

Everything runs on tiny random SDXL components written through the real save/load
path (:func:`imageprompt.testing_xl.save_tiny_sdxl`).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from imageprompt.loading import ModelLoadError
from imageprompt.testing import ip_adapter_state_dict

# tiny encoders shaped like h94/IP-Adapter's: bigG (sdxl_models/image_encoder) and ViT-H (models/image_encoder),
# every size different from the UNet's cross_attention_dim (80)
TINY_BIGG = dict(hidden_size=52, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                 patch_size=8, projection_dim=56)
TINY_VITH = dict(hidden_size=60, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                 patch_size=8, projection_dim=44)
SAMPLE = dict(num_inference_steps=3, guidance_scale=5.0, height=32, width=32, output_type="np")


@pytest.fixture
def xl(sdxl_pipe):
    yield sdxl_pipe
    sdxl_pipe.unload_ip_adapter()


# ------------------------------------------------------------ official files
@pytest.fixture(scope="module")
def sdxl_adapter_repo(tmp_path_factory, sdxl_pipe):
    """A local folder laid out like h94/IP-Adapter's SDXL part."""
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    root = tmp_path_factory.mktemp("ip-sdxl")
    torch.manual_seed(5)
    CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY_BIGG)).save_pretrained(root / "sdxl_models/image_encoder")
    CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY_VITH)).save_pretrained(root / "models/image_encoder")
    files = {"ip-adapter_sdxl.safetensors": ("sdxl", TINY_BIGG, 0),
             "ip-adapter_sdxl_vit-h.safetensors": ("sdxl", TINY_VITH, 1),
             "ip-adapter-plus_sdxl_vit-h.safetensors": ("plus", TINY_VITH, 2)}
    for name, (kind, encoder, seed) in files.items():
        # the Resampler: 16 queries, heads of 64 (20 heads of 64 in the real SDXL plus; 2 here)
        state = ip_adapter_state_dict(sdxl_pipe.unet, kind, encoder, seed, resampler_dim=128)
        flat = {f"{part}.{k}": v.contiguous() for part in state for k, v in state[part].items()}
        save_file(flat, str(root / "sdxl_models" / name))
    return root


def reference(tiny_sdxl, repo, weight_names, encoder_folder):
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline

    ref = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl[0], add_watermarker=False)
    ref.scheduler = DDIMScheduler.from_config(ref.scheduler.config)
    ref.load_ip_adapter(str(repo), subfolder="sdxl_models", weight_name=weight_names,
                        image_encoder_folder=encoder_folder)
    ref.set_progress_bar_config(disable=True)
    return ref


def images():
    rng = np.random.default_rng(3)
    return Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)), Image.new("RGB", (36, 44), (30, 200, 60))


# ------------------------------------------------------------------ tests
def test_sdxl_family_is_detected_and_loads_through_the_real_path(sdxl_pipe, tiny_sdxl):
    from imageprompt.pipelines import StableDiffusionXLImagePromptPipeline

    assert isinstance(sdxl_pipe, StableDiffusionXLImagePromptPipeline)
    assert sdxl_pipe.unet.config.cross_attention_dim == 80
    assert sdxl_pipe.sdipc_image_encoder.config.projection_dim == 24  # ViT-L-shaped
    assert sdxl_pipe.sdipc_image_encoder_2.config.projection_dim == 40  # bigG-shaped: text_encoder_2's space
    assert type(sdxl_pipe.scheduler).__name__ == "DDIMScheduler"


def test_single_file_family_and_vae_option(tmp_path, tiny_sdxl):
    from imageprompt.pipelines.loading import load_pipeline, load_vae, single_file_is_sdxl
    from safetensors.torch import save_file

    xl, sd = tmp_path / "xl.safetensors", tmp_path / "sd.safetensors"
    save_file({"conditioner.embedders.1.model.ln_final.weight": torch.zeros(2)}, str(xl))
    save_file({"cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.zeros(2)}, str(sd))
    assert single_file_is_sdxl(str(xl)) and not single_file_is_sdxl(str(sd))
    vae = load_vae(str(tiny_sdxl[0] / "vae"), torch.float32)
    assert type(vae).__name__ == "AutoencoderKL"
    with pytest.raises(ModelLoadError, match="could not load the VAE"):
        load_vae(str(tmp_path / "nowhere"), torch.float32)
    with pytest.raises(ModelLoadError, match="could not load the Stable Diffusion model"):
        load_pipeline(str(xl), str(tiny_sdxl[1]), device="cpu")  # family found, file unusable: a clear error


def test_sdxl_single_file_goes_through_diffusers_sdxl_loader_and_vae_replaces(tmp_path, tiny_sdxl, monkeypatch):
    """A single SDXL file is handed to diffusers' ``StableDiffusionXLPipeline.from_single_file`` (with ``--config``);
    ``vae=`` replaces the VAE it holds. (No tiny SDXL file in the original layout can be written here: the
    loader is stood in for by the tiny folder.)"""
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline
    from imageprompt.pipelines import StableDiffusionXLImagePromptPipeline
    from imageprompt.pipelines.loading import load_pipeline
    from safetensors.torch import save_file

    from imageprompt.testing import TINY_VAE

    model, clip_l, clip_g = tiny_sdxl
    single = tmp_path / "sd_xl_tiny.safetensors"
    save_file({"conditioner.embedders.1.model.ln_final.weight": torch.zeros(2)}, str(single))
    calls = []

    def from_single_file(path, **kwargs):
        calls.append((path, kwargs))
        return StableDiffusionXLPipeline.from_pretrained(model, add_watermarker=False)

    monkeypatch.setattr(StableDiffusionXLPipeline, "from_single_file", from_single_file)
    torch.manual_seed(3)
    other = AutoencoderKL(**TINY_VAE)
    other.save_pretrained(tmp_path / "vae")
    pipe = load_pipeline(str(single), str(clip_l), device="cpu", dtype="fp32", config=str(model), clip_2=str(clip_g),
                         vae=str(tmp_path / "vae"))
    assert isinstance(pipe, StableDiffusionXLImagePromptPipeline)
    assert calls == [(str(single), {"config": str(model), "local_files_only": True, "dtype": torch.float32,
                                    "add_watermarker": False})]
    torch.testing.assert_close(pipe.vae.decoder.conv_out.weight, other.decoder.conv_out.weight)


@pytest.mark.parametrize("weight,encoder_folder", [
    ("ip-adapter_sdxl.safetensors", "image_encoder"),
    ("ip-adapter_sdxl_vit-h.safetensors", "models/image_encoder"),
    ("ip-adapter-plus_sdxl_vit-h.safetensors", "models/image_encoder"),
])
def test_sdxl_ip_adapter_matches_diffusers(weight, encoder_folder, tiny_sdxl, sdxl_adapter_repo, xl):
    image, _ = images()
    ref = reference(tiny_sdxl, sdxl_adapter_repo, [weight], encoder_folder)
    expected = ref("a red circle", ip_adapter_image=image, generator=torch.Generator().manual_seed(0),
                   **SAMPLE).images
    xl.load_ip_adapter(str(sdxl_adapter_repo), subfolder="sdxl_models", weight_name=weight,
                       image_encoder_folder=encoder_folder)
    got = xl(prompt="a red circle", ip_adapter_image=image, generator=torch.Generator().manual_seed(0),
             **SAMPLE).images
    np.testing.assert_allclose(got, expected, atol=1e-4)
    plain = xl(prompt="a red circle", ip_adapter_image=image, generator=torch.Generator().manual_seed(0),
               **{**SAMPLE, "output_type": "latent"}).images
    xl.set_ip_adapter_scale(0.0)
    off = xl(prompt="a red circle", ip_adapter_image=image, generator=torch.Generator().manual_seed(0),
             **{**SAMPLE, "output_type": "latent"}).images
    assert (plain - off).abs().max() > 1e-3  # the adapter does something


def test_sdxl_instantstyle_blocks_masks_two_adapters_match_diffusers(tiny_sdxl, sdxl_adapter_repo, xl):
    from diffusers.image_processor import IPAdapterMaskProcessor

    weights = ["ip-adapter_sdxl_vit-h.safetensors", "ip-adapter-plus_sdxl_vit-h.safetensors"]
    a, b = images()
    left = Image.fromarray(np.pad(np.full((32, 16), 255, np.uint8), ((0, 0), (0, 16))))
    masks = IPAdapterMaskProcessor().preprocess([left], height=32, width=32)
    masks = [masks.reshape(1, 1, 32, 32), None]
    # InstantStyle on SDXL: style in up_blocks.0.attentions.1 (layout would be down_blocks.2.attentions.1; the
    # tiny UNet's last cross-attention down block is down_blocks.1)
    scale = [{"up": {"block_0": [0.0, 1.0]}}, {"down": {"block_1": [0.6]}, "up": {"block_0": [0.3, 0.0]}}]
    kwargs = dict(ip_adapter_image=[a, [a, b]], cross_attention_kwargs={"ip_adapter_masks": masks}, **SAMPLE)

    ref = reference(tiny_sdxl, sdxl_adapter_repo, weights, "models/image_encoder")
    ref.set_ip_adapter_scale(scale)
    expected = ref("a cat", generator=torch.Generator().manual_seed(1), **kwargs).images
    xl.load_ip_adapter(str(sdxl_adapter_repo), subfolder="sdxl_models", weight_name=weights,
                       image_encoder_folder="models/image_encoder")
    xl.set_ip_adapter_scale(scale)
    got = xl(prompt="a cat", generator=torch.Generator().manual_seed(1), **kwargs).images
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_plain_text_matches_diffusers_sdxl(tiny_sdxl, xl):
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline

    ref = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl[0], add_watermarker=False)
    ref.scheduler = DDIMScheduler.from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    for negative in (None, "a dog"):
        expected = ref("a red cat", negative_prompt=negative, generator=torch.Generator().manual_seed(2),
                       **SAMPLE).images
        got = xl(prompt="a red cat", negative_prompt=negative, generator=torch.Generator().manual_seed(2),
                 **SAMPLE).images
        np.testing.assert_allclose(got, expected, atol=1e-4)


def test_sdxl_sdipc_variation_and_edit_conditioning(xl):
    image, other = images()
    device = torch.device("cpu")
    cond, pooled = xl.image_prompt_embeds_pooled([image], None, 0.5, device)
    assert cond.shape == (1, 77, 80) and pooled.shape == (1, 40)
    empty, _, _ = xl.encode_text_pooled([""], device)
    torch.testing.assert_close(cond[0, 0], empty[0, 0])  # BOS of the empty prompt
    assert torch.equal(cond[0, 1], cond[0, 76])  # h everywhere after BOS
    e_l, e_g = xl.encode_images([image], device)
    stats = xl.converter.config.stats
    # pooled: bigG's image embedding, at the typical pooled text norm
    torch.testing.assert_close(pooled, stats[1]["pooled_norm"] * e_g / e_g.norm(dim=-1, keepdim=True))
    # tokens: ViT-L part (32) then bigG part (48), each the closed form at the penultimate norm ("last" mode)
    for which, (e, part) in enumerate(((e_l, cond[0, 1, :32]), (e_g, cond[0, 1, 32:]))):
        w = xl.converter.text_projections[which].weight
        h = e @ torch.linalg.pinv(w, atol=0.3).T
        torch.testing.assert_close(part, (stats[which]["penultimate_norm"] * h / h.norm())[0], atol=1e-5, rtol=1e-4)
    edit, edit_pooled = xl.image_prompt_embeds_pooled([image], ["a red cat"], 0.5, device)
    text, text_pooled, ids = xl.encode_text_pooled(["a red cat"], device)
    eos = int((ids[0] == xl.tokenizer.eos_token_id).int().argmax())
    torch.testing.assert_close(edit[0, :eos], text[0, :eos])
    torch.testing.assert_close(edit[0, eos:], cond[0, 1] + 0.5 * text[0, eos:])
    torch.testing.assert_close(edit_pooled, pooled + 0.5 * text_pooled)
    out = xl(image=[image, other], num_inference_steps=2, output_type="np", height=32, width=32)
    assert out.images.shape == (2, 32, 32, 3) and np.isfinite(out.images).all()


def test_sdxl_conversion_identities_and_modes(sdxl_pipe):
    """The exact parts: pinv(W) W y = y on W's row space; the layer-norm inverse with the token's own statistics."""
    from imageprompt.conversion import NORM_PROMPTS
    from imageprompt.conversion_xl import SDXLConverter, conversion_report, text_states

    te, tok = sdxl_pipe.text_encoder_2, sdxl_pipe.tokenizer_2
    w = te.text_projection.weight.detach().float()
    found = text_states(te, tok, ["a red cat"])
    y = found["normed"] @ w.T @ w  # a text state moved into W's row space (W is 40 x 48: rank 40)
    torch.testing.assert_close((y @ w.T) @ torch.linalg.pinv(w, atol=0.0).T, y, atol=1e-4, rtol=1e-4)
    report = conversion_report(te, tok, te.text_projection, NORM_PROMPTS, atol=0.0)
    assert report["identity_ln"] > 0.9999
    assert set(report) >= {"last_eos", "ln-inverse_eos", "last_tail", "ln-inverse_tail"}
    with pytest.raises(ValueError, match="mode must be one of"):
        SDXLConverter(mode="nope")


@torch.no_grad()
def test_sdxl_fp16_vae_upcasts_when_asked(sdxl_pipe):
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    expected = sdxl_pipe.decode(latents, "np")
    # the session's pipeline: its fp32 weights and config come back as they were, not rounded through fp16
    weights = {k: v.clone() for k, v in sdxl_pipe.vae.state_dict().items()}
    upcast = sdxl_pipe.vae.config.force_upcast
    sdxl_pipe.vae.to(torch.float16)
    sdxl_pipe.vae.register_to_config(force_upcast=True)
    try:
        got = sdxl_pipe.decode(latents.half(), "np")
        assert sdxl_pipe.vae.dtype == torch.float16  # put back after decoding
    finally:
        sdxl_pipe.vae.to(torch.float32)
        sdxl_pipe.vae.load_state_dict(weights)
        sdxl_pipe.vae.register_to_config(force_upcast=upcast)
    np.testing.assert_allclose(got, expected, atol=1e-2)


def test_sdxl_pipeline_folder_round_trip_needs_no_clip(sdxl_pipe, tmp_path):
    from imageprompt.pipelines import StableDiffusionXLImagePromptPipeline
    from imageprompt.pipelines.loading import load_pipeline

    sdxl_pipe.save_pretrained(tmp_path / "saved", safe_serialization=True)
    again = load_pipeline(str(tmp_path / "saved"), device="cpu", dtype="fp32")  # converter and encoders inside
    again.set_progress_bar_config(disable=True)
    assert isinstance(again, StableDiffusionXLImagePromptPipeline)
    image, _ = images()
    first = sdxl_pipe(image=image, generator=torch.Generator().manual_seed(0), **SAMPLE).images
    second = again(image=image, generator=torch.Generator().manual_seed(0), **SAMPLE).images
    np.testing.assert_allclose(first, second, atol=1e-4)


def test_cli_vary_with_sdxl_adapters(tiny_sdxl, sdxl_adapter_repo, tmp_path):
    from imageprompt.cli.main import main

    model, clip_l, clip_g = tiny_sdxl
    Image.new("RGB", (40, 40), (220, 30, 30)).save(tmp_path / "red.png")
    common = ["vary", str(tmp_path / "red.png"), "--model", str(model), "--clip", str(clip_l), "--clip-2",
              str(clip_g), "--steps", "2"]
    # ip-adapter_sdxl finds its bigG encoder next to the weights; the ViT-H ones take --image-encoder
    assert main([*common, "--out", str(tmp_path / "a"),
                 "--adapter", f"{sdxl_adapter_repo}:sdxl_models/ip-adapter_sdxl.safetensors"]) == 0
    vit_h = str(sdxl_adapter_repo / "models/image_encoder")
    assert main([*common, "--out", str(tmp_path / "b"), "--image-encoder", vit_h,
                 "--adapter", f"{sdxl_adapter_repo}:sdxl_models/ip-adapter-plus_sdxl_vit-h.safetensors"]) == 0
    assert len(list((tmp_path / "a").glob("*.png"))) == len(list((tmp_path / "b").glob("*.png"))) == 1
    from imageprompt.adapter_files import parse_adapter_spec

    assert parse_adapter_spec("sdxl") == ("h94/IP-Adapter", "sdxl_models/ip-adapter_sdxl.safetensors")


def test_sdxl_xformers_falls_back_to_sdpa_with_a_warning(tiny_sdxl):
    from imageprompt.pipelines.loading import load_pipeline

    from imageprompt.attention import ImagePromptAttnProcessor

    model, clip_l, clip_g = tiny_sdxl
    with pytest.warns(UserWarning, match="xformers kernels are not usable here"):
        import imageprompt.attention as attention

        attention._warn_xformers_fallback.cache_clear()
        pipe = load_pipeline(str(model), str(clip_l), device="cpu", dtype="fp32", clip_2=str(clip_g),
                             attention="xformers")
    procs = [p for n, p in pipe.unet.attn_processors.items()]
    assert all(isinstance(p, ImagePromptAttnProcessor) and p.backend == "sdpa" for p in procs)


def test_sdxl_attention_levels_at_1024():
    from imageprompt.p2p import attention_heights, default_resolution
    from imageprompt.testing_xl import SDXL_UNET

    class Config:
        down_block_types = SDXL_UNET["down_block_types"]

    assert attention_heights(Config, 128) == [64, 32]  # 1024x1024: cross-attention at 64 and 32 latent rows
    assert default_resolution(Config, 128) == 32


def test_sdxl_step_window_and_composition_of_all_three(sdxl_adapter_repo, xl):
    """IP-Adapter + SD-IPC image prompt + prompt-to-prompt in one SDXL run; a window holding no step is scale 0."""
    from imageprompt.pipelines.loading import prompt_to_prompt_from

    image, other = images()
    xl.load_ip_adapter(str(sdxl_adapter_repo), subfolder="sdxl_models", weight_name="ip-adapter_sdxl.safetensors")
    run = dict(prompt="a red cat", ip_adapter_image=other, generator=torch.Generator().manual_seed(0), **SAMPLE)
    on = xl(**{**run, "generator": torch.Generator().manual_seed(0)}).images
    xl.set_ip_adapter_window((0.5, 0.6))  # 3 steps: int(1.5) <= i < int(1.8) holds for no step
    never = xl(**{**run, "generator": torch.Generator().manual_seed(0)}).images
    xl.set_ip_adapter_window(None)
    xl.set_ip_adapter_scale(0.0)
    off = xl(**{**run, "generator": torch.Generator().manual_seed(0)}).images
    np.testing.assert_allclose(never, off, atol=1e-6)
    assert np.abs(on - off).max() > 1e-3
    xl.set_ip_adapter_scale(0.7)
    p2p = prompt_to_prompt_from(xl)
    p2p.set_progress_bar_config(disable=True)
    calls = []
    branch = next(iter(p for p in xl.unet.attn_processors.values() if p.image_branch is not None)).image_branch
    hook = branch.register_forward_hook(lambda *a: calls.append(1))
    try:
        out = p2p("a red cat", "a blue cat", image=image, image_mode="variation", ip_adapter_image=other,
                  num_inference_steps=2, height=32, width=32, output_type="np")
    finally:
        hook.remove()
    assert out.images.shape == (2, 32, 32, 3) and np.isfinite(out.images).all()
    assert len(calls) == 2  # the image branch ran in that layer at every step, under the p2p editor


def test_batch_adapter_and_p2p_rows_on_sdxl(sdxl_pipe, sdxl_adapter_repo, tmp_path):
    import json

    from imageprompt.jobs import JobDefaults, JobOptions, run_job

    Image.new("RGB", (40, 40), (220, 30, 30)).save(tmp_path / "red.png")
    spec = f"{sdxl_adapter_repo}:sdxl_models/ip-adapter_sdxl.safetensors"
    rows = [{"kind": "adapter", "image": "red.png", "adapter": spec, "prompt": "a cat", "scale": 0.6},
            {"kind": "p2p", "prompt": "a red cat", "target": "a blue cat", "adapter": spec, "adapter_image": "red.png"},
            {"kind": "vary", "image": "red.png"}]
    (tmp_path / "jobs.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    summary = run_job(tmp_path / "jobs.jsonl", tmp_path / "out", pipe=sdxl_pipe,
                      defaults=JobDefaults(steps=2, height=32, width=32), options=JobOptions(progress=False))
    records = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert summary.failed == 0 and [r["status"] for r in records] == ["done"] * 3, records
    assert sdxl_pipe.image_adapters == []  # handed back without the adapter


def test_sdxl_converter_measures_half_precision_encoders(sdxl_pipe):
    """fp16 text encoders (a GPU load) give the same statistics as fp32, within half precision."""
    import copy

    from imageprompt.conversion_xl import measure_text_stats

    half = copy.deepcopy(sdxl_pipe.text_encoder_2).half()
    got = measure_text_stats(half, sdxl_pipe.tokenizer_2)
    expected = measure_text_stats(sdxl_pipe.text_encoder_2, sdxl_pipe.tokenizer_2)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=2e-2, abs=2e-3), key
