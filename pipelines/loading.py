"""Load a Stable Diffusion 1.x model as imageprompt's pipeline: hub ids, local diffusers folders
and single-file checkpoints, with the CLIP parts SD-IPC needs (:func:`load_pipeline`).

The component loaders that do not depend on a pipeline class (CLIP parts, devices,
dtypes, errors, offline detection) are :mod:`imageprompt.loading`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from imageprompt.loading import (
    ModelLoadError,
    _load_error,
    _offline,
    default_device,
    load_clip_parts,
    make_scheduler,
    model_kind,
    quiet_torchvision_notices,
    resolve_dtype,
    resolve_model,
)

logger = logging.getLogger("imageprompt.loading")


def load_sd_components(model: str, dtype: torch.dtype, config: str | None = None) -> dict:
    """vae, text_encoder, tokenizer, unet, scheduler of an SD 1.x model (and any imageprompt parts it holds)."""
    from diffusers import StableDiffusionPipeline

    kind = model_kind(model)
    common = dict(dtype=dtype, safety_checker=None, requires_safety_checker=False)
    try:
        if kind == "file":
            # with a local --config nothing comes from the hub: no need to ask whether it answers
            local_config = config is not None and Path(config).expanduser().is_dir()
            pipe = StableDiffusionPipeline.from_single_file(
                model, config=config, local_files_only=True if local_config else (_offline() or None), **common
            )
        else:
            local_only = kind == "folder" or _offline()
            try:
                pipe = _pipeline_class(model, local_only).from_pretrained(model, local_files_only=local_only, **common)
            except (OSError, ValueError):
                if local_only:
                    raise
                # the hub is unreachable: a cached copy may still be there
                pipe = _pipeline_class(model, True).from_pretrained(model, local_files_only=True, **common)
    except ModelLoadError:
        raise
    except Exception as err:  # diffusers/hub raise many types for "not there"
        raise _load_error("the Stable Diffusion model", model, err) from None
    return dict(pipe.components)


def _pipeline_class(model: str, local_only: bool):
    """imageprompt's own pipeline class for folders it saved, else diffusers' generic loader."""
    import imageprompt.pipelines as ours
    from diffusers import DiffusionPipeline

    name = DiffusionPipeline.load_config(model, local_files_only=local_only).get("_class_name", "")
    return getattr(ours, name, DiffusionPipeline)


def load_pipeline(
    model: str | None = None,
    clip: str | None = None,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    attention: str = "sdpa",
    scheduler: str | None = "ddim",
    config: str | None = None,
):
    """Load a :class:`StableDiffusionImagePromptPipeline` ready to sample.

    Args:
        model: hub id, diffusers folder or single-file checkpoint (default: SD 1.5 if cached, else bundled).
        clip: hub id or ``CLIPModel`` folder for the conversion (default: ViT-L/14, or the bundled CLIP).
        dtype: ``"fp32"``, ``"fp16"``, ``"bf16"`` or a torch dtype (default: fp16 on GPU, fp32 on CPU).
        device: default CUDA, then MPS, then CPU.
        attention: ``"sdpa"`` or ``"xformers"`` (falls back to SDPA with a warning when unusable).
        scheduler: a name from :data:`SCHEDULERS`, or None to keep the model's own.
        config: for single files, a local diffusers folder to take the configs from (no network needed).
    """
    quiet_torchvision_notices()  # before transformers' image processors are first imported
    from imageprompt.pipelines.pipeline_sdipc import StableDiffusionImagePromptPipeline

    from imageprompt.conversion import SD1_EOS_NORM, is_sd1_text_encoder, measure_eos_norm

    device = torch.device(device) if device is not None else default_device()
    torch_dtype = resolve_dtype(dtype, device)
    model, clip, notice = resolve_model(model, clip)
    if notice:
        logger.warning(notice)
    parts = load_sd_components(model, torch_dtype, config)
    if parts.get("converter") is None or parts.get("image_encoder") is None:
        parts.update(load_clip_parts(clip, torch_dtype))
        text_encoder, tokenizer = parts["text_encoder"], parts["tokenizer"]
        scale = SD1_EOS_NORM if is_sd1_text_encoder(text_encoder) else measure_eos_norm(text_encoder, tokenizer)
        parts["converter"].register_to_config(scale=float(scale))
    names = ("vae", "text_encoder", "tokenizer", "unet", "scheduler", "image_encoder", "converter",
             "feature_extractor")
    pipe = StableDiffusionImagePromptPipeline(**{k: parts.get(k) for k in names})
    if scheduler is not None:
        pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
    pipe.to(device)
    pipe.set_attention(attention)
    pipe.model_name, pipe.clip_name = model, clip
    return pipe

