"""StyleAligned image sets (Hertz et al., CVPR 2024) on imageprompt's attention processors.

A batch of prompts is sampled together; prompt 0 is the style reference, and a
:class:`~imageprompt.style_aligned.StyleAlignedController` on every self-attention
layer makes each image attend to the reference's keys and values after AdaIN of its
queries and keys (:mod:`imageprompt.style_aligned`). The reference may be

- the first prompt (the authors' text-only use),
- a real photo: :meth:`invert_reference` DDIM-inverts it and ``inversion=`` pins
  row 0 to the inverted trajectory (the authors' transfer notebook), or
- an SD-IPC image prompt: ``image=`` conditions row 0 on the closed-form
  conversion of an image (the variation if the first prompt is empty, else
  image + text with ``alpha``).

Image adapters loaded on the UNet (IP-Adapter, the SD-IPC branch) add their image
branch to every row's cross-attention, as in the other pipelines.
"""

from __future__ import annotations

from collections.abc import Callable

import PIL.Image
import torch
from diffusers.utils.torch_utils import randn_tensor
from imageprompt.pipelines.pipeline_sdipc import ImagePromptPipelineOutput, StableDiffusionImagePromptPipeline

from imageprompt.conversion import edit_embeds, eos_positions, variation_embeds
from imageprompt.inversion import Inversion, check_sampler, invert
from imageprompt.ip_adapter import adapters_suspended
from imageprompt.style_aligned import (
    StyleAlignedController,
    StyleAlignedSettings,
    pin_reference,
    reference_start,
)


class StableDiffusionStyleAlignedPipeline(StableDiffusionImagePromptPipeline):
    def invert_reference(self, image: PIL.Image.Image, prompt: str, num_inference_steps: int = 50,
                         height: int | None = None, width: int | None = None) -> Inversion:
        """DDIM-invert a real photo described by ``prompt`` to serve as the style reference (row 0).

        Image adapters are suspended while inverting; inversion runs in float32 and needs the DDIM scheduler.
        """
        if not isinstance(image, PIL.Image.Image):
            raise TypeError("`image` must be a PIL image")
        if not isinstance(prompt, str):
            raise TypeError("`prompt` (a description of the photo) must be a string")
        cond, _ = self.encode_text([prompt], self._execution_device)
        with adapters_suspended(self.unet):
            return invert(self, image, cond, "ddim", num_inference_steps, height=height, width=width)

    def check_style_inputs(self, prompt, prompt_embeds, image, inversion, latents, num_inference_steps, eta):
        if prompt_embeds is not None and prompt is not None:
            raise ValueError("give `prompt` or `prompt_embeds`, not both")
        if prompt_embeds is None:
            if not isinstance(prompt, (list, tuple)) or not all(isinstance(p, str) for p in prompt):
                raise TypeError("`prompt` must be a list of strings: the reference's first, then the others")
            if len(prompt) < 2:
                raise ValueError("StyleAligned needs the reference prompt and at least one more prompt")
        elif prompt_embeds.ndim != 3 or prompt_embeds.shape[0] < 2:
            raise ValueError(f"`prompt_embeds` must be (prompts >= 2, tokens, dim), got {tuple(prompt_embeds.shape)}")
        if image is not None:
            if not isinstance(image, PIL.Image.Image):
                raise TypeError("`image` (the SD-IPC reference) must be one PIL image")
            if inversion is not None or prompt_embeds is not None:
                raise ValueError("`image` conditions the reference row: give it without `inversion`/`prompt_embeds`")
        if inversion is not None:
            if not isinstance(inversion, Inversion):
                raise TypeError("`inversion` must come from `invert_reference`")
            if inversion.num_inference_steps != num_inference_steps:
                raise ValueError(f"the reference was inverted with {inversion.num_inference_steps} steps; "
                                 f"sample with the same num_inference_steps, not {num_inference_steps}")
            check_sampler(self.scheduler, eta)
        if latents is not None and latents.ndim != 4:
            raise ValueError("`latents` must be (prompts, C, h, w)")

    @torch.no_grad()
    def __call__(
        self,
        prompt: list[str] | None = None,
        image: PIL.Image.Image | None = None,
        alpha: float = 0.5,
        inversion: Inversion | None = None,
        adain_queries: bool = True,
        adain_keys: bool = True,
        adain_values: bool = False,
        keys_scale: float = 1.0,
        score_shift: float = 0.0,
        share_group_norm: bool = False,
        reference_offset: int = 0,
        settings: StyleAlignedSettings | None = None,
        negative_prompt: str | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
        ip_adapter_image=None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        negative_ip_adapter_image=None,
        **kwargs,
    ):
        r"""Sample a style-aligned set: image 0 is the reference, the others share its style.

        Args:
            prompt: the reference's prompt first, then one prompt per image of the set.
            image: SD-IPC reference: row 0 is conditioned on this image (the variation if ``prompt[0]`` is
                empty, else image + ``prompt[0]`` with ``alpha``).
            inversion: a real photo inverted with :meth:`invert_reference` (``prompt[0]`` should describe it):
                row 0 starts from its noise and is put back on its trajectory after every step.
            adain_queries / adain_keys / adain_values: AdaIN to the reference's statistics (authors: Q and K).
            keys_scale: scale of the reference's keys for the other images (authors' default 1).
            score_shift: added to every image's attention scores of the reference's keys (authors' default 0; their
                transfer notebook: log 2).
            reference_offset: with ``inversion``, the reference starts this many steps ahead on the inverted
                trajectory (the authors' ``offset``; 0, their transfer notebook 5).
            share_group_norm: also share group-norm statistics with the reference (the authors' SD 1.x notebook).
            settings: all of the above as one :class:`~imageprompt.style_aligned.StyleAlignedSettings`.
            generator: a generator, or one per prompt; ``latents``: ``(prompts, C, h, w)`` starting noise.
            prompt_embeds: ready conditionings ``(prompts, 77, D)`` instead of ``prompt`` (row 0: the reference).
            ip_adapter_image / ip_adapter_image_embeds / negative_ip_adapter_image: image prompts of loaded
                adapters, shared by every row.
            **kwargs: the rest of diffusers' ``StableDiffusionPipeline.__call__`` (``eta``, ``timesteps``, ...).

        Returns:
            :class:`~imageprompt.pipelines.ImagePromptPipelineOutput`: the reference first (for ``inversion``: its
            reconstruction), then the set.
        """
        # 0. Defaults (the size of the control / init images, if any)
        toolbox = kwargs.get("toolbox")
        size = toolbox.size if toolbox is not None else None
        height = height or (size[1] if size else self.unet.config.sample_size * self.vae_scale_factor)
        width = width or (size[0] if size else self.unet.config.sample_size * self.vae_scale_factor)
        img2img = toolbox is not None and toolbox.init_image is not None
        if img2img and (inversion is not None or latents is not None):
            raise ValueError("an init image (img2img) fixes the starting latents: leave out the inversion and "
                             "`latents`")

        # 1. Check inputs
        if settings is None:
            settings = StyleAlignedSettings(adain_queries, adain_keys, adain_values, keys_scale, score_shift,
                                            share_group_norm, reference_offset)
        reference_offset = settings.reference_offset
        self.check_style_inputs(prompt, prompt_embeds, image, inversion, latents, num_inference_steps,
                                kwargs.get("eta", 0.0))
        self.check_sampling_inputs(1, num_inference_steps, guidance_scale, height, width)
        self.check_ip_adapter_inputs(ip_adapter_image, ip_adapter_image_embeds, negative_ip_adapter_image)
        device = self._execution_device

        # 2. Conditioning: row 0 the reference (text, or SD-IPC of `image`), then the set
        if prompt_embeds is not None:
            cond = prompt_embeds.to(device=device, dtype=self.unet.dtype)
        else:
            cond, ids = self.encode_text(list(prompt), device)
            if image is not None:
                h = self.convert_images([image], device)
                if prompt[0].strip():
                    cond[:1] = edit_embeds(h, cond[:1], eos_positions(ids[:1], self.tokenizer.eos_token_id), alpha)
                else:
                    empty, _ = self.encode_text([""], device)
                    cond[:1] = variation_embeds(h, empty[0, 0], length=cond.shape[1])
        rows = cond.shape[0]
        controller = StyleAlignedController(rows, settings=settings)

        # 3. Unconditional branch
        uncond, _ = self.encode_text([negative_prompt or ""] * rows, device)

        # 4. Latents: own noise per row; an inverted reference starts from its noise
        shape = (rows, self.unet.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if latents is not None and tuple(latents.shape) != shape:
            raise ValueError(f"`latents` has shape {tuple(latents.shape)} for {rows} prompts; expected {shape}")
        if isinstance(generator, list) and len(generator) != rows:
            raise ValueError(f"{len(generator)} generators for {rows} prompts")
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=cond.dtype)
        latents = latents.to(device=device, dtype=cond.dtype)
        if inversion is not None:  # DDIM (checked): the starting noise is not scaled
            latents[:1] = reference_start(inversion.trajectory, reference_offset).to(device=device, dtype=cond.dtype)

        if img2img:  # diffusers' img2img draws each row's noise from the generator(s)
            latents = None

        def after_step(pipe, step, tensors):
            if inversion is not None:
                tensors["latents"] = pin_reference(tensors["latents"], inversion.trajectory, step, reference_offset)
            return tensors

        # 5. diffusers' loop with shared attention (and, if asked, shared group norms: attach's)
        out = self.sample(
            controller=controller, prompt_embeds=cond, negative_prompt_embeds=uncond, latents=latents, height=height,
            width=width, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, generator=generator,
            output_type=output_type, after_step=[after_step], callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            ip_adapter_image=ip_adapter_image, ip_adapter_image_embeds=ip_adapter_image_embeds,
            negative_ip_adapter_image=negative_ip_adapter_image, **kwargs)
        if not return_dict:
            return (out.images,)
        return ImagePromptPipelineOutput(images=out.images)
