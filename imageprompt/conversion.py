"""Closed-form image-to-prompt conversion (SD-IPC).

Ding et al., "Closed-form image-to-prompt conversion for Stable Diffusion"
(SD-IPC). CLIP's image embedding ``e = v @ W_v.T`` lives in the space that the
text tower's projection ``W_t`` maps text states into. Inverting ``W_t`` with a
damped pseudo-inverse turns ``e`` into a text-encoder state ``h`` that Stable
Diffusion's UNet can read as a prompt:

    P = pinv(W_t, atol=0.3);  h = e @ P.T;  h = scale * h / ||h||

``scale`` is the typical norm of the text encoder's final-layer EOS states
(27.5 for SD 1.x's CLIP ViT-L/14 text tower; :func:`measure_eos_norm` measures
it for other encoders).
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

SD1_EOS_NORM = 27.5
PINV_ATOL = 0.3
# Prompts used to measure the EOS-state norm of an encoder without one on record.
NORM_PROMPTS = (
    "a photo of a cat",
    "a painting of a house by the sea",
    "a red circle on the left",
    "a blue square and a green triangle",
    "portrait of a woman, studio lighting",
    "a small dog on the grass",
    "",
    "an object",
)


class SDIPCConverter(ModelMixin, ConfigMixin):
    """Turns CLIP image embeddings into text-encoder states (SD-IPC).

    Holds only CLIP's ``text_projection`` (``projection_dim x text_hidden_size``);
    the image embedding comes from the pipeline's ``image_encoder``
    (``CLIPVisionModelWithProjection.image_embeds``).
    """

    @register_to_config
    def __init__(
        self,
        text_hidden_size: int = 768,
        projection_dim: int = 768,
        scale: float = SD1_EOS_NORM,
        atol: float = PINV_ATOL,
    ):
        super().__init__()
        self.text_projection = nn.Linear(text_hidden_size, projection_dim, bias=False)

    @classmethod
    def from_clip(cls, clip_model, scale: float = SD1_EOS_NORM, atol: float = PINV_ATOL) -> SDIPCConverter:
        """Build from a transformers ``CLIPModel`` (or ``CLIPTextModelWithProjection``)."""
        weight = clip_model.text_projection.weight
        converter = cls(text_hidden_size=weight.shape[1], projection_dim=weight.shape[0], scale=scale, atol=atol)
        converter.text_projection.weight.data.copy_(weight.data.float())
        return converter  # stays float32: it is tiny and the pseudo-inverse needs the precision

    def inverse_projection(self) -> torch.Tensor:
        """``P = pinv(W_t, atol)``, shape ``(text_hidden_size, projection_dim)``, in float32."""
        weight = self.text_projection.weight.float()
        return torch.linalg.pinv(weight, atol=self.config.atol)

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """``(B, projection_dim)`` CLIP image embeddings -> ``(B, text_hidden_size)`` text states."""
        inverse = getattr(self, "_inverse", None)
        if inverse is None or inverse.device != image_embeds.device:
            inverse = self.inverse_projection().to(image_embeds.device)
            self._inverse = inverse  # cached: the weight is frozen
        h = image_embeds.float() @ inverse.T
        h = self.config.scale * h / h.norm(dim=-1, keepdim=True)
        return h.to(image_embeds.dtype)

    def to(self, *args, **kwargs):
        """``nn.Module.to``: the weight stays float32 whatever dtype is asked (see ``_apply``), so diffusers'
        ``ModelMixin.to`` notice about modules to keep in float32 does not apply here."""
        return nn.Module.to(self, *args, **kwargs)

    def _apply(self, fn, *args, **kwargs):
        self._inverse = None  # a device change invalidates the cache
        out = super()._apply(fn, *args, **kwargs)
        weight = self.text_projection.weight
        if weight.dtype != torch.float32:  # `pipe.to(torch.float16)` casts every module: this one stays fp32
            weight.data = weight.data.float()
        return out


def variation_embeds(h: torch.Tensor, bos_state: torch.Tensor, length: int = 77) -> torch.Tensor:
    """Variation conditioning ``(B, length, D)``: the empty prompt's BOS state, then ``h`` at 1..length-1."""
    batch, dim = h.shape
    states = h[:, None, :].expand(batch, length, dim).clone()
    states[:, 0] = bos_state.reshape(-1, dim)[0].to(h)
    return states


def edit_embeds(h: torch.Tensor, text_states: torch.Tensor, eos_index: torch.Tensor, alpha: float) -> torch.Tensor:
    """Image + text conditioning: positions ``eos..end`` become ``h + alpha * text_state``.

    ``text_states`` is the text encoder's output for the edit prompt ``(B, L, D)``;
    BOS and the word positions stay as encoded.
    """
    batch, length, _ = text_states.shape
    positions = torch.arange(length, device=text_states.device)[None, :]
    after_eos = (positions >= eos_index.to(text_states.device)[:, None])[..., None]
    blended = h[:, None, :].to(text_states) + alpha * text_states
    return torch.where(after_eos, blended, text_states)


def eos_positions(input_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """Index of the first EOS token in each row (padding may repeat it)."""
    is_eos = input_ids == eos_token_id
    return is_eos.int().argmax(dim=1)


@torch.no_grad()
def measure_eos_norm(text_encoder, tokenizer, prompts=NORM_PROMPTS) -> float:
    """Mean norm of the final-layer-normed EOS states of ``text_encoder`` over ``prompts``."""
    ids = tokenizer(
        list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids.to(text_encoder.device)
    states = text_encoder(ids)[0].float()
    eos = eos_positions(ids, tokenizer.eos_token_id)
    return states[torch.arange(len(ids)), eos].norm(dim=-1).mean().item()


def is_sd1_text_encoder(text_encoder) -> bool:
    """SD 1.x's text encoder is CLIP ViT-L/14's text tower, whose EOS norm (27.5) is on record."""
    cfg = text_encoder.config
    return (cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size) == (768, 12, 49408)
