"""The SD-IPC tuning mechanism: deep visual prompts inserted into CLIP's vision tower by forward hooks.

Ding et al., "The CLIP Model is Secretly an Image-to-Prompt Converter"
(SD-IPC, NeurIPS 2023), Sec. 4, tunes CLIP's image embedding with deep visual
prompt tuning (Jia et al., "Visual Prompt Tuning", ECCV 2022, VPT-deep): each
layer of the vision tower reads its own learned tokens right after CLS. The
hooks go on transformers' CLIP layers (no copied transformers code), so the
encoder stays a ``CLIPVisionModelWithProjection`` and ``.image_embeds`` works
unchanged; the prompts are a submodule of it, so they move with it.
"""

from __future__ import annotations

import math

import torch
from torch import nn

PROMPTS_ATTR = "imageprompt_visual_prompts"  # submodule of the image encoder, so it moves with it


# Defined here, the package's lowest module, because attach_visual_prompts raises it too (prompts that do not fit).
class TuningFileError(ValueError):
    """A tuning file that cannot be used with this pipeline; the message is meant for the user."""


class DeepVisualPrompts(nn.Module):
    """VPT-deep prompts: per layer ``num_tokens`` learned tokens, a shared ``Linear``, dropout.

    Layer ``i``'s tokens are ``dropout(proj(prompts[i]))``; they sit right after
    CLS and replace the previous layer's prompt outputs (Jia et al., Sec. 3.2).
    """

    def __init__(self, num_layers: int, num_tokens: int, hidden_size: int, patch_size: int, dropout: float = 0.1):
        super().__init__()
        self.num_tokens = num_tokens
        self.prompts = nn.Parameter(torch.empty(num_layers, num_tokens, hidden_size))
        self.proj = nn.Linear(hidden_size, hidden_size)
        self.dropout = nn.Dropout(dropout)
        # VPT's initialisation: Xavier-uniform over a patch's fan-in, He-normal projection.
        bound = math.sqrt(6.0 / float(3 * patch_size**2 + hidden_size))
        nn.init.uniform_(self.prompts, -bound, bound)
        nn.init.kaiming_normal_(self.proj.weight, a=0, mode="fan_out")
        nn.init.zeros_(self.proj.bias)

    @classmethod
    def for_encoder(cls, image_encoder, num_tokens: int = 50, dropout: float = 0.1) -> DeepVisualPrompts:
        cfg = image_encoder.config
        return cls(cfg.num_hidden_layers, num_tokens, cfg.hidden_size, cfg.patch_size, dropout)

    def tokens(self, layer: int, batch: int, like: torch.Tensor) -> torch.Tensor:
        """``(batch, num_tokens, hidden)`` tokens of ``layer`` in ``like``'s dtype (dropout per sample)."""
        proj = self.proj(self.prompts[layer].to(self.proj.weight.dtype))
        return self.dropout(proj.expand(batch, -1, -1)).to(like.dtype)


def attach_visual_prompts(image_encoder, prompts: DeepVisualPrompts) -> DeepVisualPrompts:
    """Insert ``prompts`` into ``image_encoder`` (a ``CLIPVisionModelWithProjection``) with forward hooks.

    After the pre-layernorm the sequence ``[CLS, patches]`` becomes ``[CLS, P_0, patches]``;
    before layer ``i >= 1`` the prompt outputs are replaced by ``P_i``. CLS stays at
    position 0, so ``pooler_output`` and ``image_embeds`` keep their meaning.
    ``last_hidden_state`` carries the prompt tokens after CLS.
    """
    detach_visual_prompts(image_encoder)
    vision = image_encoder.vision_model
    layers = vision.encoder.layers
    if prompts.prompts.shape[0] != len(layers) or prompts.prompts.shape[2] != image_encoder.config.hidden_size:
        raise TuningFileError(
            f"visual prompts of shape {tuple(prompts.prompts.shape)} do not fit a vision tower with "
            f"{len(layers)} layers of width {image_encoder.config.hidden_size}"
        )
    n = prompts.num_tokens

    def insert_first(module, args, output):
        return torch.cat([output[:, :1], prompts.tokens(0, output.shape[0], output), output[:, 1:]], dim=1)

    def replace_at(layer):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            hidden = torch.cat([hidden[:, :1], prompts.tokens(layer, hidden.shape[0], hidden), hidden[:, 1 + n :]], 1)
            if args:
                return (hidden, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": hidden}

        return hook

    handles = [vision.pre_layrnorm.register_forward_hook(insert_first)]
    handles += [layers[i].register_forward_pre_hook(replace_at(i), with_kwargs=True) for i in range(1, len(layers))]
    prompts._hook_handles = handles
    prompts.to(device=image_encoder.device)  # stays float32: tokens are cast where they enter
    image_encoder.add_module(PROMPTS_ATTR, prompts)
    return prompts


def detach_visual_prompts(image_encoder) -> DeepVisualPrompts | None:
    """Remove the prompts (and their hooks) from ``image_encoder``; returns them, or None."""
    prompts = getattr(image_encoder, PROMPTS_ATTR, None)
    if prompts is None:
        return None
    for handle in getattr(prompts, "_hook_handles", []):
        handle.remove()
    prompts._hook_handles = []
    delattr(image_encoder, PROMPTS_ATTR)
    return prompts


def visual_prompts_of(pipe) -> DeepVisualPrompts | None:
    return getattr(pipe.sdipc_image_encoder, PROMPTS_ATTR, None)

