"""Our pipelines are diffusers pipelines: what a diffusers user does every day works, compared with diffusers
itself in the same test (fp32, tiny components written through the real save/load paths)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)
from diffusers.callbacks import SDCFGCutoffCallback, SDXLCFGCutoffCallback
from imageprompt.pipelines import StableDiffusionPromptToPromptPipeline, StableDiffusionStyleAlignedPipeline
from imageprompt.pipelines.loading import load_pipeline

from imageprompt.attention import imageprompt_processors

STEPS = 4


@pytest.fixture
def fresh(tiny_model):
    """An SD-IPC pipeline with its own modules (LoRA and textual inversion change them in place)."""
    model_dir, clip_dir = tiny_model
    pipe = load_pipeline(str(model_dir), str(clip_dir), device="cpu", dtype="fp32")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference(pipe, model_dir):
    """diffusers' own StableDiffusionPipeline from the same folder, on the same scheduler settings."""
    ref = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None, requires_safety_checker=False)
    ref.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    return ref


def run(pipe, **kwargs):
    kwargs.setdefault("prompt", "a red circle on the beach")
    return pipe(num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0), output_type="np",
                **kwargs).images


def random_lora(model_dir, folder):
    """A random LoRA on the UNet's attention projections, saved with diffusers' ``save_lora_weights``."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(1)
    unet = UNet2DConditionModel.from_pretrained(model_dir / "unet")
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(unet),
                                              safe_serialization=True)
    return folder


def test_lora_loads_fuses_weights_and_unloads_as_in_diffusers(fresh, tiny_model, tmp_path):
    model_dir = tiny_model[0]
    lora = random_lora(model_dir, tmp_path / "lora")
    plain = run(fresh)
    ref = reference(fresh, model_dir)
    fresh.load_lora_weights(lora, adapter_name="style")
    ref.load_lora_weights(lora, adapter_name="style")
    with_lora = run(fresh)
    assert np.abs(with_lora - plain).max() > 1e-3  # the LoRA is applied
    np.testing.assert_allclose(with_lora, run(ref), atol=1e-4)

    fresh.set_adapters(["style"], adapter_weights=[0.5])
    ref.set_adapters(["style"], adapter_weights=[0.5])
    half = run(fresh)
    assert np.abs(half - with_lora).max() > 1e-4
    np.testing.assert_allclose(half, run(ref), atol=1e-4)

    fresh.set_adapters(["style"], adapter_weights=[1.0])
    fresh.fuse_lora()
    np.testing.assert_allclose(run(fresh), with_lora, atol=1e-4)
    fresh.unfuse_lora()
    fresh.unload_lora_weights()
    np.testing.assert_allclose(run(fresh), plain, atol=1e-5)
    assert all(type(p).__name__ == "ImagePromptAttnProcessor" for p in fresh.unet.attn_processors.values())


def test_lora_applies_to_sdipc_variation(fresh, tiny_model, tmp_path, red_image):
    lora = random_lora(tiny_model[0], tmp_path / "lora")
    before = run(fresh, prompt=None, image=red_image)
    fresh.load_lora_weights(lora)
    assert np.abs(run(fresh, prompt=None, image=red_image) - before).max() > 1e-3


def test_textual_inversion_token_as_in_diffusers(fresh, tiny_model, tmp_path, red_image):
    from safetensors.torch import save_file

    dim = fresh.text_encoder.config.hidden_size
    torch.manual_seed(2)
    save_file({"<wobble>": torch.randn(2, dim)}, tmp_path / "wobble.safetensors")  # two vectors: <wobble>, _1
    ref = reference(fresh, tiny_model[0])
    fresh.load_textual_inversion(tmp_path / "wobble.safetensors")
    ref.load_textual_inversion(tmp_path / "wobble.safetensors")
    prompt = "a <wobble> circle"
    ours = run(fresh, prompt=prompt)
    np.testing.assert_allclose(ours, run(ref, prompt=prompt), atol=1e-4)
    assert np.abs(ours - run(fresh, prompt="a circle")).max() > 1e-3
    # SD-IPC editing finds the EOS after the expanded token: "a <wobble> <wobble>_1 circle" is 4 tokens + BOS
    ids = fresh.tokenize([prompt])
    assert ids[0, 5].item() == fresh.tokenizer.eos_token_id
    assert run(fresh, prompt=prompt, image=red_image).shape == ours.shape


def test_cfg_cutoff_callback_runs_and_matches_diffusers(tiny_pipe, tiny_model, red_image):
    cutoff = SDCFGCutoffCallback(cutoff_step_ratio=0.5)
    ours = run(tiny_pipe, callback_on_step_end=cutoff)
    np.testing.assert_allclose(ours, run(reference(tiny_pipe, tiny_model[0]), callback_on_step_end=cutoff),
                               atol=1e-4)
    assert tiny_pipe.guidance_scale == 0.0 and tiny_pipe.num_timesteps == STEPS
    assert np.abs(ours - run(tiny_pipe)).max() > 1e-4
    variation = run(tiny_pipe, prompt=None, image=red_image, callback_on_step_end=cutoff)
    assert np.isfinite(variation).all()


def test_cfg_cutoff_callback_on_the_edit_pipelines(tiny_pipe, tiny_model):
    """The source row of an edit is never changed, so it equals diffusers' generation of the source prompt from
    the same noise with the same callback."""
    from imageprompt.pipelines import StableDiffusionMasaCtrlPipeline

    ref = reference(tiny_pipe, tiny_model[0])
    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(4))
    want = ref(prompt="a red circle", latents=noise, num_inference_steps=STEPS, output_type="np",
               callback_on_step_end=SDCFGCutoffCallback(cutoff_step_ratio=0.5)).images[0]
    edits = ((StableDiffusionPromptToPromptPipeline, {}), (StableDiffusionMasaCtrlPipeline, {"start_step": 0}))
    for cls, extra in edits:
        pipe = cls.from_pipe(tiny_pipe)
        pipe.set_progress_bar_config(disable=True)
        out = pipe("a red circle", "a blue circle", latents=noise, num_inference_steps=STEPS, output_type="np",
                   callback_on_step_end=SDCFGCutoffCallback(cutoff_step_ratio=0.5), **extra).images
        assert pipe.guidance_scale == 0.0 and np.isfinite(out).all()
        np.testing.assert_allclose(out[0], want, atol=1e-4)
    style = StableDiffusionStyleAlignedPipeline.from_pipe(tiny_pipe)
    style.set_progress_bar_config(disable=True)
    out = style(["a red circle", "a blue square"], num_inference_steps=STEPS, output_type="np",
                callback_on_step_end=SDCFGCutoffCallback(cutoff_step_ratio=0.5)).images
    assert out.shape[0] == 2 and np.isfinite(out).all()


def test_cfg_cutoff_callback_on_sdxl(sdxl_pipe, red_image):
    cutoff = SDXLCFGCutoffCallback(cutoff_step_ratio=0.5)
    out = run(sdxl_pipe, prompt=None, image=red_image, callback_on_step_end=cutoff)
    assert np.isfinite(out).all() and sdxl_pipe.guidance_scale == 0.0


def test_interrupt_stops_the_loop(tiny_pipe):
    calls = []

    def stop(pipe, i, t, tensors):
        calls.append(i)
        pipe._interrupt = True  # diffusers' documented way to stop early
        return tensors

    run(tiny_pipe, callback_on_step_end=stop)
    assert calls == [0]


@pytest.mark.parametrize("scheduler,calls_per_step", [(HeunDiscreteScheduler, 2), (DPMSolverMultistepScheduler, 1),
                                                      (EulerDiscreteScheduler, 1)])
def test_p2p_windows_count_denoising_steps(tiny_pipe, scheduler, calls_per_step):
    pipe = StableDiffusionPromptToPromptPipeline.from_pipe(tiny_pipe)
    pipe.scheduler = scheduler.from_config(tiny_pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    seen = []

    def spy(module, args, kwargs):
        editor = next(iter(imageprompt_processors(module).values())).editors[0]
        seen.append((editor.step, editor.cross_active, editor.self_active))

    n, f, g = 10, 0.5, 0.3
    handle = pipe.unet.register_forward_pre_hook(spy, with_kwargs=True)
    try:
        pipe("a red circle", "a blue circle", cross_steps=f, self_steps=g, num_inference_steps=n,
             generator=torch.Generator().manual_seed(0), output_type="np")
    finally:
        handle.remove()
    # Heun: two UNet calls a step, one in the last (sigma 0); the others one a step
    assert len(seen) == n * calls_per_step - (calls_per_step - 1)
    cross_steps = int(f * (n + 1))  # the authors' get_time_words_attention_alpha rule, in denoising steps
    assert [c for _, c, _ in seen] == [True] * (cross_steps * calls_per_step) + \
        [False] * (len(seen) - cross_steps * calls_per_step)
    self_steps = int(g * n)
    assert [s for _, _, s in seen] == [True] * (self_steps * calls_per_step) + \
        [False] * (len(seen) - self_steps * calls_per_step)
    assert [step for step, _, _ in seen] == [i // calls_per_step for i in range(len(seen))]


def test_adapter_window_counts_denoising_steps_with_heun(tiny_pipe, red_image):
    from imageprompt.ip_adapter import image_branches
    from imageprompt.sdipc_branch import disable_sdipc_branch, enable_sdipc_branch

    pipe = type(tiny_pipe).from_pipe(tiny_pipe)
    pipe.scheduler = HeunDiscreteScheduler.from_config(tiny_pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    enable_sdipc_branch(pipe, scale=1.0)
    seen = []

    def spy(module, args, kwargs):
        seen.append(next(iter(image_branches(module).values())).active)

    handle = pipe.unet.register_forward_pre_hook(spy, with_kwargs=True)
    try:
        pipe.set_ip_adapter_window((0.0, 0.5))
        pipe(prompt="a red circle", ip_adapter_image=red_image, num_inference_steps=6, output_type="np",
             generator=torch.Generator().manual_seed(0))
    finally:
        handle.remove()
        disable_sdipc_branch(pipe)
    # steps 0..2 of 6 (two calls each), then steps 3..5 (the last has one call)
    assert seen == [[True]] * 6 + [[False]] * 5


def test_xformers_switches_keep_the_seam(tiny_pipe, red_image):
    from diffusers.models.attention_processor import AttnProcessor2_0

    from imageprompt.sdipc_branch import disable_sdipc_branch, enable_sdipc_branch

    pipe = type(tiny_pipe).from_pipe(tiny_pipe)
    pipe.set_progress_bar_config(disable=True)
    enable_sdipc_branch(pipe, scale=0.7)
    try:
        before = run(pipe, ip_adapter_image=red_image)
        pipe.disable_xformers_memory_efficient_attention()
        np.testing.assert_array_equal(run(pipe, ip_adapter_image=red_image), before)
        pipe.unet.set_attention_backend("native")  # diffusers' dispatcher: imageprompt's processors are untouched
        np.testing.assert_array_equal(run(pipe, ip_adapter_image=red_image), before)
        with pytest.raises(ValueError, match="fuse only the VAE"):
            pipe.fuse_qkv_projections()
        pipe.unet.set_attn_processor(AttnProcessor2_0())
        with pytest.raises(ValueError, match=r"call `pipe.set_attention\('sdpa'\)`"):
            run(pipe, ip_adapter_image=red_image)
        pipe.set_attention("sdpa")  # the adapter comes back, at scale 1
        pipe.set_ip_adapter_scale(0.7)
        np.testing.assert_allclose(run(pipe, ip_adapter_image=red_image), before, atol=1e-6)
    finally:
        disable_sdipc_branch(pipe)
        pipe.set_attention("sdpa")


def test_style_aligned_takes_custom_timesteps(tiny_pipe):
    sa = StableDiffusionStyleAlignedPipeline.from_pipe(tiny_pipe)
    sa.scheduler = EulerDiscreteScheduler.from_config(tiny_pipe.scheduler.config)
    sa.set_progress_bar_config(disable=True)
    out = sa(["a red circle", "a blue square"], num_inference_steps=3, output_type="np", timesteps=[901, 501, 101],
             generator=torch.Generator().manual_seed(0)).images
    assert out.shape[0] == 2 and sa.num_timesteps == 3


def test_sdxl_vae_latents_statistics_as_in_diffusers(tiny_sdxl):
    model_dir, clip_l, clip_g = tiny_sdxl
    pipe = load_pipeline(str(model_dir), str(clip_l), device="cpu", dtype="fp32", clip_2=str(clip_g))
    pipe.set_progress_bar_config(disable=True)
    channels = pipe.vae.config.latent_channels
    pipe.vae.register_to_config(latents_mean=[0.3, -0.2, 0.1, 0.05][:channels],
                                latents_std=[1.5, 0.8, 1.2, 0.9][:channels])
    names = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet", "scheduler")
    ref = StableDiffusionXLPipeline(**{k: getattr(pipe, k) for k in names}, add_watermarker=False)
    ref.set_progress_bar_config(disable=True)
    ours = run(pipe, prompt="a red cat")
    np.testing.assert_allclose(ours, run(ref, prompt="a red cat"), atol=1e-4)
    np.testing.assert_allclose(run(pipe, prompt="a red cat", clip_skip=1), run(ref, prompt="a red cat", clip_skip=1),
                               atol=1e-4)


def test_ip_adapter_fills_diffusers_image_encoder_and_sdipc_keeps_its_own(fresh, red_image):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from imageprompt.testing import ip_adapter_state_dict

    sdipc = fresh.sdipc_image_encoder
    assert fresh.image_encoder is None and sdipc is not None
    torch.manual_seed(3)
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=16, intermediate_size=37, num_hidden_layers=1,
                                                             num_attention_heads=2, image_size=32, patch_size=8,
                                                             projection_dim=24)).eval()
    fresh.load_ip_adapter(ip_adapter_state_dict(fresh.unet, "sd15", encoder.config), image_encoder=encoder)
    assert fresh.image_encoder is encoder and fresh.sdipc_image_encoder is sdipc  # each technique its encoder
    assert run(fresh, prompt=None, image=red_image, ip_adapter_image=red_image).shape[0] == 1
    fresh.unload_ip_adapter()
    assert fresh.image_encoder is None and fresh.sdipc_image_encoder is sdipc
    # an encoder given to the pipeline serves the adapter loaded without one, as in diffusers
    import copy

    own = copy.deepcopy(encoder)
    fresh.register_modules(image_encoder=own)
    fresh.load_ip_adapter(ip_adapter_state_dict(fresh.unet, "sd15", own.config))
    assert fresh.image_adapters[0].image_encoder is own
    fresh.unload_ip_adapter()
    assert fresh.image_encoder is own  # not the adapters' to remove


def test_folders_saved_before_sdipc_had_its_own_components_load(fresh, tmp_path, red_image):
    import json

    folder = tmp_path / "saved"
    fresh.save_pretrained(folder)
    before = run(fresh, prompt=None, image=red_image)
    index = json.loads((folder / "model_index.json").read_text())  # the earlier layout: SD-IPC's CLIP in image_encoder
    index["image_encoder"] = index.pop("sdipc_image_encoder")
    (folder / "model_index.json").write_text(json.dumps(index))
    (folder / "sdipc_image_encoder").rename(folder / "image_encoder")
    for loaded in (type(fresh).from_pretrained(folder), load_pipeline(str(folder), device="cpu", dtype="fp32")):
        loaded.set_progress_bar_config(disable=True)
        assert loaded.image_encoder is None and loaded.sdipc_image_encoder is not None
        np.testing.assert_allclose(run(loaded, prompt=None, image=red_image), before, atol=1e-5)
