"""Registry of known model ids, and the small model the project ships.

``shapes-sd/`` is a Stable Diffusion 1.x-architecture pipeline (diffusers
layout) and ``shapes-clip/`` the full CLIP whose text tower is its text
encoder; both are trained on the procedurally generated shapes world by
``python -m imageprompt.world.train`` (see ``imageprompt/world/train.py``).

This module is import-light on purpose: no torch, no diffusers at import time.
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent

BUNDLED_MODEL = HERE / "shapes-sd"
BUNDLED_CLIP = HERE / "shapes-clip"
# An IP-Adapter (sd15 format) for the bundled model; its image encoder is BUNDLED_CLIP's vision tower.
BUNDLED_IP_ADAPTER = HERE / "shapes-ip-adapter.safetensors"
# A ControlNet (diffusers folder) for the bundled model, conditioned on the objects' silhouette:
# ``imageprompt train-controlnet`` (imageprompt/world/train_controlnet.py).
BUNDLED_CONTROLNET = HERE / "shapes-controlnet"

SD15_MODEL_IDS: tuple[str, ...] = (
    "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "runwayml/stable-diffusion-v1-5",
)
DEFAULT_CLIP = "openai/clip-vit-large-patch14"

_UNET_WEIGHTS = (
    "unet/diffusion_pytorch_model.safetensors",
    "unet/diffusion_pytorch_model.fp16.safetensors",
    "unet/diffusion_pytorch_model.bin",
    "unet/diffusion_pytorch_model.fp16.bin",
)
_CLIP_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


def _cached(repo_id: str, filename: str, cache_dir: str | Path | None = None) -> bool:
    """Whether ``filename`` of ``repo_id`` is in the local Hugging Face cache (no network)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface_hub comes with diffusers
        return False
    try:
        found = try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir)
    except Exception:  # malformed cache, bad id: treat as absent
        return False
    return isinstance(found, str) and Path(found).is_file()


def cached_sd15(cache_dir: str | Path | None = None) -> str | None:
    """The first SD 1.5 id whose config and UNet weights are in the local cache, else None."""
    for repo_id in SD15_MODEL_IDS:
        if _cached(repo_id, "model_index.json", cache_dir) and any(
            _cached(repo_id, f, cache_dir) for f in _UNET_WEIGHTS
        ):
            return repo_id
    return None


def cached_clip(repo_id: str = DEFAULT_CLIP, cache_dir: str | Path | None = None) -> bool:
    return _cached(repo_id, "config.json", cache_dir) and any(_cached(repo_id, f, cache_dir) for f in _CLIP_WEIGHTS)


def default_model(cache_dir: str | Path | None = None) -> tuple[str, str, str]:
    """(model, clip, notice) to use when the user names no model.

    SD 1.5 with CLIP ViT-L/14 when both are already in the local Hugging Face
    cache (checked without any network access); otherwise the bundled shapes
    model, with a one-line notice saying so.
    """
    sd = cached_sd15(cache_dir)
    if sd is not None and cached_clip(DEFAULT_CLIP, cache_dir):
        return sd, DEFAULT_CLIP, f"Using {sd} with {DEFAULT_CLIP} from the local Hugging Face cache."
    missing = "SD 1.5" if sd is None else DEFAULT_CLIP
    notice = (
        f"{missing} is not in the local Hugging Face cache: using the bundled shapes-world model "
        f"({BUNDLED_MODEL.name}, 64x64, trained on generated shapes); pass --model/--clip to choose another."
    )
    return str(BUNDLED_MODEL), str(BUNDLED_CLIP), notice


__all__ = [
    "BUNDLED_MODEL",
    "BUNDLED_CLIP",
    "BUNDLED_IP_ADAPTER",
    "BUNDLED_CONTROLNET",
    "SD15_MODEL_IDS",
    "DEFAULT_CLIP",
    "cached_sd15",
    "cached_clip",
    "default_model",
]
