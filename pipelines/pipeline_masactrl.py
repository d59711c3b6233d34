"""MasaCtrl (Cao et al., ICCV 2023) on imageprompt's attention processors.

The source and the target prompt(s) are sampled in one batch from the same noise; a
:class:`~imageprompt.masactrl.MutualSelfAttentionController` on every attention layer
makes the targets' self-attention read the source's keys and values from step
``start_step`` and layer ``start_layer`` on (with masks from the cross-attention maps
of ``mask_words``, Sec. 3.3). Conditioning, photos through inversion and image
adapters work as for prompt-to-prompt (:class:`~imageprompt.pipelines.pipeline_p2p.PromptEditMixin`).
"""

from __future__ import annotations

import PIL.Image
import torch
from imageprompt.pipelines.pipeline_p2p import PromptEditMixin
from imageprompt.pipelines.pipeline_p2p_xl import XLPromptEditMixin
from imageprompt.pipelines.pipeline_sdipc import ImagePromptPipelineOutput, StableDiffusionImagePromptPipeline
from imageprompt.pipelines.pipeline_sdipc_xl import StableDiffusionXLImagePromptPipeline

from imageprompt.inversion import Inversion
from imageprompt.masactrl import MASK_THRESHOLD, START_STEP, MasaCtrlSettings, MutualSelfAttentionController


class MasaCtrlMixin(PromptEditMixin):
    """MasaCtrl's ``__call__`` on an imageprompt pipeline."""

    @torch.no_grad()
    def __call__(
        self,
        source_prompt: str,
        target_prompt: str | list[str],
        start_step: int = START_STEP,
        start_layer: int | None = None,
        mask_words: list[str] | None = None,
        mask_threshold: float = MASK_THRESHOLD,
        map_res: int | None = None,
        settings: MasaCtrlSettings | None = None,
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
        r"""Sample the source and its MasaCtrl edit(s) together.

        Args:
            source_prompt / target_prompt: the source text and the target(s) (a prompt or a list).
            start_step / start_layer / mask_words / mask_threshold / map_res: the edit's options
                (:class:`~imageprompt.masactrl.MasaCtrlSettings`), or all of them as ``settings``.
            image / alpha / image_mode / inversion / latents / **kwargs: as for prompt-to-prompt
                (:class:`~imageprompt.pipelines.StableDiffusionPromptToPromptPipeline`).

        Returns:
            :class:`~imageprompt.pipelines.ImagePromptPipelineOutput`: the source first, then one image per target.
        """
        settings = settings or MasaCtrlSettings(start_step, start_layer, mask_words, mask_threshold, map_res)
        controller = MutualSelfAttentionController(self.tokenizer, source_prompt, target_prompt, settings=settings,
                                                   length=self.model_max_length)
        out = self.run_edit(controller, settings.map_res, image, alpha, image_mode, inversion, negative_prompt,
                            height, width, num_inference_steps, guidance_scale, generator, latents, output_type,
                            **kwargs)
        if not return_dict:
            return (out.images,)
        return ImagePromptPipelineOutput(images=out.images)


class StableDiffusionMasaCtrlPipeline(MasaCtrlMixin, StableDiffusionImagePromptPipeline):
    """MasaCtrl on Stable Diffusion 1.x: diffusers' ``StableDiffusionPipeline`` with the mutual self-attention."""


class StableDiffusionXLMasaCtrlPipeline(MasaCtrlMixin, XLPromptEditMixin, StableDiffusionXLImagePromptPipeline):
    """MasaCtrl on Stable Diffusion XL."""
