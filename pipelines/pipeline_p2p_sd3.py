"""Prompt-to-prompt on Stable Diffusion 3 / 3.5's joint attention (:mod:`imageprompt.p2p_joint`).

The source and the target prompt(s) are sampled in one batch from the same noise (or from a photo's flow-ODE
inversion, :meth:`StableDiffusion3PromptToPromptPipeline.invert`) by diffusers' SD3 loop; a
:class:`~imageprompt.p2p_joint.JointPromptToPrompt` sits on the transformer's joint attention layers for the call
and is told each denoising step through :class:`~imageprompt.steps.DenoisingSteps`. A loaded SD3.5 IP-Adapter
applies to every prompt (``ip_adapter_image``).
"""

from __future__ import annotations

import PIL.Image
import torch
from diffusers.utils.torch_utils import randn_tensor
from imageprompt.pipelines.pipeline_p2p import PromptToPromptPipelineOutput
from imageprompt.pipelines.pipeline_sdipc_sd3 import StableDiffusion3ImagePromptPipeline

from imageprompt.attention_maps import token_labels
from imageprompt.inversion_flow import FlowInversion, invert_flow, sampling_sigmas
from imageprompt.joint_attention import joint_editor_attached
from imageprompt.p2p import BLEND_THRESHOLD, PromptToPromptSettings
from imageprompt.p2p_joint import JointPromptToPrompt
from imageprompt.rf_inversion import PhotoGuide


class StableDiffusion3PromptToPromptPipeline(StableDiffusion3ImagePromptPipeline):
    """Prompt-to-prompt on SD3: diffusers' ``StableDiffusion3Pipeline`` with the joint-attention controller."""

    def invert(self, image: PIL.Image.Image, prompt: str, method: str = "flow", num_inference_steps: int = 28,
               guidance_scale: float = 1.0, height: int | None = None, width: int | None = None,
               max_sequence_length: int = 256, gamma: float = 0.0, eta: float = 0.0, eta_steps=(0.0, 0.25),
               seed: int = 0, **unused) -> FlowInversion:
        """Invert a real photo by the flow ODE run backwards (``method="flow"``, :mod:`imageprompt.inversion_flow`);
        edit it with the same ``num_inference_steps`` and ``guidance_scale``. ``unused``: the DDIM inversions'
        options (``num_inner_steps``, ``words``), which a flow inversion has none of."""
        if method != "flow":
            raise ValueError(f"SD3 inverts photos by the flow ODE (method 'flow'); {method!r} is a DDIM inversion")
        return invert_flow(self, image, prompt, num_inference_steps, guidance_scale, height, width,
                           max_sequence_length, gamma, eta, eta_steps, seed)

    @torch.no_grad()
    def __call__(self, source_prompt: str, target_prompt: str | list[str] | None = None, mode: str = "replace",
                 weights: dict[str, float] | None = None, blend_words: list[str] | None = None,
                 blend_threshold: float = BLEND_THRESHOLD, blend_exclude: list[str] | None = None,
                 blend_start: float = 0.0, cross_steps=0.8, word_cross_steps: dict | None = None, self_steps=0.4,
                 self_layers: list[int] | None = None, settings: PromptToPromptSettings | None = None,
                 inversion: FlowInversion | None = None, image: PIL.Image.Image | None = None, alpha: float = 0.5,
                 image_mode: str = "edit", t5: str = "zeros", negative_prompt: str | None = None,
                 height: int | None = None, width: int | None = None, num_inference_steps: int = 28,
                 guidance_scale: float = 7.0, generator: torch.Generator | None = None,
                 latents: torch.Tensor | None = None, max_sequence_length: int = 256, output_type: str = "pil",
                 return_dict: bool = True, **kwargs):
        r"""Sample the source and its edit(s) together.

        Args:
            source_prompt / target_prompt / mode / weights / blend_* / cross_steps / word_cross_steps /
                self_steps: the edit (:class:`~imageprompt.p2p.PromptToPromptSettings`, or all as ``settings``).
            self_layers: joint layers (block indices) with self-attention injection (None: all).
            inversion: a photo inverted with :meth:`invert` (same steps and guidance).
            image / alpha / image_mode / t5: an SD-IPC reference: every prompt is image + text (``image_mode=
                "variation"``: the source is the image alone), the T5 part filled as ``t5`` says (default zeros).
            latents: one starting noise ``(1, 16, h, w)`` shared by every prompt.
            **kwargs: the rest of diffusers' SD3 ``__call__`` (``ip_adapter_image``, ``callback_on_step_end``, ...).

        Returns:
            :class:`~imageprompt.pipelines.pipeline_p2p.PromptToPromptPipelineOutput`.
        """
        if settings is None:
            settings = PromptToPromptSettings(mode, weights, blend_words, blend_threshold, blend_exclude, blend_start,
                                              cross_steps, word_cross_steps, self_steps)
        controller = JointPromptToPrompt(self.tokenizer, self.tokenizer_3, source_prompt, target_prompt, settings,
                                         max_sequence_length, self_layers)
        if self_layers is not None and not all(0 <= i < len(self.transformer.transformer_blocks)
                                               for i in self_layers):
            raise ValueError(f"self_layers must be block indices below {len(self.transformer.transformer_blocks)}")
        size = self.default_sample_size * self.vae_scale_factor
        height, width = height or size, width or size
        prompts = [controller.source, *controller.targets]
        rows, device = len(prompts), self._execution_device
        if inversion is not None:
            if latents is not None:
                raise ValueError("`inversion` already fixes the starting latents")
            if (inversion.num_inference_steps, inversion.guidance_scale) != (num_inference_steps, guidance_scale):
                raise ValueError(f"the inversion ran {inversion.num_inference_steps} steps at guidance "
                                 f"{inversion.guidance_scale}; edit with the same")
            latents = inversion.latents
        shape = (1, self.transformer.config.in_channels, height // self.vae_scale_factor,
                 width // self.vae_scale_factor)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=self.transformer.dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"`latents` has shape {tuple(latents.shape)}, expected {shape} (one noise, shared)")
        latents = latents.to(device=device, dtype=self.transformer.dtype).expand(rows, -1, -1, -1).clone()
        controller.setup(num_inference_steps, tuple(latents.shape[-2:]), self.transformer.config.patch_size, device)

        def after_step(pipe, step, tensors):
            tensors["latents"] = controller.end_step(tensors["latents"])
            return tensors

        hooks = [after_step]
        if inversion is not None and inversion.eta > 0:  # RF-Inversion: every row pulled towards the photo
            sigmas, _ = sampling_sigmas(self.scheduler, num_inference_steps, device)
            guide = PhotoGuide(inversion.image_latents.to(device), sigmas, inversion.eta, inversion.eta_steps)
            guide.begin(latents)
            hooks.insert(0, guide)

        if image is not None:
            if inversion is not None:
                raise ValueError("give either an SD-IPC `image` or an `inversion`, not both")
            if image_mode not in ("edit", "variation"):
                raise ValueError(f"`image_mode` must be 'edit' or 'variation', got {image_mode!r}")
            cond = self.image_conditioning([image] * rows, prompts, alpha, device, t5, None, max_sequence_length)
            if image_mode == "variation":
                source = self.image_conditioning([image], None, alpha, device, "zeros" if t5 == "caption" else t5,
                                                 None, max_sequence_length)
                for name in cond:
                    cond[name][:1] = source[name]
        else:
            cond = {"prompt": prompts}
        with joint_editor_attached(self.transformer, controller):
            out = self.sample(**cond, negative_prompt=[negative_prompt or ""] * rows, latents=latents,
                              height=height, width=width, num_inference_steps=num_inference_steps,
                              guidance_scale=guidance_scale, max_sequence_length=max_sequence_length,
                              output_type=output_type, before_step=[controller.set_step], after_step=hooks,
                              **kwargs)
        maps = controller.attention_maps()
        if not return_dict:
            return out.images, maps
        tokens = [token_labels(self.tokenizer, p) for p in prompts]
        return PromptToPromptPipelineOutput(images=out.images, attention_maps=maps, tokens=tokens,
                                            blend_mask=controller.blend_mask)
