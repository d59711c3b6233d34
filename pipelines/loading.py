"""Load a Stable Diffusion 1.x model as imageprompt's pipeline: hub ids, local diffusers folders
and single-file checkpoints, with the CLIP parts SD-IPC needs (:func:`load_pipeline`).

The loaders that do not depend on a pipeline class (CLIP parts, VAEs, devices, dtypes,
errors, offline detection) are :mod:`imageprompt.loading`; this module holds what needs
imageprompt's pipeline classes (:func:`load_pipeline`, :func:`load_sd_components`, which
picks the class a saved folder names, :func:`prompt_to_prompt_from`). It stays a module of
its own because the library layer never imports :mod:`imageprompt.pipelines`, not even
inside a function (``tests/test_layout.py``), and the pipelines import
:mod:`imageprompt.loading`. ``load_vae`` and ``single_file_is_sdxl`` are re-exported here.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from imageprompt.loading import (  # noqa: F401 (load_vae, single_file_is_sdxl: re-exported)
    ModelLoadError,
    default_device,
    hub_offline,
    load_clip_parts,
    load_error,
    load_vae,
    make_scheduler,
    model_kind,
    quiet_torchvision_notices,
    resolve_dtype,
    resolve_model,
    single_file_is_sdxl,
)

logger = logging.getLogger("imageprompt.loading")


def load_sd_components(model: str, dtype: torch.dtype, config: str | None = None) -> dict:
    """vae, text_encoder(s), tokenizer(s), unet, scheduler of an SD 1.x or SDXL model (and any imageprompt parts
    it holds). A single file's family is read from its tensor names (:func:`single_file_is_sdxl`)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    kind = model_kind(model)
    common = dict(dtype=dtype, safety_checker=None, requires_safety_checker=False)
    try:
        if kind == "file":
            # with a local --config nothing comes from the hub: no need to ask whether it answers
            local_config = config is not None and Path(config).expanduser().is_dir()
            single = StableDiffusionPipeline
            if single_file_is_sdxl(model):
                single, common = StableDiffusionXLPipeline, dict(dtype=dtype, add_watermarker=False)
            pipe = single.from_single_file(
                model, config=config, local_files_only=True if local_config else (hub_offline() or None), **common
            )
        else:
            local_only = kind == "folder" or hub_offline()
            try:
                cls, kwargs = _pipeline_class(model, local_only, common)
                pipe = cls.from_pretrained(model, local_files_only=local_only, **kwargs)
            except (OSError, ValueError):
                if local_only:
                    raise
                # the hub is unreachable: a cached copy may still be there
                cls, kwargs = _pipeline_class(model, True, common)
                pipe = cls.from_pretrained(model, local_files_only=True, **kwargs)
    except ModelLoadError:
        raise
    except Exception as err:  # diffusers/hub raise many types for "not there"
        raise load_error("the Stable Diffusion model", model, err) from None
    return dict(pipe.components)


def _model_index(model: str, local_only: bool) -> dict:
    """A diffusers folder's or hub repository's ``model_index.json`` (huggingface_hub's own download: diffusers'
    ``load_config`` passes the deprecated ``local_dir_use_symlinks``, which huggingface_hub warns about)."""
    import json

    from huggingface_hub import hf_hub_download

    folder = Path(model).expanduser()
    path = folder / "model_index.json" if folder.is_dir() else Path(
        hf_hub_download(model, "model_index.json", local_files_only=local_only))
    return json.loads(path.read_text())


def _pipeline_class(model: str, local_only: bool, common: dict):
    """imageprompt's own pipeline class for folders it saved, else diffusers' generic loader; and the loading
    arguments (SDXL pipelines have no safety checker: those arguments are left out, else diffusers warns)."""
    import imageprompt.pipelines as ours
    from diffusers import DiffusionPipeline

    name = _model_index(model, local_only).get("_class_name", "")
    if "XL" in name or name.startswith("StableDiffusion3"):
        common = {k: v for k, v in common.items() if k not in ("safety_checker", "requires_safety_checker")}
    return getattr(ours, name, DiffusionPipeline), common


def load_pipeline(
    model: str | None = None,
    clip: str | None = None,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    attention: str = "sdpa",
    scheduler: str | None = "ddim",
    config: str | None = None,
    vae: str | None = None,
    clip_2: str | None = None,
):
    """Load a :class:`StableDiffusionImagePromptPipeline` (SD 1.x) or, when the UNet is SDXL's,
    a :class:`StableDiffusionXLImagePromptPipeline`, ready to sample.

    Args:
        model: hub id, diffusers folder or single-file checkpoint (default: SD 1.5 if cached, else bundled).
        clip: hub id or ``CLIPModel`` folder for the conversion (default: ViT-L/14, or the bundled CLIP).
        dtype: ``"fp32"``, ``"fp16"``, ``"bf16"`` or a torch dtype (default: fp16 on GPU, fp32 on CPU).
        device: default CUDA, then MPS, then CPU.
        attention: ``"sdpa"`` or ``"xformers"`` (falls back to SDPA with a warning when unusable).
        scheduler: a name from :data:`SCHEDULERS`, or None to keep the model's own.
        config: for single files, a local diffusers folder to take the configs from (no network needed).
        vae: a VAE (hub id, folder or single file) replacing the model's own, e.g. madebyollama/sdxl-vae-fp16-fix.
        clip_2: SDXL only: hub id or ``CLIPModel`` folder of OpenCLIP bigG, whose vision tower SD-IPC uses
            (default: laion/CLIP-ViT-bigG-14-laion2B-39B-b160k).
    """
    quiet_torchvision_notices()  # before transformers' image processors are first imported
    from imageprompt.pipelines.pipeline_sdipc import StableDiffusionImagePromptPipeline, legacy_names
    from imageprompt.pipelines.pipeline_sdipc_xl import is_sdxl_unet

    from imageprompt.conversion import SD1_EOS_NORM, is_sd1_text_encoder, measure_eos_norm

    device = torch.device(device) if device is not None else default_device()
    torch_dtype = resolve_dtype(dtype, device)
    model, clip, notice = resolve_model(model, clip)
    if notice:
        logger.warning(notice)
    parts = load_sd_components(model, torch_dtype, config)
    if parts.get("transformer") is not None:  # SD3 / 3.5 (model_index.json names StableDiffusion3Pipeline)
        return _sd3_pipeline(parts, model, clip, clip_2, torch_dtype, device, attention, scheduler, vae)
    if vae is not None:
        parts["vae"] = load_vae(vae, torch_dtype)
    legacy_names(parts)
    if is_sdxl_unet(parts["unet"]):
        pipe = _sdxl_pipeline(parts, clip, clip_2 or DEFAULT_CLIP_BIGG, torch_dtype)
    else:
        if parts.get("converter") is None or parts.get("sdipc_image_encoder") is None:
            parts.update(load_clip_parts(clip, torch_dtype))
            text_encoder, tokenizer = parts["text_encoder"], parts["tokenizer"]
            scale = SD1_EOS_NORM if is_sd1_text_encoder(text_encoder) else measure_eos_norm(text_encoder, tokenizer)
            parts["converter"].register_to_config(scale=float(scale))
        names = ("vae", "text_encoder", "tokenizer", "unet", "scheduler", "sdipc_image_encoder", "converter",
                 "feature_extractor")
        pipe = StableDiffusionImagePromptPipeline(**{k: parts.get(k) for k in names})
    if scheduler is not None:
        pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
    pipe.to(device)
    pipe.set_attention(attention)
    pipe.model_name, pipe.clip_name = model, clip
    pipe.clip_2_name = (clip_2 or DEFAULT_CLIP_BIGG) if is_sdxl_unet(parts["unet"]) else None
    pipe.vae_name = vae
    return pipe



DEFAULT_CLIP_BIGG = "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k"


def _sdxl_pipeline(parts: dict, clip: str, clip_2: str, dtype: torch.dtype):
    """An SDXL imageprompt pipeline from loaded SDXL components: CLIP ViT-L (``clip``: its vision tower and
    text projection) and OpenCLIP bigG (``clip_2``: its vision tower) for SD-IPC, unless the folder holds them."""
    from imageprompt.pipelines.pipeline_sdipc_xl import StableDiffusionXLImagePromptPipeline

    from imageprompt.conversion_xl import SDXLConverter

    if any(parts.get(k) is None for k in ("converter", "sdipc_image_encoder", "sdipc_image_encoder_2")):
        clip_l, clip_g = load_clip_parts(clip, dtype), load_clip_parts(clip_2, dtype)
        parts.update(sdipc_image_encoder=clip_l["sdipc_image_encoder"],
                     sdipc_image_encoder_2=clip_g["sdipc_image_encoder"],
                     feature_extractor=clip_l["feature_extractor"])
        parts["converter"] = SDXLConverter.from_encoders(
            clip_l["converter"].text_projection, parts["text_encoder"], parts["text_encoder_2"], parts["tokenizer"],
            parts["tokenizer_2"])
    names = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet", "scheduler",
             "sdipc_image_encoder", "sdipc_image_encoder_2", "converter", "feature_extractor")
    return StableDiffusionXLImagePromptPipeline(**{k: parts.get(k) for k in names})


def _sd3_pipeline(parts: dict, model: str, clip: str, clip_2: str | None, dtype, device, attention: str,
                  scheduler: str | None, vae: str | None):
    """An SD3 imageprompt pipeline: SD-IPC's ViT-L (``clip``) and bigG (``clip_2``) vision towers and the closed
    form on SD3's two CLIP text towers, unless the folder holds them. SD3 samples with its own flow-matching
    scheduler and diffusers' joint attention: ``--scheduler`` (other than the default) and xformers are refused."""
    from imageprompt.pipelines.pipeline_sdipc_sd3 import StableDiffusion3ImagePromptPipeline

    from imageprompt.conversion_sd3 import SD3Converter

    if scheduler not in (None, "ddim"):
        raise ModelLoadError(f"{model}: SD3 samples with its flow-matching scheduler; --scheduler {scheduler} "
                             "does not apply")
    if attention != "sdpa":
        raise ModelLoadError(f"{model}: SD3 runs diffusers' joint attention (PyTorch SDPA); --attention {attention} "
                             "is not available")
    if vae is not None:
        parts["vae"] = load_vae(vae, dtype)
    clip_2 = clip_2 or DEFAULT_CLIP_BIGG
    if any(parts.get(k) is None for k in ("converter", "sdipc_image_encoder", "sdipc_image_encoder_2")):
        clip_l, clip_g = load_clip_parts(clip, dtype), load_clip_parts(clip_2, dtype)
        parts.update(sdipc_image_encoder=clip_l["sdipc_image_encoder"],
                     sdipc_image_encoder_2=clip_g["sdipc_image_encoder"])
        parts["converter"] = SD3Converter.from_encoders(
            parts["text_encoder"].text_projection, parts["text_encoder"], parts["text_encoder_2"],
            parts["tokenizer"], parts["tokenizer_2"])
    names = ("transformer", "scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2",
             "text_encoder_3", "tokenizer_3", "image_encoder", "feature_extractor", "sdipc_image_encoder",
             "sdipc_image_encoder_2", "converter")
    pipe = StableDiffusion3ImagePromptPipeline(**{k: parts.get(k) for k in names})
    pipe.to(device)
    pipe.model_name, pipe.clip_name, pipe.clip_2_name, pipe.vae_name = model, clip, clip_2, vae
    pipe.scheduler_name = "flow-match-euler"  # what the outputs record
    return pipe


def prompt_to_prompt_from(pipe, **kwargs):
    """The prompt-to-prompt pipeline over ``pipe``'s modules (no copies; ``kwargs`` as ``from_pipe``):
    SDXL's when the UNet is SDXL's, else SD 1.x's."""
    return edit_pipeline_from(pipe, "p2p", **kwargs)


def edit_pipeline_from(pipe, edit: str = "p2p", **kwargs):
    """The ``"p2p"`` (prompt-to-prompt) or ``"masactrl"`` pipeline over ``pipe``'s modules (no copies;
    ``kwargs`` as ``from_pipe``), for SD 1.x or SDXL as the UNet is."""
    import imageprompt.pipelines as ours
    from imageprompt.pipelines.pipeline_sdipc_xl import is_sdxl_unet

    from imageprompt.families import is_sd3_pipeline

    names = {"p2p": "PromptToPrompt", "masactrl": "MasaCtrl"}
    if edit not in names:
        raise ValueError(f"unknown edit {edit!r}; choose from {', '.join(names)}")
    if is_sd3_pipeline(pipe):
        if edit != "p2p":
            raise ValueError(f"{edit} is not available on SD3 (prompt-to-prompt is)")
        return ours.StableDiffusion3PromptToPromptPipeline.from_pipe(pipe, **kwargs)
    family = "StableDiffusionXL" if is_sdxl_unet(pipe.unet) else "StableDiffusion"
    return getattr(ours, f"{family}{names[edit]}Pipeline").from_pipe(pipe, **kwargs)
