"""Stable Diffusion prompted by images through SD-IPC's closed-form conversion.

One pipeline, three uses, chosen by the inputs:

- ``image`` only: **variation**. The conditioning is the empty prompt's BOS
  state followed by the converted image state ``h`` at positions 1..76.
- ``image`` and ``prompt``: **editing**. The prompt is encoded as usual and
  positions EOS..76 become ``h + alpha * text_state``.
- ``prompt`` only: ordinary text-to-image (what the edit is compared with).

Image prompts through decoupled cross-attention (IP-Adapter, or the training-free
SD-IPC branch) add to any of these: ``pipe.load_ip_adapter(...)``, then
``ip_adapter_image=`` (:mod:`imageprompt.ip_adapter`).

The UNet's attention runs through imageprompt's processors
(:mod:`imageprompt.attention`), so other techniques attach to the same layers.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg, retrieve_timesteps
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from imageprompt.pipelines.adapter_mixin import ImagePromptAdapterMixin
from transformers import CLIPImageProcessor, CLIPTextModel, CLIPTokenizer, CLIPVisionModelWithProjection

from imageprompt.attention import imageprompt_processors, set_attention_backend
from imageprompt.conversion import SDIPCConverter, edit_embeds, eos_positions, variation_embeds
from imageprompt.images import MAX_PROMPT_CHARS, to_rgb
from imageprompt.ip_adapter import set_adapter_step


@dataclass
class ImagePromptPipelineOutput(BaseOutput):
    """``images``: PIL images, a numpy array or a tensor, as ``output_type`` asks."""

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor


LOADED_NAMES = ("model_name", "clip_name", "clip_2_name", "vae_name")  # set by load_pipeline


class StableDiffusionImagePromptPipeline(DiffusionPipeline, ImagePromptAdapterMixin):
    model_cpu_offload_seq = "image_encoder->text_encoder->unet->vae"
    _optional_components = ["feature_extractor"]
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
        image_encoder: CLIPVisionModelWithProjection,
        converter: SDIPCConverter,
        feature_extractor: CLIPImageProcessor | None = None,
    ):
        super().__init__()
        self.register_modules(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            image_encoder=image_encoder,
            converter=converter,
            feature_extractor=feature_extractor,
        )
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        # imageprompt's processors on every layer; a UNet that has them keeps them, hooks and backend
        # included, so building a pipeline (or `from_pipe`) never changes a shared UNet.
        imageprompt_processors(self.unet)

    # ------------------------------------------------------------------ setup
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, clip: str | None = None, **kwargs):
        """diffusers' ``from_pretrained``; ``clip`` adds the CLIP parts to a plain SD 1.x model.

        ``StableDiffusionImagePromptPipeline.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5",
        clip="openai/clip-vit-large-patch14")`` loads SD's components and takes the image encoder and the
        text projection from the CLIP model. A folder saved by this pipeline needs no ``clip``.
        """
        if clip is None:
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
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

    @classmethod
    def from_pipe(cls, pipeline, **kwargs):
        """diffusers' ``from_pipe`` (the new pipeline shares the modules), keeping their dtype: diffusers
        casts the shared modules to ``dtype``, float32 unless given, which would change the original too."""
        if kwargs.get("dtype") is None and kwargs.get("torch_dtype") is None:
            kwargs["dtype"] = pipeline.unet.dtype
        pipe = super().from_pipe(pipeline, **kwargs)
        for name in LOADED_NAMES:  # what the outputs record of where the modules came from
            if hasattr(pipeline, name):
                setattr(pipe, name, getattr(pipeline, name))
        return pipe

    def set_attention(self, backend: str = "sdpa") -> None:
        """Route every UNet attention layer through imageprompt's processors (``"sdpa"`` or ``"xformers"``)."""
        set_attention_backend(self.unet, backend)

    @property
    def model_max_length(self) -> int:
        return self.tokenizer.model_max_length

    # --------------------------------------------------------------- encoding
    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        """Token ids padded to the context length; prompts that are too long are truncated with a warning.

        Each prompt is first cut to :data:`~imageprompt.images.MAX_PROMPT_CHARS` characters: CLIP reads at most
        77 tokens, and tokenizing megabytes of text in full only costs time and memory.
        """
        n = self.model_max_length
        prompts = [p[:MAX_PROMPT_CHARS] if isinstance(p, str) else p for p in prompts]
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
        """Text states ``(B, 77, D)`` and token ids. ``clip_skip``: layers skipped from the end, as
        in diffusers' ``encode_prompt`` (the earlier layer's states, through the final layer norm)."""
        ids = self.tokenize(prompts).to(device)
        if clip_skip is None:
            states = self.text_encoder(ids)[0]
        else:
            hidden = self.text_encoder(ids, output_hidden_states=True).hidden_states[-(clip_skip + 1)]
            tower = getattr(self.text_encoder, "text_model", self.text_encoder)  # transformers 4 wraps it
            states = tower.final_layer_norm(hidden)
        return states.to(dtype=self.unet.dtype), ids

    @torch.no_grad()
    def encode_images(self, images: list[PIL.Image.Image], device) -> torch.Tensor:
        """CLIP image embeddings ``e = pooler_output @ W_v.T``, shape ``(B, projection_dim)``."""
        processor = self.feature_extractor
        if processor is None:  # CLIP's own preprocessing, at the encoder's input size
            size = self.image_encoder.config.image_size
            processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
        pixels = processor(images=[to_rgb(im) for im in images], return_tensors="pt").pixel_values
        pixels = pixels.to(device=device, dtype=self.image_encoder.dtype)
        return self.image_encoder(pixels).image_embeds

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

    # ---------------------------------------------------------------- checks
    def check_inputs(self, image, prompt, negative_prompt, height, width, num_images_per_prompt, guidance_scale,
                     num_inference_steps, alpha, prompt_embeds, callback_on_step_end_tensor_inputs,
                     negative_prompt_embeds=None, guidance_rescale=0.0, clip_skip=None):
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
        if negative_prompt is not None and not isinstance(negative_prompt, (str, list)):
            raise TypeError("`negative_prompt` must be a string or a list of strings")
        for name, value in (("height", height), ("width", width)):
            if value is not None and (value <= 0 or value % self.vae_scale_factor):
                raise ValueError(f"`{name}` must be a positive multiple of {self.vae_scale_factor}, got {value}")
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"`num_images_per_prompt` must be a positive integer, got {num_images_per_prompt}")
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"`num_inference_steps` must be a positive integer, got {num_inference_steps}")
        if guidance_scale < 0:
            raise ValueError(f"`guidance_scale` must be >= 0, got {guidance_scale}")
        if not np.isfinite(alpha):
            raise ValueError(f"`alpha` must be a finite number, got {alpha}")
        if negative_prompt_embeds is not None:
            if negative_prompt is not None:
                raise ValueError("give `negative_prompt` or `negative_prompt_embeds`, not both")
            if prompt_embeds is not None and negative_prompt_embeds.shape != prompt_embeds.shape:
                raise ValueError(f"`negative_prompt_embeds` has shape {tuple(negative_prompt_embeds.shape)}, "
                                 f"`prompt_embeds` {tuple(prompt_embeds.shape)}: they must match")
        if not 0.0 <= guidance_rescale <= 1.0:
            raise ValueError(f"`guidance_rescale` must be in [0, 1], got {guidance_rescale}")
        layers = self.text_encoder.config.num_hidden_layers
        if clip_skip is not None and not (isinstance(clip_skip, int) and 0 <= clip_skip < layers):
            raise ValueError(f"`clip_skip` must be an integer in [0, {layers - 1}], got {clip_skip}")
        unknown = set(callback_on_step_end_tensor_inputs or []) - set(self._callback_tensor_inputs)
        if unknown:
            raise ValueError(f"callback tensor inputs {sorted(unknown)} not in {self._callback_tensor_inputs}")

    # --------------------------------------------------------------- sampling
    def prepare_latents(self, batch, height, width, dtype, device, generator, latents=None):
        shape = (batch, self.unet.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if isinstance(generator, list) and len(generator) != batch:
            raise ValueError(f"{len(generator)} generators for a batch of {batch} images")
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        elif latents.shape != shape:
            raise ValueError(f"`latents` has shape {tuple(latents.shape)}, expected {shape}")
        return latents.to(device=device, dtype=dtype) * self.scheduler.init_noise_sigma

    def extra_step_kwargs(self, generator, eta):
        params = set(inspect.signature(self.scheduler.step).parameters)
        kwargs = {}
        if "eta" in params:
            kwargs["eta"] = eta
        if "generator" in params:
            kwargs["generator"] = generator
        return kwargs

    def denoise(self, latents, prompt_embeds, negative_prompt_embeds, timesteps, guidance_scale,
                extra_step_kwargs, cross_attention_kwargs=None, callback_on_step_end=None,
                callback_on_step_end_tensor_inputs=("latents",), added_cond_kwargs=None, guidance_rescale=0.0):
        """The sampling loop with classifier-free guidance; returns the final latents.

        Before each UNet call the image adapters are told the step (:func:`~imageprompt.ip_adapter.set_adapter_step`),
        so each applies only inside its step window.
        """
        do_cfg = guidance_scale > 1.0
        context = torch.cat([negative_prompt_embeds, prompt_embeds]) if do_cfg else prompt_embeds
        self._num_timesteps = len(timesteps)
        with self.progress_bar(total=len(timesteps)) as bar, _adapter_steps(self.unet):
            for i, t in enumerate(timesteps):
                set_adapter_step(self.unet, i, len(timesteps))
                model_input = torch.cat([latents] * 2) if do_cfg else latents
                model_input = self.scheduler.scale_model_input(model_input, t)
                noise = self.unet(
                    model_input, t, encoder_hidden_states=context, cross_attention_kwargs=cross_attention_kwargs,
                    added_cond_kwargs=added_cond_kwargs, return_dict=False,
                )[0]
                if do_cfg:
                    noise_uncond, noise_cond = noise.chunk(2)
                    noise = noise_uncond + guidance_scale * (noise_cond - noise_uncond)
                    if guidance_rescale > 0.0:  # Lin et al. 2023, Sec. 3.4, as diffusers applies it
                        noise = rescale_noise_cfg(noise, noise_cond, guidance_rescale=guidance_rescale)
                latents = self.scheduler.step(noise, t, latents, **extra_step_kwargs, return_dict=False)[0]
                if callback_on_step_end is not None:
                    local = {"latents": latents, "prompt_embeds": prompt_embeds,
                             "negative_prompt_embeds": negative_prompt_embeds}
                    out = callback_on_step_end(self, i, t, {k: local[k] for k in callback_on_step_end_tensor_inputs})
                    latents = out.pop("latents", latents)
                    prompt_embeds = out.pop("prompt_embeds", prompt_embeds)
                    negative_prompt_embeds = out.pop("negative_prompt_embeds", negative_prompt_embeds)
                    context = torch.cat([negative_prompt_embeds, prompt_embeds]) if do_cfg else prompt_embeds
                bar.update()
        return latents

    def decode(self, latents, output_type="pil"):
        if output_type == "latent":
            return latents
        image = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False)[0]
        return self.image_processor.postprocess(image, output_type=output_type)

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
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        timesteps: list[int] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
        ip_adapter_image=None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        negative_ip_adapter_image=None,
        guidance_rescale: float = 0.0,
        clip_skip: int | None = None,
    ):
        r"""Generate images from an image (variation), an image and text (editing), or text.

        Args:
            image: reference image(s). With no ``prompt``: variation.
            prompt: text; with ``image``, the edit instruction of SD-IPC editing.
            alpha: weight of the text states added to ``h`` at positions EOS..76 when editing.
            negative_prompt: the unconditional branch's prompt (default: the empty prompt).
            prompt_embeds: ready conditioning ``(B, 77, D)`` instead of ``image``/``prompt``.
            negative_prompt_embeds: ready unconditional states instead of ``negative_prompt``.
            generator: a ``torch.Generator`` or one per output image, for reproducible results.
            callback_on_step_end: ``fn(pipe, step, timestep, tensors) -> dict`` called after each step.
            ip_adapter_image: image prompt(s) for the loaded adapters (diffusers' format: with several adapters,
                one image or list of images per adapter). Masks: ``cross_attention_kwargs={"ip_adapter_masks": ...}``.
            ip_adapter_image_embeds: precomputed image embeddings instead (``[negative, positive]`` along dim 0).
            negative_ip_adapter_image: image(s) for the unconditional branch instead of zeros / a zero image.
            guidance_rescale: rescale of the guided prediction (Lin et al. 2023), as in diffusers (0: off).
            clip_skip: text-encoder layers to skip from the end, as in diffusers.

        Returns:
            :class:`ImagePromptPipelineOutput` (or a tuple with ``return_dict=False``).
        """
        # 0. Defaults
        height = height or self.unet.config.sample_size * self.vae_scale_factor
        width = width or self.unet.config.sample_size * self.vae_scale_factor

        # 1. Check inputs
        self.check_inputs(image, prompt, negative_prompt, height, width, num_images_per_prompt, guidance_scale,
                          num_inference_steps, alpha, prompt_embeds, callback_on_step_end_tensor_inputs,
                          negative_prompt_embeds, guidance_rescale, clip_skip)
        self.check_ip_adapter_inputs(ip_adapter_image, ip_adapter_image_embeds, negative_ip_adapter_image)
        device = self._execution_device

        # 2. Conditioning, one row per reference (image or prompt)
        images = None if image is None else list(image) if isinstance(image, (list, tuple)) else [image]
        prompts = None if prompt is None else [prompt] if isinstance(prompt, str) else list(prompt)
        if images is not None and prompts is not None and len(prompts) == 1:
            prompts = prompts * len(images)
        if prompt_embeds is not None:
            cond = prompt_embeds.to(device=device, dtype=self.unet.dtype)
        elif images is not None:
            cond = self.image_prompt_embeds(images, prompts, alpha, device, clip_skip)
        else:
            cond, _ = self.encode_text(prompts, device, clip_skip)
        rows = cond.shape[0]

        # 3. Unconditional branch: given states, the negative prompt, or the empty prompt
        if negative_prompt_embeds is not None:
            uncond = negative_prompt_embeds.to(device=device, dtype=self.unet.dtype)
            if uncond.shape != cond.shape:
                raise ValueError(f"`negative_prompt_embeds` has shape {tuple(uncond.shape)}, "
                                 f"expected {tuple(cond.shape)}")
        else:
            negatives = negative_prompt if isinstance(negative_prompt, list) else [negative_prompt or ""] * rows
            if len(negatives) != rows:
                raise ValueError(f"{len(negatives)} negative prompts for {rows} conditionings")
            uncond, _ = self.encode_text(negatives, device, clip_skip)

        # 4. Repeat for the images per reference
        cond = cond.repeat_interleave(num_images_per_prompt, dim=0)
        uncond = uncond.repeat_interleave(num_images_per_prompt, dim=0)
        batch = cond.shape[0]

        # 5. Timesteps and latents
        timesteps, num_inference_steps = retrieve_timesteps(self.scheduler, num_inference_steps, device, timesteps)
        latents = self.prepare_latents(batch, height, width, cond.dtype, device, generator, latents)
        added_cond_kwargs = None
        if self.image_adapters:  # image tokens for the decoupled cross-attention branches
            added_cond_kwargs = {"image_embeds": self.prepare_ip_adapter_image_embeds(
                ip_adapter_image, ip_adapter_image_embeds, device, batch, guidance_scale > 1.0,
                negative_ip_adapter_image)}

        # 6. Denoising loop
        latents = self.denoise(
            latents, cond, uncond, timesteps, guidance_scale, self.extra_step_kwargs(generator, eta),
            cross_attention_kwargs, callback_on_step_end, callback_on_step_end_tensor_inputs, added_cond_kwargs,
            guidance_rescale,
        )

        # 7. Decode
        images_out = self.decode(latents, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images_out,)
        return ImagePromptPipelineOutput(images=images_out)


@contextlib.contextmanager
def _adapter_steps(unet):
    """Outside the loop (also after an error in it) every adapter applies again."""
    try:
        yield
    finally:
        set_adapter_step(unet, None)
