"""Our pipelines over diffusers' ControlNet, img2img and inpainting pipelines, and SD-IPC for any diffusers pipeline.

- :func:`toolbox_pipeline` builds diffusers' own pipeline class for what a call asks (ControlNet, init image,
  mask; SD 1.x or SDXL) over our pipeline's modules with diffusers' ``from_pipe`` (no copies), and
  :func:`toolbox_arguments` gives that class's arguments. ``ImagePromptMixin.sample`` calls it with the techniques
  attached (:func:`imageprompt.attach.attach`): every technique runs inside diffusers' loop of that pipeline.
- :func:`sdipc_embeds`: an image (and an edit text) as ``prompt_embeds`` / ``negative_prompt_embeds`` (and SDXL's
  pooled embeddings) for any diffusers Stable Diffusion pipeline.
- :func:`load_loras` and :func:`load_embeddings`: the command line's ``--lora`` and ``--embedding``, through
  diffusers' ``load_lora_weights`` / ``set_adapters`` and ``load_textual_inversion``.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import diffusers
import torch
from diffusers import ControlNetModel, MultiControlNetModel

from imageprompt.toolbox import ToolboxSettings, parse_lora

# (SDXL, ControlNet, init image, mask) -> diffusers' pipeline class
CLASSES = {
    (False, True, False, False): "StableDiffusionControlNetPipeline",
    (False, False, True, False): "StableDiffusionImg2ImgPipeline",
    (False, False, True, True): "StableDiffusionInpaintPipeline",
    (False, True, True, False): "StableDiffusionControlNetImg2ImgPipeline",
    (False, True, True, True): "StableDiffusionControlNetInpaintPipeline",
    (True, True, False, False): "StableDiffusionXLControlNetPipeline",
    (True, False, True, False): "StableDiffusionXLImg2ImgPipeline",
    (True, False, True, True): "StableDiffusionXLInpaintPipeline",
    (True, True, True, False): "StableDiffusionXLControlNetImg2ImgPipeline",
    (True, True, True, True): "StableDiffusionXLControlNetInpaintPipeline",
}


def is_xl(pipe) -> bool:
    return getattr(pipe, "text_encoder_2", None) is not None or getattr(pipe, "tokenizer_2", None) is not None


def controlnet_list(controlnet) -> list:
    if controlnet is None:
        return []
    if isinstance(controlnet, MultiControlNetModel):
        return list(controlnet.nets)
    return list(controlnet) if isinstance(controlnet, (list, tuple)) else [controlnet]


def toolbox_pipeline(pipe, settings: ToolboxSettings, controlnet=None):
    """diffusers' pipeline for ``settings`` (and ``controlnet``) over ``pipe``'s modules, in their dtype."""
    nets = controlnet_list(controlnet)
    settings.check_controlnets(nets, pipe.unet)
    key = (is_xl(pipe), bool(nets), settings.init_image is not None, settings.mask is not None)
    cls = getattr(diffusers, CLASSES[key])
    extra = {"controlnet": nets[0] if len(nets) == 1 else MultiControlNetModel(nets)} if nets else {}
    return shared_modules(cls, pipe, **extra)


def shared_modules(cls, pipeline, **kwargs):
    """A ``cls`` pipeline over ``pipeline``'s modules (no copies, no casts; diffusers' ``from_pipe`` casts them to
    float32 unless given a dtype, which changes them for ``pipeline`` too); ``kwargs`` replace components or config
    values."""
    names = [n for n in inspect.signature(cls.__init__).parameters if n not in ("self", "args", "kwargs")]
    given = {n: kwargs.pop(n) for n in names if n in kwargs}
    parts = {n: pipeline.components[n] for n in names if n in pipeline.components and n not in given}
    settings = {n: pipeline.config[n] for n in names if n not in parts and n not in given and n in pipeline.config}
    if kwargs:
        raise TypeError(f"{cls.__name__}.from_pipe got unexpected arguments: {', '.join(sorted(kwargs))}")
    pipe = cls(**parts, **settings, **given)
    pipe.set_progress_bar_config(**getattr(pipeline, "_progress_bar_config", {}))
    return pipe


def toolbox_arguments(settings: ToolboxSettings, controlnet=None) -> dict:
    """The arguments of :func:`toolbox_pipeline`'s class for ``settings``."""
    nets = controlnet_list(controlnet)
    args = {}
    if settings.init_image is not None:
        args.update(image=settings.init_image, strength=settings.strength)
        if settings.mask is not None:
            args["mask_image"] = settings.mask
    if nets:
        control = list(settings.control_images) if len(nets) > 1 else settings.control_images[0]
        scales = settings.control_scales
        args.update({"control_image" if settings.init_image is not None else "image": control,
                     "controlnet_conditioning_scale": list(scales) * (len(nets) // len(scales)) if len(nets) > 1
                     else scales[0],
                     "control_guidance_start": settings.control_start, "control_guidance_end": settings.control_end,
                     "guess_mode": settings.guess_mode})
    return args


@torch.no_grad()
def sdipc_embeds(pipe, image, prompt=None, alpha: float = 0.5, negative_prompt=None, clip_skip: int | None = None
                 ) -> dict:
    """SD-IPC's conditioning of ``image`` (a PIL image or a list) for any diffusers SD / SDXL pipeline:
    ``prompt_embeds`` and ``negative_prompt_embeds`` (SDXL: and the pooled pair), made by ``pipe``, one of our
    pipelines (it holds SD-IPC's CLIP and converter); the negative side is diffusers' ``encode_prompt``'s, as in
    our pipelines. ``prompt`` turns the variation into an edit of weight ``alpha``."""
    if image is None:
        raise ValueError("SD-IPC needs an image")
    device = pipe._execution_device
    cond = pipe.image_conditioning(image, prompt, alpha, device, clip_skip)
    rows = cond["prompt_embeds"].shape[0]
    # None as diffusers takes it: the empty prompt's states (SDXL: zeros, `force_zeros_for_empty_prompt`)
    negative = [negative_prompt] * rows if isinstance(negative_prompt, str) else negative_prompt
    if is_xl(pipe):
        out = pipe.encode_prompt(prompt=None, device=device, num_images_per_prompt=1, do_classifier_free_guidance=True,
                                 negative_prompt=negative, prompt_embeds=cond["prompt_embeds"],
                                 pooled_prompt_embeds=cond["pooled_prompt_embeds"])
        return dict(zip(("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds",
                         "negative_pooled_prompt_embeds"), out))
    out = pipe.encode_prompt(None, device, 1, True, negative, prompt_embeds=cond["prompt_embeds"])
    return {"prompt_embeds": out[0], "negative_prompt_embeds": out[1]}


def local_weights(path: str, what: str) -> tuple[str, str | None]:
    """``(folder, weight_name)`` of a local LoRA / embedding file or folder, safetensors only."""
    p = Path(path)
    if not p.exists():
        raise ValueError(f"{what} {path!r} not found")
    if p.is_file():
        if p.suffix != ".safetensors":
            raise ValueError(f"{what} {path!r} is not a .safetensors file (pickled weights are not loaded)")
        return str(p.parent), p.name
    return str(p), None


def load_loras(pipe, specs: list[str]) -> list[str]:
    """Load each ``PATH[:WEIGHT]`` with diffusers' ``load_lora_weights`` and weigh them with ``set_adapters``;
    returns the adapter names."""
    names, weights = [], []
    for i, spec in enumerate(specs):
        path, weight = parse_lora(spec)
        folder, name = local_weights(path, "LoRA")
        pipe.load_lora_weights(folder, weight_name=name, adapter_name=f"lora{i}", use_safetensors=True)
        names.append(f"lora{i}")
        weights.append(weight)
    if names:
        pipe.set_adapters(names, adapter_weights=weights)
    return names


def load_embeddings(pipe, paths: list[str]) -> None:
    """Textual-inversion embeddings (safetensors) with diffusers' ``load_textual_inversion``: the token is the one
    the file names. On SDXL the file's ``clip_l`` / ``clip_g`` go to each text encoder, as ``<FILE-STEM>``."""
    from safetensors.torch import load_file

    for path in paths:
        folder, name = local_weights(path, "embedding")
        file = Path(folder) / name if name else None
        if not is_xl(pipe):
            pipe.load_textual_inversion(folder, weight_name=name, use_safetensors=True)  # the file's own token
            continue
        if file is None:
            raise ValueError(f"embedding {path!r}: give the .safetensors file (SDXL's has clip_l and clip_g)")
        state = load_file(str(file))
        if not {"clip_l", "clip_g"} <= set(state):
            raise ValueError(f"embedding {path!r} has no clip_l and clip_g tensors, as SDXL's embeddings do")
        token = f"<{file.stem}>"
        pipe.load_textual_inversion(state["clip_l"], token=token, text_encoder=pipe.text_encoder,
                                    tokenizer=pipe.tokenizer)
        pipe.load_textual_inversion(state["clip_g"], token=token, text_encoder=pipe.text_encoder_2,
                                    tokenizer=pipe.tokenizer_2)


def load_controlnets(paths: list[str], dtype, device) -> list:
    """ControlNets from diffusers folders (or hub ids), safetensors."""
    nets = []
    for path in paths:
        try:
            nets.append(ControlNetModel.from_pretrained(path, torch_dtype=dtype, use_safetensors=True).to(device))
        except OSError as error:
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ValueError(f"ControlNet {path!r} could not be loaded: {first}") from None
    return nets


UNUSED = {"guidance_rescale": 0.0, "height": None, "width": None, "latents": None, "timesteps": None, "sigmas": None}


def call_arguments(target, kwargs: dict) -> dict:
    """``kwargs`` that ``target``'s ``__call__`` takes: those it lacks are dropped when unused (their default;
    height and width: the images' size, checked), else refused in one line."""
    accepted = inspect.signature(type(target).__call__).parameters
    out = {}
    for name, value in kwargs.items():
        if name in accepted:
            out[name] = value
        elif name in ("height", "width") or (name in UNUSED and (value is None or value == UNUSED[name])):
            continue
        else:
            raise ValueError(f"`{name}` does not work with {type(target).__name__} (diffusers' pipeline for the "
                             "ControlNet / init image / mask asked for)")
    return out
