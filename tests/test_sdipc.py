"""SD-IPC conversion and conditioning, checked against independent computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0
from transformers import CLIPModel

from imageprompt.attention import ImagePromptAttnProcessor, resolve_backend, set_imageprompt_attention
from imageprompt.conversion import SDIPCConverter, edit_embeds, eos_positions, variation_embeds


def numpy_conversion(pooled, visual_projection, text_projection, scale, atol=0.3):
    """The authors' recipe, written with numpy's SVD instead of torch.linalg.pinv."""
    e = pooled @ visual_projection.T
    u, s, vt = np.linalg.svd(text_projection, full_matrices=False)
    s_inv = np.where(s > atol, 1.0 / s, 0.0)
    pinv = vt.T @ np.diag(s_inv) @ u.T
    h = e @ pinv.T
    return scale * h / np.linalg.norm(h, axis=-1, keepdims=True)


def test_conversion_matches_independent_computation(tiny_model, tiny_pipe, red_image, noise_image):
    _, clip_dir = tiny_model
    clip = CLIPModel.from_pretrained(clip_dir).double()
    pixels = tiny_pipe.feature_extractor(images=[red_image, noise_image], return_tensors="pt").pixel_values
    pooled = clip.vision_model(pixel_values=pixels.double()).pooler_output.detach().numpy()
    expected = numpy_conversion(pooled, clip.visual_projection.weight.detach().numpy(),
                                clip.text_projection.weight.detach().numpy(), tiny_pipe.converter.config.scale)
    got = tiny_pipe.convert_images([red_image, noise_image], "cpu").double().numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    assert np.allclose(np.linalg.norm(got, axis=-1), tiny_pipe.converter.config.scale, rtol=1e-5)


def test_pinv_atol_discards_small_singular_values():
    converter = SDIPCConverter(text_hidden_size=4, projection_dim=4, scale=1.0, atol=0.3)
    u, _ = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64))
    weight = u @ torch.diag(torch.tensor([2.0, 1.0, 0.5, 0.1], dtype=torch.float64)) @ v.T
    converter.text_projection.weight.data = weight.float()
    singular = torch.linalg.svdvals(converter.inverse_projection().double())
    # 1/0.1 is dropped: only 1/0.5, 1/1, 1/2 survive
    assert torch.allclose(singular.sort().values, torch.tensor([0.0, 0.5, 1.0, 2.0], dtype=torch.float64), atol=1e-5)


def test_scale_is_measured_for_other_text_encoders(tiny_pipe):
    from imageprompt.conversion import is_sd1_text_encoder, measure_eos_norm

    assert not is_sd1_text_encoder(tiny_pipe.text_encoder)
    measured = measure_eos_norm(tiny_pipe.text_encoder, tiny_pipe.tokenizer)
    assert tiny_pipe.converter.config.scale == pytest.approx(measured, rel=1e-5)


def test_variation_conditioning_positions(tiny_pipe, red_image):
    embeds = tiny_pipe.image_prompt_embeds([red_image], None, 0.5, "cpu")
    h = tiny_pipe.convert_images([red_image], "cpu")
    empty, _ = tiny_pipe.encode_text([""], "cpu")
    assert embeds.shape == (1, 77, tiny_pipe.text_encoder.config.hidden_size)
    torch.testing.assert_close(embeds[0, 0], empty[0, 0])
    torch.testing.assert_close(embeds[0, 1:], h[0].expand(76, -1))


def test_edit_conditioning_positions(tiny_pipe, red_image):
    prompt, alpha = "a blue circle", 0.6
    embeds = tiny_pipe.image_prompt_embeds([red_image], [prompt], alpha, "cpu")
    states, ids = tiny_pipe.encode_text([prompt], "cpu")
    eos = int(eos_positions(ids, tiny_pipe.tokenizer.eos_token_id)[0])
    assert eos == 4  # BOS a blue circle EOS: single tokens in the test vocabulary
    h = tiny_pipe.convert_images([red_image], "cpu")[0]
    torch.testing.assert_close(embeds[0, :eos], states[0, :eos])
    torch.testing.assert_close(embeds[0, eos:], h + alpha * states[0, eos:])


def test_edit_embeds_per_row_eos():
    text = torch.randn(2, 6, 3)
    h = torch.randn(2, 3)
    out = edit_embeds(h, text, torch.tensor([2, 4]), alpha=0.5)
    torch.testing.assert_close(out[0, :2], text[0, :2])
    torch.testing.assert_close(out[0, 2:], h[0] + 0.5 * text[0, 2:])
    torch.testing.assert_close(out[1, :4], text[1, :4])
    torch.testing.assert_close(out[1, 4:], h[1] + 0.5 * text[1, 4:])
    var = variation_embeds(h, torch.zeros(3), length=6)
    assert var.shape == (2, 6, 3) and torch.all(var[:, 0] == 0)


def test_pipeline_uses_the_conditioning(tiny_pipe, red_image):
    """A variation equals sampling from its conditioning given as prompt_embeds."""
    embeds = tiny_pipe.image_prompt_embeds([red_image], None, 0.5, "cpu")
    kw = dict(num_inference_steps=3, output_type="np")
    a = tiny_pipe(image=red_image, generator=torch.Generator().manual_seed(3), **kw).images
    b = tiny_pipe(prompt_embeds=embeds, generator=torch.Generator().manual_seed(3), **kw).images
    np.testing.assert_array_equal(a, b)
    edited = tiny_pipe(image=red_image, prompt="a blue circle", generator=torch.Generator().manual_seed(3), **kw)
    assert not np.allclose(a, edited.images)


def test_same_seed_same_pixels_and_batch_shapes(tiny_pipe, red_image, noise_image):
    kw = dict(num_inference_steps=2, output_type="np", num_images_per_prompt=2)
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(4)]  # noqa: E731
    a = tiny_pipe(image=[red_image, noise_image], generator=gens(), **kw).images
    b = tiny_pipe(image=[red_image, noise_image], generator=gens(), **kw).images
    assert a.shape == (4, 32, 32, 3)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a[0], a[1])  # different seeds, different images


@pytest.mark.parametrize("scheduler", ["ddim", "euler-a", "dpm++", "pndm"])
def test_any_diffusers_scheduler(tiny_pipe, red_image, scheduler):
    from imageprompt.loading import make_scheduler

    original = tiny_pipe.scheduler
    try:
        tiny_pipe.scheduler = make_scheduler(scheduler, original.config)
        out = tiny_pipe(image=red_image, num_inference_steps=6, output_type="np", height=24, width=40,
                        generator=torch.Generator().manual_seed(0))
    finally:
        tiny_pipe.scheduler = original
    assert out.images.shape == (1, 24, 40, 3) and np.isfinite(out.images).all()


def test_check_inputs_errors(tiny_pipe, red_image):
    with pytest.raises(ValueError, match="give an `image`"):
        tiny_pipe()
    with pytest.raises(ValueError, match="multiple of"):
        tiny_pipe(image=red_image, height=33)
    with pytest.raises(ValueError, match="num_images_per_prompt"):
        tiny_pipe(image=red_image, num_images_per_prompt=0)
    with pytest.raises(TypeError, match="PIL image"):
        tiny_pipe(image="not-an-image.png")
    with pytest.raises(ValueError, match="2 prompts for 1 images"):
        tiny_pipe(image=red_image, prompt=["a", "b"])
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs. has to be in"):
        tiny_pipe(image=red_image, callback_on_step_end_tensor_inputs=["noise"])


def test_long_prompt_is_truncated_with_warning(tiny_pipe, red_image):
    prompt = " ".join(["red circle"] * 60)
    with pytest.warns(UserWarning, match="only the first 75 are used"):
        ids = tiny_pipe.tokenize([prompt])
    assert ids.shape == (1, 77)


def test_callback_on_step_end_sees_every_step(tiny_pipe, red_image):
    steps = []

    def callback(pipe, i, t, tensors):
        steps.append(i)
        return {"latents": tensors["latents"] * 0}

    out = tiny_pipe(image=red_image, num_inference_steps=3, output_type="latent", callback_on_step_end=callback)
    assert steps == [0, 1, 2]
    assert torch.all(out.images == 0)


def test_processor_matches_diffusers_sdpa(tiny_pipe):
    unet = tiny_pipe.unet
    sample = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    context = torch.randn(2, 77, unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = unet(sample, 10, encoder_hidden_states=context).sample
        unet.set_attn_processor(AttnProcessor2_0())
        try:
            theirs = unet(sample, 10, encoder_hidden_states=context).sample
        finally:
            set_imageprompt_attention(unet, "sdpa")
    assert all(isinstance(p, ImagePromptAttnProcessor) for p in unet.attn_processors.values())
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_xformers_falls_back_to_sdpa_with_one_warning():
    import warnings

    from imageprompt import attention

    attention._warn_xformers_fallback.cache_clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert resolve_backend("xformers", "cpu") == "sdpa"
        assert resolve_backend("xformers", "cpu") == "sdpa"
    assert len([w for w in caught if "xformers" in str(w.message)]) == 1
    with pytest.raises(ValueError, match="attention must be one of"):
        resolve_backend("flash")


def test_saved_pipeline_round_trip(tiny_pipe, tmp_path, red_image):
    from imageprompt.pipelines.loading import load_pipeline

    tiny_pipe.save_pretrained(tmp_path / "saved")
    again = load_pipeline(str(tmp_path / "saved"), device="cpu", dtype="fp32")
    again.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=2, output_type="np")
    a = tiny_pipe(image=red_image, generator=torch.Generator().manual_seed(5), **kw).images
    b = again(image=red_image, generator=torch.Generator().manual_seed(5), **kw).images
    np.testing.assert_allclose(a, b, atol=1e-5)
    assert again.converter.config.scale == tiny_pipe.converter.config.scale


def test_from_pretrained_with_clip(tiny_model, tiny_pipe):
    from imageprompt.pipelines import StableDiffusionImagePromptPipeline

    model_dir, clip_dir = tiny_model
    pipe = StableDiffusionImagePromptPipeline.from_pretrained(model_dir, clip=str(clip_dir))
    assert pipe.converter.config.scale == pytest.approx(tiny_pipe.converter.config.scale, rel=1e-6)
    torch.testing.assert_close(pipe.converter.text_projection.weight, tiny_pipe.converter.text_projection.weight)
    assert all(isinstance(p, ImagePromptAttnProcessor) for p in pipe.unet.attn_processors.values())


# ------------------------------------------------ diffusers' arguments and small defects
def _np(pipe, **kwargs):
    return pipe(prompt="a red circle", num_inference_steps=2, height=32, width=32, output_type="np",
                generator=torch.Generator().manual_seed(0), **kwargs).images


def test_negative_prompt_embeds_clip_skip_and_guidance_rescale(tiny_pipe):
    plain = _np(tiny_pipe)
    empty, _ = tiny_pipe.encode_text([""], "cpu")
    np.testing.assert_array_equal(_np(tiny_pipe, negative_prompt_embeds=empty), plain)
    np.testing.assert_allclose(_np(tiny_pipe, clip_skip=0), plain, atol=1e-6)  # the last layer, as without
    assert np.abs(_np(tiny_pipe, clip_skip=1) - plain).max() > 1e-4
    np.testing.assert_array_equal(_np(tiny_pipe, guidance_rescale=0.0), plain)
    assert np.abs(_np(tiny_pipe, guidance_rescale=0.7) - plain).max() > 1e-4
    with pytest.raises(ValueError, match="guidance_rescale"):
        _np(tiny_pipe, guidance_rescale=1.5)
    with pytest.raises(ValueError, match="clip_skip"):
        _np(tiny_pipe, clip_skip=99)
    with pytest.raises(ValueError, match="negative_prompt_embeds"):
        _np(tiny_pipe, negative_prompt_embeds=empty[:, :5])


def test_callback_tensor_inputs_are_call_arguments(tiny_pipe):
    import inspect

    from diffusers import StableDiffusionPipeline

    params = set(inspect.signature(type(tiny_pipe).__call__).parameters)
    params |= set(inspect.signature(StableDiffusionPipeline.__call__).parameters)  # what **kwargs passes on
    assert set(tiny_pipe._callback_tensor_inputs) - {"latents"} <= params


def test_converter_keeps_its_inverse_and_stays_fp32(tiny_pipe, red_image):
    tiny_pipe.convert_images([red_image], "cpu")
    cached = tiny_pipe.converter._inverse
    tiny_pipe.convert_images([red_image], "cpu")
    assert tiny_pipe.converter._inverse is cached  # not recomputed per call
    converter = type(tiny_pipe.converter)(text_hidden_size=8, projection_dim=8)
    converter.to(torch.float16)
    assert converter.text_projection.weight.dtype == torch.float32


def test_the_vision_tower_waits_at_its_home_while_sampling(tiny_model, tiny_pipe, red_image):
    """``vision_tower_home``: the tower visits the sampling device for the encoding only. On this CPU-only machine
    the home is the meta device (weights dropped), which no later step could run on: the variation still samples."""
    from imageprompt.pipelines.loading import load_pipeline

    pipe = load_pipeline(str(tiny_model[0]), str(tiny_model[1]), device="cpu", dtype="fp32")
    pipe.set_progress_bar_config(disable=True)
    assert pipe.vision_tower_home == "cpu"  # the default: on a GPU, off it between encodings
    pipe.vision_tower_home = "meta"
    seen = []

    def where(p, i, t, tensors):
        seen.append({param.device.type for param in p.sdipc_image_encoder.parameters()})
        return tensors

    kw = dict(image=red_image, num_inference_steps=2, output_type="np", height=32, width=32,
              generator=torch.Generator().manual_seed(0))
    got = pipe(callback_on_step_end=where, **kw).images
    assert seen == [{"meta"}, {"meta"}]
    np.testing.assert_array_equal(got, tiny_pipe(**kw | {"generator": torch.Generator().manual_seed(0)}).images)
    tiny_pipe.vision_tower_home = None  # stays: the same as at home when both are the CPU
    try:
        np.testing.assert_array_equal(got, tiny_pipe(**kw | {"generator": torch.Generator().manual_seed(0)}).images)
    finally:
        del tiny_pipe.vision_tower_home
    assert next(tiny_pipe.sdipc_image_encoder.parameters()).device.type == "cpu"
