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

The controller is an :class:`~imageprompt.attention.AttentionEditor` with the step
interface of :class:`imageprompt.p2p.PromptToPromptController` (``setup``, ``set_step``,
``end_step``), run by :class:`~imageprompt.pipelines.StableDiffusionMasaCtrlPipeline`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from imageprompt.attention import AttentionEditor, Layer, compiled_form, imageprompt_processors, layer_facts
from imageprompt.attention import attend as attend_fused
from imageprompt.p2p import normalize_word, prompt_words, word_positions

MASK_THRESHOLD = 0.1  # the authors' `thres`
START_STEP = 4  # the paper's S (of 50 steps)
START_LAYER_SD = 10  # the paper's L on SD 1.x's 16 self-attention layers

# ---------------------------------------------------------------- layers
def self_attention_layers(unet) -> list[str]:
    """Self-attention processor names in the order the UNet runs them (encoder, mid block, decoder)."""
    facts = layer_facts(unet)
    return sorted((n for n, f in facts.items() if not f.is_cross), key=lambda n: facts[n].index)


def default_start_layer(unet) -> int:
    """The paper's ``L = 10`` (of 16 on SD 1.x) for any UNet: the first decoder self-attention layer of the
    decoder's second-highest resolution (SD 1.x: ``up_blocks.2``, 32x32 latents at 512x512)."""
    decoder = [f for f in layer_facts(unet).values() if not f.is_cross and f.place == "up"]
    if not decoder:
        return len(self_attention_layers(unet))
    scales = sorted({f.scale for f in decoder})
    scale = scales[1] if len(scales) > 1 else scales[0]
    return min(f.index for f in decoder if f.scale == scale)


@dataclass(frozen=True)
class MasaCtrlSettings:
    """A MasaCtrl edit's options, checked when made; :meth:`check` adds the checks that need the prompts.

    Args:
        start_step: first denoising step (0-based) with mutual self-attention (the paper's ``S``, 4 of 50).
        start_layer: first self-attention layer (counted as they run, from 0) with it (the paper's ``L``, 10 on
            SD 1.x); None: :func:`default_start_layer` of the UNet.
        mask_words: words of the foreground object (each prompt uses those it contains); None: no masks.
        mask_threshold: threshold of the normalised cross-attention maps (the authors' 0.1).
        map_res: latent rows of the cross-attention layers whose maps make the masks (None: the level nearest a
            quarter of the latent height).
    """

    start_step: int = START_STEP
    start_layer: int | None = None
    mask_words: tuple[str, ...] | None = None
    mask_threshold: float = MASK_THRESHOLD
    map_res: int | None = None

    def __post_init__(self):
        step, layer, threshold = self.start_step, self.start_layer, self.mask_threshold
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"`start_step` must be a step number >= 0, got {step!r}")
        if layer is not None and (isinstance(layer, bool) or not isinstance(layer, int) or layer < 0):
            raise ValueError(f"`start_layer` must be a layer number >= 0, got {layer!r}")
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 <= threshold <= 1.0:
            raise ValueError(f"`mask_threshold` must be in [0, 1], got {threshold!r}")
        if self.map_res is not None and (isinstance(self.map_res, bool) or not isinstance(self.map_res, int)
                                         or self.map_res < 1):
            raise ValueError(f"`map_res` must be a positive number of latent rows, got {self.map_res!r}")
        if isinstance(self.mask_words, str):
            raise TypeError(f"`mask_words` must be a list of words, got the string {self.mask_words!r}")
        object.__setattr__(self, "mask_words", tuple(self.mask_words) if self.mask_words else None)

    def check(self, source: str, targets) -> list[str]:
        """Check the edit of ``source`` into ``targets`` (a prompt or a list); returns the target prompts."""
        if not isinstance(source, str) or not source.strip():
            raise ValueError("the source prompt is empty")
        targets = [targets] if targets is None or isinstance(targets, str) else list(targets)
        if not targets or any(not isinstance(t, str) or not t.strip() for t in targets):
            raise ValueError("MasaCtrl needs a target prompt")
        if self.mask_words:
            wanted = {normalize_word(w) for w in self.mask_words}
            for prompt in [source, *targets]:
                if not wanted & set(prompt_words(prompt)):
                    raise ValueError(f"none of the mask words {list(self.mask_words)} is in the prompt {prompt!r}")
        return targets


def validate_masactrl(source: str, targets, start_step: int, start_layer: int | None,
                      mask_words=None, mask_threshold: float = MASK_THRESHOLD) -> list[str]:
    """Check a MasaCtrl edit on the text alone (no model needed); returns the target prompts
    (:class:`MasaCtrlSettings` and its :meth:`~MasaCtrlSettings.check`)."""
    return MasaCtrlSettings(start_step, start_layer, mask_words, mask_threshold).check(source, targets)


# -------------------------------------------------------------- attention
def source_keys_values(key, value, num_prompts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every row's keys and values replaced by its half's source row's (the source rows keep their own)."""
    halves = key.shape[0] // num_prompts
    shared = (num_prompts - 1, -1, -1, -1)
    keys, values = [], []
    for h in range(halves):
        src = slice(h * num_prompts, h * num_prompts + 1)
        keys += [key[src], key[src].expand(shared)]
        values += [value[src], value[src].expand(shared)]
    return torch.cat(keys), torch.cat(values)


def mutual_self_attention(query, key, value, num_prompts: int, fg_keys=None, fg_queries=None,
                          attention_mask=None, attend=attend_fused):
    """Mutual self-attention of one layer (Cao et al. 2023, Eq. 3 and Sec. 3.3) on the fused kernel.

    ``query``/``key``/``value``: ``(rows, heads, tokens, head_dim)``, rows ``[uncond prompts.., cond prompts..]``
    or ``[cond prompts..]``, each half source first. Target rows attend to their half's source keys and values.
    ``attend(query, key, value, mask)``: the fused call (in an editor chain: the rest of the chain).
    ``fg_keys``: boolean ``(tokens,)`` source foreground; ``fg_queries``: float ``(targets, tokens)`` in [0, 1],
    the target foregrounds (both None: no masks).
    """
    rows = query.shape[0]
    halves = rows // num_prompts
    key, value = source_keys_values(key, value, num_prompts)
    if fg_keys is None:
        return attend(query, key, value, attention_mask)
    targets = [i for i in range(rows) if i % num_prompts]
    sources = [i for i in range(rows) if i % num_prompts == 0]
    out = torch.empty_like(query)
    out[sources] = attend(query[sources], key[sources], value[sources],
                          None if attention_mask is None else attention_mask[sources])
    q, k, v = query[targets], key[targets], value[targets]
    outs = []
    for keep in (fg_keys, ~fg_keys):
        # no such keys: the whole source (avoids an all-masked softmax); a tensor choice, not a Python branch
        keep = torch.where(keep.any(), keep, torch.ones_like(keep))
        outs.append(F.scaled_dot_product_attention(q, k, v, attn_mask=keep[None, None, None, :]))
    weight = fg_queries.to(query.dtype).repeat(halves, 1)[:, None, :, None]  # (targets x halves, 1, tokens, 1)
    out[targets] = outs[0] * weight + outs[1] * (1 - weight)
    return out


# --------------------------------------------------------------- controller
class MutualSelfAttentionController(AttentionEditor):
    """The MasaCtrl editor for every attention layer of a UNet.

    Args:
        tokenizer: the pipeline's CLIP tokenizer (token positions of the mask words).
        source: the source prompt (batch row 0 of each half).
        targets: the target prompt(s), rows 1...
        settings: the edit's :class:`MasaCtrlSettings`; or its fields as keyword arguments (``start_step``,
            ``start_layer``, ``mask_words``, ``mask_threshold``, ``map_res``), from which one is made.
        length: the text encoder's context length (None: the tokenizer's).
    """

    def __init__(self, tokenizer, source: str, targets, start_step: int = START_STEP, start_layer: int | None = None,
                 mask_words=None, mask_threshold: float = MASK_THRESHOLD, map_res: int | None = None,
                 length: int | None = None, settings: MasaCtrlSettings | None = None):
        settings = settings or MasaCtrlSettings(start_step, start_layer, mask_words, mask_threshold, map_res)
        targets = settings.check(source, targets)
        self.settings = settings
        start_step, start_layer, mask_words = settings.start_step, settings.start_layer, settings.mask_words
        mask_threshold, map_res = settings.mask_threshold, settings.map_res
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
        self.start_layer = start_layer if start_layer is not None else START_LAYER_SD
        self.blend_mask = None
        self.setup(1, (64, 64))

    # ------------------------------------------------------------ schedule
    def setup(self, num_steps: int, latent_size: tuple[int, int], device=None, default_res: int | None = None) -> None:
        """Prepare a run of ``num_steps`` on latents of ``latent_size``; ``default_res`` stands in for ``map_res``."""
        self.num_steps, self.latent_size = num_steps, tuple(latent_size)
        self.map_res = self.map_res_arg or default_res or max(latent_size[0] // 4, 1)
        # the step's switch as a tensor, for a compiled UNet (one graph for every step: `compiled_form`); made once
        self.flags = (torch.arange(num_steps + 1) >= self.start_step).to(device)
        self.any_step = self.start_step < num_steps
        if self.token_masks is not None and device is not None:
            self.token_masks = self.token_masks.to(device)
        self.masks = None  # (fg_keys per target-layer size, ...) of the last layer: for inspection
        self.set_step(0)

    def set_step(self, step: int) -> None:
        self.step = step
        self.active = step >= self.start_step
        self.on = self.flags[min(step, self.num_steps)]
        self.maps_sum, self.maps_count = None, 0  # the authors clear the maps after every step

    def end_step(self, latents: torch.Tensor) -> torch.Tensor:
        self.set_step(self.step + 1)
        return latents

    def attention_maps(self):
        return None

    def record(self, layer: Layer, probs: torch.Tensor) -> None:
        """Add the conditional rows' cross-attention probabilities to this step's map sum."""
        height, width = layer.size(self.latent_size)
        maps = probs.mean(1).reshape(probs.shape[0], height, width, -1)
        self.maps_sum = maps if self.maps_sum is None else self.maps_sum + maps
        self.maps_count += 1

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
    def check_rows(self, rows: int) -> None:
        if rows not in (self.num_prompts, 2 * self.num_prompts):
            raise RuntimeError(f"MasaCtrl expects {self.num_prompts} or {2 * self.num_prompts} batch rows, got {rows}")

    def probs_rows(self, layer: Layer, rows: int) -> int:
        """The mask words' maps: the conditional rows' cross-attention at ``map_res``, when masks are asked for."""
        self.check_rows(rows)
        wanted = layer.is_cross and self.token_masks is not None and layer.size(self.latent_size)[0] == self.map_res
        return self.num_prompts if wanted else 0

    def edit_probs(self, layer: Layer, probs: torch.Tensor) -> torch.Tensor:
        if self.probs_rows(layer, 2 * self.num_prompts):
            self.record(layer, probs[-self.num_prompts:])
        return probs

    def edit_attention(self, layer: Layer, query, key, value, attention_mask, attend):
        self.check_rows(query.shape[0])
        static = compiled_form()
        if layer.is_cross or not (self.any_step if static else self.active) or layer.index < self.start_layer:
            return attend(query, key, value, attention_mask)
        fg_keys = fg_queries = None
        if self.token_masks is not None and self.maps_sum is not None:
            size = layer.size(self.latent_size)
            masks = self.word_masks(size)
            fg_keys, fg_queries = masks[0], masks[1:].float()
            self.masks = masks
        if static and fg_keys is None:  # the step's switch picks the keys and values: one fused call, one graph
            shared = source_keys_values(key, value, self.num_prompts)
            key, value = (torch.where(self.on, mutual, own) for mutual, own in zip(shared, (key, value)))
            return attend(query, key, value, attention_mask)
        out = mutual_self_attention(query, key, value, self.num_prompts, fg_keys, fg_queries, attention_mask, attend)
        if static:
            out = torch.where(self.on, out, attend(query, key, value, attention_mask))
        return out

    # ---------------------------------------------------------- attaching
    def attached(self, unet):
        """This controller on every attention layer of ``unet`` for the ``with`` block."""
        count = len(self_attention_layers(unet))
        self.start_layer = self.start_layer_arg if self.start_layer_arg is not None else default_start_layer(unet)
        if self.start_layer >= count:
            raise ValueError(f"`start_layer` {self.start_layer} names no layer: this UNet has {count} "
                             f"self-attention layers (0..{count - 1})")
        imageprompt_processors(unet)
        return super().attached(unet)
