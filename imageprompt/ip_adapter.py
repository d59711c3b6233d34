"""IP-Adapter: decoupled cross-attention for image prompts, inside imageprompt's attention layer.

Ye et al., "IP-Adapter: Text Compatible Image Prompt Adapter for Text-to-Image
Diffusion Models" (2023), Eq. 5: each cross-attention layer adds a second
attention over image tokens with its own key/value projections,

    Z = Attn(Q, K_text, V_text) + scale * Attn(Q, c_img W'_k, c_img W'_v),

added before ``to_out``. Here that second term is a :class:`DecoupledImageBranch`
installed as the ``image_branch`` hook of each cross-attention
:class:`~imageprompt.attention.ImagePromptAttnProcessor`, so it composes with
prompt-to-prompt ``editor`` hooks on the same layers.

Official checkpoints load as they are (``image_proj`` + ``ip_adapter`` state
dicts; ``.safetensors``, or ``.bin`` read with ``weights_only=True``). The image
projection classes and the key conversion are diffusers' own
(:mod:`diffusers.models.embeddings`, ``UNet2DConditionLoadersMixin``); the
projection sits in ``unet.encoder_hid_proj`` and the image embeddings arrive as
``added_cond_kwargs["image_embeds"]``, exactly as in diffusers, so
``pipe.load_ip_adapter(...)``, ``set_ip_adapter_scale`` (InstantStyle dicts
included), ``ip_adapter_image``/``ip_adapter_image_embeds`` and
``cross_attention_kwargs={"ip_adapter_masks": ...}`` behave like diffusers'.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Sequence
from pathlib import Path

import PIL.Image
import torch
from torch import nn

from imageprompt.attention import imageprompt_processors
from imageprompt.loading import ModelLoadError, _offline

logger = logging.getLogger(__name__)

OFFICIAL_REPO = "h94/IP-Adapter"
# Short names for the official SD 1.5 checkpoints (``--adapter sd15``).
KNOWN_ADAPTERS = {
    "sd15": "models/ip-adapter_sd15.safetensors",
    "sd15_light": "models/ip-adapter_sd15_light.safetensors",
    "plus": "models/ip-adapter-plus_sd15.safetensors",
    "plus-face": "models/ip-adapter-plus-face_sd15.safetensors",
    "full-face": "models/ip-adapter-full-face_sd15.safetensors",
}
WEIGHT_SUFFIXES = (".safetensors", ".bin")


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
    adapter entirely, so scale 0 costs nothing and changes nothing.
    """

    def __init__(self, to_k_ip: Sequence[nn.Module], to_v_ip: Sequence[nn.Module], scale: Sequence = ()):
        super().__init__()
        self.to_k_ip = nn.ModuleList(to_k_ip)
        self.to_v_ip = nn.ModuleList(to_v_ip)
        self.scale = list(scale) or [1.0] * len(self.to_k_ip)

    def _attend(self, processor, attn, query, tokens):
        from imageprompt.attention import attend

        batch, heads, _, head_dim = query.shape
        to_k, to_v = (p.resolve(attn) if isinstance(p, LayerOwnProjection) else p for p in tokens[1])
        key = to_k(tokens[0]).view(batch, -1, heads, head_dim).transpose(1, 2)
        value = to_v(tokens[0]).view(batch, -1, heads, head_dim).transpose(1, 2)
        return attend(query, key, value, None, processor.backend).to(query.dtype)

    def forward(self, processor, attn, query: torch.Tensor, image_context) -> torch.Tensor:
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
        out = torch.zeros_like(query)
        for i, (tokens, scale) in enumerate(zip(image_context, self.scale)):
            scales = scale if isinstance(scale, (list, tuple)) else [scale]
            if all(s == 0 for s in scales):
                continue
            projections = (self.to_k_ip[i], self.to_v_ip[i])
            mask = None if masks is None else masks[i]
            if mask is None:
                if isinstance(scale, (list, tuple)):
                    raise ValueError("a list of per-image scales needs `ip_adapter_masks` for that adapter")
                out = out + scale * self._attend(processor, attn, query, (tokens, projections))
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
                out = out + scales[j] * (part * region)
        return out


# ------------------------------------------------------- checkpoints
def parse_adapter_spec(spec: str) -> tuple[str, str | None]:
    """``PATH_OR_ID[:WEIGHT_NAME]`` or a short name from :data:`KNOWN_ADAPTERS` -> ``(source, weight_name)``."""
    if spec in KNOWN_ADAPTERS:
        return OFFICIAL_REPO, KNOWN_ADAPTERS[spec]
    if Path(spec).expanduser().exists():
        return spec, None
    source, sep, weight = spec.rpartition(":")
    if sep and source and weight:
        return source, weight
    return spec, None


def resolve_weight_file(source: str, weight_name: str | None = None, subfolder: str | None = None,
                        local_files_only: bool | None = None) -> tuple[Path, str]:
    """Find the checkpoint: a local file, ``folder/weight_name`` or a hub file. Returns ``(file, where)``."""
    path = Path(source).expanduser()
    inner = "/".join(p for p in (subfolder, weight_name) if p)
    if path.is_file():
        found = path
    elif path.is_dir():
        if not weight_name:
            raise ModelLoadError(f"{source} is a folder: name the weight file, e.g. {source}:ip-adapter.safetensors")
        found = path / inner
        if not found.is_file():
            raise ModelLoadError(f"no IP-Adapter weights at {found}")
    elif source.startswith((".", "/", "~")) or source.lower().endswith(WEIGHT_SUFFIXES) or source.count("/") > 1:
        raise ModelLoadError(f"{source}: no such IP-Adapter file or folder")
    else:
        if not weight_name:
            raise ModelLoadError(f"{source}: name the weight file in the repository, "
                                 f"e.g. {source}:models/ip-adapter_sd15.safetensors")
        from huggingface_hub import hf_hub_download

        try:
            found = Path(hf_hub_download(source, inner, local_files_only=bool(local_files_only or _offline())))
        except Exception as err:
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise ModelLoadError(f"could not get IP-Adapter weights {inner!r} from {source!r}: {reason[:200]}. "
                                 "Download them on a machine with access and pass the local file.") from None
    check_weight_suffix(found)
    return found, f"{source}/{inner}" if not path.is_file() else str(found)


def check_weight_suffix(path: Path) -> None:
    if path.suffix.lower() not in WEIGHT_SUFFIXES:
        found = path.suffix or "no suffix"
        raise ModelLoadError(f"{path}: IP-Adapter weights must be .safetensors or .bin, got {found!r}")


def read_checkpoint(path: str | Path) -> dict[str, dict[str, torch.Tensor]]:
    """``{"image_proj": {...}, "ip_adapter": {...}}`` from an official ``.safetensors`` or ``.bin`` file.

    ``.bin`` files are pickles: they are read with ``torch.load(weights_only=True)``,
    which refuses (without running) anything but tensors and plain containers.
    """
    path = Path(path)
    check_weight_suffix(path)
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        flat = load_file(str(path), device="cpu")
        state = {"image_proj": {}, "ip_adapter": {}}
        for key, value in flat.items():
            part, _, rest = key.partition(".")
            if part in state:
                state[part][rest] = value
    else:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError, ValueError) as err:
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise ModelLoadError(f"{path}: refused: not a plain tensor archive ({reason[:160]}). "
                                 "Only .bin files holding tensors are read; prefer .safetensors.") from None
    if not isinstance(state, dict) or not isinstance(state.get("image_proj"), dict) \
            or not isinstance(state.get("ip_adapter"), dict) or not state["image_proj"] or not state["ip_adapter"]:
        raise ModelLoadError(f"{path}: not an IP-Adapter checkpoint (needs 'image_proj' and 'ip_adapter' weights)")
    return state


def checkpoint_kind(image_proj: dict) -> str:
    """``"sd15"`` (also sd15_light: same format), ``"full-face"`` or ``"plus"`` (also plus-face)."""
    if "proj.weight" in image_proj:
        return "sd15"
    if "proj.3.weight" in image_proj:
        return "full-face"
    if "latents" in image_proj and "proj_in.weight" in image_proj:
        return "plus"
    if "perceiver_resampler.proj_in.weight" in image_proj or "norm.weight" in image_proj:
        raise ModelLoadError("IP-Adapter FaceID checkpoints need insightface face embeddings and are not supported")
    raise ModelLoadError(f"unknown IP-Adapter image projection (keys {sorted(image_proj)[:4]}...)")


def unet_layers(unet) -> dict[str, str]:
    """Cross-attention layer name -> official key id (``"1"``, ``"3"``, ...), as diffusers counts them."""
    names = [n for n in unet.attn_processors if not n.startswith("encoder_hid_proj.")]
    ids, key_id = {}, 1
    for name in names:
        if not name.endswith("attn1.processor"):
            ids[name] = str(key_id)
            key_id += 2
    return ids


def _attention_module(unet, processor_name: str):
    return unet.get_submodule(processor_name.rsplit(".processor", 1)[0])


def check_checkpoint(state: dict, unet, image_encoder_config, where: str = "the checkpoint") -> str:
    """Raise :class:`ModelLoadError` naming expected vs found sizes; returns the checkpoint kind."""
    kind = checkpoint_kind(state["image_proj"])
    proj, ip = state["image_proj"], state["ip_adapter"]
    cross_dim = unet.config.cross_attention_dim
    layers = unet_layers(unet)
    found_ids = sorted({k.split(".")[0] for k in ip if k.endswith((".to_k_ip.weight", ".to_v_ip.weight"))}, key=int)
    if found_ids != sorted(layers.values(), key=int):
        raise ModelLoadError(f"{where}: image key/value weights for {len(found_ids)} cross-attention layers, "
                             f"but this UNet has {len(layers)}: made for another base model")
    for name, key_id in layers.items():
        attn = _attention_module(unet, name)
        expected = (attn.to_k.out_features, cross_dim)
        for which in ("to_k_ip", "to_v_ip"):
            found = tuple(ip[f"{key_id}.{which}.weight"].shape)
            if found != expected:
                raise ModelLoadError(f"{where}: layer {key_id} ({name}) {which} is {found[0]}x{found[1]}, this "
                                     f"UNet expects {expected[0]}x{expected[1]} (inner x cross_attention_dim "
                                     f"{cross_dim}): made for another base model")
    if kind == "sd15":
        out_dim, in_dim = proj["proj.weight"].shape
        checks = [("image embedding size (image encoder projection_dim)", image_encoder_config.projection_dim, in_dim),
                  ("image tokens x cross_attention_dim", 4 * cross_dim, out_dim)]
    elif kind == "plus":
        checks = [("image encoder hidden size", image_encoder_config.hidden_size, proj["proj_in.weight"].shape[1]),
                  ("cross_attention_dim", cross_dim, proj["proj_out.weight"].shape[0])]
    else:
        checks = [("image encoder hidden size", image_encoder_config.hidden_size, proj["proj.0.weight"].shape[1]),
                  ("cross_attention_dim", cross_dim, proj["proj.3.weight"].shape[0])]
    for what, expected, found in checks:
        if expected != found:
            raise ModelLoadError(f"{where}: {what} is {found} in the checkpoint, expected {expected} "
                                 "(made for another base model or image encoder)")
    return kind


# ------------------------------------------------------ image encoders
def load_image_encoder(source: str, subfolder: str | None = None, dtype=torch.float32,
                       local_files_only: bool | None = None):
    """``(CLIPVisionModelWithProjection, CLIPImageProcessor)`` from a folder or a hub id (+ subfolder)."""
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    path = Path(source).expanduser()
    local = path.exists() or bool(local_files_only or _offline())
    kwargs = dict(subfolder=subfolder or "", local_files_only=local)
    encoder = CLIPVisionModelWithProjection.from_pretrained(str(path) if path.exists() else source, dtype=dtype,
                                                            **kwargs).eval()
    try:
        processor = CLIPImageProcessor.from_pretrained(str(path) if path.exists() else source, **kwargs)
    except OSError:  # IP-Adapter's encoder folders ship no preprocessor config: diffusers' default
        size = encoder.config.image_size
        processor = CLIPImageProcessor(size=size, crop_size=size)
    encoder.requires_grad_(False)
    return encoder, processor


def find_image_encoder(source: str, weight_file: Path, subfolder: str | None, image_encoder_folder: str | None,
                       image_encoder=None, dtype=torch.float32, local_files_only: bool | None = None):
    """The adapter's image encoder: ``image_encoder`` if given, else ``image_encoder_folder`` next to the weights.

    As in diffusers, a folder name without ``/`` is looked for in the weight
    file's folder (``models/image_encoder`` for ``models/ip-adapter_sd15.safetensors``),
    a path with ``/`` from the repository root.
    """
    if image_encoder is not None and not isinstance(image_encoder, (str, Path)):
        from transformers import CLIPImageProcessor

        size = image_encoder.config.image_size
        return image_encoder, CLIPImageProcessor(size=size, crop_size=size), "given"
    tried = []
    if image_encoder is not None:
        candidates = [(str(image_encoder), None)]
    elif image_encoder_folder is None:
        raise ModelLoadError("no image encoder for the IP-Adapter: pass image_encoder= (--image-encoder PATH)")
    elif Path(source).expanduser().is_file():
        candidates = [(str(weight_file.parent / image_encoder_folder), None)]
    elif Path(source).expanduser().is_dir():
        inner = image_encoder_folder if "/" in image_encoder_folder else "/".join(
            p for p in (subfolder, image_encoder_folder) if p)
        candidates = [(str(Path(source).expanduser() / inner), None)]
    else:
        inner = image_encoder_folder if "/" in image_encoder_folder else "/".join(
            p for p in (subfolder, image_encoder_folder) if p)
        candidates = [(source, inner)]
    for where, sub in candidates:
        shown = f"{where}/{sub}" if sub else where
        try:
            encoder, processor = load_image_encoder(where, sub, dtype, local_files_only)
            return encoder, processor, shown
        except Exception as err:
            tried.append(f"{shown} ({(str(err).strip().splitlines() or [type(err).__name__])[0][:120]})")
    raise ModelLoadError("no image encoder for the IP-Adapter: looked in " + "; ".join(tried)
                         + ". Pass the CLIP vision folder with --image-encoder PATH (Python: image_encoder=PATH).")


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
        from imageprompt.images import to_rgb

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


def build_adapter(state: dict, unet, image_encoder, feature_extractor, name: str = "ip-adapter",
                  where: str = "the checkpoint") -> IPAdapter:
    """An :class:`IPAdapter` from an official state dict, through diffusers' conversion code."""
    kind = check_checkpoint(state, unet, image_encoder.config, where)
    # diffusers' converter of the official image_proj keys (ImageProjection / IPAdapterPlusImageProjection / ...)
    projection = unet._convert_ip_adapter_image_proj_to_diffusers(state["image_proj"], low_cpu_mem_usage=False)
    keys_values, ids = {}, unet_layers(unet)
    for layer, key_id in ids.items():
        k_weight = state["ip_adapter"][f"{key_id}.to_k_ip.weight"]
        v_weight = state["ip_adapter"][f"{key_id}.to_v_ip.weight"]
        to_k = nn.Linear(k_weight.shape[1], k_weight.shape[0], bias=False)
        to_v = nn.Linear(v_weight.shape[1], v_weight.shape[0], bias=False)
        to_k.weight.data.copy_(k_weight)
        to_v.weight.data.copy_(v_weight)
        keys_values[layer] = (to_k, to_v)
    adapter = IPAdapter(name, kind, projection.eval(), keys_values, image_encoder, feature_extractor)
    adapter.key_ids = list(ids.values())
    return adapter


def install_adapters(unet, adapters: list, scales: list | None = None) -> None:
    """Put the adapters' projections in ``unet.encoder_hid_proj`` and their branches on the cross-attention layers.

    Adapters without one (none loaded) restore the plain UNet. Self-attention
    layers are never touched, and ``editor`` hooks stay where they are.
    """
    from diffusers.models.embeddings import MultiIPAdapterImageProjection

    unet.encoder_hid_proj = None  # count UNet layers only (a Resampler has attention layers of its own)
    processors = imageprompt_processors(unet)
    layers = unet_layers(unet)
    scales = list(scales) if scales is not None else [1.0] * len(adapters)
    for name, proc in processors.items():
        if name not in layers or not adapters:
            proc.image_branch = None
            continue
        attn = _attention_module(unet, name)
        pairs = [a.projections(name, attn) for a in adapters]
        branch = DecoupledImageBranch([k for k, _ in pairs], [v for _, v in pairs], scales)
        proc.image_branch = branch.to(device=unet.device, dtype=unet.dtype)
    if adapters:
        projection = MultiIPAdapterImageProjection([a.projection for a in adapters])
        unet.encoder_hid_proj = projection.to(device=unet.device, dtype=unet.dtype)
        unet.config.encoder_hid_dim_type = "ip_image_proj"
    else:
        unet.config.encoder_hid_dim_type = None


def image_branches(unet) -> dict[str, DecoupledImageBranch]:
    """The installed branches by processor name."""
    return {n: p.image_branch for n, p in imageprompt_processors(unet).items()
            if isinstance(p.image_branch, DecoupledImageBranch)}


def set_branch_scales(unet, scale, count: int) -> None:
    """diffusers' ``set_ip_adapter_scale`` semantics on imageprompt's branches.

    ``scale``: a float, an InstantStyle dict such as ``{"up": {"block_0": [0.0, 1.0, 0.0]}}``
    (layers not named get 0), or a list with one of those per adapter.
    """
    from diffusers.loaders.unet_loader_utils import _maybe_expand_lora_scales

    configs = scale if isinstance(scale, list) else [scale]
    if len(configs) == 1:
        configs = configs * count
    if len(configs) != count:
        raise ValueError(f"{len(configs)} scales for {count} loaded adapters")
    configs = _maybe_expand_lora_scales(unet, configs, default_scale=0.0)
    for name, branch in image_branches(unet).items():
        for i, config in enumerate(configs):
            if isinstance(config, dict):
                for prefix, value in config.items():
                    if name.startswith(prefix):
                        branch.scale[i] = value
            else:
                branch.scale[i] = config


# ------------------------------------------------------------ pipeline
def _as_image_list(value) -> list:
    if isinstance(value, PIL.Image.Image):
        return [value]
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, PIL.Image.Image) for v in value):
        return list(value)
    raise TypeError("each adapter's image prompt must be a PIL image or a non-empty list of PIL images")


class ImagePromptAdapterMixin:
    """``load_ip_adapter`` / ``set_ip_adapter_scale`` / ``unload_ip_adapter`` on imageprompt pipelines.

    Same calls as diffusers' ``IPAdapterMixin``; the adapters' image encoders are
    kept apart from the pipeline's ``image_encoder`` (SD-IPC's CLIP).
    """

    @property
    def image_adapters(self) -> list:
        return getattr(self, "_image_adapters", [])

    def _install(self, adapters: list) -> None:
        self._image_adapters = list(adapters)
        install_adapters(self.unet, self._image_adapters)

    def load_ip_adapter(self, pretrained_model_name_or_path_or_dict, subfolder=None, weight_name=None,
                        image_encoder_folder: str | None = "image_encoder", image_encoder=None,
                        local_files_only: bool | None = None):
        """Load official IP-Adapter checkpoints (replacing any loaded before; an SD-IPC branch is kept).

        Args:
            pretrained_model_name_or_path_or_dict: hub id, folder, weight file, a state dict, or a list of these.
            subfolder / weight_name: where the file lies in the repository or folder (lists allowed).
            image_encoder_folder: the encoder folder next to the weights (``"image_encoder"``), or a path with ``/``
                from the repository root.
            image_encoder: a folder or hub id of a ``CLIPVisionModelWithProjection``, or a model, instead.
        """
        sources = pretrained_model_name_or_path_or_dict
        sources = sources if isinstance(sources, list) else [sources]
        names = weight_name if isinstance(weight_name, list) else [weight_name] * len(sources)
        if len(sources) == 1 and len(names) > 1:
            sources = sources * len(names)
        subs = subfolder if isinstance(subfolder, list) else [subfolder] * len(sources)
        if not len(sources) == len(names) == len(subs):
            raise ValueError("give as many weight names and subfolders as adapters")
        encoders, adapters = {}, []
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
            if key not in encoders:
                encoders[key] = find_image_encoder(str(source), weight_file, sub, image_encoder_folder, image_encoder,
                                                   self.unet.dtype, local_files_only)
            encoder, processor, _ = encoders[key]
            adapters.append(build_adapter(state, self.unet, encoder, processor, name=where, where=where))
        keep = [a for a in self.image_adapters if not isinstance(a, IPAdapter)]
        self._install(adapters + keep)

    def set_ip_adapter_scale(self, scale) -> None:
        """A float, an InstantStyle per-block dict, or a list of those (one per adapter, in load order)."""
        if not self.image_adapters:
            raise ValueError("no image adapter is loaded")
        set_branch_scales(self.unet, scale, len(self.image_adapters))

    def unload_ip_adapter(self) -> None:
        """Remove every image adapter (and the SD-IPC branch); the UNet is plain again."""
        self._install([])

    def check_ip_adapter_inputs(self, ip_adapter_image, ip_adapter_image_embeds, negative_ip_adapter_image):
        count = len(self.image_adapters)
        if ip_adapter_image is not None and ip_adapter_image_embeds is not None:
            raise ValueError("give `ip_adapter_image` or `ip_adapter_image_embeds`, not both")
        given = ip_adapter_image if ip_adapter_image is not None else ip_adapter_image_embeds
        if given is None:
            if count:
                raise ValueError(f"{count} image adapter(s) loaded: pass `ip_adapter_image` (or "
                                 "`ip_adapter_image_embeds`), or call `unload_ip_adapter()`")
            if negative_ip_adapter_image is not None:
                raise ValueError("`negative_ip_adapter_image` needs `ip_adapter_image`")
            return
        if not count:
            raise ValueError("`ip_adapter_image` needs an adapter: call `load_ip_adapter(...)` first")
        for name, value in (("ip_adapter_image", ip_adapter_image), ("negative_ip_adapter_image",
                                                                     negative_ip_adapter_image)):
            if value is None:
                continue
            per_adapter = value if isinstance(value, list) and count > 1 else [value]
            if len(per_adapter) != count:
                raise ValueError(f"`{name}` has {len(per_adapter)} entries for {count} loaded adapters")
            for entry in per_adapter:
                _as_image_list(entry)
        if ip_adapter_image_embeds is not None and (not isinstance(ip_adapter_image_embeds, list)
                                                    or len(ip_adapter_image_embeds) != count):
            raise ValueError(f"`ip_adapter_image_embeds` must be a list of {count} tensors, one per adapter")

    @torch.no_grad()
    def prepare_ip_adapter_image_embeds(self, ip_adapter_image, ip_adapter_image_embeds, device, batch: int,
                                        do_classifier_free_guidance: bool, negative_ip_adapter_image=None):
        """``added_cond_kwargs["image_embeds"]``: per adapter ``(batch [x2 for CFG], num_images, ...)``.

        Images per adapter follow diffusers: with one adapter ``ip_adapter_image``
        is an image or a list of images; with several, one such entry per adapter.
        Precomputed ``ip_adapter_image_embeds`` hold ``[negative, positive]`` along
        dim 0 under classifier-free guidance, as diffusers' do.
        """
        adapters = self.image_adapters
        pairs = []
        if ip_adapter_image_embeds is None:
            images = ip_adapter_image if len(adapters) > 1 else [ip_adapter_image]
            negatives = (negative_ip_adapter_image if len(adapters) > 1 else [negative_ip_adapter_image]) \
                if negative_ip_adapter_image is not None else [None] * len(adapters)
            for adapter, imgs, negs in zip(adapters, images, negatives):
                imgs = _as_image_list(imgs)
                negs = None if negs is None else _as_image_list(negs)
                if negs is not None and len(negs) not in (1, len(imgs)):
                    raise ValueError(f"{len(negs)} negative image prompts for {len(imgs)} image prompts")
                pos, neg = adapter.encode(self, imgs, negs, device)
                if neg.shape[0] != pos.shape[0]:
                    neg = neg.expand(pos.shape[0], *neg.shape[1:])
                pairs.append((pos[None], neg[None]))
        else:
            for embeds in ip_adapter_image_embeds:
                embeds = embeds.to(device=device, dtype=self.unet.dtype)
                if do_classifier_free_guidance:
                    neg, pos = embeds.chunk(2)
                else:
                    pos, neg = embeds, None
                pairs.append((pos, neg))
        out = []
        for pos, neg in pairs:
            if pos.shape[0] not in (1, batch):
                raise ValueError(f"image embeds for {pos.shape[0]} rows; expected 1 or {batch}")
            pos = pos.expand(batch, *pos.shape[1:])
            if do_classifier_free_guidance:
                out.append(torch.cat([neg.expand(batch, *neg.shape[1:]), pos]))
            else:
                out.append(pos)
        return out
