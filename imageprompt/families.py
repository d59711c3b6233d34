"""Which model family a model or a pipeline is: Stable Diffusion 1.x / 2.x (UNet), SDXL (UNet with
``text_time``) or SD3 / 3.5 (MM-DiT ``transformer``). One rule each, read where the family matters (loading,
the command line, recorded parameters)."""

from __future__ import annotations

import json
from pathlib import Path

SD3_CLASSES = ("StableDiffusion3Pipeline", "StableDiffusion3ImagePromptPipeline",
               "StableDiffusion3PromptToPromptPipeline")


def model_class_name(model: str | None) -> str | None:
    """The ``_class_name`` of a diffusers folder's (or a cached hub repository's) ``model_index.json``; None when
    there is none to read (a single file, the default model, a repository not cached)."""
    if not model:
        return None
    folder = Path(model).expanduser()
    try:
        if folder.is_dir():
            path = folder / "model_index.json"
        elif folder.exists() or model.count("/") != 1:
            return None
        else:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(model, "model_index.json")
            if not isinstance(cached, str):
                return None
            path = Path(cached)
        return json.loads(path.read_text()).get("_class_name")
    except (OSError, ValueError):
        return None


def is_sd3_model(model: str | None) -> bool:
    """True for an SD3 / 3.5 model folder or cached repository (``model_index.json`` names an SD3 pipeline)."""
    return model_class_name(model) in SD3_CLASSES


def is_sd3_pipeline(pipe) -> bool:
    """A pipeline whose denoiser is SD3's MM-DiT."""
    transformer = getattr(pipe, "transformer", None)
    return transformer is not None and type(transformer).__name__ == "SD3Transformer2DModel"


def denoiser(pipe):
    """The pipeline's UNet, or its transformer (SD3)."""
    unet = getattr(pipe, "unet", None)
    return unet if unet is not None else pipe.transformer


def native_size(pipe) -> int:
    """The image side the model was made for (its denoiser's sample size times the VAE's factor)."""
    return int(denoiser(pipe).config.sample_size * pipe.vae_scale_factor)


def size_step(pipe) -> int:
    """Pixels per step of image side that need no padding: the VAE's factor times the UNet's total downsampling,
    or times the transformer's patch size (SD3)."""
    unet = getattr(pipe, "unet", None)
    if unet is not None:
        return pipe.vae_scale_factor * 2 ** (len(unet.config.block_out_channels) - 1)
    return pipe.vae_scale_factor * pipe.transformer.config.patch_size
