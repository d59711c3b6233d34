"""A training-free decoupled image branch: SD-IPC's converted image prompt through the layer's own keys/values.

IP-Adapter (Ye et al. 2023, Eq. 5) adds ``scale * Attn(Q, c W'_k, c W'_v)`` to
each cross-attention layer and *initialises* ``W'_k``/``W'_v`` from the layer's
``to_k``/``to_v``. SD-IPC (Ding et al.) turns an image into text-encoder states
with no training. Feeding SD-IPC's variation conditioning ``c`` (the empty
prompt's BOS state, then the converted image state ``h`` at positions 1..76)
into a branch whose ``W'_k = to_k`` and ``W'_v = to_v`` gives an image prompt
with a scale knob and no adapter weights:

    Z = Attn(Q, K_text, V_text) + scale * Attn(Q, c W_k, c W_v).

The second term is exactly what the layer computes when SD-IPC variation
conditions it alone; the unconditional branch reads the empty prompt's states
(or a negative image's conversion). Contrast SD-IPC's editing blend, which
changes the *inputs* of one attention (positions EOS..76 become
``h + alpha * text_state``) instead of adding a second attention's output.
"""

from __future__ import annotations

import torch
from torch import nn

from imageprompt.ip_adapter import LayerOwnProjection, add_adapter, remove_adapters


class SDIPCTokens(nn.Module):
    """The branch's "image projection": SD-IPC's conditioning is already in the text encoder's space."""

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        return image_embeds


class SDIPCBranch:
    """An image adapter with no weights: the pipeline's CLIP + SD-IPC converter, and each layer's own K/V."""

    kind = "sdipc"
    name = "sdipc"

    def __init__(self):
        self.projection = SDIPCTokens()
        self._own = (LayerOwnProjection("to_k"), LayerOwnProjection("to_v"))

    def projections(self, name: str, attn) -> tuple[nn.Module, nn.Module]:
        return self._own

    @torch.no_grad()
    def encode(self, pipe, images, negative_images, device):
        """``(conditioning, negative)``, each ``(n, 77, D)``: SD-IPC variation states; negative: the empty prompt."""
        embeds = pipe.image_prompt_embeds(images, None, 0.0, device)
        if negative_images is not None:
            negative = pipe.image_prompt_embeds(negative_images, None, 0.0, device)
        else:
            empty, _ = pipe.encode_text([""], device)
            negative = empty.expand(len(images), *empty.shape[1:])
        return embeds, negative


def enable_sdipc_branch(pipe, scale: float = 1.0) -> SDIPCBranch:
    """Add the training-free SD-IPC branch to ``pipe``'s UNet (after any IP-Adapters); returns it.

    Its image prompt is the last entry of ``ip_adapter_image``; its scale the
    last entry of :meth:`set_ip_adapter_scale` lists (InstantStyle dicts work too).
    Other adapters keep their scales.
    """
    disable_sdipc_branch(pipe)
    branch = SDIPCBranch()
    add_adapter(pipe.unet, branch, scale)
    return branch


def disable_sdipc_branch(pipe) -> None:
    """Remove the SD-IPC branch, keeping any IP-Adapters and their scales."""
    remove_adapters(pipe.unet, SDIPCBranch)
