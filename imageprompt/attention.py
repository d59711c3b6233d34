"""imageprompt's attention-processor layer: the one seam every technique uses.

Each UNet attention layer gets an :class:`ImagePromptAttnProcessor`. On its own it
is diffusers' ``AttnProcessor2_0`` (PyTorch SDPA) or the xformers kernel. Two
optional hooks let the techniques compose in one forward pass:

- ``editor``: replaces the attention of this layer (prompt-to-prompt). Called
  as ``editor(processor, query, key, value, attention_mask)`` with tensors in
  ``(batch, heads, tokens, head_dim)`` layout; returns the same layout.
- ``image_branch``: a decoupled image key/value branch (IP-Adapter style),
  called as ``image_branch(processor, attn, query, image_context)`` and added to
  the text branch before ``to_out``. ``image_context`` arrives the way diffusers
  passes it: ``encoder_hidden_states`` as a ``(text, image)`` tuple. Region masks
  given as ``cross_attention_kwargs={"ip_adapter_masks": ...}`` (diffusers' name)
  are on ``processor.ip_adapter_masks`` during the call.

Attention layers inside ``unet.encoder_hid_proj`` (an IP-Adapter Resampler) are
not UNet layers: they keep their diffusers processors.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import warnings

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

BACKENDS = ("sdpa", "xformers")


@functools.cache
def xformers_available(device_type: str = "cuda") -> bool:
    """True when xformers imports *and* its kernels run on ``device_type``.

    The PyPI wheel often imports fine but has no CUDA kernels for the installed
    torch, so a real call on a tiny input is the only honest check.
    """
    try:
        import xformers.ops as xops

        if device_type != "cuda" or not torch.cuda.is_available():
            return False
        q = torch.zeros(1, 8, 1, 64, device="cuda", dtype=torch.float16)
        xops.memory_efficient_attention(q, q, q)
        return True
    except Exception:  # ImportError, NotImplementedError, missing kernels, ...
        return False


def resolve_backend(backend: str, device: torch.device | str | None = None) -> str:
    """Return the backend that will actually run; warn once when falling back."""
    if backend not in BACKENDS:
        raise ValueError(f"attention must be one of {BACKENDS}, got {backend!r}")
    if backend == "xformers":
        device_type = torch.device(device).type if device is not None else "cuda"
        if not xformers_available(device_type):
            _warn_xformers_fallback()
            return "sdpa"
    return backend


@functools.cache
def _warn_xformers_fallback() -> None:
    warnings.warn("xformers kernels are not usable here; using PyTorch SDPA instead.", stacklevel=3)


def attend(query, key, value, attention_mask=None, backend: str = "sdpa"):
    """Fused attention on ``(batch, heads, tokens, head_dim)`` tensors."""
    if backend == "xformers":
        import xformers.ops as xops

        # xformers wants (batch, tokens, heads, head_dim)
        out = xops.memory_efficient_attention(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attn_bias=attention_mask
        )
        return out.transpose(1, 2)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False)


class ImagePromptAttnProcessor(nn.Module):
    """Attention processor with an optional prompt-to-prompt ``editor`` and IP-Adapter ``image_branch``.

    An ``nn.Module`` so that weights of an image branch attached to it move with
    the UNet (``pipe.to(...)``), as diffusers' IP-Adapter processors do.
    """

    def __init__(self, name: str = "", backend: str = "sdpa"):
        super().__init__()
        self.name = name
        self.backend = backend
        self.editor = None
        self.image_branch = None
        self.ip_adapter_masks = None

    @property
    def is_cross_attention(self) -> bool:
        return ".attn2." in self.name or self.name.endswith("attn2.processor")

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | tuple | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        ip_adapter_masks: list | torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        image_context = None
        if isinstance(encoder_hidden_states, tuple):
            encoder_hidden_states, image_context = encoder_hidden_states

        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)

        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch_size, context_length, _ = context.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, context_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if encoder_hidden_states is None:
            context = hidden_states
        elif attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)

        query = attn.to_q(hidden_states)
        key = attn.to_k(context)
        value = attn.to_v(context)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if self.editor is not None:
            out = self.editor(self, query, key, value, attention_mask)
        else:
            out = attend(query, key, value, attention_mask, self.backend)
        if self.image_branch is not None and image_context is not None:
            self.ip_adapter_masks = ip_adapter_masks
            out = out + self.image_branch(self, attn, query, image_context)

        out = out.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def set_imageprompt_attention(unet, backend: str = "sdpa") -> dict[str, ImagePromptAttnProcessor]:
    """Install an :class:`ImagePromptAttnProcessor` in every attention layer of ``unet``.

    Layers that already carry an imageprompt processor keep it (and its hooks);
    only the backend changes. Returns the processors by layer name.
    """
    backend = resolve_backend(backend, getattr(unet, "device", None))
    processors, projection_layers = {}, {}
    for name, current in unet.attn_processors.items():
        if name.startswith("encoder_hid_proj."):
            projection_layers[name] = current
        elif isinstance(current, ImagePromptAttnProcessor):
            current.backend = backend
            processors[name] = current
        else:
            processors[name] = ImagePromptAttnProcessor(name, backend)
    unet.set_attn_processor({**processors, **projection_layers})
    return processors


def imageprompt_processors(unet) -> dict[str, ImagePromptAttnProcessor]:
    """The imageprompt processors of ``unet`` by layer name (installs them if missing)."""
    procs = {n: p for n, p in unet.attn_processors.items() if not n.startswith("encoder_hid_proj.")}
    if all(isinstance(p, ImagePromptAttnProcessor) for p in procs.values()):
        return dict(procs)
    return set_imageprompt_attention(unet, "sdpa")


def check_processors(unet, needed: bool = True) -> None:
    """One line naming the fix when another processor replaced imageprompt's (diffusers' ``set_attn_processor``,
    ``fuse_qkv_projections``, ...) on a UNet whose techniques need them (``needed``: adapters loaded, an editor)."""
    if not needed:
        return
    foreign = sorted({type(p).__name__ for n, p in unet.attn_processors.items()
                      if not n.startswith("encoder_hid_proj.") and not isinstance(p, ImagePromptAttnProcessor)})
    if foreign:
        raise ValueError(f"the UNet's attention runs {', '.join(foreign)}, not imageprompt's processors, which its "
                         "image adapters and edits need: call `pipe.set_attention('sdpa')` (or 'xformers') after "
                         "`set_attn_processor`")


def cross_attention_layers(unet) -> dict[str, str]:
    """Cross-attention layer name -> official key id (``"1"``, ``"3"``, ...), as diffusers counts them."""
    names = [n for n in unet.attn_processors if not n.startswith("encoder_hid_proj.")]
    ids, key_id = {}, 1
    for name in names:
        if not name.endswith("attn1.processor"):
            ids[name] = str(key_id)
            key_id += 2
    return ids


def attention_module(unet, processor_name: str):
    """The ``Attention`` module whose processor is named ``processor_name``."""
    return unet.get_submodule(processor_name.rsplit(".processor", 1)[0])


@contextlib.contextmanager
def editor_attached(unet, editor, processors=None):
    """``editor`` as the ``editor`` hook of ``processors`` (default: every layer of ``unet``) for a ``with`` block.

    The editors the layers had before come back when the block ends, also on an error.
    """
    processors = list(imageprompt_processors(unet).values() if processors is None else processors)
    previous = [p.editor for p in processors]
    try:
        for p in processors:
            p.editor = editor
        yield editor
    finally:
        for p, earlier in zip(processors, previous):
            p.editor = earlier
