"""Arithmetic on image-prompt embeddings, InstantStyle's content subtraction, and embedding files.

An image adapter reads one embedding per reference image: for IP-Adapter's sd15
format CLIP's projected ``image_embeds`` ``(n, D)``, for plus / full-face the
vision tower's penultimate hidden states ``(n, 257, W)``, for the SD-IPC branch
its conditioning ``(n, 77, D)``. Several references of one adapter are combined
before the adapter's image projection, as ComfyUI's IPAdapter nodes do:

- ``concat``: every image's tokens, attended together (IP-Adapter's own multi-image prompt);
- ``add``: ``sum_i e_i``; ``average``: ``mean_i e_i``;
- ``subtract``: ``e_0 - mean_{i>0} e_i``;
- ``norm-average``: the mean of the unit-length ``e_i / ||e_i||``, scaled back to the mean
  norm ``mean_i ||e_i||`` (norms over each image's whole embedding), so that images with large
  embeddings do not dominate.

**Content subtraction** (InstantStyle, Wang et al. 2024, "separating content from image"):
``e_image - scale * e_text(content words)``, with ``e_text`` the CLIP text embedding of the
words that name the content, *in CLIP's projected joint space*: the image embedding is the
vision tower's ``image_embeds`` (``visual_projection`` of the pooled output) and the text
embedding the text tower's ``text_embeds`` (``text_projection`` of the EOS state), of the same
CLIP. That is what sd15-format adapters read; plus / full-face adapters read hidden states,
which are not in that space.

Files: :func:`save_image_embeds` writes ``ip_adapter_image_embeds`` (diffusers' format: per
adapter ``(2, m, ...)`` ``[negative, positive]`` with guidance, ``(1, m, ...)`` without) to
safetensors with metadata naming the adapters and image encoders that made them;
:func:`load_image_embeds` reads them back.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from imageprompt.model_identity import identity_mismatch

COMBINE_MODES = ("concat", "add", "subtract", "average", "norm-average")
FORMAT = "imageprompt.image_embeds"
FORMAT_VERSION = "2"  # 2: the encoder is recorded as model_identity.encoder_identity (1: a hash, dtype-bound)


# -------------------------------------------------------------- arithmetic
def combine_embeds(embeds: torch.Tensor, mode: str = "concat") -> torch.Tensor:
    """Combine ``n`` images' embeddings ``(n, ...)`` of one adapter: ``(n, ...)`` for ``concat``, else ``(1, ...)``.

    See the module docstring for each mode. ``subtract`` needs at least two images.
    """
    if mode not in COMBINE_MODES:
        raise ValueError(f"combine mode must be one of {', '.join(COMBINE_MODES)}, got {mode!r}")
    if not isinstance(embeds, torch.Tensor) or embeds.ndim < 2 or embeds.shape[0] < 1:
        raise ValueError("embeds must be a tensor (images, ...) holding at least one image")
    if mode == "concat":
        return embeds
    if mode == "add":
        return embeds.sum(0, keepdim=True)
    if mode == "average":
        return embeds.mean(0, keepdim=True)
    if mode == "subtract":
        if embeds.shape[0] < 2:
            raise ValueError("combine mode 'subtract' needs at least two images: the first minus the others")
        return embeds[:1] - embeds[1:].mean(0, keepdim=True)
    flat = embeds.float().flatten(1)
    norms = flat.norm(dim=1, keepdim=True)
    unit = flat / norms.clamp_min(torch.finfo(torch.float32).tiny)
    mean = unit.mean(0, keepdim=True)
    out = mean / mean.norm().clamp_min(torch.finfo(torch.float32).tiny) * norms.mean()
    return out.view(1, *embeds.shape[1:]).to(embeds.dtype)


def subtract_content(image_embeds: torch.Tensor, text_embeds: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """InstantStyle's content subtraction: ``image_embeds - scale * text_embeds`` in CLIP's projected joint space.

    ``image_embeds`` ``(n, D)``: CLIP's ``image_embeds``; ``text_embeds`` ``(1, D)`` or ``(n, D)``: the
    ``text_embeds`` of the content words from the same CLIP (:func:`projected_text_embeds`).
    """
    if image_embeds.ndim != 2:
        raise ValueError(f"content subtraction needs projected image embeddings (images, dim); got shape "
                         f"{tuple(image_embeds.shape)}: hidden states (plus / full-face adapters) are not in "
                         "CLIP's joint image-text space")
    if text_embeds.ndim != 2 or text_embeds.shape[-1] != image_embeds.shape[-1]:
        raise ValueError(f"text embeddings of shape {tuple(text_embeds.shape)} do not match image embeddings "
                         f"{tuple(image_embeds.shape)}: use the text tower of the adapter's own CLIP")
    if text_embeds.shape[0] not in (1, image_embeds.shape[0]):
        raise ValueError(f"{text_embeds.shape[0]} text embeddings for {image_embeds.shape[0]} images")
    if not torch.isfinite(torch.tensor(float(scale))):
        raise ValueError(f"content scale must be a finite number, got {scale}")
    return image_embeds - scale * text_embeds.to(image_embeds)


@torch.no_grad()
def projected_text_embeds(text_encoder, tokenizer, texts: list[str], projection=None) -> torch.Tensor:
    """CLIP ``text_embeds`` ``(len(texts), D)``: the EOS state (after the final layer norm) times ``text_projection``.

    ``text_encoder``: a ``CLIPTextModelWithProjection`` or ``CLIPModel`` (their own projection), or a
    ``CLIPTextModel`` with ``projection`` (an ``nn.Linear``, e.g. :class:`~imageprompt.conversion.SDIPCConverter`'s
    ``text_projection``).
    """
    if projection is None:
        projection = getattr(text_encoder, "text_projection", None)
    if projection is None:
        raise ValueError("this text encoder has no text projection: pass `projection` (CLIP's text_projection)")
    tower = getattr(text_encoder, "text_model", text_encoder)
    ids = tokenizer(list(texts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids.to(next(tower.parameters()).device)
    pooled = tower(ids).pooler_output
    return projection(pooled.to(projection.weight))


# ----------------------------------------------------------------- files
def save_image_embeds(path: str | Path, embeds: list[torch.Tensor], adapters: list[dict],
                      do_classifier_free_guidance: bool = True, extra: dict | None = None) -> Path:
    """Write ``ip_adapter_image_embeds`` (one tensor per adapter) to a ``.safetensors`` file.

    ``adapters``: one dict per tensor describing the adapter that made it (``name``, ``kind``, ``encoder``:
    :func:`imageprompt.model_identity.encoder_identity`); ``extra``: more JSON-able metadata (how the
    embeddings were combined).
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: image embeddings are saved as .safetensors")
    if not embeds or len(embeds) != len(adapters):
        raise ValueError(f"{len(embeds)} embedding tensors for {len(adapters)} adapters")
    rows = 2 if do_classifier_free_guidance else 1
    for i, tensor in enumerate(embeds):
        if not isinstance(tensor, torch.Tensor) or tensor.ndim < 2 or tensor.shape[0] != rows:
            raise ValueError(f"embeddings of adapter {i} must have {rows} row(s) along dim 0 "
                             f"({'[negative, positive]' if rows == 2 else '[positive]'})")
    metadata = {"format": FORMAT, "version": FORMAT_VERSION, "guidance": json.dumps(do_classifier_free_guidance),
                "adapters": json.dumps(adapters), "extra": json.dumps(extra or {})}
    tensors = {f"adapter.{i}": t.detach().cpu().contiguous() for i, t in enumerate(embeds)}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
    return path


def load_image_embeds(path: str | Path) -> tuple[list[torch.Tensor], dict]:
    """``(embeds, metadata)`` from :func:`save_image_embeds`; ``metadata`` has ``adapters``, ``guidance``, ``extra``."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such image-embeddings file")
    try:
        with safe_open(str(path), framework="pt") as handle:
            raw = handle.metadata() or {}
            if raw.get("format") != FORMAT:
                raise ValueError(f"{path}: not an imageprompt image-embeddings file (no {FORMAT!r} metadata)")
            if raw.get("version") != FORMAT_VERSION:
                raise ValueError(f"{path}: image-embeddings format version {raw.get('version')!r}; "
                                 f"this imageprompt reads {FORMAT_VERSION!r}")
            adapters = json.loads(raw["adapters"])
            embeds = [handle.get_tensor(f"adapter.{i}") for i in range(len(adapters))]
    except SafetensorError as err:
        raise ValueError(f"{path}: not a safetensors file ({err})") from None
    return embeds, {"adapters": adapters, "guidance": json.loads(raw["guidance"]), "extra": json.loads(raw["extra"])}


def check_embeds_match(metadata: dict, adapters: list[dict], where: str = "the file") -> None:
    """Refuse embeddings made by other adapters or image encoders than ``adapters`` (same dicts as saved).

    The encoders are compared by :func:`imageprompt.model_identity.identity_mismatch`: an fp16 copy of the
    encoder that made the file is the same encoder; another encoder is not.
    """
    saved = metadata["adapters"]
    if len(saved) != len(adapters):
        raise ValueError(f"{where} holds embeddings for {len(saved)} adapter(s); {len(adapters)} are loaded")
    for i, (was, now) in enumerate(zip(saved, adapters)):
        if was.get("kind") != now.get("kind"):
            raise ValueError(f"{where}: adapter {i} was made with kind {was.get('kind')!r} "
                             f"({was.get('name')}), the loaded one has {now.get('kind')!r} ({now.get('name')})")
        why = identity_mismatch(was.get("encoder"), now.get("encoder"))
        if why:
            raise ValueError(f"{where}: adapter {i} was made with another image encoder ({was.get('name')}) than "
                             f"the loaded one ({now.get('name')}): {why}")
