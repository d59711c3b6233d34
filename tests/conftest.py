"""Shared fixtures: tiny random SD 1.x components saved as folders and loaded the way users load models."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

# Tiny models gain nothing from more threads, and parallel test runs on a
# small machine slow down badly when OpenMP threads contend.
torch.set_num_threads(int(os.environ.get("IMAGEPROMPT_TEST_THREADS", "1")))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """``(model_dir, clip_dir)``: a tiny SD 1.x diffusers folder and a tiny CLIPModel folder."""
    from imageprompt.testing import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny_pipe(tiny_model):
    """The SD-IPC pipeline on the tiny model, loaded through :func:`imageprompt.load_pipeline` (CPU, fp32)."""
    from imageprompt.pipelines.loading import load_pipeline

    model_dir, clip_dir = tiny_model
    pipe = load_pipeline(str(model_dir), str(clip_dir), device="cpu", dtype="fp32")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def p2p_pipe(tiny_pipe):
    """The prompt-to-prompt pipeline on the tiny model's components."""
    from imageprompt.pipelines import StableDiffusionPromptToPromptPipeline

    pipe = StableDiffusionPromptToPromptPipeline.from_pipe(tiny_pipe)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory):
    """``(model_dir, clip_l_dir, clip_g_dir)``: a tiny SDXL diffusers folder and its ViT-L and bigG CLIP folders."""
    from imageprompt.testing_xl import save_tiny_sdxl

    return save_tiny_sdxl(tmp_path_factory.mktemp("tiny-sdxl"))


@pytest.fixture(scope="session")
def sdxl_pipe(tiny_sdxl):
    """The SDXL imageprompt pipeline on the tiny SDXL, loaded through :func:`imageprompt.load_pipeline` (CPU, fp32)."""
    from imageprompt.pipelines.loading import load_pipeline

    model_dir, clip_l, clip_g = tiny_sdxl
    pipe = load_pipeline(str(model_dir), str(clip_l), device="cpu", dtype="fp32", clip_2=str(clip_g))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def tiny_sd3(tmp_path_factory):
    """``(model_dir, clip_l_dir, clip_g_dir)``: a tiny SD3 diffusers folder and its ViT-L and bigG CLIP folders."""
    from imageprompt.testing_sd3 import save_tiny_sd3

    return save_tiny_sd3(tmp_path_factory.mktemp("tiny-sd3"))


@pytest.fixture
def red_image():
    return Image.new("RGB", (48, 40), (220, 30, 30))


@pytest.fixture
def noise_image():
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8))


# ------------------------------------------------ the toolbox tests' inputs (test_toolbox*.py)
@pytest.fixture(scope="module")
def controlnet(tiny_pipe):
    """A ControlNet made from the tiny UNet, its zero convolutions randomised."""
    from imageprompt.testing import random_controlnet

    return random_controlnet(tiny_pipe.unet)


@pytest.fixture
def control():
    from imageprompt.testing import toolbox_images

    return toolbox_images()["control"]


@pytest.fixture
def photo():
    from imageprompt.testing import toolbox_images

    return toolbox_images()["photo"]


@pytest.fixture
def mask():
    from imageprompt.testing import toolbox_images

    return toolbox_images()["mask"]


@pytest.fixture
def red_path(tmp_path):
    """A 40x40 red PNG file (the command-line tests' input)."""
    from PIL import Image

    path = tmp_path / "red.png"
    Image.new("RGB", (40, 40), (220, 30, 30)).save(path)
    return path
