"""Prompt-to-prompt on the tiny SD3 through the pipeline, and the flow-ODE inversion of a photo."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from imageprompt.inversion_flow import psnr

ARGS = dict(height=32, width=32, max_sequence_length=16, guidance_scale=4.0)


@pytest.fixture(scope="module")
def sd3_p2p(tiny_sd3):
    from imageprompt.pipelines import StableDiffusion3PromptToPromptPipeline

    pipe = StableDiffusion3PromptToPromptPipeline.from_pretrained(tiny_sd3[0])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _noise():
    return torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(0))


def _alone(pipe, prompt, latents, steps=3):
    return pipe.sample(prompt=prompt, latents=latents, num_inference_steps=steps, output_type="latent", **ARGS).images


def test_edit_keeps_the_source_and_changes_the_target(sd3_p2p):
    noise = _noise()
    out = sd3_p2p("a red cat", "a blue cat", cross_steps=1.0, self_steps=0.5, latents=noise, num_inference_steps=3,
                  output_type="latent", **ARGS)
    source, target = out.images[:1], out.images[1:]
    torch.testing.assert_close(source, _alone(sd3_p2p, "a red cat", noise), atol=1e-4, rtol=0)
    alone = _alone(sd3_p2p, "a blue cat", noise)
    assert (target - alone).abs().max() > 1e-3  # the target follows the source's attention
    assert (target - source).abs().max() > 1e-4  # and still reads its own words in the text stream
    assert out.attention_maps.shape == (2, 8, 8, 77) and out.tokens[1] == ["a", "blue", "cat"]


def test_no_window_is_the_plain_target(sd3_p2p):
    noise = _noise()
    out = sd3_p2p("a red cat", "a blue cat", cross_steps=0.0, self_steps=0.0, latents=noise, num_inference_steps=3,
                  output_type="latent", **ARGS)
    torch.testing.assert_close(out.images[1:], _alone(sd3_p2p, "a blue cat", noise), atol=1e-4, rtol=0)


def test_local_blend_keeps_the_source_outside_the_mask(sd3_p2p):
    noise = torch.randn(1, 16, 32, 32, generator=torch.Generator().manual_seed(0))  # a 16 x 16 patch grid
    out = sd3_p2p("a red cat", "a red dog", blend_words=["cat", "dog"], blend_threshold=0.9, latents=noise,
                  num_inference_steps=3, output_type="latent", **{**ARGS, "height": 64, "width": 64})
    mask = out.blend_mask
    assert mask.shape == (1, 1, 32, 32) and 0 < mask.float().mean() < 1
    outside = ~mask[0, 0]
    torch.testing.assert_close(out.images[1][:, outside], out.images[0][:, outside])


def test_flow_inversion_reconstructs_and_improves_with_steps(sd3_p2p):
    x = np.linspace(0, 1, 32)
    photo = Image.fromarray((np.stack([np.outer(x, np.ones(32)), np.outer(np.ones(32), x), np.outer(x, x)], -1)
                             * 255).astype(np.uint8))
    errors = []
    for steps in (4, 16):
        inversion = sd3_p2p.invert(photo, "a red cat", num_inference_steps=steps, height=32, width=32,
                                   max_sequence_length=16)
        back = sd3_p2p.sample(prompt="a red cat", latents=inversion.latents, num_inference_steps=steps,
                              guidance_scale=1.0, height=32, width=32, max_sequence_length=16,
                              output_type="latent").images
        errors.append(((back - inversion.image_latents).norm() / inversion.image_latents.norm()).item())
    assert errors[1] < errors[0] / 3  # first order: 4x the steps, about a quarter of the error (measured 0.058/0.27)
    edit = sd3_p2p("a red cat", "a red dog", inversion=inversion, num_inference_steps=16, guidance_scale=1.0,
                   height=32, width=32, max_sequence_length=16, output_type="pt")
    decoded = sd3_p2p.vae.decode(inversion.image_latents / sd3_p2p.vae.config.scaling_factor
                                 + sd3_p2p.vae.config.shift_factor).sample
    reference = (decoded / 2 + 0.5).clamp(0, 1)
    assert psnr(edit.images[0], reference[0]) > 30  # the source row is the photo again (measured 35.4 dB)
    with pytest.raises(ValueError, match="same"):
        sd3_p2p("a red cat", "a red dog", inversion=inversion, num_inference_steps=8, **ARGS)


def test_rf_inversion_controllers_reach_their_targets(sd3_p2p):
    photo = Image.new("RGB", (32, 32), (200, 40, 40))
    args = dict(height=32, width=32, max_sequence_length=16)
    noisy = sd3_p2p.invert(photo, "a red cat", num_inference_steps=4, gamma=1.0, seed=7, **args)
    noise = torch.randn(noisy.image_latents.shape, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(noisy.latents, noise, atol=1e-5, rtol=1e-5)  # gamma 1: exactly the noise sample
    plain = sd3_p2p.invert(photo, "a red cat", num_inference_steps=4, **args)
    assert (plain.latents - noise).abs().max() > 0.1
    pulled = sd3_p2p.invert(photo, "a red cat", num_inference_steps=4, eta=1.0, eta_steps=(0.0, 1.0), **args)
    out = sd3_p2p("a red cat", "a red dog", inversion=pulled, num_inference_steps=4, guidance_scale=1.0,
                  output_type="latent", **args)
    target = pulled.image_latents.expand(2, -1, -1, -1)
    torch.testing.assert_close(out.images, target, atol=1e-4, rtol=1e-4)  # eta 1 throughout: every row is the photo
    with pytest.raises(ValueError, match="gamma"):
        sd3_p2p.invert(photo, "a red cat", num_inference_steps=4, gamma=1.5, **args)
