"""Model references: what kind of reference it is, and clear failures."""

from __future__ import annotations

import pytest
import torch
from imageprompt.pipelines.loading import load_pipeline

from imageprompt.loading import ModelLoadError, model_kind, resolve_dtype


def test_model_kind(tmp_path, tiny_model):
    model_dir, _ = tiny_model
    assert model_kind(str(model_dir)) == "folder"
    assert model_kind("stable-diffusion-v1-5/stable-diffusion-v1-5") == "hub"
    single = tmp_path / "model.safetensors"
    single.write_bytes(b"x")
    assert model_kind(str(single)) == "file"
    with pytest.raises(ModelLoadError, match="must end in .safetensors or .ckpt"):
        (tmp_path / "model.bin").write_bytes(b"x")
        model_kind(str(tmp_path / "model.bin"))
    with pytest.raises(ModelLoadError, match="no model_index.json"):
        model_kind(str(tmp_path))
    with pytest.raises(ModelLoadError, match="no such file or folder"):
        model_kind("./nowhere/model.safetensors")


def test_broken_single_file_is_a_clear_error(tmp_path, tiny_model):
    _, clip_dir = tiny_model
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x00" * 64)
    with pytest.raises(ModelLoadError, match="could not load the Stable Diffusion model from .*broken.safetensors"):
        load_pipeline(str(broken), str(clip_dir), device="cpu")


def test_clip_folder_must_hold_a_clip_model(tmp_path, tiny_model):
    model_dir, _ = tiny_model
    with pytest.raises(ModelLoadError, match="not a transformers CLIPModel folder"):
        load_pipeline(str(model_dir), str(tmp_path), device="cpu")


def test_dtype_defaults():
    assert resolve_dtype(None, torch.device("cpu")) == torch.float32
    assert resolve_dtype(None, torch.device("cuda")) == torch.float16
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ValueError, match="dtype must be one of"):
        resolve_dtype("fp8", torch.device("cpu"))


def test_bf16_pipeline_runs_on_cpu(tiny_model, red_image):
    model_dir, clip_dir = tiny_model
    pipe = load_pipeline(str(model_dir), str(clip_dir), device="cpu", dtype="bf16")
    pipe.set_progress_bar_config(disable=True)
    assert pipe.unet.dtype == torch.bfloat16 and pipe.sdipc_image_encoder.dtype == torch.bfloat16
    out = pipe(image=red_image, num_inference_steps=2, output_type="np")
    assert out.images.shape == (1, 32, 32, 3)
