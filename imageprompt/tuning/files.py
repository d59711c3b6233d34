"""The tuning file: one safetensors file with the prompts (and LoRA), the settings and the CLIP it was made for.

:func:`load_tuning` checks that identity before it changes anything; a
checkpoint is the same file plus the optimiser state, to resume a domain run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from imageprompt.images import atomic_write
from imageprompt.model_identity import (  # noqa: F401 (VISION_KEYS, same_weight: re-exported)
    VISION_KEYS,
    encoder_identity,
    identity_mismatch,
    same_weight,
    weight_fingerprint,
)
from imageprompt.tuning.lora import LORA_ADAPTER, add_unet_lora, lora_parameters, lora_settings
from imageprompt.tuning.prompts import (
    DeepVisualPrompts,
    TuningFileError,
    attach_visual_prompts,
    detach_visual_prompts,
    visual_prompts_of,
)

FORMAT = "imageprompt/sdipc-tuning"
FORMAT_VERSION = "1"
CHECKPOINT_KEY = "imageprompt/sdipc-tuning-checkpoint"


# ------------------------------------------------------------ CLIP identity
def clip_identity(pipe) -> dict:
    """What identifies the CLIP a tuning belongs to: the image encoder's identity
    (:func:`imageprompt.model_identity.encoder_identity`: vision config, ``visual_projection``) and the
    fingerprint of the text projection; compared by :func:`~imageprompt.model_identity.identity_mismatch`."""
    return {**encoder_identity(pipe.sdipc_image_encoder),
            "text_projection": weight_fingerprint(pipe.converter.text_projection.weight)}


# -------------------------------------------------------------- the file
def _state_tensors(pipe) -> dict[str, torch.Tensor]:
    prompts = visual_prompts_of(pipe)
    if prompts is None:
        raise ValueError("the pipeline has no visual prompts to save: tune it (or load a tuning) first")
    tensors = {f"visual_prompts.{k}": v for k, v in prompts.state_dict().items()}
    # Not peft.get_peft_model_state_dict: it drops the adapter name from the keys, which would change the file.
    tensors.update({f"unet_lora.{k}": v for k, v in lora_parameters(pipe.unet).items()})
    return {k: v.detach().float().contiguous().cpu() for k, v in tensors.items()}


def _metadata(pipe, settings: dict) -> dict[str, str]:
    import imageprompt

    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "settings": json.dumps(settings, sort_keys=True),
        "clip": json.dumps(clip_identity(pipe)),
        "clip_name": str(getattr(pipe, "clip_name", "") or ""),
        "model_name": str(getattr(pipe, "model_name", "") or ""),
        "imageprompt": imageprompt.__version__,
    }


def _write_atomic(tensors: dict, path: Path, metadata: dict) -> Path:
    from safetensors.torch import save

    data = save(tensors, metadata=metadata)
    return atomic_write(path, lambda handle: handle.write(data))


def save_tuning(pipe, path: str | os.PathLike, settings: dict | None = None) -> Path:
    """Write the pipeline's tuning (visual prompts, LoRA) to one safetensors file, atomically."""
    settings = settings or getattr(pipe, "_imageprompt_tuning_settings", None) or {}
    settings = {**settings, "lora": lora_settings(pipe.unet)}
    return _write_atomic(_state_tensors(pipe), Path(path), _metadata(pipe, settings))


def read_tuning_metadata(path: str | os.PathLike) -> dict:
    """The header of a tuning file (``settings`` and ``clip`` decoded), or :class:`TuningFileError`."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise TuningFileError(f"{path}: no such tuning file")
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = dict(handle.metadata() or {})
            keys = list(handle.keys())
    except Exception as err:
        raise TuningFileError(f"{path}: not a safetensors file ({str(err)[:200]})") from None
    if meta.get("format") not in (FORMAT, CHECKPOINT_KEY):
        raise TuningFileError(f"{path}: not an imageprompt SD-IPC tuning file (no '{FORMAT}' in its metadata)")
    if meta.get("format_version") != FORMAT_VERSION:
        raise TuningFileError(f"{path}: tuning format version {meta.get('format_version')!r}; "
                              f"this imageprompt reads version {FORMAT_VERSION}")
    try:
        meta["settings"] = json.loads(meta["settings"])
        meta["clip"] = json.loads(meta["clip"])
    except (KeyError, json.JSONDecodeError):
        raise TuningFileError(f"{path}: damaged tuning metadata") from None
    meta["keys"] = keys
    return meta


def check_tuning_file(pipe, path: str | os.PathLike) -> dict:
    """Read ``path``'s header and refuse, with a clear message, a file made for another CLIP."""
    meta = read_tuning_metadata(path)
    why = identity_mismatch(meta["clip"], clip_identity(pipe))
    if why:
        made_for = meta.get("clip_name") or "unknown CLIP"
        here = getattr(pipe, "clip_name", None) or "this pipeline's CLIP"
        raise TuningFileError(
            f"{path} was tuned for another CLIP ({made_for}), not {here}: {why}. "
            f"Load the pipeline with the CLIP it was made for (--clip {made_for}) or tune again."
        )
    return meta


def load_tuning(pipe, path: str | os.PathLike) -> dict:
    """Load a tuning file into ``pipe`` (replacing any tuning it had); returns its settings.

    Raises :class:`TuningFileError` before changing anything when the file is not
    a tuning file or was made for another CLIP.
    """
    from safetensors.torch import load_file

    meta = check_tuning_file(pipe, path)
    tensors = load_file(str(path))
    _apply_state(pipe, tensors, meta["settings"], path)
    settings = dict(meta["settings"])
    pipe._imageprompt_tuning_settings = settings
    return settings


def _apply_state(pipe, tensors: dict, settings: dict, source) -> None:
    prompt_state = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("visual_prompts.")}
    if "prompts" not in prompt_state:
        raise TuningFileError(f"{source}: no visual prompts in the file")
    layers, tokens, hidden = prompt_state["prompts"].shape
    cfg = pipe.sdipc_image_encoder.config
    prompts = DeepVisualPrompts(layers, tokens, hidden, cfg.patch_size, settings.get("dropout", 0.1))
    try:
        prompts.load_state_dict(prompt_state)
    except RuntimeError as err:
        raise TuningFileError(f"{source}: visual prompts do not match ({str(err)[:200]})") from None
    lora_state = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("unet_lora.")}
    remove_tuning(pipe)
    attach_visual_prompts(pipe.sdipc_image_encoder, prompts.eval())
    if lora_state:
        lora = settings.get("lora") or {}
        add_unet_lora(pipe.unet, int(lora.get("rank", 4)), lora.get("alpha"))
        params = lora_parameters(pipe.unet)
        wrong = sorted(set(lora_state) ^ set(params))
        if wrong or any(params[k].shape != v.shape for k, v in lora_state.items()):
            remove_tuning(pipe)
            raise TuningFileError(f"{source}: its UNet LoRA does not fit this UNet (e.g. {wrong[:2]})")
        with torch.no_grad():  # not peft.set_peft_model_state_dict: the file's keys keep the adapter name
            for k, v in lora_state.items():
                params[k].copy_(v)
        for p in params.values():
            p.requires_grad_(False)


def remove_tuning(pipe) -> None:
    """Undo :func:`load_tuning` / :func:`tune`: detach the prompts and delete the LoRA adapter."""
    detach_visual_prompts(pipe.sdipc_image_encoder)
    if LORA_ADAPTER in (getattr(pipe.unet, "peft_config", None) or {}):
        pipe.unet.delete_adapters(LORA_ADAPTER)
    pipe._imageprompt_tuning_settings = None


# ------------------------------------------------------------ checkpoints
RESUME_KEYS = ("mode", "lr", "batch_size", "num_tokens", "dropout", "lora_rank", "lora_alpha", "lora_lr",
               "weight_decay", "resolution", "seed")


def save_checkpoint(pipe, path, optimizer, scaler, settings: dict, step: int, data_id: str = "") -> Path:
    """The tuning file plus the optimiser state and the step, to resume a domain run."""
    tensors = _state_tensors(pipe)
    state = optimizer.state_dict()
    for index, values in state["state"].items():
        for key, value in values.items():
            tensors[f"optimizer.{index}.{key}"] = torch.as_tensor(value).detach().float().contiguous().cpu()
    meta = _metadata(pipe, settings)
    meta.update(format=CHECKPOINT_KEY, step=str(step), data_id=data_id,
                grad_scaler=json.dumps({k: float(v) if isinstance(v, float) else v
                                        for k, v in scaler.state_dict().items()}))
    return _write_atomic(tensors, Path(path), meta)


def load_checkpoint(pipe, path, optimizer, scaler, settings: dict, data_id: str = "") -> int:
    """Restore weights and optimiser from :func:`save_checkpoint`; returns the step to continue from."""
    from safetensors import safe_open

    meta = check_tuning_file(pipe, path)
    with safe_open(str(path), framework="pt") as handle:
        raw = handle.metadata()
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    if raw.get("format") != CHECKPOINT_KEY:
        raise TuningFileError(f"{path}: not a tuning checkpoint")
    before = {k: meta["settings"].get(k) for k in RESUME_KEYS}
    now = {k: settings.get(k) for k in RESUME_KEYS}
    if before != now or raw.get("data_id", "") != data_id:
        changed = [k for k in RESUME_KEYS if before[k] != now[k]] + (["data"] if raw.get("data_id", "") != data_id
                                                                      else [])
        raise TuningFileError(f"{path}: checkpoint of another run (differs in {', '.join(changed)}); "
                              "delete it or run without --resume")
    prompts = visual_prompts_of(pipe)
    lora = lora_parameters(pipe.unet)
    with torch.no_grad():
        for k, v in prompts.state_dict(keep_vars=True).items():
            v.copy_(tensors[f"visual_prompts.{k}"])
        for k, v in lora.items():
            v.copy_(tensors[f"unet_lora.{k}"])
    state = optimizer.state_dict()
    for index in range(sum(len(g["params"]) for g in state["param_groups"])):
        keys = [k.split(".", 2)[2] for k in tensors if k.startswith(f"optimizer.{index}.")]
        if keys:
            state["state"][index] = {k: tensors[f"optimizer.{index}.{k}"] for k in keys}
    optimizer.load_state_dict(state)
    scaler.load_state_dict(json.loads(raw.get("grad_scaler", "{}")) or scaler.state_dict())
    return int(raw["step"])
