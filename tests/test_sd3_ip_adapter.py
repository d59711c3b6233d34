"""SD 3.5's IP-Adapter through our SD3 pipeline equals diffusers' own (``load_ip_adapter`` on
``StableDiffusion3Pipeline``), and composes with step windows, embedding arithmetic and joint-attention editors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from imageprompt.pipelines.pipeline_sdipc_sd3 import ip_processors
from PIL import Image

from imageprompt.attention import AttentionEditor
from imageprompt.joint_attention import joint_editor_attached
from imageprompt.testing_sd3 import save_sd3_ip_adapter, save_tiny_siglip, sd3_ip_adapter_state_dict

STEPS = 3
ARGS = dict(num_inference_steps=STEPS, height=32, width=32, max_sequence_length=16, guidance_scale=4.0,
            output_type="np")


@pytest.fixture(scope="module")
def adapter_dir(tiny_sd3, tmp_path_factory):
    """An InstantX-layout adapter folder: ``ip-adapter.safetensors`` and ``image_encoder/`` (a tiny SigLIP)."""
    from diffusers import SD3Transformer2DModel

    folder = tmp_path_factory.mktemp("sd3-ip")
    transformer = SD3Transformer2DModel.from_pretrained(tiny_sd3[0], subfolder="transformer")
    save_sd3_ip_adapter(folder / "ip-adapter.safetensors", sd3_ip_adapter_state_dict(transformer))
    save_tiny_siglip(folder / "image_encoder")
    return folder


def _load(cls, model_dir, adapter_dir, scale=0.6):
    pipe = cls.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    # a folder name with "/": diffusers 0.42 reads a bare `image_encoder_folder` relative to the working directory
    pipe.load_ip_adapter(str(adapter_dir), weight_name="ip-adapter.safetensors",
                         image_encoder_folder=str(adapter_dir / "image_encoder"))
    pipe.set_ip_adapter_scale(scale)
    return pipe


@pytest.fixture(scope="module")
def pipes(tiny_sd3, adapter_dir):
    from diffusers import StableDiffusion3Pipeline
    from imageprompt.pipelines import StableDiffusion3ImagePromptPipeline

    return (_load(StableDiffusion3Pipeline, tiny_sd3[0], adapter_dir),
            _load(StableDiffusion3ImagePromptPipeline, tiny_sd3[0], adapter_dir))


@pytest.fixture(scope="module")
def reference_image():
    rng = np.random.default_rng(1)
    return Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8))


def _gen():
    return torch.Generator().manual_seed(0)


class _ExplicitNoOp(AttentionEditor):
    """Asks for the explicit joint probabilities of every row and changes nothing."""

    def probs_rows(self, layer, rows):
        return rows


def test_ip_adapter_equals_diffusers(pipes, reference_image):
    theirs, ours = pipes
    expected = theirs("a red cat", ip_adapter_image=reference_image, generator=_gen(), **ARGS).images
    got = ours(prompt="a red cat", ip_adapter_image=reference_image, generator=_gen(), **ARGS).images
    without = theirs("a red cat", generator=_gen(), **ARGS).images
    assert np.abs(expected - without).max() > 1e-3  # the adapter changes the picture
    assert np.abs(got - expected).max() < 1e-4
    with joint_editor_attached(ours.transformer, _ExplicitNoOp()):  # our joint attention + IP branch, explicitly
        explicit = ours(prompt="a red cat", ip_adapter_image=reference_image, generator=_gen(), **ARGS).images
    assert np.abs(explicit - expected).max() < 1e-4
    assert type(ours.transformer.attn_processors["transformer_blocks.0.attn.processor"]).__name__ == \
        "SD3IPAdapterJointAttnProcessor2_0"  # diffusers' processors are back after the block


def test_step_window_equals_scale_switched_in_diffusers(pipes, reference_image):
    theirs, ours = pipes
    ours.set_ip_adapter_window((0.5, 1.0))  # steps int(0.5 * 3) = 1 and 2
    try:
        got = ours(prompt="a red cat", ip_adapter_image=reference_image, generator=_gen(), **ARGS).images
    finally:
        ours.set_ip_adapter_window(None)

    def switch(pipe, i, t, tensors):  # after call i: the scale of call i + 1
        pipe.set_ip_adapter_scale(0.6 if i + 1 >= 1 else 0.0)
        return tensors

    theirs.set_ip_adapter_scale(0.0)
    embeds = ours.encode_ip_adapter_image(reference_image)
    try:
        expected = theirs("a red cat", ip_adapter_image_embeds=embeds, generator=_gen(), callback_on_step_end=switch,
                          **ARGS).images
    finally:
        theirs.set_ip_adapter_scale(0.6)
    full = theirs("a red cat", ip_adapter_image=reference_image, generator=_gen(), **ARGS).images
    assert np.abs(got - expected).max() < 1e-4
    assert np.abs(got - full).max() > 1e-4
    assert [p.scale for p in ip_processors(ours.transformer)] == [0.6, 0.6]  # restored after the call


def test_embedding_average_is_the_mean_of_siglip_features(pipes, reference_image):
    theirs, ours = pipes
    other = Image.new("RGB", (32, 32), (10, 200, 40))
    embeds = ours.encode_ip_adapter_image([reference_image, other], combine="average")
    features = torch.cat([theirs.encode_image([im], "cpu") for im in (reference_image, other)])
    assert embeds.shape == (2, *features.shape[1:])
    assert torch.equal(embeds[0], torch.zeros_like(embeds[0]))
    torch.testing.assert_close(embeds[1], features.mean(0), atol=1e-6, rtol=0)
    got = ours(prompt="a red cat", ip_adapter_image_embeds=embeds, generator=_gen(), **ARGS).images
    expected = theirs("a red cat", ip_adapter_image_embeds=embeds, generator=_gen(), **ARGS).images
    assert np.abs(got - expected).max() < 1e-4
    concat = ours.encode_ip_adapter_image([reference_image, other])
    assert concat.shape[1] == 2 * features.shape[1]


def test_window_without_adapter_is_refused(tiny_sd3):
    from imageprompt.pipelines import StableDiffusion3ImagePromptPipeline

    pipe = StableDiffusion3ImagePromptPipeline.from_pretrained(tiny_sd3[0])
    with pytest.raises(ValueError, match="no IP-Adapter is loaded"):
        pipe.set_ip_adapter_window((0.0, 0.5))
    with pytest.raises(ValueError, match="needs an IP-Adapter"):
        pipe(prompt="a cat", ip_adapter_image=Image.new("RGB", (8, 8)), **ARGS)


def test_prompt_to_prompt_with_the_adapter(pipes, reference_image):
    from imageprompt.pipelines import StableDiffusion3PromptToPromptPipeline

    theirs, ours = pipes
    p2p = StableDiffusion3PromptToPromptPipeline.from_pipe(ours)
    p2p.set_progress_bar_config(disable=True)
    noise = torch.randn(1, 16, 16, 16, generator=_gen())
    args = {**ARGS, "output_type": "latent"}
    out = p2p("a red cat", "a blue cat", cross_steps=1.0, self_steps=0.5, latents=noise,
              ip_adapter_image=reference_image, **args)
    source = theirs("a red cat", latents=noise, ip_adapter_image=reference_image, **args).images
    torch.testing.assert_close(out.images[:1], source, atol=1e-4, rtol=0)  # the edit leaves the source as diffusers
    plain = p2p("a red cat", "a blue cat", cross_steps=1.0, self_steps=0.5, latents=noise, **args)
    assert (plain.images - out.images).abs().max() > 1e-3  # and the adapter acts on both rows
