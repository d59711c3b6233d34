"""Prompt-to-prompt on the MM-DiT's joint attention (Stable Diffusion 3 / 3.5).

Hertz et al.'s prompt-to-prompt (:mod:`imageprompt.p2p`) edits two separate softmaxes of a UNet: cross-attention
(image queries x text keys) and self-attention (image x image). In a joint block both are parts of *one* softmax
over the ``I + T`` keys. Row ``i < I`` (an image query) of the target's joint probabilities is
``[P_ii | P_it]``; we carry prompt-to-prompt over block by block:

- **cross-attention** -> the image-query x text-key block ``P_it``: replace (word swap, ``P_it* = P_it^src M``),
  refine (aligned tokens) and reweight (token multipliers), with prompt-to-prompt's per-step, per-token window
  ``cross_steps`` -- the same math as on SD 1.5 (:meth:`PromptToPromptController.edit_cross`), applied to the
  77 CLIP tokens with CLIP's alignment and to the T5 tokens with T5's (each tokenizer aligns its own part);
- **self-attention** -> the image x image block ``P_ii``: during ``self_steps`` the targets take the source's
  ``P_ii`` (in the joint layers ``self_layers``, default all of them);
- **local blend** reads the (edited) ``P_it`` maps of the CLIP tokens, averaged over heads, joint layers and
  steps, on the patch grid; then prompt-to-prompt's mask and ``x_t = x_src + mask * (x_t - x_src)`` as on SD 1.5.

Choices (``docs/sd3.md`` lists them with the work each follows):

- the blocks are substituted as they are, not renormalised: while both blocks are replaced and the mapper is a
  permutation, the target's image rows are exactly the source's (mapped), which sum to 1, as in prompt-to-prompt;
  with only ``P_it`` replaced a row sums to ``1 + sum(P_it^src M) - sum(P_it^tgt)`` (reweight, as on SD 1.5,
  is unnormalised on purpose);
- the text-query rows (the text stream's own update) and the unconditional rows stay the target's own;
- values are the target's own (``P* V_tgt``), as in prompt-to-prompt.

The probabilities of the conditional rows are formed explicitly (float32) a few heads at a time, only in the steps
that edit or record; every other call runs diffusers' fused kernel.
"""

from __future__ import annotations

import torch

from imageprompt.attention import AttentionEditor
from imageprompt.p2p import PromptToPromptController, PromptToPromptSettings

CLIP_TOKENS = 77
HEAD_CHUNK = 4


class _LeadingSlot:
    """A T5 tokenizer seen with one leading slot: T5 has no BOS, and :mod:`imageprompt.p2p_align` counts word
    positions from 1 (CLIP's BOS at 0); positions are shifted back by one after alignment."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=add_special_tokens)
        return [-1, *ids] if add_special_tokens else ids


class JointPromptToPrompt(AttentionEditor):
    """Prompt-to-prompt on the joint attention layers of an SD3 transformer (attach with
    :func:`imageprompt.joint_attention.joint_editor_attached`).

    Args:
        tokenizer / tokenizer_3: the pipeline's CLIP and T5 tokenizers (``tokenizer_3`` None: the T5 block is the
            target's own).
        source / targets / settings: as :class:`~imageprompt.p2p.PromptToPromptController` (``self_res`` and
            ``map_res`` are UNet levels: refused; every joint layer has the same grid).
        t5_length: the T5 tokens (``max_sequence_length``).
        self_layers: indices of the joint layers with self-attention injection (None: all).
    """

    def __init__(self, tokenizer, tokenizer_3, source: str, targets, settings: PromptToPromptSettings,
                 t5_length: int, self_layers=None):
        if settings.self_res is not None or settings.map_res is not None:
            raise ValueError("self_res / map_res name UNet levels; on SD3 choose joint layers with `self_layers`")
        self.clip = PromptToPromptController(tokenizer, source, targets, settings=settings, length=CLIP_TOKENS)
        self.t5 = None
        if tokenizer_3 is not None and t5_length > 0:
            self.t5 = PromptToPromptController(_LeadingSlot(tokenizer_3), source, targets, settings=settings,
                                               length=t5_length + 1)
            for name in ("mapper",):
                if hasattr(self.t5, name):
                    setattr(self.t5, name, getattr(self.t5, name)[:, 1:, 1:])
            if hasattr(self.t5, "index"):
                self.t5.index, self.t5.keep = (self.t5.index[:, 1:] - 1).clamp_min(0), self.t5.keep[:, 1:]
            if self.t5.weights is not None:
                self.t5.weights = self.t5.weights[:, 1:]
        self.settings, self.source, self.targets = settings, source, self.clip.targets
        self.num_prompts, self.t5_length = self.clip.num_prompts, t5_length
        self.self_layers = None if self_layers is None else {int(i) for i in self_layers}
        self.setup(1, (2, 2), 1)

    # ------------------------------------------------------------ schedule
    def setup(self, num_steps: int, latent_size: tuple[int, int], patch_size: int, device=None) -> None:
        """Prepare a run of ``num_steps`` on latents of ``latent_size``; resets the maps."""
        self.clip.setup(num_steps, latent_size, device)
        if self.t5 is not None:
            self.t5.setup(num_steps, latent_size, device)
            self.t5.alphas = self.t5.alphas[..., 1:]
            self.t5.set_step(0)
        self.grid = (latent_size[0] // patch_size, latent_size[1] // patch_size)
        self.clip.maps_sum, self.clip.maps_count = None, 0

    def set_step(self, step: int) -> None:
        self.clip.set_step(step)
        if self.t5 is not None:
            self.t5.set_step(step)

    @property
    def cross_active(self) -> bool:
        return self.clip.cross_active or (self.t5 is not None and self.t5.cross_active)

    def end_step(self, latents: torch.Tensor) -> torch.Tensor:
        """After a sampling step: local blend on the ``(prompts, C, H, W)`` latents, then the next step."""
        latents = self.clip.end_step(latents)
        if self.t5 is not None:
            self.t5.set_step(self.clip.step)
        return latents

    def attention_maps(self) -> torch.Tensor | None:
        """The image x CLIP-token maps ``(prompts, h, w, 77)`` on the patch grid, averaged over steps, layers, heads."""
        return self.clip.attention_maps()

    @property
    def blend_mask(self):
        return self.clip.blend_mask

    # --------------------------------------------------------------- edits
    def edit_joint(self, probs: torch.Tensor, image_tokens: int, self_on: bool, cross_on: bool) -> torch.Tensor:
        """The conditional rows' joint probabilities ``(prompts, heads, I + T, I + T)`` -> the edited ones."""
        new, n = probs.clone(), image_tokens
        if self_on:
            new[1:, :, :n, :n] = probs[:1, :, :n, :n]
        if cross_on:
            text = probs[:, :, :n, n:]
            parts = [self.clip.edit_cross(text[0, ..., :CLIP_TOKENS], text[1:, ..., :CLIP_TOKENS])]
            rest = text[1:, ..., CLIP_TOKENS:]
            parts.append(rest if self.t5 is None else self.t5.edit_cross(text[0, ..., CLIP_TOKENS:], rest))
            new[1:, :, :n, n:] = torch.cat(parts, dim=-1)
        return new

    def check_rows(self, rows: int) -> None:
        self.clip.check_rows(rows)

    def edit_attention(self, layer, query, key, value, attention_mask, attend):
        if not getattr(layer, "is_joint", False):
            return attend(query, key, value, attention_mask)
        self.check_rows(query.shape[0])
        n, text = layer.image_tokens, query.shape[2] - layer.image_tokens
        if text != CLIP_TOKENS + self.t5_length:
            raise RuntimeError(f"prompt-to-prompt was set up for {CLIP_TOKENS} + {self.t5_length} text tokens, "
                               f"the layer has {text}")
        self_on = self.clip.self_active and (self.self_layers is None or layer.index in self.self_layers)
        cross_on, record = self.cross_active, self.clip.blend is not None
        if not (self_on or cross_on or record):
            return attend(query, key, value, attention_mask)
        first = query.shape[0] - self.num_prompts
        outs, maps = [], 0.0
        for h in range(0, query.shape[1], HEAD_CHUNK):
            q, k, v = (x[first:, h:h + HEAD_CHUNK].float() for x in (query, key, value))
            probs = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(-1)
            probs = self.edit_joint(probs, n, self_on, cross_on)
            maps = maps + probs[:, :, :n, n:n + CLIP_TOKENS].sum(1)
            outs.append(probs @ v)
        out = torch.cat(outs, dim=1).to(query.dtype)
        self._record(maps / query.shape[1])
        if first == 0:
            return out
        return torch.cat([attend(query[:first], key[:first], value[:first], attention_mask), out])

    def _record(self, maps: torch.Tensor) -> None:
        maps = maps.reshape(maps.shape[0], *self.grid, CLIP_TOKENS)
        clip = self.clip
        clip.maps_sum = maps if clip.maps_sum is None else clip.maps_sum + maps
        clip.maps_count += 1
