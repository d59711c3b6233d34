"""Stable Diffusion XL prompted by images: SD-IPC's closed form on SDXL's two text encoders.

The XL counterpart of :class:`~imageprompt.pipelines.pipeline_sdipc.StableDiffusionImagePromptPipeline`,
built on diffusers' ``StableDiffusionXLPipeline`` (its ``encode_prompt`` and
``_get_add_time_ids`` are used as they are). Same three uses, chosen by the inputs:

- ``image`` only: **variation**. Token states: the empty prompt's BOS state, then the
  converted image state ``h`` (ViT-L part and bigG part, :class:`~imageprompt.conversion_xl.SDXLConverter`)
  at positions 1..76; pooled: bigG's image embedding.
- ``image`` and ``prompt``: **editing**. Positions EOS..76 become ``h + alpha * text_state``,
  and the pooled vector ``pooled_image + alpha * pooled_text``.
- ``prompt`` only: ordinary SDXL text-to-image.

IP-Adapters (``load_ip_adapter``, the official SDXL checkpoints) and the other techniques
attach to the UNet's imageprompt processors, as on SD 1.x.
"""

from __future__ import annotations

from collections.abc import Callable

import PIL.Image
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps
from diffusers.schedulers import KarrasDiffusionSchedulers
from imageprompt.pipelines.adapter_mixin import ImagePromptAdapterMixin
from imageprompt.pipelines.pipeline_sdipc import ImagePromptPipelineOutput, StableDiffusionImagePromptPipeline
from transformers import (
    CLIPImageProcessor,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionModelWithProjection,
)

from imageprompt.attention import imageprompt_processors
from imageprompt.conversion import edit_embeds, eos_positions, variation_embeds
from imageprompt.conversion_xl import SDXLConverter
from imageprompt.images import MAX_PROMPT_CHARS, to_rgb


def is_sdxl_unet(unet) -> bool:
    """SDXL's UNet adds the pooled text embedding and the size/crop numbers (``text_time``)."""
    return getattr(unet.config, "addition_embed_type", None) == "text_time"


class StableDiffusionXLImagePromptPipeline(StableDiffusionImagePromptPipeline, StableDiffusionXLPipeline):
    model_cpu_offload_seq = "image_encoder->image_encoder_2->text_encoder->text_encoder_2->unet->vae"
    _optional_components = ["feature_extractor", "image_encoder", "image_encoder_2", "converter"]
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        text_encoder_2: CLIPTextModelWithProjection,
        tokenizer: CLIPTokenizer,
        tokenizer_2: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
        image_encoder: CLIPVisionModelWithProjection | None = None,
        image_encoder_2: CLIPVisionModelWithProjection | None = None,
        converter: SDXLConverter | None = None,
        feature_extractor: CLIPImageProcessor | None = None,
        force_zeros_for_empty_prompt: bool = True,
    ):
        DiffusionPipeline.__init__(self)
        self.register_modules(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
                              tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler, image_encoder=image_encoder,
                              image_encoder_2=image_encoder_2, converter=converter,
                              feature_extractor=feature_extractor)
        self.register_to_config(force_zeros_for_empty_prompt=force_zeros_for_empty_prompt)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        self.default_sample_size = self.unet.config.sample_size
        self.watermark = None
        imageprompt_processors(self.unet)

    # diffusers' SDXL class defines these too; imageprompt's (adapters on the UNet's processors) must win
    prepare_ip_adapter_image_embeds = ImagePromptAdapterMixin.prepare_ip_adapter_image_embeds
    from_pretrained = classmethod(DiffusionPipeline.from_pretrained.__func__)

    # --------------------------------------------------------------- encoding
    @torch.no_grad()
    def encode_text_pooled(self, prompts: list[str], device, clip_skip: int | None = None):
        """``(states (B, 77, D_L + D_G), pooled (B, projection), ids)`` through diffusers' ``encode_prompt``."""
        prompts = [p[:MAX_PROMPT_CHARS] for p in prompts]  # CLIP reads 77 tokens: megabytes of text cost only time
        ids = self.tokenize(prompts).to(device)  # warns about truncation, gives the EOS positions
        states, _, pooled, _ = self.encode_prompt(prompts, device=device, do_classifier_free_guidance=False,
                                                  clip_skip=clip_skip)
        return states.to(self.unet.dtype), pooled.to(self.unet.dtype), ids

    @torch.no_grad()
    def encode_text(self, prompts: list[str], device, clip_skip: int | None = None):
        states, _, ids = self.encode_text_pooled(prompts, device, clip_skip)
        return states, ids

    def _check_sdipc_parts(self) -> None:
        missing = [n for n in ("image_encoder", "image_encoder_2", "converter") if getattr(self, n, None) is None]
        if missing:
            raise ValueError(f"SD-IPC on SDXL needs {', '.join(missing)}: load the model with "
                             "imageprompt.load_pipeline (it adds CLIP ViT-L and bigG), or pass them")

    @torch.no_grad()
    def encode_images(self, images: list[PIL.Image.Image], device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(e_L, e_G)``: projected image embeddings of the ViT-L and the bigG vision towers."""
        self._check_sdipc_parts()
        out = []
        for encoder in (self.image_encoder, self.image_encoder_2):
            processor = self.feature_extractor
            size = encoder.config.image_size
            if processor is None or processor.crop_size.get("height", size) != size:
                processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
            pixels = processor(images=[to_rgb(im) for im in images], return_tensors="pt").pixel_values
            out.append(encoder(pixels.to(device=device, dtype=encoder.dtype)).image_embeds)
        return out[0], out[1]

    @torch.no_grad()
    def convert_images_pooled(self, images: list[PIL.Image.Image], device) -> tuple[torch.Tensor, torch.Tensor]:
        """SD-IPC on SDXL: ``(h (B, D_L + D_G), pooled (B, projection))`` (the conversion in float32)."""
        e_l, e_g = self.encode_images(images, device)
        where = self.converter.device
        h, pooled = self.converter(e_l.float().to(where), e_g.float().to(where))
        return h.to(device=device, dtype=self.unet.dtype), pooled.to(device=device, dtype=self.unet.dtype)

    @torch.no_grad()
    def convert_images(self, images: list[PIL.Image.Image], device) -> torch.Tensor:
        return self.convert_images_pooled(images, device)[0]

    @torch.no_grad()
    def image_prompt_embeds_pooled(self, images, prompts, alpha: float, device, clip_skip: int | None = None):
        """``(states, pooled)`` for variation (``prompts`` None) or editing, one row per image."""
        h, pooled = self.convert_images_pooled(images, device)
        if prompts is None:
            empty, _, _ = self.encode_text_pooled([""], device, clip_skip)
            return variation_embeds(h, empty[0, 0], length=empty.shape[1]), pooled
        states, text_pooled, ids = self.encode_text_pooled(prompts, device, clip_skip)
        return edit_embeds(h, states, eos_positions(ids, self.tokenizer.eos_token_id), alpha), \
            pooled + alpha * text_pooled

    def image_prompt_embeds(self, images, prompts, alpha, device, clip_skip=None):
        return self.image_prompt_embeds_pooled(images, prompts, alpha, device, clip_skip)[0]

    def time_ids(self, height: int, width: int, original_size=None, crops_coords_top_left=(0, 0), target_size=None,
                 dtype=None) -> torch.Tensor:
        """SDXL's six size/crop numbers ``(1, 6)`` (diffusers' ``_get_add_time_ids``)."""
        projection = self.text_encoder_2.config.projection_dim if self.text_encoder_2 is not None else None
        return self._get_add_time_ids(tuple(original_size or (height, width)), tuple(crops_coords_top_left),
                                      tuple(target_size or (height, width)), dtype=dtype or self.unet.dtype,
                                      text_encoder_projection_dim=projection)

    def added_text_conditioning(self, pooled, negative_pooled, time_ids, do_cfg: bool, device) -> dict:
        """``added_cond_kwargs`` of the text: pooled embeddings and time ids, ``[negative, positive]`` under CFG."""
        rows = pooled.shape[0]
        text_embeds = torch.cat([negative_pooled, pooled]) if do_cfg else pooled
        time_ids = time_ids.to(device).repeat(2 * rows if do_cfg else rows, 1)
        return {"text_embeds": text_embeds.to(device=device, dtype=self.unet.dtype), "time_ids": time_ids}

    def decode(self, latents, output_type="pil"):
        """As diffusers' SDXL: a float16 VAE that asks for it (``force_upcast``) decodes in float32."""
        if output_type == "latent":
            return latents
        upcast = self.vae.dtype == torch.float16 and self.vae.config.force_upcast
        if upcast:
            self.vae.to(torch.float32)
            latents = latents.float()
        try:
            latents = latents.to(self.vae.dtype)
            image = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False)[0]
        finally:
            if upcast:
                self.vae.to(torch.float16)
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
        guidance_scale: float = 5.0,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
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
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
    ):
        r"""Generate images from an image (variation), an image and text (editing), or text, with SDXL.

        Arguments as :class:`StableDiffusionImagePromptPipeline`, plus SDXL's: ``pooled_prompt_embeds`` /
        ``negative_pooled_prompt_embeds`` (with ``prompt_embeds``), ``original_size``, ``crops_coords_top_left``,
        ``target_size`` (the micro-conditioning; default: the output size). With no ``negative_prompt`` the
        unconditional branch is zeros, as diffusers' SDXL does (``force_zeros_for_empty_prompt``).
        """
        # 0. Defaults
        height = height or self.default_sample_size * self.vae_scale_factor
        width = width or self.default_sample_size * self.vae_scale_factor

        # 1. Check inputs
        self.check_inputs(image, prompt, negative_prompt, height, width, num_images_per_prompt, guidance_scale,
                          num_inference_steps, alpha, prompt_embeds, callback_on_step_end_tensor_inputs,
                          negative_prompt_embeds, guidance_rescale, clip_skip)
        if prompt_embeds is not None and pooled_prompt_embeds is None:
            raise ValueError("with `prompt_embeds`, give `pooled_prompt_embeds` too (SDXL reads both)")
        if negative_prompt_embeds is not None and negative_pooled_prompt_embeds is None:
            raise ValueError("with `negative_prompt_embeds`, give `negative_pooled_prompt_embeds` too")
        self.check_ip_adapter_inputs(ip_adapter_image, ip_adapter_image_embeds, negative_ip_adapter_image)
        device = self._execution_device
        do_cfg = guidance_scale > 1.0

        # 2. Conditioning, one row per reference (image or prompt)
        images = None if image is None else list(image) if isinstance(image, (list, tuple)) else [image]
        prompts = None if prompt is None else [prompt] if isinstance(prompt, str) else list(prompt)
        if images is not None and prompts is not None and len(prompts) == 1:
            prompts = prompts * len(images)
        if prompt_embeds is not None:
            cond = prompt_embeds.to(device=device, dtype=self.unet.dtype)
            pooled = pooled_prompt_embeds.to(device=device, dtype=self.unet.dtype)
        elif images is not None:
            cond, pooled = self.image_prompt_embeds_pooled(images, prompts, alpha, device, clip_skip)
        else:
            cond, pooled, _ = self.encode_text_pooled(prompts, device, clip_skip)
        rows = cond.shape[0]

        # 3. Unconditional branch: given states, the negative prompt, or zeros (diffusers' SDXL default)
        if negative_prompt_embeds is not None:
            uncond = negative_prompt_embeds.to(device=device, dtype=self.unet.dtype)
            uncond_pooled = negative_pooled_prompt_embeds.to(device=device, dtype=self.unet.dtype)
        elif negative_prompt is None and self.config.force_zeros_for_empty_prompt:
            uncond, uncond_pooled = torch.zeros_like(cond), torch.zeros_like(pooled)
        else:
            negatives = negative_prompt if isinstance(negative_prompt, list) else [negative_prompt or ""] * rows
            if len(negatives) != rows:
                raise ValueError(f"{len(negatives)} negative prompts for {rows} conditionings")
            uncond, uncond_pooled, _ = self.encode_text_pooled(negatives, device, clip_skip)
        if uncond.shape != cond.shape:
            raise ValueError(f"`negative_prompt_embeds` has shape {tuple(uncond.shape)}, expected {tuple(cond.shape)}")

        # 4. Repeat for the images per reference
        cond, uncond, pooled, uncond_pooled = (x.repeat_interleave(num_images_per_prompt, dim=0)
                                               for x in (cond, uncond, pooled, uncond_pooled))
        batch = cond.shape[0]

        # 5. Timesteps, latents, SDXL's added conditioning (pooled text, size/crop numbers), image tokens
        timesteps, num_inference_steps = retrieve_timesteps(self.scheduler, num_inference_steps, device, timesteps)
        latents = StableDiffusionImagePromptPipeline.prepare_latents(self, batch, height, width, cond.dtype, device,
                                                                     generator, latents)
        time_ids = self.time_ids(height, width, original_size, crops_coords_top_left, target_size)
        added_cond_kwargs = self.added_text_conditioning(pooled, uncond_pooled, time_ids, do_cfg, device)
        if self.image_adapters:
            added_cond_kwargs["image_embeds"] = self.prepare_ip_adapter_image_embeds(
                ip_adapter_image, ip_adapter_image_embeds, device, batch, do_cfg, negative_ip_adapter_image)

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
