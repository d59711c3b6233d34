"""The techniques compose: state lives on the UNet, so every pipeline over it sees the same
adapters, editors and backend; prompt-to-prompt takes image adapters and SD-IPC sources."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from imageprompt.pipelines import StableDiffusionImagePromptPipeline, StableDiffusionPromptToPromptPipeline
from PIL import Image
from test_ip_adapter import TINY_ENCODER, two_images, write_official

from imageprompt.sdipc_branch import enable_sdipc_branch
from imageprompt.testing import ip_adapter_state_dict

SOURCE, TARGET = "a red circle", "a blue circle"
SAMPLE = dict(num_inference_steps=3, guidance_scale=7.5, height=32, width=32, output_type="np")


@pytest.fixture
def base(tiny_pipe):
    yield tiny_pipe
    tiny_pipe.unload_ip_adapter()


@pytest.fixture(scope="module")
def encoder():
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(1)
    return CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY_ENCODER)).eval()


def noise(pipe, seed=0):
    side = SAMPLE["height"] // pipe.vae_scale_factor
    return torch.randn(1, pipe.unet.config.in_channels, side, side, generator=torch.Generator().manual_seed(seed))


def p2p(pipe, **kwargs):
    return pipe(SOURCE, TARGET, latents=noise(pipe), **SAMPLE, **kwargs).images


def test_p2p_with_an_official_ip_adapter(base, encoder):
    pipe = StableDiffusionPromptToPromptPipeline.from_pipe(base)
    plain = p2p(pipe)
    pipe.load_ip_adapter(ip_adapter_state_dict(base.unet, "sd15", encoder.config), image_encoder=encoder)
    image, _ = two_images()
    with_image = p2p(pipe, ip_adapter_image=image)
    assert with_image.shape == plain.shape == (2, 32, 32, 3)
    assert np.abs(with_image - plain).max() > 1e-3  # the image branch acts on source and target
    pipe.set_ip_adapter_scale(0.0)
    np.testing.assert_allclose(p2p(pipe, ip_adapter_image=image), plain, atol=1e-6)  # scale 0: the plain edit


def test_p2p_with_the_sdipc_branch(base, red_image):
    pipe = StableDiffusionPromptToPromptPipeline.from_pipe(base)
    plain = p2p(pipe)
    enable_sdipc_branch(pipe, scale=1.0)
    assert [a.kind for a in base.image_adapters] == ["sdipc"]  # installed through one pipeline, seen by the other
    assert np.abs(p2p(pipe, ip_adapter_image=red_image) - plain).max() > 1e-3
    pipe.set_ip_adapter_scale(0.0)
    np.testing.assert_allclose(p2p(pipe, ip_adapter_image=red_image), plain, atol=1e-6)


def test_p2p_without_the_adapters_image_is_a_clear_error(base, encoder):
    pipe = StableDiffusionPromptToPromptPipeline.from_pipe(base)
    base.load_ip_adapter(ip_adapter_state_dict(base.unet, "sd15", encoder.config), image_encoder=encoder)
    with pytest.raises(ValueError, match="ip_adapter_image"):
        p2p(pipe)


def test_p2p_of_an_sdipc_variation_source(base, red_image):
    pipe = StableDiffusionPromptToPromptPipeline.from_pipe(base)
    edited = p2p(pipe, image=red_image, image_mode="variation", alpha=0.5)
    # The source row is the SD-IPC variation itself: the image pipeline, same noise, another code path.
    variation = base(image=red_image, latents=noise(pipe), **SAMPLE).images
    np.testing.assert_allclose(edited[0], variation[0], atol=1e-4)
    # The target is image + text, edited with the source's attention: not the source again.
    assert np.abs(edited[1] - edited[0]).max() > 1e-3
    as_edit = p2p(pipe, image=red_image, image_mode="edit", alpha=0.5)
    assert np.abs(as_edit[0] - edited[0]).max() > 1e-3  # an edit source is image + source text
    with pytest.raises(ValueError, match="image_mode"):
        p2p(pipe, image_mode="variation")


def test_sibling_pipelines_share_adapters_and_backend(base, encoder, tmp_path):
    from imageprompt.attention import imageprompt_processors

    sibling = StableDiffusionPromptToPromptPipeline.from_pipe(base)
    assert sibling.unet is base.unet
    base.load_ip_adapter(ip_adapter_state_dict(base.unet, "sd15", encoder.config), image_encoder=encoder)
    assert [a.kind for a in sibling.image_adapters] == ["sd15"]
    sibling.set_ip_adapter_scale(0.3)
    assert all(b.scale == [0.3] for b in _branches(base))
    sibling.unload_ip_adapter()
    assert base.image_adapters == [] and base.unet.encoder_hid_proj is None

    processors = imageprompt_processors(base.unet)
    first = next(iter(processors.values()))
    try:
        first.backend = "xformers"  # as set_attention("xformers") leaves it on a GPU; not run here
        StableDiffusionPromptToPromptPipeline.from_pipe(base)
        StableDiffusionImagePromptPipeline(**base.components)
        after = imageprompt_processors(base.unet)
        assert after[next(iter(after))] is first and first.backend == "xformers"
        assert all(after[n] is p for n, p in processors.items())  # same processors, hooks and all
    finally:
        first.backend = "sdpa"


def test_from_pipe_keeps_the_shared_modules_dtype(tiny_model):
    from imageprompt.pipelines.loading import load_pipeline

    half = load_pipeline(str(tiny_model[0]), str(tiny_model[1]), device="cpu", dtype="bf16")
    sibling = StableDiffusionPromptToPromptPipeline.from_pipe(half)
    for pipe in (half, sibling):
        assert pipe.unet.dtype == pipe.vae.dtype == pipe.text_encoder.dtype == torch.bfloat16
        assert pipe.converter.text_projection.weight.dtype == torch.float32  # the conversion stays fp32


def _branches(pipe):
    from imageprompt.ip_adapter import image_branches

    return list(image_branches(pipe.unet).values())


def test_inversion_with_an_adapter_loaded_inverts_under_the_text(base, encoder, noise_image):
    pipe = StableDiffusionPromptToPromptPipeline.from_pipe(base)
    from diffusers import DDIMScheduler

    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    plain = pipe.invert(noise_image, SOURCE, "ddim", 3, 7.5, 32, 32).latents
    pipe.load_ip_adapter(ip_adapter_state_dict(base.unet, "sd15", encoder.config), image_encoder=encoder)
    pipe.set_ip_adapter_scale(0.7)
    inverted = pipe.invert(noise_image, SOURCE, "ddim", 3, 7.5, 32, 32).latents
    np.testing.assert_allclose(inverted, plain, atol=1e-6)
    assert [a.kind for a in pipe.image_adapters] == ["sd15"]
    assert all(b.scale == [0.7] for b in _branches(pipe))  # back, with its scale


def test_cli_p2p_with_an_adapter(tiny_model, encoder, tiny_pipe, tmp_path, capsys):
    from imageprompt.cli.main import main
    from imageprompt.images import read_parameters

    weights = write_official(ip_adapter_state_dict(tiny_pipe.unet, "sd15", encoder.config),
                             tmp_path / "ip.safetensors")
    encoder.save_pretrained(tmp_path / "encoder")
    two_images()[0].save(tmp_path / "ref.png")
    out = tmp_path / "out"
    code = main(["p2p", "--source", SOURCE, "--target", TARGET, "--adapter", str(weights), "--adapter-image",
                 str(tmp_path / "ref.png"), "--image-encoder", str(tmp_path / "encoder"), "--scale", "0.6",
                 "--steps", "2", "--seed", "3", "--height", "32", "--width", "32",
                 "--model", str(tiny_model[0]), "--clip", str(tiny_model[1]), "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    edit = read_parameters(out / "p2p-edit-3.png")
    assert edit["adapters"] == [str(weights)] and edit["adapter_scales"] == [0.6]
    assert edit["adapter_images"] == ["ref.png"] and edit["method"] == "p2p"
    tiny_pipe.unload_ip_adapter()

    code = main(["p2p", "--source", SOURCE, "--target", TARGET, "--adapter", str(weights), "--out", str(out),
                 "--model", str(tiny_model[0])])
    assert code == 1 and "--adapter-image" in capsys.readouterr().err


def test_cli_p2p_with_an_adapter_on_the_bundled_model(tmp_path, capsys):
    from imageprompt.checkpoints import BUNDLED_CLIP, BUNDLED_IP_ADAPTER

    from imageprompt.cli.main import main

    Image.new("RGB", (64, 64), (50, 80, 225)).save(tmp_path / "blue.png")
    code = main(["p2p", "--source", "a red circle on the left", "--target", "a green circle on the left",
                 "--adapter", str(BUNDLED_IP_ADAPTER), "--adapter-image", str(tmp_path / "blue.png"),
                 "--image-encoder", str(BUNDLED_CLIP), "--scale", "0.5", "--steps", "3", "--seed", "0",
                 "--out", str(tmp_path / "out")])
    assert code == 0, capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["p2p-edit-0.png", "p2p-source-0.png"]


def test_a_type_error_inside_the_library_is_not_a_user_error(tiny_model, tmp_path, monkeypatch, capsys):
    from imageprompt.cli.main import main

    def broken(*args, **kwargs):
        raise TypeError("argument of type 'NoneType' is not iterable")

    monkeypatch.setattr(StableDiffusionPromptToPromptPipeline, "__call__", broken)
    code = main(["p2p", "--source", SOURCE, "--target", TARGET, "--steps", "1", "--model", str(tiny_model[0]),
                 "--clip", str(tiny_model[1]), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 1 and "unexpected TypeError" in err and "--debug" in err


def test_per_block_scales_survive_adding_removing_and_suspending(base, encoder):
    from imageprompt.ip_adapter import adapters_suspended, layer_scales
    from imageprompt.sdipc_branch import disable_sdipc_branch

    base.load_ip_adapter(ip_adapter_state_dict(base.unet, "sd15", encoder.config), image_encoder=encoder)
    base.set_ip_adapter_scale({"up": {"block_1": [0.0, 1.0]}})  # InstantStyle: layers differ
    before = layer_scales(base.unet)
    assert len({tuple(v) for v in before.values()}) > 1
    enable_sdipc_branch(base, scale=0.5)
    assert layer_scales(base.unet) == {name: [*v, 0.5] for name, v in before.items()}
    disable_sdipc_branch(base)
    assert layer_scales(base.unet) == before
    with adapters_suspended(base.unet):
        assert base.image_adapters == [] and layer_scales(base.unet) == {}
    assert layer_scales(base.unet) == before and [a.kind for a in base.image_adapters] == ["sd15"]
