"""Loading models the way diffusers users expect: hub ids, local folders, single files.

``--model`` may be a hub id (``stable-diffusion-v1-5/stable-diffusion-v1-5``), a
local diffusers folder, or a single ``.safetensors``/``.ckpt`` checkpoint;
``--clip`` names the CLIP whose projections SD-IPC inverts (a hub id or a
folder holding a transformers ``CLIPModel``). Failures become one
:class:`ModelLoadError` that says what was tried and how to use local weights.

The pipeline-level loader (:func:`imageprompt.load_pipeline`) is
:mod:`imageprompt.pipelines.loading`: it needs the pipeline classes, which this layer
does not import.
"""

from __future__ import annotations

import functools
import logging
import socket
from pathlib import Path

import torch

from imageprompt.checkpoints import DEFAULT_CLIP, default_model
from imageprompt.schedulers import SCHEDULERS, make_scheduler  # noqa: F401 (re-exported)

logger = logging.getLogger(__name__)

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

OFFLINE_HINT = (
    "No network is needed if the weights are local: pass a diffusers folder or a single .safetensors/.ckpt file "
    "to --model, a folder holding a transformers CLIPModel to --clip, or pre-fill the Hugging Face cache "
    "(HF_HOME) on a machine with access; omit --model to use the bundled offline model."
)


class ModelLoadError(RuntimeError):
    """Weights could not be found or read; the message names what was tried."""


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """fp16 on accelerators, fp32 on the CPU, unless asked otherwise."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None:
        return torch.float32 if device.type == "cpu" else torch.float16
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def model_kind(model: str) -> str:
    """``"file"``, ``"folder"`` or ``"hub"``; raises for a local path that is neither."""
    path = Path(model).expanduser()
    if path.is_file():
        if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
            raise ModelLoadError(f"{model}: a single-file checkpoint must end in .safetensors or .ckpt")
        return "file"
    if path.is_dir():
        if not (path / "model_index.json").exists():
            raise ModelLoadError(f"{model}: folder has no model_index.json, so it is not a diffusers pipeline folder")
        return "folder"
    if model.startswith((".", "/", "~")) or model.lower().endswith(SINGLE_FILE_SUFFIXES) or model.count("/") > 1:
        raise ModelLoadError(f"{model}: no such file or folder")
    return "hub"


class _TorchvisionNotice(logging.Filter):
    """Drops transformers' notice that an image processor falls back to its PIL version without torchvision.

    The PIL processors are what imageprompt uses anyway; torchvision is not a dependency.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed)" not in record.getMessage()


def quiet_torchvision_notices() -> None:
    """Silence transformers' "``CLIPImageProcessor`` requires torchvision" notices (idempotent)."""
    source = logging.getLogger("transformers.utils.import_utils")
    if not any(isinstance(f, _TorchvisionNotice) for f in source.filters):
        source.addFilter(_TorchvisionNotice())


def env_offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub reads it (once, when it is imported, like every HF library)."""
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE


def hub_offline() -> bool:
    """True when the hub must not be asked: HF_HUB_OFFLINE is set, or the hub does not answer."""
    return env_offline() or not hub_reachable()


@functools.lru_cache(maxsize=1)
def hub_reachable(timeout: float = 3.0) -> bool:
    """One quick TCP connection to the hub, instead of the hub client's retries (tens of seconds offline)."""
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _refused_pickle(err: BaseException) -> bool:
    """Whether ``err`` (or its cause) is torch refusing a pickle under ``weights_only=True``."""
    seen = 0
    while err is not None and seen < 8:
        text = str(err)
        if "weights_only" in text or "Weights only load failed" in text or "unsupported GLOBAL" in text:
            return True
        err, seen = err.__cause__ or err.__context__, seen + 1
    return False


def load_error(what: str, source: str, err: Exception) -> ModelLoadError:
    """The :class:`ModelLoadError` for ``err`` raised loading ``what`` from ``source``: not cached while offline,
    a refused pickle, or the error's first line; with :data:`OFFLINE_HINT`."""
    if not Path(source).expanduser().exists() and hub_offline():
        from huggingface_hub.constants import HF_HUB_CACHE

        why = "HF_HUB_OFFLINE is set" if env_offline() else "the hub is unreachable"
        reason = f"not in the local Hugging Face cache ({HF_HUB_CACHE}) and {why}"
    elif _refused_pickle(err):
        # never repeat torch's hint to load the file unsafely
        reason = ("refused: its .bin weights are a pickle holding more than tensors, and nothing in it was run. "
                  "Use .safetensors weights")
    else:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return ModelLoadError(f"could not load {what} from {source!r}: {reason[:300]}\n{OFFLINE_HINT}")


def single_file_is_sdxl(path: str) -> bool:
    """Whether a single-file checkpoint is SDXL (its second text encoder: ``conditioner.embedders.1``).

    Only a ``.safetensors`` header is read; a ``.ckpt`` pickle is taken as SD 1.x.
    """
    import json
    import struct

    path = Path(path).expanduser()
    if path.suffix.lower() != ".safetensors":
        return False
    try:
        with path.open("rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > 100 * 1024 * 1024:
                return False
            names = json.loads(f.read(length))
    except (OSError, ValueError, struct.error):
        return False  # a broken file: the loader says what is wrong with it
    return isinstance(names, dict) and any(k.startswith("conditioner.embedders.1.") for k in names)


def load_vae(vae: str, dtype: torch.dtype):
    """An ``AutoencoderKL`` from a hub id, folder or single file (``--vae``, e.g. madebyollama/sdxl-vae-fp16-fix)."""
    from diffusers import AutoencoderKL

    path = Path(vae).expanduser()
    try:
        if path.is_file():
            return AutoencoderKL.from_single_file(str(path), dtype=dtype)
        local_only = path.is_dir() or hub_offline()
        return AutoencoderKL.from_pretrained(str(path) if path.is_dir() else vae, dtype=dtype,
                                             local_files_only=local_only)
    except Exception as err:
        raise load_error("the VAE", vae, err) from None


def load_clip_parts(clip: str, dtype: torch.dtype) -> dict:
    """sdipc_image_encoder, feature_extractor and the text projection (inside a converter) from a ``CLIPModel``:
    the CLIP parts SD-IPC reads (its own component names, apart from diffusers' IP-Adapter ``image_encoder``)."""
    from transformers import CLIPImageProcessor, CLIPModel, CLIPVisionConfig, CLIPVisionModelWithProjection

    from imageprompt.conversion import SDIPCConverter

    path = Path(clip).expanduser()
    local_only = path.exists() or hub_offline()
    if path.exists() and not (path / "config.json").exists():
        raise ModelLoadError(f"{clip}: folder has no config.json, so it is not a transformers CLIPModel folder")
    try:
        try:
            clip_model = CLIPModel.from_pretrained(clip, dtype=torch.float32, local_files_only=local_only)
        except OSError:
            if local_only:
                raise
            clip_model = CLIPModel.from_pretrained(clip, dtype=torch.float32, local_files_only=True)
        try:
            feature_extractor = CLIPImageProcessor.from_pretrained(clip, local_files_only=True)
        except OSError:
            size = clip_model.config.vision_config.image_size
            feature_extractor = CLIPImageProcessor(size={"shortest_edge": size},
                                                   crop_size={"height": size, "width": size})
    except Exception as err:
        raise load_error("the CLIP model", clip, err) from None
    if not hasattr(clip_model, "text_projection"):
        raise ModelLoadError(f"{clip}: not a CLIPModel with text and visual projections")
    vision_config = CLIPVisionConfig(**{**clip_model.config.vision_config.to_dict(),
                                        "projection_dim": clip_model.config.projection_dim})
    image_encoder = CLIPVisionModelWithProjection(vision_config)
    image_encoder.vision_model.load_state_dict(clip_model.vision_model.state_dict())
    image_encoder.visual_projection.load_state_dict(clip_model.visual_projection.state_dict())
    converter = SDIPCConverter.from_clip(clip_model)
    return dict(sdipc_image_encoder=image_encoder.to(dtype).eval(), feature_extractor=feature_extractor,
                converter=converter)


def resolve_model(model: str | None, clip: str | None) -> tuple[str, str, str | None]:
    """Fill in defaults: ``(model, clip, notice)``; the notice says when the bundled model is used."""
    notice = None
    if model is None:
        model, default_clip, notice = default_model()
        clip = clip or default_clip
    elif clip is None:
        clip = _bundled_clip_for(model) or DEFAULT_CLIP
    return str(model), str(clip), notice


def _bundled_clip_for(model: str) -> str | None:
    try:
        from imageprompt.checkpoints import BUNDLED_CLIP, BUNDLED_MODEL
    except ImportError:
        return None
    same = Path(model).expanduser().resolve() == Path(BUNDLED_MODEL).resolve()
    return str(BUNDLED_CLIP) if same else None
