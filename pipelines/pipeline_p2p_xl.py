"""Prompt-to-prompt editing (Hertz et al. 2022) on Stable Diffusion XL.

:class:`~imageprompt.pipelines.pipeline_p2p.StableDiffusionPromptToPromptPipeline`'s
edit, run on SDXL's components. What SDXL adds:

- **Two token sequences, one attention.** SDXL's cross-attention reads the two
  text encoders' states side by side at the same 77 positions, so one token
  mapper serves both; it is only valid when both tokenizers split every word of
  the prompts the same way, which :meth:`check_edit_inputs` verifies with each
  tokenizer (SDXL's two share one BPE vocabulary; they differ only in padding).
- **Pooled text and size numbers.** Every prompt row carries its own pooled
  bigG embedding (with an SD-IPC ``image``: the image's, as in
  :class:`~imageprompt.pipelines.pipeline_sdipc_xl.StableDiffusionXLImagePromptPipeline`)
  and ``add_time_ids``; the unconditional rows carry the empty (or negative)
  prompt's pooled embedding, not zeros, so that null-text inversion's
  optimised embeddings and the edit agree.
- **Maps at SDXL's resolutions.** Cross-attention sits at 1/2 and 1/4 of the
  latent grid (64 and 32 rows at 1024x1024); maps and self-attention
  replacement default to the level nearest a quarter of the latent height (32).
- **Inversions.** DDIM, null-text, negative-prompt and direct inversion run
  with the prompt's pooled embedding and size numbers added to every UNet call
  (the unconditional branch: the empty prompt's; negative-prompt inversion: the
  source's, as its token states).
"""

from __future__ import annotations

import PIL.Image
import torch
from imageprompt.pipelines.pipeline_p2p import PromptEditMixin, PromptToPromptMixin
from imageprompt.pipelines.pipeline_sdipc_xl import StableDiffusionXLImagePromptPipeline

from imageprompt.inversion import Inversion
from imageprompt.p2p_align import word_token_spans


class XLPromptEditMixin(PromptEditMixin):
    """What edits from one noise need on SDXL (prompt-to-prompt and MasaCtrl): token alignment over both
    tokenizers, pooled embeddings per row, inversion with the pooled embedding and size numbers."""

    def check_edit_inputs(self, source_prompt, targets, *args, **kwargs):
        super().check_edit_inputs(source_prompt, targets, *args, **kwargs)
        for prompt in (source_prompt, *targets):
            first = word_token_spans(self.tokenizer, prompt)
            second = word_token_spans(self.tokenizer_2, prompt)
            if first != second:
                word = next(w for (w, a), (_, b) in zip(first, second) if a != b)
                raise ValueError(f"the two tokenizers split {word!r} of {prompt!r} differently, so one token "
                                 "alignment cannot serve both text encoders")

    def prompt_extras(self, prompts, negative_prompt, image, image_mode, alpha, inversion, device) -> dict:
        """Each row's pooled embedding (SD-IPC: the image's, edited with ``alpha``) and the unconditional rows'."""
        _, pooled, _ = self.encode_text_pooled(prompts, device)
        if image is not None:
            _, image_pooled = self.convert_images_pooled([image], device)
            pooled = image_pooled + alpha * pooled
            if image_mode == "variation":
                pooled[:1] = image_pooled
        rows = len(prompts)
        _, negative_pooled, _ = self.encode_text_pooled([negative_prompt or ""] * rows, device)
        if inversion is not None and inversion.method == "negative-prompt":  # the source's, as its token states
            negative_pooled = pooled[:1].expand(rows, -1)
        return {"pooled_prompt_embeds": pooled, "negative_pooled_prompt_embeds": negative_pooled}

    def invert(self, image: PIL.Image.Image, prompt: str, method: str = "null-text", num_inference_steps: int = 50,
               guidance_scale: float = 7.5, height: int | None = None, width: int | None = None,
               num_inner_steps: int = 10, early_stop_epsilon: float = 1e-5, **kwargs) -> Inversion:
        """Invert a real photo as on SD 1.x, with SDXL's pooled embedding and size numbers in every UNet call."""
        if method == "dpl":
            raise ValueError("Dynamic Prompt Learning inversion is not available on SDXL; use null-text, "
                             "negative-prompt, ddim or direct")
        device = self._execution_device
        height = height or self.default_sample_size * self.vae_scale_factor
        width = width or self.default_sample_size * self.vae_scale_factor
        cond, pooled, _ = self.encode_text_pooled([prompt], device)
        _, empty_pooled, _ = self.encode_text_pooled([""], device)
        time_ids = self.time_ids(height, width)

        def add_text(module, args, call_kwargs):
            if call_kwargs.get("added_cond_kwargs") is None:
                context = call_kwargs["encoder_hidden_states"]
                # the prompt's own states (DDIM, the conditional branch, negative-prompt's null): its pooled
                # embedding; anything else (the empty prompt, null-text's optimised states): the empty prompt's
                own = context.shape == cond.shape and torch.equal(context, cond.to(context))
                call_kwargs["added_cond_kwargs"] = {
                    "text_embeds": (pooled if own else empty_pooled).to(context).expand(context.shape[0], -1),
                    "time_ids": time_ids.to(context).repeat(context.shape[0], 1)}
            return args, call_kwargs

        handle = self.unet.register_forward_pre_hook(add_text, with_kwargs=True)
        try:
            return super().invert(image, prompt, method, num_inference_steps, guidance_scale, height, width,
                                  num_inner_steps, early_stop_epsilon, **kwargs)
        finally:
            handle.remove()


class StableDiffusionXLPromptToPromptPipeline(PromptToPromptMixin, XLPromptEditMixin,
                                              StableDiffusionXLImagePromptPipeline):
    """Prompt-to-prompt on Stable Diffusion XL."""
