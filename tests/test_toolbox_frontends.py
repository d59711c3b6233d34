"""The toolbox in our front ends (command line, batch rows) and LoRA / errors, checked against diffusers where a
result is compared (fp32, tiny components)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import ControlNetModel
from imageprompt.pipelines.toolbox import load_loras
from test_toolbox import seed

from imageprompt.toolbox import ToolboxSettings, check_controlnet, parse_lora

SAMPLE = dict(num_inference_steps=3, output_type="np")
SOURCE, TARGET = "a red circle", "a blue circle"



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
    # a photo's edit with an inpainting mask: inverted, then only the masked part changes
    assert main(["p2p", "--source", SOURCE, "--target", TARGET, "--image", str(tmp_path / "photo.png"),
                 "--invert", "ddim", "--inpaint-mask", str(tmp_path / "mask.png"), "--out", str(tmp_path / "q"),
                 *model]) == 0
    assert read_parameters(tmp_path / "q" / "photo-edit.png")["inpaint_mask"] == "mask.png"
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


def test_embedding_option_equals_diffusers_textual_inversion(tiny_model, tmp_path):
    from diffusers import StableDiffusionPipeline
    from imageprompt.pipelines.loading import load_pipeline
    from imageprompt.pipelines.toolbox import load_embeddings
    from safetensors.torch import save_file

    model_dir, clip_dir = tiny_model
    pipe = load_pipeline(str(model_dir), str(clip_dir), device="cpu", dtype="fp32")
    pipe.set_progress_bar_config(disable=True)
    width = pipe.text_encoder.get_input_embeddings().weight.shape[1]
    save_file({"<shiny>": torch.randn(width, generator=seed(2)) * 3}, str(tmp_path / "shiny.safetensors"))
    plain = pipe(prompt="a <shiny> circle", generator=seed(), **SAMPLE).images
    load_embeddings(pipe, [str(tmp_path / "shiny.safetensors")])
    ref = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None, requires_safety_checker=False)
    ref.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    ref.load_textual_inversion(str(tmp_path / "shiny.safetensors"))
    got = pipe(prompt="a <shiny> circle", generator=seed(), **SAMPLE).images
    np.testing.assert_allclose(got, ref("a <shiny> circle", generator=seed(), **SAMPLE).images, atol=1e-4)
    assert np.abs(got - plain).max() > 1e-3
    with pytest.raises(ValueError, match="not found"):
        load_embeddings(pipe, [str(tmp_path / "absent.safetensors")])
