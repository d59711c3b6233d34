"""Prompt-to-prompt attention control on fused attention kernels.

Hertz et al., "Prompt-to-Prompt Image Editing with Cross Attention Control"
(2022). The source prompt and the edited (target) prompts run in one batch; the
target rows reuse the source's attention:

- cross-attention (Sec. 3.2): word swap ``M_t* = M_t @ mapper`` (replace),
  aligned tokens ``M_t*[..., j] = M_t[..., a(j)]`` with new tokens kept
  (refine), per-token multipliers (reweight, Sec. 3.2 "attention
  re-weighting"); blended with the target's own maps by a per-step, per-token
  weight (``cross_steps``);
- self-attention: for the first ``self_steps`` of the steps, at the layers up
  to ``self_res`` latent rows, the target uses the source's probabilities;
- local blend (Sec. 3.3 and the authors' code): the chosen words' cross maps
  at ``map_res`` (the targets' maps *after* the edit, as the authors' store
  keeps them) are summed over steps, max-pooled 3x3, upsampled, normalised,
  thresholded, less the unpooled mask of any excluded words, and
  ``x_t = x_src + mask * (x_t - x_src)`` after each step from ``blend_start``.

Step rules follow the authors' code: the cross-attention window of a fraction
``f`` is steps ``[0, int(f * (num_steps + 1)))`` (``get_time_words_attention_alpha``),
the self-attention window ``[0, int(f * num_steps))``; refinement maps padding
position ``j`` to ``j``. One deliberate difference: a replaced word of another
token count shifts the later words, and we map them in order (the authors'
``mapper[j, j]`` reads the wrong source words there).

The fast path: ``P_src @ V_tgt == SDPA(Q_src, K_src, V_tgt)``, so self-attention
replacement only swaps the target rows' queries and keys and stays on the fused
kernel. Cross-attention probabilities (77 keys: small) are formed explicitly
only for the conditional rows, and only in the steps that edit or the layers
that record maps. Every other layer runs the fused kernel unchanged.

The controller is an :class:`~imageprompt.attention.AttentionEditor`: it wraps the
self-attention call and edits (and records) the explicit cross-attention probabilities.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from imageprompt.attention import AttentionEditor, Layer, compiled_form
from imageprompt.p2p_align import (  # noqa: F401 (re-exported: the mappers are part of the p2p API)
    global_alignment,
    normalize_word,
    refinement_mapper,
    replacement_mapper,
    token_weights,
    word_positions,
    word_token_spans,
)

MODES = ("replace", "refine", "reweight")
BLEND_THRESHOLD = 0.3


# ------------------------------------------------------------- text checks
def prompt_words(prompt: str) -> list[str]:
    """Whitespace-separated words, lower-cased and stripped of punctuation (how words are matched)."""
    return [normalize_word(w) for w in prompt.split()]


def step_window(steps, name: str) -> tuple[float, float]:
    """A fraction ``f`` (meaning ``(0, f)``) or a ``(start, end)`` pair, each in [0, 1]."""
    if isinstance(steps, (int, float)) and not isinstance(steps, bool):
        window = (0.0, float(steps))
    elif isinstance(steps, (tuple, list)) and len(steps) == 2:
        window = (float(steps[0]), float(steps[1]))
    else:
        raise TypeError(f"`{name}` must be a fraction in [0, 1] or a (start, end) pair, got {steps!r}")
    if not all(0.0 <= x <= 1.0 for x in window) or window[0] > window[1]:
        raise ValueError(f"`{name}` must lie in [0, 1] with start <= end, got {steps!r}")
    return window


def parse_word_weights(items: list[str] | None) -> dict[str, float]:
    """``["snow=2", "cat=0.5"]`` -> ``{"snow": 2.0, "cat": 0.5}``; ``ValueError`` naming a malformed item."""
    weights = {}
    for item in items or []:
        word, sep, value = item.partition("=")
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not sep or not word.strip() or not math.isfinite(number):
            raise ValueError(f"expects WORD=NUMBER, got {item!r}")
        weights[word.strip()] = number
    return weights


@dataclass(frozen=True)
class PromptToPromptSettings:
    """One prompt-to-prompt edit's options, checked when made; :meth:`check` adds the checks that need the prompts.

    The pipelines, the command line, batch rows and the demo all build one, so each rule is written once.

    Args:
        mode: ``"replace"`` (same word count), ``"refine"`` (words added/removed) or ``"reweight"``.
        weights: ``{word: multiplier}`` on the target's cross-attention (any mode).
        blend_words: words whose maps form the local-blend mask (None: no blend).
        blend_threshold: mask threshold on the normalised maps.
        blend_exclude: words whose region is removed from the blend mask (the authors' ``substruct_words``).
        blend_start: fraction of the steps before blending starts (the authors' ``start_blend``;
            step ``s`` blends when ``s >= int(blend_start * num_steps)``).
        cross_steps: fraction ``f`` or ``(start, end)`` of the steps with cross-attention control.
        word_cross_steps: ``{word: fraction or (start, end)}`` overriding ``cross_steps`` per word.
        self_steps: fraction or ``(start, end)`` of the steps with self-attention replacement.
        self_res: self-attention is replaced in layers with at most this many latent rows (None: the
            cross-attention level nearest a quarter of the latent height).
        map_res: latent rows of the layers whose cross maps are recorded (blend, maps; None: the same default).
    """

    mode: str = "replace"
    weights: dict | None = None
    blend_words: tuple[str, ...] | None = None
    blend_threshold: float = BLEND_THRESHOLD
    blend_exclude: tuple[str, ...] | None = None
    blend_start: float = 0.0
    cross_steps: float | tuple[float, float] = 0.8
    word_cross_steps: dict | None = None
    self_steps: float | tuple[float, float] = 0.4
    self_res: int | None = None
    map_res: int | None = None

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; choose from {', '.join(MODES)}")
        for name in ("blend_words", "blend_exclude"):
            words = getattr(self, name)
            if isinstance(words, str):
                raise TypeError(f"`{name}` must be a list of words, got the string {words!r}")
            object.__setattr__(self, name, tuple(words) if words else None)
        step_window(self.cross_steps, "cross_steps")
        step_window(self.self_steps, "self_steps")
        for word, value in (self.weights or {}).items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"weight of {word!r} must be a finite number, got {value!r}")
        for word, steps in (self.word_cross_steps or {}).items():
            step_window(steps, f"cross_steps of {word!r}")
        threshold = self.blend_threshold
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 <= threshold <= 1.0:
            raise ValueError(f"`blend_threshold` must be in [0, 1], got {threshold!r}")
        start = self.blend_start
        if isinstance(start, bool) or not isinstance(start, (int, float)) or not 0.0 <= start <= 1.0:
            raise ValueError(f"`blend_start` must be a fraction in [0, 1], got {start!r}")
        if (self.blend_exclude or self.blend_start) and not self.blend_words:
            raise ValueError("`blend_exclude` and `blend_start` refine a local blend: give `blend_words` too")
        if self.mode == "reweight" and not self.weights:
            raise ValueError("reweight needs at least one word weight")
        for name in ("self_res", "map_res"):
            res = getattr(self, name)
            if res is not None and (isinstance(res, bool) or not isinstance(res, int) or res < 1):
                raise ValueError(f"`{name}` must be a positive number of latent rows, got {res!r}")

    def check(self, source: str, targets) -> list[str]:
        """Check the edit of ``source`` into ``targets`` (a prompt or a list); returns the target prompts.

        Raises ``ValueError``/``TypeError`` naming the problem: an empty prompt, replace with different word
        counts, a weight, blend or per-word-steps word that is not in the prompts.
        """
        if not isinstance(source, str) or not source.strip():
            raise ValueError("the source prompt is empty")
        targets = [targets] if targets is None or isinstance(targets, str) else list(targets)
        if not targets:
            raise ValueError("give at least one target prompt")
        return [self._check_one(source, t) for t in targets]

    def _check_one(self, source: str, target: str | None) -> str:
        mode = self.mode
        if mode == "reweight":
            if target is not None and target.split() != source.split():
                raise ValueError("reweight edits the source prompt's own attention: leave the target out "
                                 "(or use mode replace/refine with weights to change words too)")
            target = source
        elif not isinstance(target, str) or not target.strip():
            raise ValueError(f"mode {mode} needs a target prompt")
        if mode == "replace" and len(source.split()) != len(target.split()):
            raise ValueError(f"replace swaps words one for one, but the source has {len(source.split())} words "
                             f"and the target {len(target.split())}; use mode refine to add or remove words")
        src_words, tgt_words = set(prompt_words(source)), set(prompt_words(target))
        for word in self.weights or {}:
            if normalize_word(word) not in tgt_words:
                raise ValueError(f"weight word {word!r} is not in the target prompt {target!r}")
        for word in self.word_cross_steps or {}:
            if normalize_word(word) not in tgt_words:
                raise ValueError(f"cross-steps word {word!r} is not in the target prompt {target!r}")
        for kind, words in (("blend word", self.blend_words), ("blend-exclude word", self.blend_exclude)):
            for word in words or ():
                if normalize_word(word) not in src_words | tgt_words:
                    raise ValueError(f"{kind} {word!r} is in neither the source nor the target prompt")
        return target


def validate_edit(source: str, target: str | None, mode: str, weights: dict | None = None,
                  blend_words=None, cross_steps=0.8, word_cross_steps: dict | None = None, self_steps=0.4,
                  blend_threshold: float = BLEND_THRESHOLD, blend_exclude=None, blend_start: float = 0.0) -> str:
    """Check an edit on the text alone (no model needed); returns the target prompt
    (:class:`PromptToPromptSettings` and its :meth:`~PromptToPromptSettings.check`)."""
    settings = PromptToPromptSettings(mode, weights, blend_words, blend_threshold, blend_exclude, blend_start,
                                      cross_steps, word_cross_steps, self_steps)
    return settings.check(source, target)[0]


def step_alphas(tokenizer, prompt: str, num_steps: int, cross_steps, word_cross_steps, length: int) -> torch.Tensor:
    """``(num_steps, length)``: 1 where the target's cross-attention is replaced at that step and token.

    A window ``(start, end)`` covers steps ``int(start * (num_steps + 1))`` up to (not including)
    ``int(end * (num_steps + 1))``: the authors' ``ptp_utils.get_time_words_attention_alpha`` rule.
    """
    def window(steps, name):
        start, end = step_window(steps, name)
        alpha = torch.zeros(num_steps + 1)
        alpha[int(start * (num_steps + 1)):int(end * (num_steps + 1))] = 1.0
        return alpha[:num_steps]

    alphas = window(cross_steps, "cross_steps")[:, None].repeat(1, length)
    for word, steps in (word_cross_steps or {}).items():
        positions = word_positions(tokenizer, prompt, word, length)
        alphas[:, positions] = window(steps, f"cross_steps of {word!r}")[:, None]
    return alphas


def attention_heights(unet_config, latent_height: int) -> list[int]:
    """Latent rows of the UNet's cross-attention layers, largest first (from the block types)."""
    heights, height = set(), latent_height
    for block in unet_config.down_block_types:
        if "CrossAttn" in block:
            heights.add(height)
        height = (height + 1) // 2
    heights.add((latent_height + 2 ** (len(unet_config.down_block_types) - 1) - 1)
                // 2 ** (len(unet_config.down_block_types) - 1))  # the mid block
    return sorted(heights, reverse=True)


def default_resolution(unet_config, latent_height: int) -> int:
    """The cross-attention level nearest to a quarter of the latent height (16 rows at 512x512)."""
    return min(attention_heights(unet_config, latent_height), key=lambda h: (abs(h - latent_height / 4), -h))


# -------------------------------------------------------------- local blend
class LocalBlend:
    """The mask of local blending, from the summed cross-attention maps of the blend words.

    ``token_masks`` is ``(prompts, length)``: 1 at the blend words' tokens of each
    prompt. A target's mask is the union of its own and the source's.
    ``exclude_masks`` (same shape, or None): the tokens of words whose region is
    taken out of the mask (the authors' ``substruct_words``: their maps are not
    max-pooled, and the source's and the target's regions are both removed).
    """

    def __init__(self, token_masks: torch.Tensor, threshold: float = BLEND_THRESHOLD, pool: int = 3,
                 exclude_masks: torch.Tensor | None = None):
        self.token_masks = token_masks
        self.exclude_masks = exclude_masks
        self.threshold = threshold
        self.pool = pool

    def _region(self, maps: torch.Tensor, token_masks: torch.Tensor, size: tuple[int, int],
                pool: bool) -> torch.Tensor:
        word_maps = (maps * token_masks.to(maps)[:, None, None, :]).sum(-1)[:, None]
        if pool:
            word_maps = F.max_pool2d(word_maps, self.pool, stride=1, padding=self.pool // 2)
        word_maps = F.interpolate(word_maps, size=size)
        word_maps = word_maps / word_maps.amax(dim=(2, 3), keepdim=True).clamp_min(1e-12)
        above = word_maps > self.threshold
        return above[:1] | above[1:]

    def mask(self, maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """``maps`` ``(prompts, h, w, length)`` -> boolean ``(targets, 1, H, W)``."""
        mask = self._region(maps, self.token_masks, size, pool=True)
        if self.exclude_masks is not None:
            mask = mask & ~self._region(maps, self.exclude_masks, size, pool=False)
        return mask

    def __call__(self, latents: torch.Tensor, maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x_t = x_src + mask * (x_t - x_src)`` for every target row; the source row is unchanged."""
        mask = self.mask(maps, tuple(latents.shape[-2:]))
        edited = torch.where(mask, latents[1:], latents[:1])
        return torch.cat([latents[:1], edited]), mask


# --------------------------------------------------------------- controller
class PromptToPromptController(AttentionEditor):
    """The prompt-to-prompt editor for every attention layer of a UNet.

    Args:
        tokenizer: the pipeline's CLIP tokenizer (token positions of words).
        source: the source prompt (batch row 0 of the conditional half).
        targets: the edited prompt(s), rows 1.. (for ``reweight``: the source).
        settings: the edit's :class:`PromptToPromptSettings`; or its fields as keyword arguments (``mode``,
            ``weights``, ``blend_words``, ...), from which one is made. ``self_res``/``map_res`` left out
            default to ``default_res`` of :meth:`setup`.
        length: the text encoder's context length (None: the tokenizer's).
    """

    def __init__(self, tokenizer, source: str, targets: str | list[str] | None, mode: str = "replace",
                 weights: dict | None = None, blend_words=None, blend_threshold: float = BLEND_THRESHOLD,
                 cross_steps=0.8, word_cross_steps: dict | None = None, self_steps=0.4,
                 self_res: int | None = None, map_res: int | None = None, length: int | None = None,
                 blend_exclude=None, blend_start: float = 0.0, settings: PromptToPromptSettings | None = None):
        if settings is None:
            settings = PromptToPromptSettings(mode, weights, blend_words, blend_threshold, blend_exclude, blend_start,
                                              cross_steps, word_cross_steps, self_steps, self_res, map_res)
        targets = settings.check(source, targets)
        self.settings = settings
        mode, weights, blend_words = settings.mode, settings.weights, settings.blend_words
        self.tokenizer, self.source, self.targets, self.mode = tokenizer, source, targets, mode
        self.length = length or tokenizer.model_max_length
        self.cross_steps, self.word_cross_steps = settings.cross_steps, settings.word_cross_steps
        self.self_steps = settings.self_steps
        self.self_res_arg, self.map_res_arg = settings.self_res, settings.map_res
        blend_exclude, blend_start = settings.blend_exclude, settings.blend_start
        L = self.length
        if mode == "replace":
            self.mapper = torch.stack([replacement_mapper(tokenizer, source, t, L) for t in targets])
        elif mode == "refine":
            pairs = [refinement_mapper(tokenizer, source, t, L) for t in targets]
            self.index = torch.stack([p[0] for p in pairs])
            self.keep = torch.stack([p[1] for p in pairs])
        self.weights = torch.stack([token_weights(tokenizer, t, weights, L) for t in targets]) if weights else None
        self.blend, self.blend_start = None, float(blend_start)

        def token_masks(words):
            masks = torch.zeros(len(targets) + 1, L)
            for row, prompt in enumerate([source, *targets]):
                for word in words:
                    masks[row, word_positions(tokenizer, prompt, word, L)] = 1.0
            return masks

        if blend_words:
            self.blend = LocalBlend(token_masks(blend_words), settings.blend_threshold,
                                    exclude_masks=token_masks(blend_exclude) if blend_exclude else None)
        self.num_prompts = len(targets) + 1
        self.setup(1, (64, 64))

    # ------------------------------------------------------------ schedule
    def setup(self, num_steps: int, latent_size: tuple[int, int], device=None, default_res: int | None = None) -> None:
        """Prepare a run of ``num_steps`` on latents of ``latent_size`` (rows, columns); resets the maps.

        ``default_res`` (None: a quarter of the latent rows) stands in for ``self_res``/``map_res`` not given.
        """
        self.num_steps, self.latent_size = num_steps, tuple(latent_size)
        default_res = default_res or max(latent_size[0] // 4, 1)
        self.self_res = self.self_res_arg or default_res
        self.map_res = self.map_res_arg or default_res
        self.alphas = torch.stack([step_alphas(self.tokenizer, t, num_steps, self.cross_steps, self.word_cross_steps,
                                               self.length) for t in self.targets], dim=1)  # (steps, T, L)
        start, end = step_window(self.self_steps, "self_steps")
        self.self_window = (int(start * num_steps), int(end * num_steps))  # the authors' self-replace rule
        self.blend_from = int(self.blend_start * num_steps)
        # per-step switches as tensors, for a compiled UNet (see `compiled_form`); Python flags for eager runs
        self.self_flags = torch.tensor([self.self_window[0] <= s < self.self_window[1] for s in range(num_steps)])
        self.cross_any, self.self_any = bool(self.alphas.any()), bool(self.self_flags.any())
        # which steps edit the cross-attention, read here on the CPU: a per-step `alpha.any()` on the GPU would
        # stall the launch queue once a step (a device-to-host copy)
        self.cross_on = self.alphas.flatten(1).any(1).tolist()
        self._device_tensors(device)
        self.maps_sum, self.maps_count, self.step_maps = None, 0, []
        self.blend_mask = None
        self.set_step(0)

    def _device_tensors(self, device) -> None:
        for name in ("mapper", "index", "keep", "weights", "alphas", "self_flags"):
            value = getattr(self, name, None)
            if value is not None and device is not None:
                setattr(self, name, value.to(device))
        if self.blend is not None and device is not None:
            self.blend.token_masks = self.blend.token_masks.to(device)
            if self.blend.exclude_masks is not None:
                self.blend.exclude_masks = self.blend.exclude_masks.to(device)

    def set_step(self, step: int) -> None:
        self.step = step
        # the step's switches as tensors: a compiled UNet reads them as inputs, and does not recompile every step
        last = min(step, self.num_steps - 1)
        self.alpha, self.self_on = self.alphas[last], self.self_flags[last] & (step < self.num_steps)
        self.cross_active = step < self.num_steps and self.cross_on[step]
        self.self_active = self.self_window[0] <= step < self.self_window[1]

    def end_step(self, latents: torch.Tensor) -> torch.Tensor:
        """After a sampling step: local blend on the ``(prompts, C, H, W)`` latents, then advance the step."""
        self.fold_maps()
        if self.blend is not None and self.maps_sum is not None and self.step >= self.blend_from:
            latents, self.blend_mask = self.blend(latents, self.maps_sum)
        self.set_step(self.step + 1)
        return latents

    def attention_maps(self) -> torch.Tensor | None:
        """Cross-attention maps at ``map_res`` averaged over steps, layers and heads: ``(prompts, h, w, length)``."""
        self.fold_maps()
        return None if self.maps_sum is None else self.maps_sum / self.maps_count

    def record(self, layer: Layer, probs: torch.Tensor) -> None:
        """Keep the conditional rows' ``(prompts, heads, tokens, length)`` (edited) probabilities for the map sum."""
        height, width = layer.size(self.latent_size)
        self.step_maps.append(probs.float().mean(1).reshape(probs.shape[0], height, width, -1))

    def fold_maps(self) -> None:
        """Add this step's recorded maps to the sum, in the order they came, outside the UNet call: a compiled UNet
        then starts every step with the same (empty) list, where a growing sum and count would recompile it."""
        for maps in self.step_maps:  # (a copy of the first: a CUDA-graph output is overwritten by the next step)
            self.maps_sum = maps.clone() if self.maps_sum is None else self.maps_sum + maps
            self.maps_count += 1
        self.step_maps = []

    # --------------------------------------------------------------- edits
    def edit_cross(self, base: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
        """Targets' cross-attention probabilities from the source's ``base`` ``(heads, n, L)`` and their ``own``."""
        if self.mode == "replace":
            edited = base[None] @ self.mapper[:, None].to(base)
        elif self.mode == "refine":
            index = self.index[:, None, None, :].expand(own.shape)
            keep = self.keep[:, None, None, :].to(base)
            edited = base[None].expand(own.shape).gather(-1, index) * keep + own * (1 - keep)
        else:
            edited = base[None].expand(own.shape)
        if self.weights is not None:
            edited = edited * self.weights[:, None, None, :].to(base)
        alpha = self.alpha[:, None, None, :].to(base)
        return edited * alpha + own * (1 - alpha)

    def check_rows(self, rows: int) -> None:
        if rows not in (self.num_prompts, 2 * self.num_prompts):
            raise RuntimeError(f"prompt-to-prompt expects {self.num_prompts} or {2 * self.num_prompts} batch rows, "
                               f"got {rows}")

    def edits_cross(self) -> bool:
        """Whether the cross-attention is edited now: in this step (eager), or in any step of the run (compiled:
        :func:`compiled_form`; outside the window the step's ``alpha`` is 0 and the edit keeps the target's own)."""
        return self.cross_any if compiled_form() else self.cross_active

    def probs_rows(self, layer: Layer, rows: int) -> int:
        """The conditional rows' cross-attention probabilities, in the steps that edit or the layers that record."""
        self.check_rows(rows)
        wanted = layer.is_cross and (self.edits_cross() or layer.size(self.latent_size)[0] == self.map_res)
        return self.num_prompts if wanted else 0

    def edit_probs(self, layer: Layer, probs: torch.Tensor) -> torch.Tensor:
        if not layer.is_cross:
            return probs
        prompts = self.num_prompts
        ours = probs[-prompts:]
        if self.edits_cross():
            ours = torch.cat([ours[:1], self.edit_cross(ours[0], ours[1:])])
        if layer.size(self.latent_size)[0] == self.map_res:  # after the edit, as the authors' store keeps them
            self.record(layer, ours)
        return torch.cat([probs[:-prompts], ours]) if probs.shape[0] > prompts else ours

    def edit_attention(self, layer: Layer, query, key, value, attention_mask, attend):
        self.check_rows(query.shape[0])
        prompts = self.num_prompts
        static = compiled_form()
        if not layer.is_cross and (self.self_any if static else self.self_active) \
                and layer.size(self.latent_size)[0] <= self.self_res:
            # P_src @ V_tgt == softmax(Q_src K_src^T) V_tgt: the target rows borrow the source's Q and K.
            first = query.shape[0] - prompts
            source = slice(first, first + 1)
            shared = (prompts - 1, -1, -1, -1)
            borrowed_query = torch.cat([query[:first + 1], query[source].expand(shared)])
            borrowed_key = torch.cat([key[:first + 1], key[source].expand(shared)])
            if static:  # the step's switch as a tensor: one graph for every step
                borrowed_query = torch.where(self.self_on, borrowed_query, query)
                borrowed_key = torch.where(self.self_on, borrowed_key, key)
            query, key = borrowed_query, borrowed_key
        return attend(query, key, value, attention_mask)
