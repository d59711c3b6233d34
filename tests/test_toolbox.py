"""Our techniques with the rest of diffusers' toolbox (ControlNet, T2I-Adapter, img2img, inpainting, LoRA), each
compared with diffusers' own pipeline, loaded from the same folder, in the same test (fp32, tiny components)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import (
    ControlNetModel,
    StableDiffusionAdapterPipeline,
    StableDiffusionControlNetPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    T2IAdapter,
)
from imageprompt.pipelines.toolbox import sdipc_embeds
from PIL import Image

from imageprompt.attach import attach
from imageprompt.p2p import PromptToPromptSettings
from imageprompt.testing import ip_adapter_state_dict, random_controlnet, toolbox_images
from imageprompt.toolbox import ToolboxSettings, check_controlnet

STEPS = 3
SAMPLE = dict(num_inference_steps=STEPS, output_type="np")


def seed(n=0):
    return torch.Generator().manual_seed(n)


def diffusers_pipeline(cls, tiny_model, tiny_pipe, **parts):
    ref = cls.from_pretrained(tiny_model[0], safety_checker=None, requires_safety_checker=False, **parts)
    ref.scheduler = type(tiny_pipe.scheduler).from_config(tiny_pipe.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    return ref


# ----------------------------------------------------------------- SD-IPC
def test_sdipc_embeds_through_diffusers_img2img_inpaint_and_controlnet_equal_ours(
        tiny_model, tiny_pipe, controlnet, red_image, photo, mask, control):
    embeds = sdipc_embeds(tiny_pipe, red_image)
    cases = [
        (StableDiffusionImg2ImgPipeline, {}, dict(image=photo, strength=0.7),
         ToolboxSettings(init_image=photo, strength=0.7)),
        (StableDiffusionInpaintPipeline, {}, dict(image=photo, mask_image=mask, strength=1.0),
         ToolboxSettings(init_image=photo, mask=mask, strength=1.0)),
        (StableDiffusionControlNetPipeline, {"controlnet": controlnet},
         dict(image=control, controlnet_conditioning_scale=0.8), ToolboxSettings(control_images=[control],
                                                                                control_scales=0.8)),
    ]
    plain = tiny_pipe(image=red_image, generator=seed(), **SAMPLE).images
    for cls, parts, args, toolbox in cases:
        ref = diffusers_pipeline(cls, tiny_model, tiny_pipe, **parts)
        expected = ref(**embeds, **args, generator=seed(), **SAMPLE).images
        got = tiny_pipe(image=red_image, toolbox=toolbox, controlnet=parts.get("controlnet"), generator=seed(),
                        **SAMPLE).images
        np.testing.assert_allclose(got, expected, atol=1e-4, err_msg=cls.__name__)
        assert np.abs(got - plain).max() > 1e-3, cls.__name__  # the toolbox's input changed the result
    kept = np.asarray(photo, dtype=np.float32)[:, 16:] / 255  # inpainting: the unmasked half is the photo's
    got = tiny_pipe(image=red_image, toolbox=cases[1][3], generator=seed(), **SAMPLE).images[0]
    assert np.abs(got[:, 20:] - kept[:, 4:]).mean() < np.abs(plain[0][:, 20:] - kept[:, 4:]).mean()


def test_sdipc_embeds_through_a_t2i_adapter_pipeline(tiny_model, tiny_pipe, red_image, control):
    torch.manual_seed(2)
    adapter = T2IAdapter(in_channels=3, channels=[32, 64], num_res_blocks=1, downscale_factor=2,
                         adapter_type="full_adapter")
    ref = diffusers_pipeline(StableDiffusionAdapterPipeline, tiny_model, tiny_pipe, adapter=adapter)
    embeds = sdipc_embeds(tiny_pipe, red_image)
    off = ref(**embeds, image=control, adapter_conditioning_scale=0.0, generator=seed(), **SAMPLE).images
    np.testing.assert_allclose(off, tiny_pipe(image=red_image, generator=seed(), **SAMPLE).images, atol=1e-4)
    on = ref(**embeds, image=control, adapter_conditioning_scale=1.0, generator=seed(), **SAMPLE).images
    assert np.abs(on - off).max() > 1e-3


# -------------------------------------------------------------- IP-Adapter
def test_ip_adapter_with_controlnet_equals_diffusers(tiny_model, tiny_pipe, controlnet, control, red_image,
                                                     tmp_path):
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(1)
    config = CLIPVisionConfig(hidden_size=48, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8, projection_dim=40)
    CLIPVisionModelWithProjection(config).save_pretrained(tmp_path / "models" / "image_encoder")
    state = ip_adapter_state_dict(tiny_pipe.unet, "sd15", config, 0)
    save_file({f"{part}.{k}": v.contiguous() for part in state for k, v in state[part].items()},
              str(tmp_path / "models" / "ip.safetensors"))
    ref = diffusers_pipeline(StableDiffusionControlNetPipeline, tiny_model, tiny_pipe, controlnet=controlnet)
    ref.load_ip_adapter(str(tmp_path), subfolder="models", weight_name="ip.safetensors")
    expected = ref("a red circle", image=control, controlnet_conditioning_scale=0.6, ip_adapter_image=red_image,
                   generator=seed(), **SAMPLE).images
    tiny_pipe.load_ip_adapter(str(tmp_path), subfolder="models", weight_name="ip.safetensors")
    try:
        got = tiny_pipe(prompt="a red circle", ip_adapter_image=red_image, controlnet=controlnet,
                        toolbox=ToolboxSettings(control_images=[control], control_scales=0.6), generator=seed(),
                        **SAMPLE).images
        np.testing.assert_allclose(got, expected, atol=1e-4)
        # the step window still counts the ControlNet pipeline's steps: an empty window is no adapter
        tiny_pipe.set_ip_adapter_window((0.0, 0.1))  # of 3 steps: none
        late = tiny_pipe(prompt="a red circle", ip_adapter_image=red_image, controlnet=controlnet,
                         toolbox=ToolboxSettings(control_images=[control], control_scales=0.6), generator=seed(),
                         **SAMPLE).images
        assert np.abs(late - got).max() > 1e-4
    finally:
        tiny_pipe.unload_ip_adapter()
    without = ref.__class__.from_pipe(ref)
    without.unload_ip_adapter()
    np.testing.assert_allclose(late, without("a red circle", image=control, controlnet_conditioning_scale=0.6,
                                             generator=seed(), **SAMPLE).images, atol=1e-4)


# --------------------------------------------------------- prompt-to-prompt
SOURCE, TARGET = "a red circle", "a blue circle"


def test_p2p_attached_to_diffusers_controlnet_pipeline(tiny_model, tiny_pipe, p2p_pipe, controlnet, control):
    ref = diffusers_pipeline(StableDiffusionControlNetPipeline, tiny_model, tiny_pipe, controlnet=controlnet)
    noise = torch.randn((1, 4, 16, 16), generator=seed(3))
    settings = PromptToPromptSettings("replace", cross_steps=0.8, self_steps=0.4)

    def attached(scale):
        with attach(ref, settings, [SOURCE, TARGET]) as callback:
            out = ref([SOURCE, TARGET], image=control, controlnet_conditioning_scale=scale,
                      latents=noise.expand(2, -1, -1, -1), callback_on_step_end=callback, **SAMPLE).images
        assert callback.editor.attention_maps() is not None  # the editor ran in diffusers' loop
        return out

    ours = p2p_pipe(SOURCE, TARGET, settings=settings, latents=noise, **SAMPLE).images
    np.testing.assert_allclose(attached(0.0), ours, atol=1e-4)
    controlled = attached(1.0)
    source = ref(SOURCE, image=control, controlnet_conditioning_scale=1.0, latents=noise, **SAMPLE).images
    np.testing.assert_allclose(controlled[:1], source, atol=1e-4)
    assert np.abs(controlled - ours).max() > 1e-3
    # the processors diffusers had are back
    assert all(type(p).__name__ != "ImagePromptAttnProcessor" for p in ref.unet.attn_processors.values())
    # and our pipeline with the ControlNet is the same edit
    mine = p2p_pipe(SOURCE, TARGET, settings=settings, latents=noise, controlnet=controlnet,
                    toolbox=ToolboxSettings(control_images=[control]), **SAMPLE).images
    np.testing.assert_allclose(mine, controlled, atol=1e-4)


def test_p2p_with_init_image_shares_one_noise(p2p_pipe, photo):
    toolbox = ToolboxSettings(init_image=photo, strength=0.75)
    out = p2p_pipe(SOURCE, SOURCE, mode="refine", generator=seed(), toolbox=toolbox, **SAMPLE).images
    np.testing.assert_allclose(out[0], out[1], atol=1e-5)  # the same prompt from one noise: the same image
    with pytest.raises(ValueError, match="fixes the starting latents"):
        p2p_pipe(SOURCE, TARGET, latents=torch.zeros(1, 4, 16, 16), toolbox=toolbox, **SAMPLE)


# ------------------------------------------------------ MasaCtrl, StyleAligned
def test_masactrl_and_style_aligned_attached_to_diffusers_equal_ours(tiny_model, tiny_pipe, controlnet, control):
    from imageprompt.pipelines import StableDiffusionMasaCtrlPipeline, StableDiffusionStyleAlignedPipeline

    from imageprompt.masactrl import MasaCtrlSettings
    from imageprompt.style_aligned import StyleAlignedSettings

    ref = diffusers_pipeline(StableDiffusionControlNetPipeline, tiny_model, tiny_pipe, controlnet=controlnet)
    noise = torch.randn((1, 4, 16, 16), generator=seed(4))
    masactrl = MasaCtrlSettings(start_step=1, start_layer=0)
    with attach(ref, masactrl, [SOURCE, TARGET]) as callback:
        got = ref([SOURCE, TARGET], image=control, controlnet_conditioning_scale=0.0,
                  latents=noise.expand(2, -1, -1, -1), callback_on_step_end=callback, **SAMPLE).images
    ours = StableDiffusionMasaCtrlPipeline.from_pipe(tiny_pipe)(SOURCE, TARGET, settings=masactrl, latents=noise,
                                                               **SAMPLE).images
    np.testing.assert_allclose(got, ours, atol=1e-4)

    prompts = [SOURCE, "a green square"]
    style = StyleAlignedSettings(share_group_norm=True)
    noise2 = torch.randn((2, 4, 16, 16), generator=seed(6))
    with attach(ref, style, prompts) as callback:
        got = ref(prompts, image=control, controlnet_conditioning_scale=0.0, latents=noise2,
                  callback_on_step_end=callback, **SAMPLE).images
    plain = ref(prompts, image=control, controlnet_conditioning_scale=0.0, latents=noise2, **SAMPLE).images
    ours = StableDiffusionStyleAlignedPipeline.from_pipe(tiny_pipe)(prompts, settings=style, latents=noise2,
                                                                   **SAMPLE).images
    np.testing.assert_allclose(got, ours, atol=1e-4)
    np.testing.assert_allclose(plain[0], got[0], atol=1e-4)  # the reference row is itself
    assert np.abs(plain[1] - got[1]).max() > 1e-3  # the other shares its style, and the group-norm hooks are gone:
    np.testing.assert_allclose(ref(prompts, image=control, controlnet_conditioning_scale=0.0, latents=noise2,
                                   **SAMPLE).images, plain, atol=1e-6)


# -------------------------------------------------------------------- SDXL
def test_sdxl_sdipc_with_controlnet_equals_diffusers(tiny_sdxl, sdxl_pipe, red_image):
    from diffusers import StableDiffusionXLControlNetPipeline

    net = random_controlnet(sdxl_pipe.unet, seed=8, scale_factor=sdxl_pipe.vae_scale_factor)
    size = sdxl_pipe.default_sample_size * sdxl_pipe.vae_scale_factor
    layout = Image.fromarray(np.random.default_rng(9).integers(0, 255, (size, size, 3), dtype=np.uint8))
    ref = StableDiffusionXLControlNetPipeline.from_pretrained(tiny_sdxl[0], controlnet=net)
    ref.scheduler = type(sdxl_pipe.scheduler).from_config(sdxl_pipe.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    embeds = sdipc_embeds(sdxl_pipe, red_image)
    assert set(embeds) == {"prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds",
                           "negative_pooled_prompt_embeds"}
    expected = ref(**embeds, image=layout, controlnet_conditioning_scale=0.7, generator=seed(), **SAMPLE).images
    got = sdxl_pipe(image=red_image, controlnet=net, toolbox=ToolboxSettings(control_images=[layout],
                                                                            control_scales=0.7),
                    generator=seed(), **SAMPLE).images
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert np.abs(got - sdxl_pipe(image=red_image, generator=seed(), **SAMPLE).images).max() > 1e-3
    with pytest.raises(ValueError, match="made for another UNet"):
        check_controlnet(net, ControlNetModel.from_config({**net.config, "addition_embed_type": None}))


def test_p2p_of_an_inverted_photo_with_an_inpainting_mask(p2p_pipe, photo, mask):
    """The mask plays the local blend's role: outside it the edit keeps the photo's (reconstructed) pixels."""
    inversion = p2p_pipe.invert(photo, SOURCE, "ddim", num_inference_steps=STEPS)
    free = p2p_pipe(SOURCE, TARGET, inversion=inversion, **SAMPLE).images
    masked = p2p_pipe(SOURCE, TARGET, inversion=inversion, toolbox=ToolboxSettings(init_image=photo, mask=mask,
                                                                                   strength=1.0), **SAMPLE).images
    kept = slice(20, None)  # columns well outside the mask (its left half), away from the VAE's reach
    assert np.abs(masked[1][:, kept] - masked[0][:, kept]).max() < np.abs(free[1][:, kept] - free[0][:, kept]).max()
    with pytest.raises(ValueError, match="only an inpainting mask of the photo at strength 1"):
        p2p_pipe(SOURCE, TARGET, inversion=inversion, toolbox=ToolboxSettings(init_image=photo), **SAMPLE)


def test_p2p_attached_to_a_t2i_adapter_pipeline(tiny_model, tiny_pipe, p2p_pipe, control):
    """diffusers' T2I-Adapter pipeline has only the older per-step ``callback``: the attachment serves it too."""
    torch.manual_seed(2)
    adapter = T2IAdapter(in_channels=3, channels=[32, 64], num_res_blocks=1, downscale_factor=2,
                         adapter_type="full_adapter")
    ref = diffusers_pipeline(StableDiffusionAdapterPipeline, tiny_model, tiny_pipe, adapter=adapter)
    noise = torch.randn((1, 4, 16, 16), generator=seed(3))
    settings = PromptToPromptSettings("replace", blend_words=("circle",))

    def attached(scale):
        with attach(ref, settings, [SOURCE, TARGET]) as hooks:
            return ref([SOURCE, TARGET], image=[control, control], adapter_conditioning_scale=scale,
                       latents=noise.expand(2, -1, -1, -1).clone(), callback=hooks.legacy_callback,
                       **SAMPLE).images

    ours = p2p_pipe(SOURCE, TARGET, settings=settings, latents=noise, **SAMPLE).images
    np.testing.assert_allclose(attached(0.0), ours, atol=1e-4)
    adapted = attached(1.0)
    source = ref(SOURCE, image=control, adapter_conditioning_scale=1.0, latents=noise, **SAMPLE).images
    np.testing.assert_allclose(adapted[:1], source, atol=1e-4)


def test_sdxl_p2p_with_controlnet_at_scale_zero_is_plain_sdxl_p2p(sdxl_pipe):
    from imageprompt.pipelines import StableDiffusionXLPromptToPromptPipeline

    net = random_controlnet(sdxl_pipe.unet, seed=8, scale_factor=sdxl_pipe.vae_scale_factor)
    size = sdxl_pipe.default_sample_size * sdxl_pipe.vae_scale_factor
    layout = toolbox_images(size)["control"]
    pipe = StableDiffusionXLPromptToPromptPipeline.from_pipe(sdxl_pipe)
    noise = torch.randn((1, 4, sdxl_pipe.default_sample_size, sdxl_pipe.default_sample_size), generator=seed(3))
    plain = pipe(SOURCE, TARGET, latents=noise, **SAMPLE).images
    off = pipe(SOURCE, TARGET, latents=noise, controlnet=net,
               toolbox=ToolboxSettings(control_images=[layout], control_scales=0.0), **SAMPLE).images
    np.testing.assert_allclose(off, plain, atol=1e-4)
    on = pipe(SOURCE, TARGET, latents=noise, controlnet=net, toolbox=ToolboxSettings(control_images=[layout]),
              **SAMPLE).images
    assert np.abs(on - plain).max() > 1e-3
