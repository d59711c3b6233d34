"""Prompt-to-prompt editing (Hertz et al. 2022) on imageprompt's attention processors.

The source and the target prompt(s) are sampled in one batch from the same
noise; a :class:`~imageprompt.p2p.PromptToPromptController` attached to every
attention layer makes the targets reuse the source's attention. The source may be

- a text prompt,
- an SD-IPC image + text conditioning (``image`` with ``alpha``: "this image,
  on a beach" -> "this image, in the snow"),
- an SD-IPC variation (``image`` with ``image_mode="variation"``: the source is
  the image alone, the targets are image + text), or
- a real photo inverted with :meth:`invert` (null-text, negative-prompt, DDIM or
  direct inversion), passed as ``inversion``.

Image adapters loaded on the UNet (IP-Adapter, the SD-IPC branch) apply to every
prompt of the batch: pass ``ip_adapter_image`` as for the other pipelines. Their
image branch adds to the edited text attention in the same processors.

:class:`PromptEditMixin` is what prompt-to-prompt shares with MasaCtrl
(:mod:`imageprompt.pipelines.pipeline_masactrl`): prompts that start from one noise,
their conditioning (text, SD-IPC, a photo's inversion), and the edit's controller on
the UNet for the parent's sampling loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import PIL.Image
import torch
from diffusers.utils import BaseOutput
from imageprompt.pipelines.pipeline_sdipc import StableDiffusionImagePromptPipeline

from imageprompt.attention_maps import token_labels
from imageprompt.conversion import edit_embeds, eos_positions, variation_embeds
from imageprompt.dpl import dpl_inversion, step_conditioning
from imageprompt.inversion import METHODS, Inversion, check_sampler, direct_correction, invert
from imageprompt.ip_adapter import adapters_suspended
from imageprompt.p2p import BLEND_THRESHOLD, PromptToPromptController, PromptToPromptSettings, attention_heights
from imageprompt.toolbox import same_noise_generators


@dataclass
class PromptToPromptPipelineOutput(BaseOutput):
    """Results of an edit.

    ``images``: the source image first, then one edited image per target.
    ``attention_maps``: ``(prompts, h, w, 77)`` cross-attention maps averaged over
    steps, layers and heads (render with :func:`imageprompt.attention_maps.render_attention_maps`).
    ``tokens``: each prompt's word tokens (labels of map positions 1..n).
    ``blend_mask``: the final local-blend mask ``(targets, 1, h, w)`` on the latent grid, or None.
    """

    images: list[PIL.Image.Image] | torch.Tensor
    attention_maps: torch.Tensor | None
    tokens: list[list[str]]
    blend_mask: torch.Tensor | None = None


IMAGE_MODES = ("edit", "variation")
INVERSIONS = (*METHODS, "dpl")  # dpl: Dynamic Prompt Learning (imageprompt.dpl), needs the nouns (`words`)


class PromptEditMixin:
    """Edits of a source prompt into target prompts from one noise (prompt-to-prompt, MasaCtrl): inversion of
    photos, the conditioning, and :meth:`run_edit`, which samples with the edit's controller attached."""

    def invert(self, image: PIL.Image.Image, prompt: str, method: str = "null-text", num_inference_steps: int = 50,
               guidance_scale: float = 7.5, height: int | None = None, width: int | None = None,
               num_inner_steps: int = 10, early_stop_epsilon: float = 1e-5, words: list[str] | None = None,
               dpl_settings=None) -> Inversion:
        """Invert a real photo described by ``prompt`` so that it can be edited (see :mod:`imageprompt.inversion`).

        Image adapters loaded on the UNet are suspended while inverting: the photo is inverted under its text.
        Inversion runs in float32 (and returns the UNet's dtype) and needs the DDIM scheduler.
        ``method="dpl"`` (Dynamic Prompt Learning, :mod:`imageprompt.dpl`) learns the tokens of ``words``
        (nouns of ``prompt``) with ``dpl_settings`` (a :class:`~imageprompt.dpl.DPLSettings`; None: the paper's).
        """
        if method not in INVERSIONS:
            raise ValueError(f"unknown inversion {method!r}; choose from {', '.join(INVERSIONS)}")
        if not isinstance(image, PIL.Image.Image):
            raise TypeError("`image` must be a PIL image")
        cond, _ = self.encode_text([prompt], self._execution_device)
        with adapters_suspended(self.unet):
            if method == "dpl":  # Wang et al. 2023: null-text inversion plus learned noun tokens
                return dpl_inversion(self, image, prompt, words, num_inference_steps, guidance_scale, height, width,
                                     num_inner_steps, early_stop_epsilon, dpl_settings)
            return invert(self, image, cond, method, num_inference_steps, guidance_scale, height, width,
                          num_inner_steps, early_stop_epsilon)

    def prompt_extras(self, prompts, negative_prompt, image, image_mode, alpha, inversion, device) -> dict:
        """The parent's conditioning arguments beyond the token states: none on SD 1.x (SDXL's pipeline adds its
        pooled embeddings here)."""
        return {}

    def check_edit_inputs(self, source_prompt, targets, image, inversion, num_inference_steps, guidance_scale,
                          latents, image_mode="edit"):
        if not isinstance(source_prompt, str):
            raise TypeError("`source_prompt` must be a string")
        if image is not None and not isinstance(image, PIL.Image.Image):
            raise TypeError("`image` (the SD-IPC reference) must be one PIL image")
        if image_mode not in IMAGE_MODES:
            raise ValueError(f"`image_mode` must be one of {IMAGE_MODES}, got {image_mode!r}")
        if image_mode != "edit" and image is None:
            raise ValueError(f"`image_mode={image_mode!r}` needs an SD-IPC `image`")
        if inversion is not None:
            if image is not None:
                raise ValueError("give either an SD-IPC `image` or an `inversion`, not both")
            if latents is not None:
                raise ValueError("`inversion` already fixes the starting latents")
            if inversion.num_inference_steps != num_inference_steps:
                raise ValueError(f"the inversion ran {inversion.num_inference_steps} steps; "
                                 f"edit with the same num_inference_steps, not {num_inference_steps}")
            if inversion.method in ("null-text", "dpl") and inversion.guidance_scale != guidance_scale:
                raise ValueError(f"null-text inversion was tuned for guidance {inversion.guidance_scale}; "
                                 f"edit with the same guidance_scale, not {guidance_scale}")

    def run_edit(self, controller, map_res=None, image=None, alpha=0.5, image_mode="edit", inversion=None,
                 negative_prompt=None, height=None, width=None, num_inference_steps=50, guidance_scale=7.5,
                 generator=None, latents=None, output_type="pil", **kwargs):
        """Sample ``controller.source`` and its targets from one noise with ``controller`` on the UNet; returns the
        parent's output. ``kwargs``: the rest of the parent's ``__call__`` (image prompts, callbacks, ...)."""
        # 0. Defaults (the size of the control / init images, if any)
        size = kwargs["toolbox"].size if kwargs.get("toolbox") is not None else None
        height = height or (size[1] if size else self.unet.config.sample_size * self.vae_scale_factor)
        width = width or (size[0] if size else self.unet.config.sample_size * self.vae_scale_factor)

        # 1. Check inputs
        self.check_edit_inputs(controller.source, controller.targets, image, inversion, num_inference_steps,
                               guidance_scale, latents, image_mode)
        if inversion is not None:  # the edit must retrace the inversion: DDIM, eta 0
            check_sampler(self.scheduler, kwargs.get("eta", 0.0))
        self.check_sampling_inputs(1, num_inference_steps, guidance_scale, height, width)
        self.check_ip_adapter_inputs(kwargs.get("ip_adapter_image"), kwargs.get("ip_adapter_image_embeds"),
                                     kwargs.get("negative_ip_adapter_image"))
        heights = attention_heights(self.unet.config, height // self.vae_scale_factor)
        if map_res is not None and map_res not in heights:
            raise ValueError(f"`map_res` {map_res} names no cross-attention layer; this UNet has {heights} latent rows")
        prompts = [controller.source, *controller.targets]
        rows = len(prompts)
        device = self._execution_device

        # 2. Conditioning: text, or SD-IPC image + text (the source: the image alone for a variation)
        cond, ids = self.encode_text(prompts, device)
        if image is not None:
            h = self.convert_images([image], device)
            cond = edit_embeds(h.expand(rows, -1), cond, eos_positions(ids, self.tokenizer.eos_token_id), alpha)
            if image_mode == "variation":
                empty, _ = self.encode_text([""], device)
                cond[:1] = variation_embeds(h, empty[0, 0], length=cond.shape[1])

        # 3. Unconditional branch: inversion's per-step embeddings, the negative prompt or the empty prompt
        uncond, _ = self.encode_text([negative_prompt or ""] * rows, device)
        if inversion is not None and inversion.uncond_embeds is not None:
            uncond = inversion.uncond_at(0).to(device=device, dtype=cond.dtype).expand(rows, -1, -1)
        if inversion is not None and inversion.cond_embeds is not None:  # DPL: the learned noun tokens, per step
            cond = step_conditioning(self, inversion, prompts, 0, cond)

        # 4. Latents: one starting noise for every prompt (a photo's: its inversion; img2img's: one generator state
        #    per row, as diffusers' img2img and inpainting draw each row's noise)
        #    A photo's inversion with an inpainting mask of the photo at strength 1: the mask plays the local
        #    blend's role (outside it every row is put back on the photo after each step)
        toolbox = kwargs.get("toolbox")
        img2img = toolbox is not None and toolbox.init_image is not None
        if img2img and (latents is not None or inversion is not None and (toolbox.mask is None
                                                                          or toolbox.strength < 1.0)):
            raise ValueError("an init image (img2img) fixes the starting latents: leave out `latents`; with an "
                             "inversion only an inpainting mask of the photo at strength 1 goes")
        if img2img and inversion is None:
            generator = same_noise_generators(generator, rows, device)
        else:
            if img2img and generator is None:  # the photo's VAE encoding samples: the same one every time
                generator = torch.Generator().manual_seed(0)
            if inversion is not None:
                latents = inversion.latents / self.scheduler.init_noise_sigma
            latents = self.shared_noise(rows, height, width, cond.dtype, generator, latents)
            generator = generator[0] if isinstance(generator, list) else generator  # the noise is drawn: one

        # 5. After each step: inversion's corrections and embeddings, the controller's blending
        def after_step(pipe, step, tensors):
            if inversion is not None and inversion.method == "direct":  # Ju et al. 2024: source row only
                tensors["latents"] = direct_correction(tensors["latents"], inversion, step)
            tensors["latents"] = controller.end_step(tensors["latents"])
            if step + 1 < num_inference_steps and inversion is not None and pipe.do_classifier_free_guidance:
                # diffusers' loop holds [negative, positive] in `prompt_embeds`: null-text's per-step
                # unconditional states and DPL's per-step noun tokens replace their half
                negative, positive = tensors["prompt_embeds"].chunk(2)
                if isinstance(inversion.uncond_embeds, list):
                    negative = inversion.uncond_at(step + 1).to(negative).expand(rows, -1, -1)
                if inversion.cond_embeds is not None:
                    positive = step_conditioning(pipe, inversion, prompts, step + 1, cond).to(positive)
                tensors["prompt_embeds"] = torch.cat([negative, positive])
            return tensors

        # 6. The loop (the parent's, or diffusers' ControlNet / img2img / inpainting) with the controller attached
        return self.sample(
            controller=controller, prompt_embeds=cond, negative_prompt_embeds=uncond, latents=latents, height=height,
            width=width, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, generator=generator,
            output_type=output_type, after_step=[after_step], tensor_inputs=["latents", "prompt_embeds"],
            **self.prompt_extras(prompts, negative_prompt, image, image_mode, alpha, inversion, device),
            **kwargs)


class PromptToPromptMixin(PromptEditMixin):
    """Prompt-to-prompt's ``__call__`` on an imageprompt pipeline."""

    @torch.no_grad()
    def __call__(
        self,
        source_prompt: str,
        target_prompt: str | list[str] | None = None,
        mode: str = "replace",
        weights: dict[str, float] | None = None,
        blend_words: list[str] | None = None,
        blend_threshold: float = BLEND_THRESHOLD,
        blend_exclude: list[str] | None = None,
        blend_start: float = 0.0,
        cross_steps: float | tuple[float, float] = 0.8,
        word_cross_steps: dict[str, float | tuple[float, float]] | None = None,
        self_steps: float | tuple[float, float] = 0.4,
        self_res: int | None = None,
        map_res: int | None = None,
        settings: PromptToPromptSettings | None = None,
        image: PIL.Image.Image | None = None,
        alpha: float = 0.5,
        image_mode: str = "edit",
        inversion: Inversion | None = None,
        negative_prompt: str | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        **kwargs,
    ):
        r"""Sample the source and its edit(s) together.

        Args:
            source_prompt: the source text (with ``image``: the SD-IPC edit text of the source).
            target_prompt: the edited text, or a list of them (``reweight``: leave out).
            mode / weights / blend_words / blend_threshold / blend_exclude / blend_start / cross_steps /
                word_cross_steps / self_steps / self_res / map_res: the edit's options
                (:class:`~imageprompt.p2p.PromptToPromptSettings`), or all of them as ``settings``.
            image: SD-IPC reference image: every prompt is conditioned as image + text with ``alpha``.
            image_mode: with ``image``, ``"edit"`` (every prompt image + text) or ``"variation"`` (the source
                is the image alone, an SD-IPC variation; the targets are image + text).
            inversion: a real photo inverted with :meth:`invert` (its prompt should be ``source_prompt``).
            latents: starting noise ``(1, C, h, w)``, shared by all prompts.
            **kwargs: the rest of the diffusers parent's ``__call__`` (``eta``, ``timesteps``, ``sigmas``,
                ``callback_on_step_end``, ``cross_attention_kwargs``, ...) and the image prompts of loaded adapters
                (``ip_adapter_image``, ``ip_adapter_image_embeds``, ``negative_ip_adapter_image``), shared by every
                prompt. Every scheduler works; the step windows count denoising steps.

        Returns:
            :class:`PromptToPromptPipelineOutput` (or a tuple ``(images, attention_maps)``).
        """
        if mode == "masactrl":
            raise ValueError("MasaCtrl is an edit of its own: StableDiffusionMasaCtrlPipeline.from_pipe(pipe)")
        if settings is None:
            settings = PromptToPromptSettings(mode, weights, blend_words, blend_threshold, blend_exclude, blend_start,
                                              cross_steps, word_cross_steps, self_steps, self_res, map_res)
        controller = PromptToPromptController(self.tokenizer, source_prompt, target_prompt, settings=settings,
                                              length=self.model_max_length)
        out = self.run_edit(controller, settings.map_res, image, alpha, image_mode, inversion, negative_prompt,
                            height, width, num_inference_steps, guidance_scale, generator, latents, output_type,
                            **kwargs)
        maps = controller.attention_maps()
        if not return_dict:
            return out.images, maps
        tokens = [token_labels(self.tokenizer, p) for p in [controller.source, *controller.targets]]
        return PromptToPromptPipelineOutput(images=out.images, attention_maps=maps, tokens=tokens,
                                            blend_mask=controller.blend_mask)


class StableDiffusionPromptToPromptPipeline(PromptToPromptMixin, StableDiffusionImagePromptPipeline):
    """Prompt-to-prompt on Stable Diffusion 1.x: diffusers' ``StableDiffusionPipeline`` with the edit's controller."""
