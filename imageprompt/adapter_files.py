"""IP-Adapter checkpoint files: where they are, what is in them, whether they fit a UNet.

Official checkpoints (``image_proj`` + ``ip_adapter`` state dicts) are read from
``.safetensors``, or from ``.bin`` with ``torch.load(weights_only=True)``, which
refuses (without running) anything but tensors. The mechanism that uses them is
:mod:`imageprompt.ip_adapter`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from imageprompt.attention import attention_module, cross_attention_layers
from imageprompt.loading import ModelLoadError, hub_offline

OFFICIAL_REPO = "h94/IP-Adapter"
# Short names for official checkpoints (``--adapter sd15``, ``--adapter sdxl``).
KNOWN_ADAPTERS = {
    "sd15": "models/ip-adapter_sd15.safetensors",
    "sd15_light": "models/ip-adapter_sd15_light.safetensors",
    "plus": "models/ip-adapter-plus_sd15.safetensors",
    "plus-face": "models/ip-adapter-plus-face_sd15.safetensors",
    "full-face": "models/ip-adapter-full-face_sd15.safetensors",
    # SDXL: its bigG image encoder is next to the weights (the _vit-h ones need --image-encoder: docs/sdxl.md)
    "sdxl": "sdxl_models/ip-adapter_sdxl.safetensors",
}
WEIGHT_SUFFIXES = (".safetensors", ".bin")


def first_sentence(err: BaseException | str, limit: int = 200) -> str:
    """The first sentence of an error's first line, without its final period, for quoting inside a message.

    Hub and transformers errors run on for several sentences; cutting them at a fixed length left
    messages ending mid-word ("... Use `repo_type").
    """
    text = str(err).strip()
    line = text.splitlines()[0].strip() if text else ""
    if not line:
        return type(err).__name__ if isinstance(err, BaseException) else "unknown error"
    end = line.find(". ")
    sentence = line[: end] if end > 0 else line.rstrip(".")
    if len(sentence) > limit:
        sentence = sentence[:limit].rsplit(" ", 1)[0] + " ..."
    return sentence


def _hub_failure(err: BaseException) -> str:
    """Why a hub file could not be had, in the user's terms."""
    from imageprompt.loading import env_offline

    if hub_offline():
        from huggingface_hub.constants import HF_HUB_CACHE

        why = "HF_HUB_OFFLINE is set" if env_offline() else "the hub is unreachable"
        return f"not in the local Hugging Face cache ({HF_HUB_CACHE}) and {why}"
    return first_sentence(err)


def bundled_image_encoder(weight_file: str | Path | None) -> Path | None:
    """The bundled CLIP (its vision tower) when ``weight_file`` is the bundled IP-Adapter, else None.

    The bundled adapter was trained on that encoder and ships without an ``image_encoder/`` folder.
    """
    from imageprompt.checkpoints import BUNDLED_CLIP, BUNDLED_IP_ADAPTER

    if weight_file is None:
        return None
    try:
        same = Path(weight_file).expanduser().resolve() == Path(BUNDLED_IP_ADAPTER).resolve()
    except (OSError, TypeError, ValueError):
        return None
    return Path(BUNDLED_CLIP) if same else None


def parse_adapter_spec(spec: str) -> tuple[str, str | None]:
    """``PATH_OR_ID[:WEIGHT_NAME]`` or a short name from :data:`KNOWN_ADAPTERS` -> ``(source, weight_name)``."""
    if spec in KNOWN_ADAPTERS:
        return OFFICIAL_REPO, KNOWN_ADAPTERS[spec]
    if Path(spec).expanduser().exists():
        return spec, None
    source, sep, weight = spec.rpartition(":")
    if sep and source and weight:
        return source, weight
    return spec, None


def resolve_weight_file(source: str, weight_name: str | None = None, subfolder: str | None = None,
                        local_files_only: bool | None = None) -> tuple[Path, str]:
    """Find the checkpoint: a local file, ``folder/weight_name`` or a hub file. Returns ``(file, where)``."""
    path = Path(source).expanduser()
    inner = "/".join(p for p in (subfolder, weight_name) if p)
    if path.is_file():
        found = path
    elif path.is_dir():
        if not weight_name:
            raise ModelLoadError(f"{source} is a folder: name the weight file, e.g. {source}:ip-adapter.safetensors")
        found = path / inner
        if not found.is_file():
            raise ModelLoadError(f"no IP-Adapter weights at {found}")
    elif source.startswith((".", "/", "~")) or source.lower().endswith(WEIGHT_SUFFIXES) or source.count("/") > 1:
        raise ModelLoadError(f"{source}: no such IP-Adapter file or folder")
    else:
        if not weight_name:
            raise ModelLoadError(f"{source}: name the weight file in the repository, "
                                 f"e.g. {source}:models/ip-adapter_sd15.safetensors")
        from huggingface_hub import hf_hub_download

        try:
            found = Path(hf_hub_download(source, inner, local_files_only=bool(local_files_only or hub_offline())))
        except Exception as err:
            raise ModelLoadError(f"could not get IP-Adapter weights {inner!r} from {source!r}: {_hub_failure(err)}. "
                                 "Download them on a machine with access and pass the local file.") from None
    check_weight_suffix(found)
    return found, f"{source}/{inner}" if not path.is_file() else str(found)


def check_weight_suffix(path: Path) -> None:
    if path.suffix.lower() not in WEIGHT_SUFFIXES:
        found = path.suffix or "no suffix"
        raise ModelLoadError(f"{path}: IP-Adapter weights must be .safetensors or .bin, got {found!r}")


MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the JSON header


def pickle_refusal(path: str | Path, err: BaseException) -> str:
    """Why a pickled ``.bin`` was refused, in whole sentences (never torch's hint to load it unsafely)."""
    import re

    text = str(err)
    found = re.search(r"(?:unsupported global:? GLOBAL|unsupported GLOBAL) ([\w.]+)", text, re.IGNORECASE)
    if found:
        why = f"It asks to import {found.group(1)}, which is not a tensor."
    elif isinstance(err, EOFError) or "Ran out of input" in text:
        why = "The file is empty or cut short."
    elif "invalid load key" in text or "not a zip file" in text.lower():
        why = "The file is not a PyTorch archive."
    else:
        why = "It is not a PyTorch archive of plain tensors."
    return (f"{path}: refused: not a plain tensor archive, and nothing in it was run. {why} "
            "Only .bin files holding tensors are read; prefer .safetensors.")


def check_safetensors(path: Path) -> None:
    """Refuse a malformed ``.safetensors`` file with a message naming it and what is wrong.

    Reads only the 8-byte header length and the JSON header: an empty file, a header longer than the file,
    a pickle renamed ``.safetensors`` and a tensor that ends past the end of the file are all caught here.
    """
    import json
    import struct

    size = path.stat().st_size
    if size == 0:
        raise ModelLoadError(f"{path}: the file is empty, not a .safetensors file.")
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ModelLoadError(f"{path}: only {size} bytes, too short to be a .safetensors file.")
        (length,) = struct.unpack("<Q", head)
        if length > size - 8 or length > MAX_SAFETENSORS_HEADER:
            looks = ""
            if head[:1] == b"\x80" or head[:2] == b"PK":
                looks = " It looks like a PyTorch pickle renamed .safetensors; it was not read."
            raise ModelLoadError(f"{path}: not a .safetensors file: its header claims {length} bytes but the file "
                                 f"has {size}.{looks}")
        try:
            header = json.loads(f.read(length))
        except (ValueError, RecursionError):
            raise ModelLoadError(f"{path}: not a .safetensors file: its header is not valid JSON.") from None
    if not isinstance(header, dict):
        raise ModelLoadError(f"{path}: not a .safetensors file: its header is not a JSON object.")
    data = size - 8 - length
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise ModelLoadError(f"{path}: corrupt .safetensors header: tensor {name[:80]!r} has no valid "
                                 "data_offsets.")
        if not 0 <= offsets[0] <= offsets[1] <= data:
            raise ModelLoadError(f"{path}: truncated or corrupt .safetensors file: tensor {name[:80]!r} ends at "
                                 f"byte {offsets[1]} of the data, but the file holds {data} bytes of data.")


def read_checkpoint(path: str | Path) -> dict[str, dict[str, torch.Tensor]]:
    """``{"image_proj": {...}, "ip_adapter": {...}}`` from an official ``.safetensors`` or ``.bin`` file.

    ``.bin`` files are pickles: they are read with ``torch.load(weights_only=True)``,
    which refuses (without running) anything but tensors and plain containers.
    """
    path = Path(path)
    check_weight_suffix(path)
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        check_safetensors(path)
        try:
            flat = load_file(str(path), device="cpu")
        except Exception as err:  # anything the header check above let through
            raise ModelLoadError(f"{path}: not a readable .safetensors file ({first_sentence(err, 160)}).") from None
        state = {"image_proj": {}, "ip_adapter": {}}
        for key, value in flat.items():
            part, _, rest = key.partition(".")
            if part in state:
                state[part][rest] = value
    else:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as err:  # UnpicklingError, RuntimeError, EOFError, KeyError (junk), ...
            raise ModelLoadError(pickle_refusal(path, err)) from None
    if not isinstance(state, dict) or not isinstance(state.get("image_proj"), dict) \
            or not isinstance(state.get("ip_adapter"), dict) or not state["image_proj"] or not state["ip_adapter"]:
        raise ModelLoadError(f"{path}: not an IP-Adapter checkpoint (needs 'image_proj' and 'ip_adapter' weights)")
    return state


def checkpoint_kind(image_proj: dict) -> str:
    """``"sd15"`` (also sd15_light: same format), ``"full-face"`` or ``"plus"`` (also plus-face)."""
    if "proj.weight" in image_proj:
        return "sd15"
    if "proj.3.weight" in image_proj:
        return "full-face"
    if "latents" in image_proj and "proj_in.weight" in image_proj:
        return "plus"
    if "perceiver_resampler.proj_in.weight" in image_proj or "norm.weight" in image_proj:
        raise ModelLoadError("IP-Adapter FaceID checkpoints need insightface face embeddings and are not supported")
    raise ModelLoadError(f"unknown IP-Adapter image projection (keys {sorted(image_proj)[:4]}...)")


def check_checkpoint(state: dict, unet, image_encoder_config, where: str = "the checkpoint") -> str:
    """Raise :class:`ModelLoadError` naming expected vs found sizes; returns the checkpoint kind."""
    kind = checkpoint_kind(state["image_proj"])
    proj, ip = state["image_proj"], state["ip_adapter"]
    cross_dim = unet.config.cross_attention_dim
    layers = cross_attention_layers(unet)
    found_ids = sorted({k.split(".")[0] for k in ip if k.endswith((".to_k_ip.weight", ".to_v_ip.weight"))}, key=int)
    if found_ids != sorted(layers.values(), key=int):
        raise ModelLoadError(f"{where}: image key/value weights for {len(found_ids)} cross-attention layers, "
                             f"but this UNet has {len(layers)}: made for another base model")
    for name, key_id in layers.items():
        attn = attention_module(unet, name)
        expected = (attn.to_k.out_features, cross_dim)
        for which in ("to_k_ip", "to_v_ip"):
            found = tuple(ip[f"{key_id}.{which}.weight"].shape)
            if found != expected:
                raise ModelLoadError(f"{where}: layer {key_id} ({name}) {which} is {found[0]}x{found[1]}, this "
                                     f"UNet expects {expected[0]}x{expected[1]} (inner x cross_attention_dim "
                                     f"{cross_dim}): made for another base model")
    if kind == "sd15":
        out_dim, in_dim = proj["proj.weight"].shape
        checks = [("image embedding size (image encoder projection_dim)", image_encoder_config.projection_dim, in_dim),
                  ("image tokens x cross_attention_dim", 4 * cross_dim, out_dim)]
    elif kind == "plus":
        checks = [("image encoder hidden size", image_encoder_config.hidden_size, proj["proj_in.weight"].shape[1]),
                  ("cross_attention_dim", cross_dim, proj["proj_out.weight"].shape[0])]
    else:
        checks = [("image encoder hidden size", image_encoder_config.hidden_size, proj["proj.0.weight"].shape[1]),
                  ("cross_attention_dim", cross_dim, proj["proj.3.weight"].shape[0])]
    for what, expected, found in checks:
        if expected != found:
            raise ModelLoadError(f"{where}: {what} is {found} in the checkpoint, expected {expected} "
                                 "(made for another base model or image encoder)")
    return kind


# ------------------------------------------------------ image encoders
def load_image_encoder(source: str, subfolder: str | None = None, dtype=torch.float32,
                       local_files_only: bool | None = None):
    """``(CLIPVisionModelWithProjection, CLIPImageProcessor)`` from a folder or a hub id (+ subfolder)."""
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    path = Path(source).expanduser()
    local = path.exists() or bool(local_files_only or hub_offline())
    kwargs = dict(subfolder=subfolder or "", local_files_only=local)
    encoder = CLIPVisionModelWithProjection.from_pretrained(str(path) if path.exists() else source, dtype=dtype,
                                                            **kwargs).eval()
    try:
        processor = CLIPImageProcessor.from_pretrained(str(path) if path.exists() else source, **kwargs)
    except OSError:  # IP-Adapter's encoder folders ship no preprocessor config: diffusers' default
        size = encoder.config.image_size
        processor = CLIPImageProcessor(size=size, crop_size=size)
    encoder.requires_grad_(False)
    return encoder, processor


def find_image_encoder(source: str, weight_file: Path, subfolder: str | None, image_encoder_folder: str | None,
                       image_encoder=None, dtype=torch.float32, local_files_only: bool | None = None):
    """The adapter's image encoder: ``image_encoder`` if given, else ``image_encoder_folder`` next to the weights.

    As in diffusers, a folder name without ``/`` is looked for in the weight
    file's folder (``models/image_encoder`` for ``models/ip-adapter_sd15.safetensors``),
    a path with ``/`` from the repository root. Beside a local weight file, ``FILE-image_encoder``
    (what ``imageprompt train-adapter`` writes when the file is in the current folder) is used too.
    The bundled adapter (:data:`imageprompt.checkpoints.BUNDLED_IP_ADAPTER`) has neither: its encoder
    is the bundled CLIP.
    """
    if image_encoder is not None and not isinstance(image_encoder, (str, Path)):
        from transformers import CLIPImageProcessor

        size = image_encoder.config.image_size
        return image_encoder, CLIPImageProcessor(size=size, crop_size=size), "given"
    if image_encoder is not None:  # a folder, or a hub id (owner/name)
        where, sub = str(image_encoder), None
        local = Path(where).expanduser().exists() or where.startswith((".", "/", "~")) or where.count("/") != 1
    elif image_encoder_folder is None:
        raise ModelLoadError("no image encoder for the IP-Adapter: pass image_encoder= (--image-encoder PATH)")
    elif Path(source).expanduser().is_file():
        # beside the weights; else FILE-image_encoder (train-adapter's name for it in the current folder);
        # else, for the bundled adapter, the bundled CLIP
        beside = weight_file.parent / image_encoder_folder
        named = weight_file.with_name(f"{weight_file.stem}-image_encoder")
        bundled = bundled_image_encoder(weight_file)
        found = next((p for p in (beside, named, bundled) if p is not None and p.is_dir()), beside)
        where, sub, local = str(found), None, True
    else:
        inner = image_encoder_folder if "/" in image_encoder_folder else "/".join(
            p for p in (subfolder, image_encoder_folder) if p)
        if Path(source).expanduser().is_dir():
            where, sub, local = str(Path(source).expanduser() / inner), None, True
        else:
            where, sub, local = source, inner, False
    shown = f"{where}/{sub}" if sub else where
    if local and not Path(where).expanduser().is_dir():
        reason = "no such folder"  # a local path: nothing to ask the hub about
    else:
        try:
            encoder, processor = load_image_encoder(where, sub, dtype, local_files_only)
            return encoder, processor, shown
        except Exception as err:
            reason = first_sentence(err, 160) if local else _hub_failure(err)
    raise ModelLoadError(f"no image encoder for the IP-Adapter: looked in {shown} ({reason}). "
                         "Pass the CLIP vision folder with --image-encoder PATH (Python: image_encoder=PATH).")
