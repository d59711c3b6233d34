"""imageprompt's attention-processor layer: the one seam every technique uses.

Each UNet attention layer gets an :class:`ImagePromptAttnProcessor`. On its own it
is diffusers' ``AttnProcessor2_0`` (PyTorch SDPA) or the xformers kernel. Two
kinds of hooks let the techniques compose in one forward pass:

- ``editors``: :class:`AttentionEditor` objects (prompt-to-prompt, MasaCtrl,
  StyleAligned, recorders), chained in the order they were attached. Each may
  wrap the fused call (:meth:`AttentionEditor.edit_attention`: change the queries,
  keys and values, or compute the attention another way) and may read or edit the
  explicit probabilities of the last rows of the batch
  (:meth:`AttentionEditor.edit_probs`), which one shared helper
  (:func:`explicit_attention`) forms only when some editor asks for them.
- ``image_branch``: a decoupled image key/value branch (IP-Adapter style),
  called as ``image_branch(processor, attn, query, image_context)`` and added to
  the text branch before ``to_out``. ``image_context`` arrives the way diffusers
  passes it: ``encoder_hidden_states`` as a ``(text, image)`` tuple. Region masks
  given as ``cross_attention_kwargs={"ip_adapter_masks": ...}`` (diffusers' name)
  are on ``processor.ip_adapter_masks`` during the call.

Each processor knows its layer's facts (:class:`Layer`: cross or self attention,
place, scale of its grid, order), computed once when the processors are installed.
Attention layers inside ``unet.encoder_hid_proj`` (an IP-Adapter Resampler) are
not UNet layers: they keep their diffusers processors.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass

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


# ------------------------------------------------------------------ layers
_PARTS = {"down_blocks": ("down", 0), "mid_block": ("mid", 1), "up_blocks": ("up", 2)}


@dataclass(frozen=True)
class Layer:
    """Facts of one UNet attention layer, computed once when imageprompt's processors are installed.

    ``scale``: the latent grid has ``scale`` times this layer's rows and columns (1, 2, 4, ...).
    ``index``: the layer's place among the layers of its kind (self or cross) in the order the UNet runs them
    (encoder, mid block, decoder; MasaCtrl counts its ``start_layer`` so).
    """

    name: str
    is_cross: bool
    place: str
    scale: int
    index: int

    def size(self, latent_size: tuple[int, int]) -> tuple[int, int]:
        """The layer's ``(rows, columns)`` for latents of ``latent_size``."""
        return -(-latent_size[0] // self.scale), -(-latent_size[1] // self.scale)


def run_order(name: str) -> tuple:
    """Sort key of a processor name in the order the UNet runs it (``attn_processors`` lists the decoder
    before the mid block)."""
    part = name.split(".", 1)[0]
    return _PARTS.get(part, ("", 3))[1], [int(x) for x in re.findall(r"\.(\d+)\.", f".{name}.")]


def layer_facts(unet) -> dict[str, Layer]:
    """Every UNet attention layer's :class:`Layer`, by processor name."""
    levels = len(unet.config.down_block_types)
    names = sorted((n for n in unet.attn_processors if not n.startswith("encoder_hid_proj.")), key=run_order)
    counts, facts = {True: 0, False: 0}, {}
    for name in names:
        part, block = name.split(".")[0], name.split(".")[1]
        place = _PARTS.get(part, (part, 3))[0]
        level = int(block) if place == "down" else levels - 1 if place == "mid" else levels - 1 - int(block)
        is_cross = bool(attention_module(unet, name).is_cross_attention)
        facts[name] = Layer(name, is_cross, place, 2 ** max(level, 0), counts[is_cross])
        counts[is_cross] += 1
    return facts


# ----------------------------------------------------------------- editors
def compiled_form() -> bool:
    """Whether the attention runs inside ``torch.compile`` (dynamo tracing). There an editor's or image branch's
    per-step decisions become tensors (a window's switch, a step's weights), so that one graph serves every step;
    eager runs keep the Python decisions that skip work outside the windows. Both give the same images up to
    float rounding (``tests/test_compile.py``)."""
    return torch.compiler.is_compiling()


Attend = Callable[..., torch.Tensor]  # attend(query, key, value, attention_mask) -> output


class AttentionEditor:
    """An attention editor: hooks on the processors of the layers it is attached to (:func:`editor_attached`).

    Editors chain in the order they were attached. Override what the technique changes:

    - :meth:`edit_attention` wraps the attention call of a layer; ``attend`` runs the rest of the chain (the next
      editors, then the fused kernel). Tensors are ``(batch, heads, tokens, head_dim)``.
    - :meth:`probs_rows` / :meth:`edit_probs`: an editor that reads or changes attention probabilities says for how
      many rows (counted from the last: the conditional prompts) it needs them in a layer; the probabilities of
      those rows are then formed explicitly in float32 (:func:`explicit_attention`) and passed through every
      editor's :meth:`edit_probs` in order.
    """

    def probs_rows(self, layer: Layer, rows: int) -> int:
        """How many of the batch's last rows this editor needs explicit probabilities of in ``layer`` now (0: none)."""
        return 0

    def edit_probs(self, layer: Layer, probs: torch.Tensor) -> torch.Tensor:
        """Read or change ``probs`` ``(n, heads, queries, keys)``, the last ``n`` rows' probabilities."""
        return probs

    def edit_attention(self, layer: Layer, query, key, value, attention_mask, attend: Attend) -> torch.Tensor:
        return attend(query, key, value, attention_mask)

    def attached(self, unet):
        """This editor on every attention layer of ``unet`` for a ``with`` block (removed after, also on error)."""
        return editor_attached(unet, self)


def explicit_attention(query, key, value, attention_mask, rows: int, edit: Callable, attend: Attend):
    """Attention whose last ``rows`` rows form their probabilities explicitly (float32) and pass them through
    ``edit`` before ``probs @ value``; the other rows run ``attend`` (the fused kernel)."""
    first = query.shape[0] - rows
    scores = query[first:].float() @ key[first:].float().transpose(-1, -2) * query.shape[-1] ** -0.5
    if attention_mask is not None:
        scores = scores + attention_mask[first:].float()
    out = (edit(scores.softmax(-1)) @ value[first:].float()).to(query.dtype)
    if first == 0:
        return out
    mask = None if attention_mask is None else attention_mask[:first]
    return torch.cat([attend(query[:first], key[:first], value[:first], mask), out])


def run_editors(layer: Layer, editors, query, key, value, attention_mask=None, backend: str = "sdpa"):
    """One layer's attention through ``editors`` (see :class:`AttentionEditor`), ending in the fused kernel."""
    fused = functools.partial(attend, backend=backend)
    rows = max([e.probs_rows(layer, query.shape[0]) for e in editors] or [0])
    call = fused
    if rows:
        def edit(probs):
            for editor in editors:
                probs = editor.edit_probs(layer, probs)
            return probs

        call = functools.partial(explicit_attention, rows=rows, edit=edit, attend=fused)
    for editor in reversed(editors):
        call = functools.partial(editor.edit_attention, layer, attend=call)
    return call(query, key, value, attention_mask)


# -------------------------------------------------------------- processor
class ImagePromptAttnProcessor(nn.Module):
    """Attention processor with attention ``editors`` and an IP-Adapter ``image_branch``.

    An ``nn.Module`` so that weights of an image branch attached to it move with
    the UNet (``pipe.to(...)``), as diffusers' IP-Adapter processors do.
    """

    def __init__(self, name: str = "", backend: str = "sdpa", layer: Layer | None = None):
        super().__init__()
        self.name = name
        self.backend = backend
        self.layer = layer
        self.editors: tuple = ()
        self.image_branch = None
        self.ip_adapter_masks = None

    @property
    def is_cross_attention(self) -> bool:
        return self.layer.is_cross

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

        if self.editors:
            out = run_editors(self.layer, self.editors, query, key, value, attention_mask, self.backend)
        else:
            out = attend(query, key, value, attention_mask, self.backend)
        if self.image_branch is not None and image_context is not None:
            self.ip_adapter_masks = ip_adapter_masks
            image_out = self.image_branch(self, attn, query, image_context)
            if image_out is not None:  # None: no adapter applies at this step
                out = out + image_out

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
    facts = layer_facts(unet)
    processors, projection_layers = {}, {}
    for name, current in unet.attn_processors.items():
        if name.startswith("encoder_hid_proj."):
            projection_layers[name] = current
        elif isinstance(current, ImagePromptAttnProcessor):
            current.name, current.backend, current.layer = name, backend, facts[name]
            processors[name] = current
        else:
            processors[name] = ImagePromptAttnProcessor(name, backend, facts[name])
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
        if attention_module(unet, name).is_cross_attention:
            ids[name] = str(key_id)
            key_id += 2
    return ids


def attention_module(unet, processor_name: str):
    """The ``Attention`` module whose processor is named ``processor_name``."""
    return unet.get_submodule(processor_name.rsplit(".processor", 1)[0])


@contextlib.contextmanager
def editor_attached(unet, editor, processors=None):
    """``editor`` chained after the editors of ``processors`` (default: every layer of ``unet``) for a ``with``
    block; the chains they had before come back when the block ends, also on an error."""
    processors = list(imageprompt_processors(unet).values() if processors is None else processors)
    previous = [p.editors for p in processors]
    try:
        for p in processors:
            p.editors = (*p.editors, editor)
        yield editor
    finally:
        for p, earlier in zip(processors, previous):
            p.editors = earlier
