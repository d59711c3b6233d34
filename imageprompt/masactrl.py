"""MasaCtrl mutual self-attention control on fused attention kernels.

Cao et al., "MasaCtrl: Tuning-Free Mutual Self-Attention Control for Consistent
Image Synthesis and Editing" (ICCV 2023), Sec. 3.2 (mutual self-attention) and
Sec. 3.3 (mask-guided mutual self-attention). The source prompt and the target
prompt(s) run in one batch. From denoising step ``S`` on and in the
self-attention layers from ``L`` on, each target row's queries read the
*source's* keys and values, ``Attention(Q_tgt, K_src, V_src)``; the target keeps
its own layout from the first steps and the early layers, and takes the
source's content (colour, texture, identity) from its keys and values. As in the
authors' code the unconditional rows do the same with the source's
unconditional keys and values, and the source rows are untouched.

Layers are counted as the authors count them: every self-attention layer of the
UNet in the order they run (encoder, mid block, decoder), ``0 .. 15`` on SD 1.x;
the paper's ``S = 4, L = 10`` (of 50 steps) makes only the decoder's 32x32 and
64x64 layers mutual. :func:`default_start_layer` translates that choice to other
UNets.

Mask-guided variant (Sec. 3.3, the authors' ``MutualSelfAttentionControlMaskAuto``):
the cross-attention maps of chosen words (the foreground object) at ``map_res``,
recorded so far in the current step and averaged, min-max normalised and
thresholded (0.1), give a source mask ``M_s`` and a target mask ``M_t``. The
target then attends to the source's foreground keys and to its background keys
separately, ``O_fg = Attn(Q_t, K_s, V_s; keys in M_s)``,
``O_bg = Attn(Q_t, K_s, V_s; keys not in M_s)``, and combines them per query,
``O = M_t * O_fg + (1 - M_t) * O_bg``. (An empty key set falls back to all
keys, where the authors' softmax would spread evenly over masked keys.)

Everything runs on the fused kernel: ``SDPA(Q_tgt, K_src, V_src)`` only swaps the
target rows' keys and values, and the masks are boolean key masks of the same
call; no probability matrix is formed, except the small cross-attention maps of
the mask words' layers (77 keys), and only when masks are asked for.

The controller is an ``editor`` hook of :mod:`imageprompt.attention`, with the
interface of :class:`imageprompt.p2p.PromptToPromptController`, so the
prompt-to-prompt pipeline runs it as ``mode="masactrl"``.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F

from imageprompt.attention import attend, editor_attached, imageprompt_processors
from imageprompt.p2p import normalize_word, prompt_words, word_positions

MASK_THRESHOLD = 0.1  # the authors' `thres`
START_STEP = 4  # the paper's S (of 50 steps)
START_LAYER_SD = 10  # the paper's L on SD 1.x's 16 self-attention layers

_PARTS = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}


# ---------------------------------------------------------------- layers
def self_attention_layers(unet_or_names) -> list[str]:
    """Self-attention processor names in the order the UNet runs them (encoder, mid block, decoder).

    ``unet.attn_processors`` lists the decoder before the mid block; the authors count layers as they run.
    """
    names = unet_or_names if isinstance(unet_or_names, (list, tuple)) else list(unet_or_names.attn_processors)
    names = [n for n in names if n.endswith("attn1.processor") and not n.startswith("encoder_hid_proj.")]

    def key(name):
        part = name.split(".", 1)[0]
        return _PARTS.get(part, 3), [int(x) for x in re.findall(r"\.(\d+)\.", f".{name}.")]

    return sorted(names, key=key)


def default_start_layer(unet) -> int:
    """The paper's ``L = 10`` (of 16 on SD 1.x) for any UNet: the first decoder self-attention layer of the
    decoder's second-highest resolution (SD 1.x: ``up_blocks.2``, 32x32 latents at 512x512)."""
    names = self_attention_layers(unet)
    decoder = [i for i, n in enumerate(names) if n.startswith("up_blocks.")]
    if not decoder:
        return len(names)
    blocks = sorted({int(names[i].split(".")[1]) for i in decoder})
    block = blocks[-2] if len(blocks) > 1 else blocks[-1]
    return next(i for i in decoder if int(names[i].split(".")[1]) == block)


def validate_masactrl(source: str, targets, start_step: int, start_layer: int | None,
                      mask_words=None, mask_threshold: float = MASK_THRESHOLD) -> list[str]:
    """Check a MasaCtrl edit on the text alone (no model needed); returns the target prompts."""
    if not isinstance(source, str) or not source.strip():
        raise ValueError("the source prompt is empty")
    targets = [targets] if targets is None or isinstance(targets, str) else list(targets)
    if not targets or any(not isinstance(t, str) or not t.strip() for t in targets):
        raise ValueError("mode masactrl needs a target prompt")
    if isinstance(start_step, bool) or not isinstance(start_step, int) or start_step < 0:
        raise ValueError(f"`start_step` must be a step number >= 0, got {start_step!r}")
    if start_layer is not None and (isinstance(start_layer, bool) or not isinstance(start_layer, int)
                                    or start_layer < 0):
        raise ValueError(f"`start_layer` must be a layer number >= 0, got {start_layer!r}")
    if not isinstance(mask_threshold, (int, float)) or not 0.0 <= mask_threshold <= 1.0:
        raise ValueError(f"`mask_threshold` must be in [0, 1], got {mask_threshold!r}")
    if mask_words:
        wanted = {normalize_word(w) for w in mask_words}
        for prompt in [source, *targets]:
            if not wanted & set(prompt_words(prompt)):
                raise ValueError(f"none of the mask words {list(mask_words)} is in the prompt {prompt!r}")
    return targets


# -------------------------------------------------------------- attention
def mutual_self_attention(query, key, value, num_prompts: int, fg_keys=None, fg_queries=None,
                          attention_mask=None, backend: str = "sdpa"):
    """Mutual self-attention of one layer (Cao et al. 2023, Eq. 3 and Sec. 3.3) on the fused kernel.

    ``query``/``key``/``value``: ``(rows, heads, tokens, head_dim)``, rows ``[uncond prompts.., cond prompts..]``
    or ``[cond prompts..]``, each half source first. Target rows attend to their half's source keys and values.
    ``fg_keys``: boolean ``(tokens,)`` source foreground; ``fg_queries``: float ``(targets, tokens)`` in [0, 1],
    the target foregrounds (both None: no masks).
    """
    rows = query.shape[0]
    halves = rows // num_prompts
    shared = (num_prompts - 1, -1, -1, -1)
    keys, values = [], []
    for h in range(halves):
        src = slice(h * num_prompts, h * num_prompts + 1)
        keys += [key[src], key[src].expand(shared)]
        values += [value[src], value[src].expand(shared)]
    key, value = torch.cat(keys), torch.cat(values)
    if fg_keys is None:
        return attend(query, key, value, attention_mask, backend)
    targets = [i for i in range(rows) if i % num_prompts]
    sources = [i for i in range(rows) if i % num_prompts == 0]
    out = torch.empty_like(query)
    out[sources] = attend(query[sources], key[sources], value[sources],
                          None if attention_mask is None else attention_mask[sources], backend)
    q, k, v = query[targets], key[targets], value[targets]
    outs = []
    for keep in (fg_keys, ~fg_keys):
        if not bool(keep.any()):  # no such keys: the whole source (avoids an all-masked softmax)
            keep = torch.ones_like(keep)
        outs.append(F.scaled_dot_product_attention(q, k, v, attn_mask=keep[None, None, None, :]))
    weight = fg_queries.to(query.dtype).repeat(halves, 1)[:, None, :, None]  # (targets x halves, 1, tokens, 1)
    out[targets] = outs[0] * weight + outs[1] * (1 - weight)
    return out


# --------------------------------------------------------------- controller
class MutualSelfAttentionController:
    """The MasaCtrl ``editor`` for every attention layer of a UNet.

    Args:
        tokenizer: the pipeline's CLIP tokenizer (token positions of the mask words).
        source: the source prompt (batch row 0 of each half).
        targets: the target prompt(s), rows 1...
        start_step: first denoising step (0-based) with mutual self-attention (the paper's ``S``, 4 of 50).
        start_layer: first self-attention layer (counted as they run, from 0) with it (the paper's ``L``, 10 on
            SD 1.x); None: :func:`default_start_layer` when attached.
        mask_words: words of the foreground object (each prompt uses those it contains); None: no masks.
        mask_threshold: threshold of the normalised cross-attention maps (the authors' 0.1).
        map_res: latent rows of the cross-attention layers whose maps make the masks (None: ``default_res``).
    """

    mode = "masactrl"

    def __init__(self, tokenizer, source: str, targets, start_step: int = START_STEP, start_layer: int | None = None,
                 mask_words=None, mask_threshold: float = MASK_THRESHOLD, map_res: int | None = None,
                 length: int | None = None):
        targets = validate_masactrl(source, targets, start_step, start_layer, mask_words, mask_threshold)
        if map_res is not None and (not isinstance(map_res, int) or map_res < 1):
            raise ValueError(f"`map_res` must be a positive number of latent rows, got {map_res!r}")
        self.tokenizer, self.source, self.targets = tokenizer, source, targets
        self.start_step, self.start_layer_arg = start_step, start_layer
        self.mask_threshold, self.map_res_arg = float(mask_threshold), map_res
        self.length = length or tokenizer.model_max_length
        self.num_prompts = len(targets) + 1
        self.token_masks = None
        if mask_words:
            self.token_masks = torch.zeros(self.num_prompts, self.length)
            for row, prompt in enumerate([source, *targets]):
                for word in mask_words:
                    if normalize_word(word) in prompt_words(prompt):
                        self.token_masks[row, word_positions(tokenizer, prompt, word, self.length)] = 1.0
        self.layers: dict[str, int] = {}
        self.start_layer = start_layer if start_layer is not None else START_LAYER_SD
        self.blend_mask = None
        self.setup(1, (64, 64))

    # ------------------------------------------------------------ schedule
    def setup(self, num_steps: int, latent_size: tuple[int, int], device=None, default_res: int | None = None) -> None:
        """Prepare a run of ``num_steps`` on latents of ``latent_size``; ``default_res`` stands in for ``map_res``."""
        self.num_steps, self.latent_size = num_steps, tuple(latent_size)
        self.map_res = self.map_res_arg or default_res or max(latent_size[0] // 4, 1)
        if self.token_masks is not None and device is not None:
            self.token_masks = self.token_masks.to(device)
        self.masks = None  # (fg_keys per target-layer size, ...) of the last layer: for inspection
        self.set_step(0)

    def set_step(self, step: int) -> None:
        self.step = step
        self.active = step >= self.start_step
        self.maps_sum, self.maps_count = None, 0  # the authors clear the maps after every step

    def end_step(self, latents: torch.Tensor) -> torch.Tensor:
        self.set_step(self.step + 1)
        return latents

    def attention_maps(self):
        return None

    def layer_size(self, tokens: int) -> tuple[int, int]:
        rows, cols = self.latent_size
        factor = math.sqrt(rows * cols / tokens)
        height = max(int(round(rows / factor)), 1)
        return height, tokens // height

    # ---------------------------------------------------------------- masks
    def _record(self, processor, query, key, value, attention_mask, first):
        """Cross-attention with explicit probabilities for the conditional rows; adds their maps to the step's sum."""
        scores = query[first:].float() @ key[first:].float().transpose(-1, -2) * query.shape[-1] ** -0.5
        if attention_mask is not None:
            scores = scores + attention_mask[first:].float()
        probs = scores.softmax(-1)
        height, width = self.layer_size(probs.shape[2])
        maps = probs.mean(1).reshape(probs.shape[0], height, width, -1)
        self.maps_sum = maps if self.maps_sum is None else self.maps_sum + maps
        self.maps_count += 1
        out = (probs @ value[first:].float()).to(query.dtype)
        if first == 0:
            return out
        mask = None if attention_mask is None else attention_mask[:first]
        return torch.cat([attend(query[:first], key[:first], value[:first], mask, processor.backend), out])

    def word_masks(self, size: tuple[int, int]) -> torch.Tensor:
        """``(prompts, H*W)`` foreground masks at ``size`` from this step's maps (the authors' aggregation)."""
        maps = self.maps_sum / self.maps_count  # (prompts, h, w, length)
        image = (maps * self.token_masks.to(maps)[:, None, None, :]).sum(-1)[:, None]
        low = image.amin(dim=(2, 3), keepdim=True)
        high = image.amax(dim=(2, 3), keepdim=True)
        image = (image - low) / (high - low).clamp_min(1e-12)
        image = F.interpolate(image, size=size)  # nearest, as the authors resize
        return (image >= self.mask_threshold).flatten(1)

    # --------------------------------------------------------------- editor
    def __call__(self, processor, query, key, value, attention_mask=None):
        prompts, rows = self.num_prompts, query.shape[0]
        if rows not in (prompts, 2 * prompts):
            raise RuntimeError(f"MasaCtrl expects {prompts} or {2 * prompts} batch rows, got {rows}")
        first = rows - prompts
        if processor.is_cross_attention:
            if self.token_masks is not None and self.layer_size(query.shape[2])[0] == self.map_res:
                return self._record(processor, query, key, value, attention_mask, first)
            return attend(query, key, value, attention_mask, processor.backend)
        layer = self.layers.get(processor.name, -1)
        if not self.active or layer < self.start_layer:
            return attend(query, key, value, attention_mask, processor.backend)
        fg_keys = fg_queries = None
        if self.token_masks is not None and self.maps_sum is not None:
            masks = self.word_masks(self.layer_size(query.shape[2]))
            fg_keys, fg_queries = masks[0], masks[1:].float()
            self.masks = masks
        return mutual_self_attention(query, key, value, prompts, fg_keys, fg_queries, attention_mask,
                                     processor.backend)

    # ---------------------------------------------------------- attaching
    def attached(self, unet):
        """Install this controller as the ``editor`` of every attention layer for the ``with`` block."""
        processors = imageprompt_processors(unet)
        order = self_attention_layers(list(processors))
        self.layers = {name: i for i, name in enumerate(order)}
        self.start_layer = self.start_layer_arg if self.start_layer_arg is not None else default_start_layer(unet)
        if self.start_layer >= len(order):
            raise ValueError(f"`start_layer` {self.start_layer} names no layer: this UNet has {len(order)} "
                             f"self-attention layers (0..{len(order) - 1})")
        return editor_attached(unet, self, processors.values())
