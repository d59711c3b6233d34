"""Stable Diffusion prompted by images through SD-IPC's closed-form conversion.

One pipeline, three uses, chosen by the inputs:

- ``image`` only: **variation**. The conditioning is the empty prompt's BOS
  state followed by the converted image state ``h`` at positions 1..76.
- ``image`` and ``prompt``: **editing**. The prompt is encoded as usual and
  positions EOS..76 become ``h + alpha * text_state``.
- ``prompt`` only: ordinary text-to-image, exactly diffusers' ``StableDiffusionPipeline``.

It *is* diffusers' ``StableDiffusionPipeline``: prompt encoding, latents, the loop,
decoding, the loaders (LoRA, textual inversion, single file), FreeU, offloading, the
step properties, ``interrupt`` and ``callback_on_step_end`` are inherited. What is
imageprompt's: the conditioning (SD-IPC, passed to diffusers as ``prompt_embeds``),
the attention processors (:mod:`imageprompt.attention`), and per-step logic through
diffusers' callback (:mod:`imageprompt.steps`).

Image prompts through decoupled cross-attention (IP-Adapter, or the training-free
SD-IPC branch) add to any of these: ``pipe.load_ip_adapter(...)``, then
``ip_adapter_image=`` (:mod:`imageprompt.ip_adapter`).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from imageprompt.pipelines.adapter_mixin import ImagePromptAdapterMixin
from imageprompt.pipelines.toolbox import call_arguments, shared_modules, toolbox_arguments, toolbox_pipeline
from transformers import CLIPImageProcessor, CLIPTextModel, CLIPTokenizer, CLIPVisionModelWithProjection

from imageprompt.attach import attach
from imageprompt.attention import check_processors, imageprompt_processors, set_imageprompt_attention
from imageprompt.conversion import SDIPCConverter, edit_embeds, eos_positions, variation_embeds
from imageprompt.images import MAX_PROMPT_CHARS, to_rgb
from imageprompt.ip_adapter import image_branches, install_adapters
from imageprompt.toolbox import ToolboxSettings


@dataclass
class ImagePromptPipelineOutput(BaseOutput):
    """``images``: PIL images, a numpy array or a tensor, as ``output_type`` asks."""

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor


LOADED_NAMES = ("model_name", "clip_name", "clip_2_name", "vae_name")  # set by load_pipeline


def legacy_names(parts: dict) -> dict:
    """Folders saved before SD-IPC's CLIP had components of its own held it in ``image_encoder`` (and SDXL's bigG
    in ``image_encoder_2``), beside a ``converter``: give them their names (in place; returns ``parts``)."""
    if parts.get("converter") is not None and parts.get("sdipc_image_encoder") is None \
            and parts.get("image_encoder") is not None:
        parts["sdipc_image_encoder"], parts["image_encoder"] = parts["image_encoder"], None
        if parts.get("image_encoder_2") is not None:
            parts["sdipc_image_encoder_2"] = parts.pop("image_encoder_2")
    return parts



@contextlib.contextmanager
def visiting(module: torch.nn.Module, device, home):
    """``module`` on ``device`` for the ``with`` block, then at ``home`` (None: it stays on ``device``)."""
    module.to(device)
    try:
        yield module
    finally:
        if home is not None and torch.device(home) != torch.device(device):
            module.to(home)


class ImagePromptMixin(ImagePromptAdapterMixin):
    """What imageprompt adds to a diffusers Stable Diffusion pipeline (SD 1.x or SDXL): SD-IPC's conditioning,
    its processors on the UNet, and :meth:`sample`, which runs the diffusers parent's ``__call__`` with the
    techniques' per-step hooks.

    ``vision_tower_home``: where SD-IPC's CLIP vision tower(s) wait between encodings, ``"cpu"`` by default: on a GPU
    the tower visits it for the encoding only, so sampling's peak memory is a plain pipeline's (the price: moving
    the tower's weights in and out each call). None: the tower stays where the pipeline put it.
    """

    vision_tower_home: str | None = "cpu"

    @classmethod
    def from_pipe(cls, pipeline, **kwargs):
        """A pipeline of this class over ``pipeline``'s modules (no copies), as diffusers' ``from_pipe``; ``kwargs``
        replace components or config values.

        Without ``dtype`` the modules are not cast: diffusers' ``from_pipe`` casts them to float32 unless told
        otherwise, which would change the original pipeline's modules too (and diffusers 0.42 logs a float32
        notice for each cast module). With ``dtype``, diffusers' ``from_pipe`` runs as it is.
        """
        if kwargs.get("dtype") is not None or kwargs.get("torch_dtype") is not None:
            pipe = super().from_pipe(pipeline, **kwargs)
        else:
            pipe = shared_modules(cls, pipeline, **kwargs)
        for name in LOADED_NAMES:  # what the outputs record of where the modules came from
            if hasattr(pipeline, name):
                setattr(pipe, name, getattr(pipeline, name))
        return pipe

    # ------------------------------------------------------------ attention
    def set_attention(self, backend: str = "sdpa") -> None:
        """Route every UNet attention layer through imageprompt's processors (``"sdpa"`` or ``"xformers"``).

        After diffusers' ``set_attn_processor`` replaced them, the loaded image adapters come back at scale 1.
        """
        lost = self.image_adapters and not image_branches(self.unet)
        set_imageprompt_attention(self.unet, backend)
        if lost:
            install_adapters(self.unet, self.image_adapters)

    def enable_xformers_memory_efficient_attention(self, attention_op=None) -> None:
        """xformers in imageprompt's processors (diffusers' switch would replace them with its own)."""
        if attention_op is not None:
            raise ValueError("imageprompt's processors call xformers' default kernel: leave `attention_op` out")
        self.set_attention("xformers")

    def disable_xformers_memory_efficient_attention(self) -> None:
        """PyTorch SDPA in imageprompt's processors (diffusers' switch would replace them with its own)."""
        self.set_attention("sdpa")

    def fuse_qkv_projections(self, unet: bool = True, vae: bool = True) -> None:
        """Refused for the UNet: fused projections need diffusers' fused processors, which would replace
        imageprompt's (and every technique on them). The VAE's are fused as diffusers does."""
        if unet:
            raise ValueError("imageprompt's attention processors read to_q/to_k/to_v apart: fuse only the VAE's "
                             "projections, `pipe.fuse_qkv_projections(unet=False)`")
        super().fuse_qkv_projections(unet=False, vae=vae)

    @property
    def model_max_length(self) -> int:
        return self.tokenizer.model_max_length

    # --------------------------------------------------------------- encoding
    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        """Token ids padded to the context length; prompts that are too long are truncated with a warning.

        Each prompt is first cut to :data:`~imageprompt.images.MAX_PROMPT_CHARS` characters: CLIP reads at most
        77 tokens, and tokenizing megabytes of text in full only costs time and memory. Textual-inversion tokens
        are expanded first, as diffusers' ``encode_prompt`` does.
        """
        n = self.model_max_length
        prompts = [p[:MAX_PROMPT_CHARS] if isinstance(p, str) else p for p in prompts]
        prompts = self.maybe_convert_prompt(prompts, self.tokenizer)
        full = self.tokenizer(prompts, padding="longest", truncation=False).input_ids
        for ids in full:
            if len(ids) > n:
                dropped = self.tokenizer.decode(ids[n - 1 : -1]).strip()
                warnings.warn(
                    f"prompt has {len(ids) - 2} tokens; only the first {n - 2} are used "
                    f"(dropped: {dropped[:60]!r}{'...' if len(dropped) > 60 else ''})",
                    stacklevel=3,
                )
        return self.tokenizer(
            prompts, padding="max_length", max_length=n, truncation=True, return_tensors="pt"
        ).input_ids

    @torch.no_grad()
    def encode_text(self, prompts: list[str], device, clip_skip: int | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Text states ``(B, 77, D)`` through diffusers' ``encode_prompt`` (LoRA, textual inversion, ``clip_skip``)
        and the token ids (EOS positions)."""
        ids = self.tokenize(prompts).to(device)
        prompts = [p[:MAX_PROMPT_CHARS] for p in prompts]
        if clip_skip is not None and not hasattr(self.text_encoder, "text_model"):
            # diffusers 0.42 reads `text_encoder.text_model.final_layer_norm`, gone from transformers 5's CLIP
            hidden = self.text_encoder(self.tokenize(prompts).to(device), output_hidden_states=True).hidden_states
            return self.text_encoder.final_layer_norm(hidden[-(clip_skip + 1)]).to(dtype=self.unet.dtype), ids
        states = self.encode_prompt(prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False,
                                    clip_skip=clip_skip)[0]
        return states.to(dtype=self.unet.dtype), ids

    @torch.no_grad()
    def encode_images(self, images: list[PIL.Image.Image], device) -> torch.Tensor:
        """CLIP image embeddings ``e = pooler_output @ W_v.T``, shape ``(B, projection_dim)``."""
        encoder = self.sdipc_image_encoder
        if encoder is None:
            raise ValueError("SD-IPC needs its CLIP (`sdipc_image_encoder`): load the model with "
                             "imageprompt.load_pipeline or from_pretrained(..., clip=...)")
        processor = self.feature_extractor
        if processor is None or processor.crop_size.get("height", encoder.config.image_size) != \
                encoder.config.image_size:  # CLIP's own preprocessing, at the encoder's input size
            size = encoder.config.image_size
            processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
        pixels = processor(images=[to_rgb(im) for im in images], return_tensors="pt").pixel_values
        with visiting(encoder, device, self.vision_tower_home):
            return encoder(pixels.to(device=device, dtype=encoder.dtype)).image_embeds

    @torch.no_grad()
    def convert_images(self, images: list[PIL.Image.Image], device) -> torch.Tensor:
        """SD-IPC: images -> text-encoder states ``h`` of shape ``(B, D)`` (the conversion in float32)."""
        e = self.encode_images(images, device)
        return self.converter(e.float().to(self.converter.device)).to(device=device, dtype=self.unet.dtype)

    @torch.no_grad()
    def image_prompt_embeds(
        self, images: list[PIL.Image.Image], prompts: list[str] | None, alpha: float, device,
        clip_skip: int | None = None,
    ) -> torch.Tensor:
        """Conditioning for variation (``prompts`` None) or editing, one row per image."""
        h = self.convert_images(images, device)
        if prompts is None:
            empty, _ = self.encode_text([""], device, clip_skip)
            return variation_embeds(h, empty[0, 0], length=empty.shape[1])
        states, ids = self.encode_text(prompts, device, clip_skip)
        return edit_embeds(h, states, eos_positions(ids, self.tokenizer.eos_token_id), alpha)

    def check_image_prompt_inputs(self, image, prompt, prompt_embeds, alpha):
        """SD-IPC's inputs; diffusers' ``check_inputs`` checks the rest when the parent's ``__call__`` runs."""
        if image is None and prompt is None and prompt_embeds is None:
            raise ValueError("give an `image` (variation), an `image` and a `prompt` (editing), or a `prompt`")
        if prompt_embeds is not None and (image is not None or prompt is not None):
            raise ValueError("`prompt_embeds` replaces `image` and `prompt`; give one or the other")
        if image is not None:
            images = image if isinstance(image, (list, tuple)) else [image]
            if not images or not all(isinstance(im, PIL.Image.Image) for im in images):
                raise TypeError("`image` must be a PIL image or a non-empty list of PIL images")
        if prompt is not None and not isinstance(prompt, (str, list)):
            raise TypeError(f"`prompt` must be a string or a list of strings, got {type(prompt).__name__}")
        if image is not None and isinstance(prompt, list):
            images = image if isinstance(image, (list, tuple)) else [image]
            if len(prompt) not in (1, len(images)):
                raise ValueError(f"{len(prompt)} prompts for {len(images)} images: give one prompt or one per image")
        if not np.isfinite(alpha):
            raise ValueError(f"`alpha` must be a finite number, got {alpha}")

    def check_sampling_inputs(self, num_images_per_prompt=1, num_inference_steps=50, guidance_scale=7.5,
                              height=None, width=None, clip_skip=None, guidance_rescale=0.0):
        """One-line errors for what diffusers would only fail on deep in the loop."""
        for name, value in (("height", height), ("width", width)):
            if value is not None and (value <= 0 or value % self.vae_scale_factor):
                raise ValueError(f"`{name}` must be a positive multiple of {self.vae_scale_factor}, got {value}")
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"`num_images_per_prompt` must be a positive integer, got {num_images_per_prompt}")
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"`num_inference_steps` must be a positive integer, got {num_inference_steps}")
        if guidance_scale < 0:
            raise ValueError(f"`guidance_scale` must be >= 0, got {guidance_scale}")
        if not 0.0 <= guidance_rescale <= 1.0:
            raise ValueError(f"`guidance_rescale` must be in [0, 1], got {guidance_rescale}")
        layers = self.text_encoder.config.num_hidden_layers
        if clip_skip is not None and not (isinstance(clip_skip, int) and 0 <= clip_skip < layers):
            raise ValueError(f"`clip_skip` must be an integer in [0, {layers - 1}], got {clip_skip}")

    # --------------------------------------------------------------- sampling
    def shared_noise(self, rows: int, height: int, width: int, dtype, generator=None, latents=None) -> torch.Tensor:
        """One starting noise ``(1, C, h, w)`` (or ``latents``) repeated for ``rows`` prompts: the edits of
        prompt-to-prompt and MasaCtrl start where their source starts."""
        shape = (1, self.unet.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=self._execution_device, dtype=dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"`latents` has shape {tuple(latents.shape)}, expected {shape} (one noise, shared)")
        return latents.to(device=self._execution_device, dtype=dtype).expand(rows, -1, -1, -1).clone()

    def decode(self, latents, output_type="pil"):
        """Latents to images, as the parent's ``__call__`` decodes them."""
        if output_type == "latent":
            return latents
        image = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False)[0]
        return self.image_processor.postprocess(image, output_type=output_type)

    def sample(self, *, controller=None, before_step=(), after_step=None, tensor_inputs=("latents",),
               callback_on_step_end=None, callback_on_step_end_tensor_inputs=("latents",), ip_adapter_image=None,
               ip_adapter_image_embeds=None, negative_ip_adapter_image=None, num_inference_steps: int = 50,
               timesteps=None, sigmas=None, guidance_scale: float = 7.5, num_images_per_prompt: int = 1,
               controlnet=None, toolbox: ToolboxSettings | None = None, **kwargs):
        """The diffusers parent's ``__call__`` with ``controller`` and imageprompt's hooks attached
        (:func:`imageprompt.attach.attach`); with ``controlnet`` or a ``toolbox`` that has images, diffusers' own
        ControlNet / img2img / inpainting pipeline over these modules instead (:mod:`imageprompt.pipelines.toolbox`).

        ``before_step(step)`` / ``after_step(pipe, step, tensors)`` count denoising steps, whatever the scheduler's
        order (``after_step`` replaces the controller's ``end_step``); the image adapters' step windows are told the
        step the same way. Image prompts are encoded here (with ``negative_ip_adapter_image``, which diffusers does
        not take) and passed as ``ip_adapter_image_embeds``. Returns the pipeline's output.
        """
        check_processors(self.unet, needed=bool(self.image_adapters))
        if self.image_adapters and not image_branches(self.unet):  # processors replaced, then reinstalled bare
            raise ValueError("the image adapters lost their attention branches (diffusers' `set_attn_processor` "
                             "replaced imageprompt's processors): call `pipe.set_attention('sdpa')`")
        self.check_ip_adapter_inputs(ip_adapter_image, ip_adapter_image_embeds, negative_ip_adapter_image)
        negative = kwargs.get("negative_prompt_embeds")
        if negative is not None and kwargs.get("prompt_embeds") is None:  # diffusers checks it only against those
            expected = (self.conditioning_rows(kwargs), self.model_max_length)
            if tuple(negative.shape[:2]) != expected:
                raise ValueError(f"`negative_prompt_embeds` has shape {tuple(negative.shape)}; expected "
                                 f"{expected + (negative.shape[-1],)}")
        target, call = self, super().__call__
        if controlnet is not None or (toolbox is not None and toolbox.active):
            toolbox = toolbox or ToolboxSettings()
            toolbox.check_size(kwargs.get("height"), kwargs.get("width"))
            target = toolbox_pipeline(self, toolbox, controlnet)
            kwargs.update(toolbox_arguments(toolbox, controlnet))
            call = target.__call__
        if self.image_adapters:  # diffusers' own pipelines repeat the embeddings per image themselves
            rows = self.conditioning_rows(kwargs) * (num_images_per_prompt if target is self else 1)
            ip_adapter_image_embeds = self.prepare_ip_adapter_image_embeds(
                ip_adapter_image, ip_adapter_image_embeds, self._execution_device, rows, guidance_scale > 1.0,
                negative_ip_adapter_image)
        args = dict(num_inference_steps=num_inference_steps, timesteps=timesteps, sigmas=sigmas,
                    guidance_scale=guidance_scale, num_images_per_prompt=num_images_per_prompt,
                    ip_adapter_image_embeds=ip_adapter_image_embeds, **kwargs)
        if target is not self:
            args = call_arguments(target, args)
        with attach(target, controller, before_step=before_step, after_step=after_step, tensor_inputs=tensor_inputs,
                    callback_on_step_end=callback_on_step_end,
                    callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs) as hooks:
            return call(callback_on_step_end=hooks, **args)

    @staticmethod
    def conditioning_rows(kwargs) -> int:
        """Rows of the conditioning given to the parent's ``__call__`` (prompts or ``prompt_embeds``)."""
        prompt = kwargs.get("prompt")
        if prompt is not None:
            return 1 if isinstance(prompt, str) else len(prompt)
        return kwargs["prompt_embeds"].shape[0]

    def image_conditioning(self, image, prompt, alpha, device, clip_skip=None) -> dict:
        """The parent's conditioning arguments for ``image`` / ``prompt``: SD-IPC's ``prompt_embeds`` when an
        image is given, else the prompt itself (diffusers encodes it)."""
        if image is None:
            prompts = [p[:MAX_PROMPT_CHARS] for p in ([prompt] if isinstance(prompt, str) else prompt)]
            if clip_skip is not None:  # see encode_text: diffusers' clip_skip path fails on transformers 5
                return {"prompt_embeds": self.encode_text(prompts, device, clip_skip)[0]}
            self.tokenize(prompts)  # the truncation warning, as for the other paths
            return {"prompt": prompts}
        images = list(image) if isinstance(image, (list, tuple)) else [image]
        prompts = None if prompt is None else [prompt] if isinstance(prompt, str) else list(prompt)
        if prompts is not None and len(prompts) == 1:
            prompts = prompts * len(images)
        return {"prompt_embeds": self.image_prompt_embeds(images, prompts, alpha, device, clip_skip)}


class StableDiffusionImagePromptPipeline(ImagePromptMixin, StableDiffusionPipeline):
    model_cpu_offload_seq = "sdipc_image_encoder->image_encoder->text_encoder->unet->vae"
    _optional_components = ["safety_checker", "feature_extractor", "image_encoder", "sdipc_image_encoder", "converter"]

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
        sdipc_image_encoder: CLIPVisionModelWithProjection | None = None,
        converter: SDIPCConverter | None = None,
        feature_extractor: CLIPImageProcessor | None = None,
        image_encoder: CLIPVisionModelWithProjection | None = None,
        safety_checker=None,
        requires_safety_checker: bool = False,
    ):
        super().__init__(vae, text_encoder, tokenizer, unet, scheduler, safety_checker, feature_extractor,
                         image_encoder, requires_safety_checker)
        # SD-IPC's CLIP (vision tower and text projection): components diffusers lacks, apart from its
        # `image_encoder`, which holds the IP-Adapter's encoder as in diffusers
        self.register_modules(sdipc_image_encoder=sdipc_image_encoder, converter=converter)
        # imageprompt's processors on every layer; a UNet that has them keeps them, hooks and backend
        # included, so building a pipeline (or `from_pipe`) never changes a shared UNet.
        imageprompt_processors(self.unet)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, clip: str | None = None, **kwargs):
        """diffusers' ``from_pretrained``; ``clip`` adds the CLIP parts to a plain SD 1.x model.

        ``StableDiffusionImagePromptPipeline.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5",
        clip="openai/clip-vit-large-patch14")`` loads SD's components and takes the image encoder and the
        text projection from the CLIP model. A folder saved by this pipeline needs no ``clip``.
        """
        if clip is None:
            pipe = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
            parts = legacy_names(dict(pipe.components))
            if parts["sdipc_image_encoder"] is not pipe.sdipc_image_encoder:  # a folder saved by an earlier version
                pipe.register_modules(sdipc_image_encoder=parts["sdipc_image_encoder"], image_encoder=None)
            return pipe
        from imageprompt.conversion import SD1_EOS_NORM, is_sd1_text_encoder, measure_eos_norm
        from imageprompt.loading import load_clip_parts

        dtype = kwargs.get("dtype", kwargs.get("torch_dtype")) or torch.float32
        for name, part in load_clip_parts(clip, dtype).items():
            kwargs.setdefault(name, part)
        pipe = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        text_encoder = pipe.text_encoder
        scale = SD1_EOS_NORM if is_sd1_text_encoder(text_encoder) else measure_eos_norm(text_encoder, pipe.tokenizer)
        pipe.converter.register_to_config(scale=float(scale))
        return pipe

    @torch.no_grad()
    def __call__(
        self,
        image: PIL.Image.Image | list[PIL.Image.Image] | None = None,
        prompt: str | list[str] | None = None,
        alpha: float = 0.5,
        negative_prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        num_images_per_prompt: int = 1,
        prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
        ip_adapter_image=None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        negative_ip_adapter_image=None,
        guidance_rescale: float = 0.0,
        clip_skip: int | None = None,
        **kwargs,
    ):
        r"""Generate images from an image (variation), an image and text (editing), or text.

        Args:
            image: reference image(s). With no ``prompt``: variation.
            prompt: text; with ``image``, the edit instruction of SD-IPC editing.
            alpha: weight of the text states added to ``h`` at positions EOS..76 when editing.
            negative_prompt: the unconditional branch's prompt (default: the empty prompt).
            prompt_embeds: ready conditioning ``(B, 77, D)`` instead of ``image``/``prompt``.
            ip_adapter_image: image prompt(s) for the loaded adapters (diffusers' format: with several adapters,
                one image or list of images per adapter). Masks: ``cross_attention_kwargs={"ip_adapter_masks": ...}``.
            ip_adapter_image_embeds: precomputed image embeddings instead (``[negative, positive]`` along dim 0).
            negative_ip_adapter_image: image(s) for the unconditional branch instead of zeros / a zero image.
            **kwargs: the rest of diffusers' ``StableDiffusionPipeline.__call__`` (``negative_prompt_embeds``,
                ``generator``, ``latents``, ``eta``, ``timesteps``, ``sigmas``, ``cross_attention_kwargs``, ...).

        Returns:
            :class:`ImagePromptPipelineOutput` (or a tuple with ``return_dict=False``).
        """
        # 1. Check inputs (diffusers' own `check_inputs` runs in the parent's call)
        self.check_image_prompt_inputs(image, prompt, prompt_embeds, alpha)
        self.check_sampling_inputs(num_images_per_prompt, num_inference_steps, guidance_scale, height, width,
                                   clip_skip, guidance_rescale)

        # 2. Conditioning: SD-IPC's for an image, else the prompt (or `prompt_embeds`) as diffusers takes it
        if prompt_embeds is None:
            conditioning = self.image_conditioning(image, prompt, alpha, self._execution_device, clip_skip)
        else:
            conditioning = {"prompt_embeds": prompt_embeds}

        # 3. diffusers' sampling, with the image adapters' step windows
        out = self.sample(
            **conditioning, negative_prompt=negative_prompt, height=height, width=width,
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
            num_images_per_prompt=num_images_per_prompt, output_type=output_type,
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            ip_adapter_image=ip_adapter_image, ip_adapter_image_embeds=ip_adapter_image_embeds,
            negative_ip_adapter_image=negative_ip_adapter_image, guidance_rescale=guidance_rescale,
            clip_skip=None, **kwargs,  # clip_skip: applied to the conditioning above
        )
        if not return_dict:
            return (out.images,)
        return ImagePromptPipelineOutput(images=out.images)
