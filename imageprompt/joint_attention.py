"""The attention seam of the MM-DiT (Stable Diffusion 3 / 3.5): editors on joint attention.

In an MM-DiT block the image tokens (``I`` of them) and the text tokens (``T``) are projected separately and
attend *jointly*: one softmax over the ``I + T`` keys for every query. diffusers computes it in
``JointAttnProcessor2_0`` (``SD3IPAdapterJointAttnProcessor2_0`` adds the SD3.5 IP-Adapter's image branch).

Unlike the UNet seam (:mod:`imageprompt.attention`), nothing is installed for good: diffusers' processors stay on
the transformer, so its loaders (``load_ip_adapter``, ``set_ip_adapter_scale``, ``unload_ip_adapter``, LoRA) work
unchanged. :func:`joint_editor_attached` wraps each joint layer's processor in a :class:`JointEditProcessor` for a
``with`` block and puts diffusers' own back afterwards (also on an error). The wrapper calls the processor it
wraps, unchanged, except in layers where an editor is attached; there it forms the same projections and joint
attention and hands ``(batch, heads, I + T, head_dim)`` queries, keys and values to the editors
(:func:`imageprompt.attention.run_editors`, the UNet seam's chain), with a :class:`JointLayer` telling them where
the image tokens end. The IP-Adapter branch, when the wrapped processor has one, is then added as diffusers adds it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from imageprompt.attention import run_editors


@dataclass(frozen=True)
class JointLayer:
    """One joint attention call: its processor ``name``, ``index`` (block order) and ``image_tokens`` (``I``: the
    first ``I`` of the ``I + T`` tokens are the image's). ``is_cross`` is False: the UNet seam's editors
    (cross-attention only) leave joint layers alone."""

    name: str
    index: int
    image_tokens: int
    is_cross: bool = False
    is_joint: bool = True


def joint_layer_names(transformer) -> list[str]:
    """The processor names of the transformer's joint attention layers (those with text projections), in order."""
    return [n for n in transformer.attn_processors
            if getattr(transformer.get_submodule(n.rsplit(".processor", 1)[0]), "add_q_proj", None) is not None]


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.view(x.shape[0], -1, heads, x.shape[-1] // heads).transpose(1, 2)


def ip_branch(proc, attn, query, key, value, ip_hidden_states, temb) -> torch.Tensor | None:
    """The SD3.5 IP-Adapter's addition (``SD3IPAdapterJointAttnProcessor2_0``'s image branch), ``(B, I, inner)``:
    the image queries attend to the image keys and the adapter's keys; ``query``/``key``/``value``: the image
    tokens' projections before diffusers' ``norm_q``/``norm_k``. None when it adds nothing."""
    scale = getattr(proc, "scale", 0)
    if not hasattr(proc, "to_k_ip") or scale == 0 or ip_hidden_states is None:
        return None
    batch, heads = query.shape[0], attn.heads
    normed = proc.norm_ip(ip_hidden_states, temb=temb)
    ip_key = proc.norm_ip_k(_heads(proc.to_k_ip(normed), heads))
    ip_value = _heads(proc.to_v_ip(normed), heads)
    keys = torch.cat([proc.norm_k(key), ip_key], dim=2)
    values = torch.cat([value, ip_value], dim=2)
    out = F.scaled_dot_product_attention(proc.norm_q(query), keys, values, dropout_p=0.0, is_causal=False)
    return out.transpose(1, 2).reshape(batch, -1, heads * query.shape[-1]).to(query.dtype) * scale


class JointEditProcessor(nn.Module):
    """Wraps diffusers' joint processor ``base``; with ``editors``, runs the joint attention through them.

    An ``nn.Module`` so that an IP-Adapter processor it wraps (weights) stays a submodule of the transformer.
    """

    def __init__(self, base, name: str, index: int, editors: tuple = ()):
        super().__init__()
        self.base, self.name, self.index, self.editors = base, name, index, tuple(editors)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, ip_hidden_states=None,
                 temb=None, **kwargs):
        extra = {k: v for k, v in (("ip_hidden_states", ip_hidden_states), ("temb", temb)) if v is not None}
        if not self.editors or encoder_hidden_states is None:
            return self.base(attn, hidden_states, encoder_hidden_states, attention_mask, **extra, **kwargs)
        heads, image_tokens = attn.heads, hidden_states.shape[1]
        query, key, value = (_heads(f(hidden_states), heads) for f in (attn.to_q, attn.to_k, attn.to_v))
        raw = (query, key, value)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        text_q, text_k, text_v = (_heads(f(encoder_hidden_states), heads)
                                  for f in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
        if attn.norm_added_q is not None:
            text_q = attn.norm_added_q(text_q)
        if attn.norm_added_k is not None:
            text_k = attn.norm_added_k(text_k)
        query, key, value = (torch.cat(pair, dim=2) for pair in ((query, text_q), (key, text_k), (value, text_v)))
        layer = JointLayer(self.name, self.index, image_tokens)
        out = run_editors(layer, self.editors, query, key, value, attention_mask)
        out = out.transpose(1, 2).reshape(out.shape[0], -1, heads * out.shape[-1]).to(query.dtype)
        image, text = out[:, :image_tokens], out[:, image_tokens:]
        if not attn.context_pre_only:
            text = attn.to_add_out(text)
        added = ip_branch(self.base, attn, *raw, ip_hidden_states, temb)
        if added is not None:
            image = image + added
        image = attn.to_out[1](attn.to_out[0](image))
        return image, text


@contextlib.contextmanager
def joint_editor_attached(transformer, editor, layers=None):
    """``editor`` on the joint attention layers of ``transformer`` (``layers``: their indices, None: all) for a
    ``with`` block; the processors they had come back afterwards, also on an error."""
    names = joint_layer_names(transformer)
    current = transformer.attn_processors
    wrapped = {}
    for index, name in enumerate(names):
        proc = current[name]
        base = proc.base if isinstance(proc, JointEditProcessor) else proc
        chosen = layers is None or index in layers
        before = proc.editors if isinstance(proc, JointEditProcessor) else ()
        wrapped[name] = JointEditProcessor(base, name, index, (*before, editor) if chosen else before)
    try:
        transformer.set_attn_processor({**current, **wrapped})
        yield editor
    finally:
        transformer.set_attn_processor(current)
