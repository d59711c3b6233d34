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
from imageprompt.pipelines.toolbox import load_loras, sdipc_embeds
from PIL import Image

from imageprompt.attach import attach
from imageprompt.p2p import PromptToPromptSettings
from imageprompt.testing import ip_adapter_state_dict
from imageprompt.toolbox import ToolboxSettings, check_controlnet, parse_lora

STEPS = 3
SAMPLE = dict(num_inference_steps=STEPS, output_type="np")


def seed(n=0):
    return torch.Generator().manual_seed(n)


@pytest.fixture(scope="module")
def controlnet(tiny_pipe):
    """diffusers' ``ControlNetModel.from_unet`` on the tiny UNet, its zero convolutions made random (else any scale
    is scale 0)."""
    torch.manual_seed(5)
    net = ControlNetModel.from_unet(tiny_pipe.unet, conditioning_embedding_out_channels=(8, 16)).eval()
    with torch.no_grad():
        for block in [*net.controlnet_down_blocks, net.controlnet_mid_block]:
            for p in block.parameters():
                p.normal_(0, 0.3)
    return net


@pytest.fixture
def control():
    rng = np.random.default_rng(7)
    return Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))


@pytest.fixture
def photo():
    image = Image.new("RGB", (32, 32), (30, 60, 200))
    image.paste((240, 200, 20), (8, 8, 24, 24))
    return image


@pytest.fixture
def mask():
    image = Image.new("L", (32, 32), 0)
    image.paste(255, (0, 0, 16, 32))
    return image


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


# -------------------------------------------------------------------- LoRA
def test_lora_option_equals_diffusers_set_adapters(tiny_model, tmp_path):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from imageprompt.pipelines.loading import load_pipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    model_dir, clip_dir = tiny_model
    torch.manual_seed(1)
    unet = UNet2DConditionModel.from_pretrained(model_dir / "unet")
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=["to_q", "to_k", "to_v"]))
    StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=get_peft_model_state_dict(unet),
                                              safe_serialization=True)
    lora = tmp_path / "pytorch_lora_weights.safetensors"
    pipe = load_pipeline(str(model_dir), str(clip_dir), device="cpu", dtype="fp32")
    pipe.set_progress_bar_config(disable=True)
    assert load_loras(pipe, [f"{lora}:0.5"]) == ["lora0"]
    ref = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None, requires_safety_checker=False)
    ref.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    ref.load_lora_weights(str(tmp_path), adapter_name="x")
    ref.set_adapters(["x"], adapter_weights=[0.5])
    np.testing.assert_allclose(pipe(prompt=SOURCE, generator=seed(), **SAMPLE).images,
                               ref(SOURCE, generator=seed(), **SAMPLE).images, atol=1e-4)
    (tmp_path / "x.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="not a .safetensors"):
        load_loras(pipe, [str(tmp_path / "x.bin")])


# ------------------------------------------------------------------ errors
def test_one_line_errors(tiny_pipe, photo, mask, control, controlnet):
    with pytest.raises(ValueError, match=r"strength.*\(0, 1\]"):
        ToolboxSettings(init_image=photo, strength=0.0)
    with pytest.raises(ValueError, match=r"strength.*\(0, 1\]"):
        ToolboxSettings(init_image=photo, strength=1.5)
    with pytest.raises(ValueError, match="mask of its size"):
        ToolboxSettings(init_image=photo, mask=mask.resize((16, 16)))
    with pytest.raises(ValueError, match="needs the image it masks"):
        ToolboxSettings(mask=mask)
    with pytest.raises(ValueError, match="differ in size"):
        ToolboxSettings(init_image=photo, control_images=[control.resize((40, 32))])
    with pytest.raises(ValueError, match="is sampled"):
        tiny_pipe(prompt=SOURCE, height=48, width=48, toolbox=ToolboxSettings(init_image=photo), **SAMPLE)
    with pytest.raises(ValueError, match="needs its control image"):
        tiny_pipe(prompt=SOURCE, controlnet=controlnet, **SAMPLE)
    other = ControlNetModel.from_unet(tiny_pipe.unet, conditioning_embedding_out_channels=(8, 16))
    other.register_to_config(cross_attention_dim=64)
    with pytest.raises(ValueError, match="made for another UNet: its cross_attention_dim is 64"):
        check_controlnet(other, tiny_pipe.unet)
    assert parse_lora("a/b.safetensors:0.3") == ("a/b.safetensors", 0.3)
    assert parse_lora("a/b.safetensors") == ("a/b.safetensors", 1.0)


# --------------------------------------------------------------- command line
def test_cli_vary_and_p2p_with_controlnet_init_image_and_mask(tiny_model, tiny_pipe, controlnet, control, photo,
                                                              mask, tmp_path, red_image, capsys):
    from imageprompt.cli.main import main
    from imageprompt.images import read_parameters

    controlnet.save_pretrained(tmp_path / "cn")
    other = ControlNetModel.from_config({**controlnet.config, "cross_attention_dim": 48})
    other.save_pretrained(tmp_path / "other-cn")
    for name, image in (("ref", red_image), ("control", control), ("photo", photo), ("mask", mask)):
        image.save(tmp_path / f"{name}.png")
    mask.resize((16, 16)).save(tmp_path / "small-mask.png")
    model = ["--model", str(tiny_model[0]), "--clip", str(tiny_model[1]), "--steps", "2", "--seed", "5"]
    ref, out = str(tmp_path / "ref.png"), str(tmp_path / "out")
    assert main(["vary", ref, "--controlnet", str(tmp_path / "cn"), "--control-image", str(tmp_path / "control.png"),
                 "--control-scale", "0.5", "--init-image", str(tmp_path / "photo.png"), "--strength", "0.6",
                 "--inpaint-mask", str(tmp_path / "mask.png"), "--out", out, *model]) == 0
    params = read_parameters(tmp_path / "out" / "ref-vary-5.png")
    assert params["controlnet"] == [str(tmp_path / "cn")] and params["control_scale"] == [0.5]
    assert params["strength"] == 0.6 and params["inpaint_mask"] == "mask.png"
    assert main(["p2p", "--source", SOURCE, "--target", TARGET, "--controlnet", str(tmp_path / "cn"),
                 "--control-image", str(tmp_path / "control.png"), "--out", str(tmp_path / "p"), *model]) == 0
    assert read_parameters(tmp_path / "p" / "p2p-edit-5.png")["control_image"] == ["control.png"]
    capsys.readouterr()
    cases = [
        (["--controlnet", str(tmp_path / "cn")], "--controlnet needs its --control-image"),
        (["--init-image", str(tmp_path / "photo.png"), "--strength", "0"], "--strength must be in (0, 1]"),
        (["--init-image", str(tmp_path / "photo.png"), "--strength", "1.5"], "--strength must be in (0, 1]"),
        (["--init-image", str(tmp_path / "photo.png"), "--inpaint-mask", str(tmp_path / "small-mask.png")],
         "of its size"),
        (["--init-image", str(tmp_path / "photo.png"), "--height", "48"], "is sampled"),
        (["--controlnet", str(tmp_path / "other-cn"), "--control-image", str(tmp_path / "control.png")],
         "made for another UNet: its cross_attention_dim is 48"),
    ]
    for extra, message in cases:
        assert main(["vary", ref, "--out", str(tmp_path / "bad"), *model, *extra]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("imageprompt: error:") and message in err[-1], err
    assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").iterdir())


# -------------------------------------------------------------------- batch
def test_batch_rows_with_controlnet_init_image_and_mask(tiny_pipe, controlnet, control, photo, mask, red_image,
                                                        tmp_path):
    import json

    from imageprompt.images import read_parameters
    from imageprompt.jobs import RESULTS, JobDefaults, JobOptions, run_job

    controlnet.save_pretrained(tmp_path / "cn")
    ControlNetModel.from_config({**controlnet.config, "cross_attention_dim": 48}).save_pretrained(tmp_path / "other")
    for name, image in (("ref", red_image), ("control", control), ("photo", photo), ("mask", mask)):
        image.save(tmp_path / f"{name}.png")
    mask.resize((16, 16)).save(tmp_path / "small.png")
    cn = {"controlnet": "cn", "control_image": "control.png", "control_scale": 0.5}
    rows = [
        {"kind": "vary", "image": "ref.png", **cn},
        {"kind": "edit", "image": "ref.png", "prompt": "a circle", "init_image": "photo.png", "strength": 0.6,
         "inpaint_mask": "mask.png"},
        {"kind": "p2p", "prompt": SOURCE, "target": TARGET, "init_image": "photo.png", **cn},
        {"kind": "vary", "image": "ref.png", "controlnet": "cn"},
        {"kind": "vary", "image": "ref.png", "init_image": "photo.png", "strength": 2.0},
        {"kind": "vary", "image": "ref.png", "init_image": "photo.png", "inpaint_mask": "small.png"},
        {"kind": "vary", "image": "ref.png", "init_image": "photo.png", "height": 48},
        {"kind": "vary", "image": "ref.png", "controlnet": "other", "control_image": "control.png"},
    ]
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    run_job(jobs, out, pipe=tiny_pipe, defaults=JobDefaults(steps=2, height=32, width=32),
            options=JobOptions(batch_size=4, progress=False))
    records = {r["line"]: r for r in map(json.loads, (out / RESULTS).read_text().splitlines())}
    assert {line for line, r in records.items() if r["status"] == "done"} == {1, 2, 3}, records
    assert read_parameters(out / records[1]["outputs"][0])["control_scale"] == 0.5
    errors = {4: "'controlnet' and 'control_image' go together", 5: "'strength' must be in (0, 1]",
              6: "give a mask of the image's size", 7: "give images of the output size",
              8: "made for another UNet: its cross_attention_dim is 48"}
    for line, message in errors.items():
        assert message in records[line]["error"], records[line]
