"""IP-Adapter: decoupled cross-attention for image prompts, inside imageprompt's attention layer.

Ye et al., "IP-Adapter: Text Compatible Image Prompt Adapter for Text-to-Image
Diffusion Models" (2023), Eq. 5: each cross-attention layer adds a second
attention over image tokens with its own key/value projections,

    Z = Attn(Q, K_text, V_text) + scale * Attn(Q, c_img W'_k, c_img W'_v),

added before ``to_out``. Here that second term is a :class:`DecoupledImageBranch`
installed as the ``image_branch`` hook of each cross-attention
:class:`~imageprompt.attention.ImagePromptAttnProcessor`, so it composes with
prompt-to-prompt ``editor`` hooks on the same layers.

All state lives on the UNet: the branches on its cross-attention processors,
the image projections in ``unet.encoder_hid_proj`` (an :class:`ImageAdapterStack`,
diffusers' ``MultiIPAdapterImageProjection`` that also remembers the loaded
adapters), so every pipeline over the same UNet (``from_pipe``) sees the same
adapters. Image embeddings arrive as ``added_cond_kwargs["image_embeds"]``,
exactly as in diffusers. The image projection classes and the key conversion are
diffusers' own; checkpoint files are read by :mod:`imageprompt.adapter_files`;
the pipeline methods (``load_ip_adapter``, ``set_ip_adapter_scale``, ...) are in
:mod:`imageprompt.pipelines.adapter_mixin`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence

import PIL.Image
import torch
from diffusers.models.embeddings import MultiIPAdapterImageProjection
from torch import nn

from imageprompt.adapter_files import check_checkpoint, find_image_encoder, read_checkpoint, resolve_weight_file
from imageprompt.attention import (
    attend,
    attention_module,
    compiled_form,
    cross_attention_layers,
    imageprompt_processors,
    set_imageprompt_attention,
)
from imageprompt.images import to_rgb

logger = logging.getLogger(__name__)

# ------------------------------------------------------------ the hook
class LayerOwnProjection(nn.Module):
    """Stands for the layer's own ``to_k`` or ``to_v`` (no weights of its own).

    Used by the training-free branch (:mod:`imageprompt.sdipc_branch`), whose
    image key/value projections *are* the text ones: IP-Adapter's initialisation.
    """

    def __init__(self, which: str):
        super().__init__()
        if which not in ("to_k", "to_v"):
            raise ValueError(f"which must be 'to_k' or 'to_v', got {which!r}")
        self.which = which

    def resolve(self, attn) -> nn.Module:
        return getattr(attn, self.which)


class DecoupledImageBranch(nn.Module):
    """The image half of decoupled cross-attention for one layer, for one or more adapters.

    ``to_k_ip[i]``/``to_v_ip[i]`` and ``scale[i]`` belong to adapter ``i``;
    ``image_context[i]`` is its projected tokens ``(B, num_images, tokens, dim)``.
    Several images of one adapter are attended together (tokens concatenated),
    unless masks are given (``processor.ip_adapter_masks``, diffusers' format:
    one ``(1, num_images, H, W)`` tensor per adapter), in which case each image
    is attended on its own and confined to its mask. A scale is a float, or a
    list with one float per image when masks are given. Zero scales skip the
    adapter entirely, so scale 0 costs nothing and changes nothing. ``active`` (set by
    :func:`set_adapter_step` from each adapter's step window) skips the adapters whose
    window does not hold the current sampling step the same way; None: all are active.
    """

    def __init__(self, to_k_ip: Sequence[nn.Module], to_v_ip: Sequence[nn.Module], scale: Sequence = ()):
        super().__init__()
        self.to_k_ip = nn.ModuleList(to_k_ip)
        self.to_v_ip = nn.ModuleList(to_v_ip)
        self.scale = list(scale) or [1.0] * len(self.to_k_ip)
        self.active: list[bool] | None = None
        # `active` as a tensor (a compiled UNet reads it as an input: one graph for every step, `compiled_form`)
        self.register_buffer("gates", torch.ones(len(self.to_k_ip), dtype=torch.bool), persistent=False)

    def set_active(self, active: list[bool] | None) -> None:
        self.active = active
        self.gates.copy_(torch.tensor([True] * len(self.to_k_ip) if active is None else active))

    def _attend(self, processor, attn, query, tokens):
        batch, heads, _, head_dim = query.shape
        to_k, to_v = (p.resolve(attn) if isinstance(p, LayerOwnProjection) else p for p in tokens[1])
        key = to_k(tokens[0]).view(batch, -1, heads, head_dim).transpose(1, 2)
        value = to_v(tokens[0]).view(batch, -1, heads, head_dim).transpose(1, 2)
        return attend(query, key, value, None, processor.backend).to(query.dtype)

    def forward(self, processor, attn, query: torch.Tensor, image_context) -> torch.Tensor | None:
        """The adapters' attention summed, ``(batch, heads, queries, head_dim)``; None when none applies."""
        batch, heads, queries, head_dim = query.shape
        if not isinstance(image_context, (list, tuple)):
            image_context = [image_context]
        if len(image_context) != len(self.to_k_ip):
            raise ValueError(f"{len(image_context)} image prompts for {len(self.to_k_ip)} loaded adapters")
        masks = getattr(processor, "ip_adapter_masks", None)
        if masks is not None and not isinstance(masks, (list, tuple)):
            masks = list(masks.unsqueeze(1))  # diffusers' legacy (num_adapters, H, W) form
        if masks is not None and len(masks) != len(image_context):
            raise ValueError(f"{len(masks)} ip_adapter_masks for {len(image_context)} adapters")
        static = compiled_form()
        terms = []  # summed at the end: no zero buffer per layer
        for i, (tokens, scale) in enumerate(zip(image_context, self.scale)):
            scales = scale if isinstance(scale, (list, tuple)) else [scale]
            if all(s == 0 for s in scales) or (not static and self.active is not None and not self.active[i]):
                continue
            # compiled: the step window is a tensor switch, `part * True` is `part` and `part * False` is zeros
            gate = self.gates[i] if static else None
            projections = (self.to_k_ip[i], self.to_v_ip[i])
            mask = None if masks is None else masks[i]
            if mask is None:
                if isinstance(scale, (list, tuple)):
                    raise ValueError("a list of per-image scales needs `ip_adapter_masks` for that adapter")
                part = self._attend(processor, attn, query, (tokens, projections))
                terms.append(scale * (part if gate is None else part * gate))
                continue
            if mask.ndim != 4 or mask.shape[1] != tokens.shape[1]:
                raise ValueError(f"mask of adapter {i} has shape {tuple(mask.shape)}; expected "
                                 f"(1, {tokens.shape[1]}, H, W): one mask per image (see IPAdapterMaskProcessor)")
            if len(scales) == 1:
                scales = scales * mask.shape[1]
            from diffusers.image_processor import IPAdapterMaskProcessor

            for j in range(mask.shape[1]):
                part = self._attend(processor, attn, query, (tokens[:, j], projections))
                region = IPAdapterMaskProcessor.downsample(mask[:, j], batch, queries, heads * head_dim)
                region = region.to(query).view(batch, queries, heads, head_dim).transpose(1, 2)
                terms.append(scales[j] * (part * (region if gate is None else region * gate)))
        if not terms:
            return None
        out = terms[0]
        for term in terms[1:]:
            out = out + term
        return out


# -------------------------------------------------------------- adapters
class IPAdapter:
    """One loaded IP-Adapter: its image projection, per-layer key/value weights and image encoder."""

    def __init__(self, name: str, kind: str, projection: nn.Module, keys_values: dict, image_encoder,
                 feature_extractor):
        self.name, self.kind, self.projection = name, kind, projection
        self.keys_values = keys_values  # cross-attention processor name -> (to_k_ip, to_v_ip)
        self.image_encoder, self.feature_extractor = image_encoder, feature_extractor

    @property
    def uses_hidden_states(self) -> bool:
        """plus / full-face read the penultimate hidden states; sd15 the projected ``image_embeds``."""
        return self.kind != "sd15"

    def projections(self, name: str, attn) -> tuple[nn.Module, nn.Module]:
        return self.keys_values[name]

    def _pixels(self, images, device, dtype):
        pixels = self.feature_extractor(images=[to_rgb(im) for im in images], return_tensors="pt").pixel_values
        return pixels.to(device=device, dtype=dtype)

    def _encode_pixels(self, pixels):
        if self.uses_hidden_states:
            return self.image_encoder(pixels, output_hidden_states=True).hidden_states[-2]
        return self.image_encoder(pixels).image_embeds

    @torch.no_grad()
    def encode(self, pipe, images, negative_images, device):
        """``(embeds, negative_embeds)``, one row per image; negatives: zeros / a zero image, as in the paper."""
        dtype = pipe.unet.dtype
        self.image_encoder.to(device=device, dtype=dtype)
        pixels = self._pixels(images, device, dtype)
        embeds = self._encode_pixels(pixels)
        if negative_images is not None:
            negative = self._encode_pixels(self._pixels(negative_images, device, dtype))
        elif self.uses_hidden_states:
            negative = self._encode_pixels(torch.zeros_like(pixels))
        else:
            negative = torch.zeros_like(embeds)
        return embeds, negative

    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        """Back to the official format (sd15 kind only: what :mod:`imageprompt.train_adapter` trains)."""
        if self.kind != "sd15":
            raise NotImplementedError("saving is implemented for the sd15 format only")
        p = self.projection
        image_proj = {"proj.weight": p.image_embeds.weight, "proj.bias": p.image_embeds.bias,
                      "norm.weight": p.norm.weight, "norm.bias": p.norm.bias}
        ip = {}
        for key_id, (k, v) in zip(self.key_ids, self.keys_values.values()):
            ip[f"{key_id}.to_k_ip.weight"], ip[f"{key_id}.to_v_ip.weight"] = k.weight, v.weight
        return {"image_proj": {k: t.detach().cpu().contiguous() for k, t in image_proj.items()},
                "ip_adapter": {k: t.detach().cpu().contiguous() for k, t in ip.items()}}


def build_adapters(pipe, states: list[dict], encoders: list, names: list[str]) -> list[IPAdapter]:
    """:class:`IPAdapter` s from official state dicts, parsed by diffusers' own ``load_ip_adapter`` (its projection
    classes and key conversion), then handed to imageprompt's processors; not installed yet.

    ``encoders``: ``(image_encoder, feature_extractor)`` per state dict; ``names``: where each came from (errors
    name it). The adapters installed before come back as they were (scales included).
    """
    from diffusers.loaders import IPAdapterMixin

    unet = pipe.unet
    kinds = [check_checkpoint(state, unet, encoder.config, name) for state, (encoder, _), name
             in zip(states, encoders, names)]
    kept, scales = loaded_adapters(unet), layer_scales(unet)
    backend = next(iter(imageprompt_processors(unet).values())).backend
    feature_extractor = getattr(pipe, "feature_extractor", None)  # diffusers' loader registers one when missing
    image_encoder = getattr(pipe, "image_encoder", None)  # without one, diffusers' loader warns that it has none
    install_adapters(unet, [])
    try:
        if hasattr(pipe, "image_encoder"):
            pipe.register_modules(image_encoder=encoders[0][0])
        official = [{"image_proj": state["image_proj"], "ip_adapter": state["ip_adapter"]} for state in states]
        none = [None] * len(official)
        IPAdapterMixin.load_ip_adapter(pipe, official, subfolder=none, weight_name=none, image_encoder_folder=None,
                                       low_cpu_mem_usage=False)
        projections = list(unet.encoder_hid_proj.image_projection_layers)
        branches = {name: (proc.to_k_ip, proc.to_v_ip) for name, proc in unet.attn_processors.items()
                    if hasattr(proc, "to_k_ip")}
    finally:  # diffusers' processors and projection out, imageprompt's back in
        unet.encoder_hid_proj = None
        unet.config.encoder_hid_dim_type = None
        set_imageprompt_attention(unet, backend)
        if hasattr(pipe, "feature_extractor") and pipe.feature_extractor is not feature_extractor:
            pipe.register_modules(feature_extractor=feature_extractor)
        if hasattr(pipe, "image_encoder"):
            pipe.register_modules(image_encoder=image_encoder)
        _reinstall(unet, kept, scales)
    ids = cross_attention_layers(unet)
    adapters = []
    for i, (kind, (encoder, processor), name) in enumerate(zip(kinds, encoders, names)):
        keys_values = {layer: (branches[layer][0][i], branches[layer][1][i]) for layer in ids}
        adapter = IPAdapter(name, kind, projections[i].eval(), keys_values, encoder, processor)
        adapter.key_ids = list(ids.values())
        adapters.append(adapter)
    return adapters


def load_adapters(pipe, sources, subfolder=None, weight_name=None, image_encoder_folder: str | None = "image_encoder",
                  image_encoder=None, local_files_only: bool | None = None) -> list[IPAdapter]:
    """Official IP-Adapter checkpoints as :class:`IPAdapter` s for ``pipe``'s UNet (not installed yet).

    Arguments as diffusers' ``load_ip_adapter``: ``sources`` is a hub id, folder, weight file or
    state dict, or a list of these; ``weight_name``/``subfolder`` may be lists. Files are checked
    (:mod:`imageprompt.adapter_files`: safetensors, pickles only through ``weights_only``, shapes
    against the UNet and the encoder) before diffusers parses them. Image encoders shared by several
    adapters are loaded once.
    """
    sources = sources if isinstance(sources, list) else [sources]
    names = weight_name if isinstance(weight_name, list) else [weight_name] * len(sources)
    if len(sources) == 1 and len(names) > 1:
        sources = sources * len(names)
    subs = subfolder if isinstance(subfolder, list) else [subfolder] * len(sources)
    if not len(sources) == len(names) == len(subs):
        raise ValueError("give as many weight names and subfolders as adapters")
    found, states, chosen, wheres = {}, [], [], []
    for source, name, sub in zip(sources, names, subs):
        if isinstance(source, dict):
            state, where, weight_file = source, "the state dict", None
            if image_encoder is None:
                raise ValueError("with a state dict, pass image_encoder= (a folder or a model)")
        else:
            weight_file, where = resolve_weight_file(str(source), name, sub, local_files_only)
            state = read_checkpoint(weight_file)
        if name and "/" in name and sub is None:
            sub = name.rsplit("/", 1)[0]
        key = str(image_encoder) if image_encoder is not None else f"{source}|{sub}|{image_encoder_folder}"
        if key not in found:
            found[key] = find_image_encoder(str(source), weight_file, sub, image_encoder_folder, image_encoder,
                                            pipe.unet.dtype, local_files_only)
        states.append(state)
        chosen.append(found[key][:2])
        wheres.append(where)
    return build_adapters(pipe, states, chosen, wheres)


# ------------------------------------------------------- state on the UNet
class ImageAdapterStack(MultiIPAdapterImageProjection):
    """``unet.encoder_hid_proj`` while image adapters are installed: diffusers' projection
    list, plus the adapters themselves (a plain list: their image encoders are not UNet weights)."""

    def __init__(self, adapters: list):
        super().__init__([a.projection for a in adapters])
        self.adapters = list(adapters)
        self.active: list[bool] | None = None  # what the branches were last told (set_adapter_step)


def loaded_adapters(unet) -> list:
    """The image adapters installed on ``unet``, in order (IP-Adapters and the SD-IPC branch)."""
    stack = getattr(unet, "encoder_hid_proj", None)
    return list(stack.adapters) if isinstance(stack, ImageAdapterStack) else []


def install_adapters(unet, adapters: list, scales: list | None = None) -> None:
    """Make ``adapters`` the UNet's image adapters: projections in ``unet.encoder_hid_proj``,
    branches on the cross-attention layers (scales 1.0 unless given).

    An empty list restores the plain UNet. Self-attention layers are never
    touched, and ``editor`` hooks and the attention backend stay as they are.
    """
    unet.encoder_hid_proj = None  # count UNet layers only (a Resampler has attention layers of its own)
    processors = imageprompt_processors(unet)
    layers = cross_attention_layers(unet)
    scales = list(scales) if scales is not None else [1.0] * len(adapters)
    for name, proc in processors.items():
        if name not in layers or not adapters:
            proc.image_branch = None
            continue
        attn = attention_module(unet, name)
        pairs = [a.projections(name, attn) for a in adapters]
        branch = DecoupledImageBranch([k for k, _ in pairs], [v for _, v in pairs], scales)
        proc.image_branch = branch.to(device=unet.device, dtype=unet.dtype)
    if adapters:
        unet.encoder_hid_proj = ImageAdapterStack(adapters).to(device=unet.device, dtype=unet.dtype)
        unet.config.encoder_hid_dim_type = "ip_image_proj"
    else:
        unet.config.encoder_hid_dim_type = None


def image_branches(unet) -> dict[str, DecoupledImageBranch]:
    """The installed branches by processor name."""
    return {n: p.image_branch for n, p in imageprompt_processors(unet).items()
            if isinstance(p.image_branch, DecoupledImageBranch)}


def layer_scales(unet) -> dict[str, list]:
    """Each cross-attention layer's scales, one per installed adapter (InstantStyle makes them differ)."""
    return {name: list(branch.scale) for name, branch in image_branches(unet).items()}


def _reinstall(unet, adapters: list, scales: dict[str, list]) -> None:
    """Install ``adapters`` with per-layer ``scales`` (layers or adapters not listed get 1.0)."""
    install_adapters(unet, adapters)
    for name, branch in image_branches(unet).items():
        for i, value in enumerate(scales.get(name, [])[: len(adapters)]):
            branch.scale[i] = value


def set_branch_scales(unet, scale, count: int | None = None) -> None:
    """diffusers' ``set_ip_adapter_scale`` semantics on imageprompt's branches.

    ``scale``: a float, an InstantStyle dict such as ``{"up": {"block_0": [0.0, 1.0, 0.0]}}``
    (layers not named get 0; :mod:`imageprompt.block_scales`), or a list with one of those per adapter.
    """
    from imageprompt.block_scales import expand_block_scales, layer_scale

    count = len(loaded_adapters(unet)) if count is None else count
    configs = scale if isinstance(scale, list) else [scale]
    if len(configs) == 1:
        configs = configs * count
    if len(configs) != count:
        raise ValueError(f"{len(configs)} scales for {count} loaded adapters")
    configs = [expand_block_scales(unet, config) for config in configs]
    for name, branch in image_branches(unet).items():
        for i, config in enumerate(configs):
            branch.scale[i] = layer_scale(config, name) if isinstance(config, dict) else config


def add_adapter(unet, adapter, scale: float = 1.0) -> None:
    """Install ``adapter`` after those already on ``unet``, keeping their (per-layer) scales."""
    kept, scales = loaded_adapters(unet), layer_scales(unet)
    _reinstall(unet, [*kept, adapter], {name: [*values, scale] for name, values in scales.items()}
               if kept else {})
    if not kept:
        set_branch_scales(unet, scale)


def remove_adapters(unet, kind: type) -> None:
    """Uninstall the adapters that are instances of ``kind``, keeping the others and their (per-layer) scales."""
    adapters, scales = loaded_adapters(unet), layer_scales(unet)
    keep = [i for i, a in enumerate(adapters) if not isinstance(a, kind)]
    if len(keep) != len(adapters):
        _reinstall(unet, [adapters[i] for i in keep], {n: [v[i] for i in keep] for n, v in scales.items()})


@contextlib.contextmanager
def adapters_suspended(unet):
    """Run the UNet without its image adapters for a while (inversion of a photo under its text);
    they come back with their scales afterwards, even on error."""
    adapters, scales = loaded_adapters(unet), layer_scales(unet)
    if not adapters:
        yield
        return
    install_adapters(unet, [])
    try:
        yield
    finally:
        _reinstall(unet, adapters, scales)


# ---------------------------------------------------------- step windows
FULL_WINDOW = (0.0, 1.0)


def check_window(window) -> tuple[float, float]:
    """``(begin, end)``: fractions of the sampling steps with ``0 <= begin < end <= 1``; a clear error otherwise."""
    if isinstance(window, (str, bytes)) or not isinstance(window, (tuple, list)) or len(window) != 2:
        raise ValueError(f"a step window is a (begin, end) pair of fractions, got {window!r}")
    try:
        begin, end = (float(x) for x in window)
    except (TypeError, ValueError):
        raise ValueError(f"a step window is a (begin, end) pair of numbers, got {window!r}") from None
    if not 0.0 <= begin < end <= 1.0:  # NaN fails here too
        raise ValueError(f"a step window needs 0 <= begin < end <= 1, got ({begin}, {end})")
    return begin, end


def window_steps(window, num_steps: int) -> range:
    """The steps a window covers: ``int(begin * N)`` up to, not including, ``int(end * N)`` (prompt-to-prompt's
    rule for its self-attention window); ``(0.5, 1.0)`` of 4 steps is steps 2 and 3."""
    begin, end = check_window(window)
    return range(int(begin * num_steps), int(end * num_steps))


def adapter_windows(unet) -> list[tuple[float, float]]:
    """Each installed adapter's step window, in order (``(0.0, 1.0)``: every step)."""
    return [getattr(a, "window", FULL_WINDOW) for a in loaded_adapters(unet)]


def set_adapter_windows(unet, window) -> None:
    """Apply each adapter only between fractions ``begin`` and ``end`` of the sampling steps (ComfyUI's
    start_at/end_at): ``(begin, end)`` for every adapter, a list with one pair (or None) per adapter, or None
    (every step). The window is kept on the adapter itself, in ``unet.encoder_hid_proj``."""
    adapters = loaded_adapters(unet)
    if not adapters:
        raise ValueError("no image adapter is loaded")
    per_adapter = window if isinstance(window, list) and (not window or window[0] is None
                                                          or isinstance(window[0], (list, tuple))) else [window]
    if len(per_adapter) == 1:
        per_adapter = per_adapter * len(adapters)
    if len(per_adapter) != len(adapters):
        raise ValueError(f"{len(per_adapter)} step windows for {len(adapters)} loaded adapters")
    checked = [FULL_WINDOW if w is None else check_window(w) for w in per_adapter]
    for adapter, value in zip(adapters, checked):
        adapter.window = value


def set_adapter_step(unet, step: int | None, num_steps: int | None = None) -> None:
    """Tell the image branches that sampling step ``step`` of ``num_steps`` runs next; adapters whose window
    does not cover it are skipped, exactly as at scale 0. ``None``: outside a sampling loop, all adapters on.

    The pipelines' denoising loop calls it before every UNet call and with None afterwards."""
    windows = adapter_windows(unet)
    if not windows:
        return
    active = None
    if step is not None and any(w != FULL_WINDOW for w in windows):
        active = [step in window_steps(w, num_steps) for w in windows]
    stack = unet.encoder_hid_proj  # remembers what the branches were told, so most steps change nothing
    if stack.active == active:
        return
    for branch in image_branches(unet).values():
        branch.set_active(active)
    stack.active = active


# ------------------------------------------------------- image embeddings
def as_image_list(value) -> list:
    if isinstance(value, PIL.Image.Image):
        return [value]
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, PIL.Image.Image) for v in value):
        return list(value)
    raise TypeError("each adapter's image prompt must be a PIL image or a non-empty list of PIL images")
