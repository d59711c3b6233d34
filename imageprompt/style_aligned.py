"""StyleAligned shared attention on fused attention kernels.

Hertz, Voynov, Fruchter and Cohen-Or, "Style Aligned Image Generation via Shared
Attention" (CVPR 2024), Sec. 3 (Eq. 2-4). A batch of prompts is sampled together;
batch row 0 is the reference. In every self-attention layer each image attends to
its own keys and values *and* the reference's,

    Attention(Q_t^, [K_t^ ; K_r^], [V_t ; V_r]),

where ``^`` is AdaIN of the queries and keys to the reference's statistics, per
channel over the tokens: ``AdaIN(x, y) = sigma(y) * (x - mu(x)) / sigma(x) + mu(y)``.

The authors' defaults (google/style-aligned, ``sa_handler.StyleAlignedArgs``) and
what this module does:

- shared attention in **all** self-attention layers (``only_self_level=0``), never
  in cross-attention;
- AdaIN on the queries and keys, not on the values (``adain_queries=True``,
  ``adain_keys=True``, ``adain_values=False``); statistics over tokens with the
  unbiased variance and ``eps = 1e-5`` inside the square root, as they compute it;
- the reference is batch row 0, in the unconditional and the conditional half of
  classifier-free guidance alike; the reference itself is computed the same way
  (its concatenated keys are its own twice, which leaves its attention unchanged);
- ``keys_scale`` (their ``keys_scale``, renamed ``shared_score_scale`` later,
  default 1): the reference's keys are multiplied by it for the other images,
  which sharpens (> 1) or flattens (< 1) their attention to the reference;
- ``score_shift`` (their later ``shared_score_shift``, default 0; their transfer
  notebook uses ``log 2``): added to every image's scores of the reference's keys,
  so the images attend more (> 0) or less (< 0) to the reference;
- their SD 1.x notebook also shares group-norm statistics with the reference
  (``share_group_norm``); their SDXL notebook turns that off. Here it is an option,
  off by default (:func:`shared_group_norm`); their ``share_layer_norm`` is omitted
  because a layer norm normalises each token alone, so sharing it changes nothing.

A real photo as the reference (the authors' transfer notebook): DDIM-invert it, start
row 0 from the inverted noise and put row 0 back on the inversion's trajectory after
every step (:func:`pin_reference`; their ``offset``, 5 in that notebook, starts the
reference a few steps ahead: :func:`reference_start`).

Everything runs on the fused kernel: the keys and values are concatenated and one
``scaled_dot_product_attention`` call does the rest. The controller is an
:class:`~imageprompt.attention.AttentionEditor` on the self-attention layers only, so image
branches (IP-Adapter, the SD-IPC branch) on the cross-attention layers compose with it, and
so does prompt-to-prompt: chained after it, StyleAligned shares the reference's keys and values
of the self-attention that prompt-to-prompt edited.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from imageprompt.attention import AttentionEditor, Layer, editor_attached, imageprompt_processors
from imageprompt.attention import attend as attend_fused

ADAIN_EPS = 1e-5  # the authors' calc_mean_std


def adain(x: torch.Tensor, reference: torch.Tensor, eps: float = ADAIN_EPS) -> torch.Tensor:
    """AdaIN of ``x`` ``(rows, heads, tokens, dim)`` to ``reference`` ``(1, heads, tokens, dim)``: per channel
    (head and dim) over the tokens (Huang & Belongie 2017; StyleAligned Eq. 4). The statistics are taken in
    float32 (a variance over 4096 tokens can overflow fp16); the result has ``x``'s dtype."""
    x32, ref32 = x.float(), reference.float()
    mean, std = x32.mean(-2, keepdim=True), (x32.var(-2, keepdim=True) + eps).sqrt()
    ref_mean, ref_std = ref32.mean(-2, keepdim=True), (ref32.var(-2, keepdim=True) + eps).sqrt()
    return ((x32 - mean) / std * ref_std + ref_mean).to(x.dtype)


def shared_attention(query, key, value, num_prompts: int, adain_queries: bool = True, adain_keys: bool = True,
                     adain_values: bool = False, keys_scale: float = 1.0, attention_mask=None,
                     attend=attend_fused, score_shift: float = 0.0) -> torch.Tensor:
    """StyleAligned self-attention of one layer on ``(rows, heads, tokens, head_dim)`` tensors.

    Rows are ``[uncond prompts.., cond prompts..]`` or ``[cond prompts..]``; in each half row 0 is the reference.
    ``score_shift`` is added to every row's scores of the reference's keys (an additive mask of the same fused
    call; it leaves the reference's own output unchanged, its two key halves holding the same values).
    """
    rows = query.shape[0]
    halves = rows // num_prompts
    out_q, out_k, out_v = [], [], []
    for h in range(halves):
        part = slice(h * num_prompts, (h + 1) * num_prompts)
        q, k, v = query[part], key[part], value[part]
        if adain_queries:
            q = adain(q, q[:1])
        if adain_keys:
            k = adain(k, k[:1])
        if adain_values:
            v = adain(v, v[:1])
        ref_k = k[:1].expand_as(k)
        if keys_scale != 1.0:  # the reference's own row keeps scale 1, as in the authors' expand_first
            scale = torch.full((num_prompts, 1, 1, 1), float(keys_scale), dtype=k.dtype, device=k.device)
            scale[0] = 1.0
            ref_k = ref_k * scale
        out_q.append(q)
        out_k.append(torch.cat([k, ref_k], dim=-2))
        out_v.append(torch.cat([v, v[:1].expand_as(v)], dim=-2))
    if attention_mask is not None:
        attention_mask = torch.cat([attention_mask, attention_mask], dim=-1)
    if score_shift:
        tokens = key.shape[-2]
        shift = torch.zeros(1, 1, 1, 2 * tokens, dtype=query.dtype, device=query.device)
        shift[..., tokens:] = float(score_shift)
        attention_mask = shift if attention_mask is None else attention_mask + shift
    return attend(torch.cat(out_q), torch.cat(out_k), torch.cat(out_v), attention_mask)


@dataclass(frozen=True)
class StyleAlignedSettings:
    """StyleAligned's options (the authors' ``StyleAlignedArgs``; see the module docstring), checked when made.

    ``reference_offset``: with a real photo as the reference, it starts this many steps ahead on its inverted
    trajectory (the authors' ``offset``: 0, their transfer notebook 5).
    """

    adain_queries: bool = True
    adain_keys: bool = True
    adain_values: bool = False
    keys_scale: float = 1.0
    score_shift: float = 0.0
    share_group_norm: bool = False
    reference_offset: int = 0

    def __post_init__(self):
        for name in ("adain_queries", "adain_keys", "adain_values", "share_group_norm"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"`{name}` must be True or False, got {getattr(self, name)!r}")
        if isinstance(self.keys_scale, bool) or not isinstance(self.keys_scale, (int, float)) \
                or not self.keys_scale > 0 or not math.isfinite(self.keys_scale):
            raise ValueError(f"`keys_scale` must be a positive number, got {self.keys_scale!r}")
        if isinstance(self.score_shift, bool) or not isinstance(self.score_shift, (int, float)) \
                or not math.isfinite(self.score_shift):
            raise ValueError(f"`score_shift` must be a finite number, got {self.score_shift!r}")
        offset = self.reference_offset
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise ValueError(f"`reference_offset` must be a number of steps >= 0, got {offset!r}")


class StyleAlignedController(AttentionEditor):
    """The StyleAligned editor of every self-attention layer (see the module docstring for the options)."""

    def __init__(self, num_prompts: int, adain_queries: bool = True, adain_keys: bool = True,
                 adain_values: bool = False, keys_scale: float = 1.0, score_shift: float = 0.0,
                 settings: StyleAlignedSettings | None = None):
        if not isinstance(num_prompts, int) or num_prompts < 2:
            raise ValueError(f"StyleAligned needs a reference and at least one more prompt, got {num_prompts!r}")
        settings = settings or StyleAlignedSettings(adain_queries, adain_keys, adain_values, keys_scale, score_shift)
        self.settings, self.num_prompts = settings, num_prompts
        self.adain_queries, self.adain_keys = settings.adain_queries, settings.adain_keys
        self.adain_values, self.keys_scale = settings.adain_values, float(settings.keys_scale)
        self.score_shift = float(settings.score_shift)

    def edit_attention(self, layer: Layer, query, key, value, attention_mask, attend):
        if layer.is_cross:
            return attend(query, key, value, attention_mask)
        rows = query.shape[0]
        if rows % self.num_prompts or rows // self.num_prompts not in (1, 2):
            raise RuntimeError(f"StyleAligned expects {self.num_prompts} or {2 * self.num_prompts} batch rows, "
                               f"got {rows}")
        return shared_attention(query, key, value, self.num_prompts, self.adain_queries, self.adain_keys,
                                self.adain_values, self.keys_scale, attention_mask, attend, self.score_shift)

    def attached(self, unet):
        """Install this controller as the ``editor`` of every self-attention layer for the ``with`` block."""
        processors = [p for p in imageprompt_processors(unet).values() if not p.is_cross_attention]
        return editor_attached(unet, self, processors)


@contextlib.contextmanager
def shared_group_norm(unet, num_prompts: int):
    """The authors' ``share_group_norm``: every ``GroupNorm`` of ``unet`` normalises each image with statistics over
    its own and the reference's (row 0 of its half) features, for the ``with`` block (forward hooks, removed after)."""

    def hook(module, inputs, output):
        x = inputs[0]
        rows = x.shape[0]
        if rows % num_prompts or x.ndim < 3:
            return output
        halves = rows // num_prompts
        ref = torch.cat([x[h * num_prompts:h * num_prompts + 1].expand(num_prompts, *x.shape[1:])
                         for h in range(halves)])
        n = x.shape[-2]
        joint = torch.cat([x, ref], dim=-2)  # along the rows of the feature map, as the authors concatenate
        return F.group_norm(joint, module.num_groups, module.weight, module.bias, module.eps)[..., :n, :]

    handles = [m.register_forward_hook(hook) for m in unet.modules() if isinstance(m, torch.nn.GroupNorm)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def pin_reference(latents: torch.Tensor, trajectory: list[torch.Tensor], step: int, offset: int = 0) -> torch.Tensor:
    """After step ``step``: put the reference (row 0) back on the DDIM inversion ``trajectory`` (``x_0 .. x_T``),
    ``x_ref = z*_{t-1}``; other rows are untouched. The authors' ``make_inversion_callback``: with ``offset`` k the
    reference starts k steps ahead (:func:`reference_start`) and stays at the latent k + 1 steps in until the
    sampling catches up."""
    ahead = max(offset + 1, step + 1)
    target = trajectory[max(len(trajectory) - 1 - ahead, 0)].to(device=latents.device, dtype=latents.dtype)
    latents = latents.clone()
    latents[0] = target[0]
    return latents


def reference_start(trajectory: list[torch.Tensor], offset: int = 0) -> torch.Tensor:
    """The reference's starting latent: the inversion's noise ``z*_T``, or with ``offset`` k the latent k steps in."""
    return trajectory[max(len(trajectory) - 1 - offset, 0)]
