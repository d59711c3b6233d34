"""Closed-form image-to-prompt conversion (SD-IPC) for Stable Diffusion 3 / 3.5.

SD3 conditions its MM-DiT on

- token states: CLIP ViT-L's and OpenCLIP bigG's *penultimate* states, concatenated (768 + 1280 = 2048) and
  zero-padded to T5-XXL's width (4096): 77 tokens; then T5's states (``max_sequence_length`` tokens, 256 by
  default) along the sequence;
- a pooled vector: *both* towers' projected EOS embeddings, concatenated (768 + 1280 = 2048).

The CLIP parts are SDXL's (:mod:`imageprompt.conversion_xl`), reused as they are: each tower's token state is
SD-IPC's closed form ``pinv(W_t) e`` brought to the penultimate layer, and each pooled half is that tower's image
embedding rescaled to the typical pooled text norm (same space as the text's: no inversion). SDXL reads bigG's
pooled vector only; SD3 reads ViT-L's too, so :class:`SD3Converter` adds it.

T5 has no image tower and no projection to invert, so the T5 part is filled (``t5``, :data:`T5_FILLS`):

- ``"zeros"`` (default): what SD3 sees when T5 is dropped. SD3 was trained with each of its three text
  encoders dropped independently (Esser et al. 2024: 46.3 % each), and diffusers feeds zeros when
  ``text_encoder_3`` is None, so the model knows this input;
- ``"empty"``: T5's states of the empty prompt (what an unconditional T5 row holds);
- ``"caption"``: T5's states of a text (the edit prompt; for a variation, a caption the user gives).

The measured effect of each choice on the tiny random model is in ``docs/sd3.md``.
"""

from __future__ import annotations

# ConfigMixin / ModelMixin: diffusers' loader looks a saved component's base classes up in the module its
# model_index.json names (this one, for a saved SD3Converter)
import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin  # noqa: F401
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401

from imageprompt.conversion_xl import SDXLConverter

T5_FILLS = ("zeros", "empty", "caption")
CLIP_TOKENS = 77


class SD3Converter(SDXLConverter):
    """SD-IPC for SD3: ViT-L and bigG image embeddings -> ``(token state (B, D_L + D_G), pooled (B, P_L + P_G))``.

    Built like :class:`SDXLConverter` (:meth:`~SDXLConverter.from_encoders` with ``text_encoder.text_projection``:
    SD3's ViT-L tower has its projection)."""

    def pooled_parts(self, embeds_l: torch.Tensor, embeds_g: torch.Tensor) -> torch.Tensor:
        """Each tower's image embedding rescaled to its typical pooled text norm, concatenated (SD3's pooled)."""
        parts = []
        for which, e in ((0, embeds_l), (1, embeds_g)):
            e = e.float()
            parts.append(self.config.stats[which]["pooled_norm"] * e / e.norm(dim=-1, keepdim=True))
        return torch.cat(parts, dim=-1)

    def forward(self, embeds_l: torch.Tensor, embeds_g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.cat([self.tokens(embeds_l, 0), self.tokens(embeds_g, 1)], dim=-1)
        return h, self.pooled_parts(embeds_l, embeds_g)


def split_joint_states(prompt_embeds: torch.Tensor, clip_width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """diffusers' SD3 ``prompt_embeds`` ``(B, 77 + n, W)`` -> ``(clip (B, 77, clip_width), t5 (B, n, W))``."""
    return prompt_embeds[:, :CLIP_TOKENS, :clip_width], prompt_embeds[:, CLIP_TOKENS:]


def joint_states(clip_states: torch.Tensor, t5_states: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`split_joint_states`: CLIP states zero-padded to T5's width, then T5's, along the
    sequence (diffusers' ``encode_prompt`` layout)."""
    padded = F.pad(clip_states, (0, t5_states.shape[-1] - clip_states.shape[-1]))
    return torch.cat([padded, t5_states.to(padded)], dim=-2)


def check_t5_fill(t5: str, caption: str | None) -> None:
    if t5 not in T5_FILLS:
        raise ValueError(f"t5 must be one of {', '.join(T5_FILLS)}, got {t5!r}")
    if t5 == "caption" and not (isinstance(caption, str) and caption.strip()):
        raise ValueError("t5='caption' needs a caption (a non-empty `t5_caption` or the edit prompt)")
