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
from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.schedulers import KarrasDiffusionSchedulers
from imageprompt.pipelines.pipeline_sdipc import ImagePromptMixin, ImagePromptPipelineOutput, visiting
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


class StableDiffusionXLImagePromptPipeline(ImagePromptMixin, StableDiffusionXLPipeline):
    model_cpu_offload_seq = ("sdipc_image_encoder->sdipc_image_encoder_2->image_encoder->text_encoder->"
                             "text_encoder_2->unet->vae")
    _optional_components = ["tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2", "feature_extractor",
                            "image_encoder", "sdipc_image_encoder", "sdipc_image_encoder_2", "converter"]

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        text_encoder_2: CLIPTextModelWithProjection,
        tokenizer: CLIPTokenizer,
        tokenizer_2: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
        sdipc_image_encoder: CLIPVisionModelWithProjection | None = None,
        sdipc_image_encoder_2: CLIPVisionModelWithProjection | None = None,
        converter: SDXLConverter | None = None,
        feature_extractor: CLIPImageProcessor | None = None,
        image_encoder: CLIPVisionModelWithProjection | None = None,
        force_zeros_for_empty_prompt: bool = True,
    ):
        super().__init__(vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, unet, scheduler, image_encoder,
                         feature_extractor, force_zeros_for_empty_prompt, add_watermarker=False)
        # SD-IPC's ViT-L and bigG vision towers and conversion: components diffusers' SDXL lacks, apart from its
        # `image_encoder`, which holds the IP-Adapter's encoder as in diffusers
        self.register_modules(sdipc_image_encoder=sdipc_image_encoder, sdipc_image_encoder_2=sdipc_image_encoder_2,
                              converter=converter)
        imageprompt_processors(self.unet)

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
        missing = [n for n in ("sdipc_image_encoder", "sdipc_image_encoder_2", "converter")
                   if getattr(self, n, None) is None]
        if missing:
            raise ValueError(f"SD-IPC on SDXL needs {', '.join(missing)}: load the model with "
                             "imageprompt.load_pipeline (it adds CLIP ViT-L and bigG), or pass them")

    @torch.no_grad()
    def encode_images(self, images: list[PIL.Image.Image], device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(e_L, e_G)``: projected image embeddings of the ViT-L and the bigG vision towers."""
        self._check_sdipc_parts()
        out = []
        for encoder in (self.sdipc_image_encoder, self.sdipc_image_encoder_2):
            processor = self.feature_extractor
            size = encoder.config.image_size
            if processor is None or processor.crop_size.get("height", size) != size:
                processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
            pixels = processor(images=[to_rgb(im) for im in images], return_tensors="pt").pixel_values
            with visiting(encoder, device, self.vision_tower_home):
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

    def image_conditioning(self, image, prompt, alpha, device, clip_skip=None) -> dict:
        """SD-IPC's token states and pooled embedding for an image (else the prompt, encoded by diffusers)."""
        if image is None:  # diffusers' SDXL encodes it (its clip_skip path works on transformers 5)
            prompts = [p[:MAX_PROMPT_CHARS] for p in ([prompt] if isinstance(prompt, str) else prompt)]
            self.tokenize(prompts)  # the truncation warning, as for the other paths
            return {"prompt": prompts}
        images = list(image) if isinstance(image, (list, tuple)) else [image]
        prompts = None if prompt is None else [prompt] if isinstance(prompt, str) else list(prompt)
        if prompts is not None and len(prompts) == 1:
            prompts = prompts * len(images)
        states, pooled = self.image_prompt_embeds_pooled(images, prompts, alpha, device, clip_skip)
        return {"prompt_embeds": states, "pooled_prompt_embeds": pooled}

    def decode(self, latents, output_type="pil"):
        """Latents to images as diffusers' SDXL ``__call__`` decodes them: a float16 VAE that asks for it
        (``force_upcast``) decodes in float32, and a VAE's ``latents_mean``/``latents_std`` are undone."""
        if output_type == "latent":
            return latents
        upcast = self.vae.dtype == torch.float16 and self.vae.config.force_upcast
        if upcast:
            self.vae.to(torch.float32)
        try:
            latents = latents.to(self.vae.dtype)
            mean, std = getattr(self.vae.config, "latents_mean", None), getattr(self.vae.config, "latents_std", None)
            if mean is not None and std is not None:
                mean = torch.tensor(mean).view(1, -1, 1, 1).to(latents)
                std = torch.tensor(std).view(1, -1, 1, 1).to(latents)
                latents = latents * std / self.vae.config.scaling_factor + mean
            else:
                latents = latents / self.vae.config.scaling_factor
            image = self.vae.decode(latents, return_dict=False)[0]
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
        prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
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
        r"""Generate images from an image (variation), an image and text (editing), or text, with SDXL.

        Arguments as :class:`StableDiffusionImagePromptPipeline`; ``**kwargs`` are the rest of diffusers'
        ``StableDiffusionXLPipeline.__call__`` (``negative_prompt_embeds``, ``negative_pooled_prompt_embeds``,
        ``original_size``, ``crops_coords_top_left``, ``target_size``, ``generator``, ``latents``, ...). With no
        ``negative_prompt`` the unconditional branch is zeros, as diffusers' SDXL does
        (``force_zeros_for_empty_prompt``).
        """
        # 1. Check inputs (diffusers' own `check_inputs` runs in the parent's call)
        self.check_image_prompt_inputs(image, prompt, prompt_embeds, alpha)
        self.check_sampling_inputs(num_images_per_prompt, num_inference_steps, guidance_scale, height, width,
                                   clip_skip, guidance_rescale)
        if prompt_embeds is not None and pooled_prompt_embeds is None:
            raise ValueError("with `prompt_embeds`, give `pooled_prompt_embeds` too (SDXL reads both)")
        if kwargs.get("negative_prompt_embeds") is not None and kwargs.get("negative_pooled_prompt_embeds") is None:
            raise ValueError("with `negative_prompt_embeds`, give `negative_pooled_prompt_embeds` too")

        # 2. Conditioning: SD-IPC's (token states and pooled) for an image, else the prompt as diffusers takes it
        if prompt_embeds is None:
            conditioning = self.image_conditioning(image, prompt, alpha, self._execution_device, clip_skip)
        else:
            conditioning = {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled_prompt_embeds}

        # 3. diffusers' SDXL sampling (micro-conditioning, VAE latents statistics, upcasting), step windows
        out = self.sample(
            **conditioning, negative_prompt=negative_prompt, height=height, width=width,
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
            num_images_per_prompt=num_images_per_prompt, output_type=output_type,
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            ip_adapter_image=ip_adapter_image, ip_adapter_image_embeds=ip_adapter_image_embeds,
            negative_ip_adapter_image=negative_ip_adapter_image, guidance_rescale=guidance_rescale,
            clip_skip=clip_skip, **kwargs,
        )
        if not return_dict:
            return (out.images,)
        return ImagePromptPipelineOutput(images=out.images)
