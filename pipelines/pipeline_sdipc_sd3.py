"""Stable Diffusion 3 / 3.5 prompted by images: SD-IPC on the CLIP parts, diffusers' SD3.5 IP-Adapter.

Built on diffusers' ``StableDiffusion3Pipeline``: prompt encoding, latents, the flow-matching loop, decoding,
``load_ip_adapter`` / ``set_ip_adapter_scale`` / ``unload_ip_adapter`` (``SD3IPAdapterMixin``, InstantX's
SD3.5-Large format with a SigLIP encoder), LoRA and the callbacks are inherited. What is ours:

- SD-IPC conditioning (``image``): the CLIP token states and both pooled halves by the closed form
  (:class:`~imageprompt.conversion_sd3.SD3Converter`), the T5 part filled as ``t5`` says;
- the IP-Adapter's step window (:meth:`set_ip_adapter_window`), applied through
  :class:`~imageprompt.steps.DenoisingSteps` by setting the adapter processors' scale per step;
- embedding arithmetic on the SigLIP features (:meth:`encode_ip_adapter_image`, :mod:`imageprompt.image_embeds`).
"""

from __future__ import annotations

from collections.abc import Callable

import PIL.Image
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from diffusers.models.attention_processor import SD3IPAdapterJointAttnProcessor2_0
from imageprompt.pipelines.pipeline_sdipc import LOADED_NAMES
from imageprompt.pipelines.toolbox import shared_modules
from transformers import (
    CLIPImageProcessor,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionModelWithProjection,
    SiglipImageProcessor,
    SiglipVisionModel,
    T5EncoderModel,
    T5TokenizerFast,
)

from imageprompt.conversion import edit_embeds, eos_positions, variation_embeds
from imageprompt.conversion_sd3 import CLIP_TOKENS, SD3Converter, check_t5_fill, joint_states, split_joint_states
from imageprompt.image_embeds import COMBINE_MODES, combine_embeds
from imageprompt.images import MAX_PROMPT_CHARS, to_rgb
from imageprompt.ip_adapter import FULL_WINDOW, as_image_list, check_window, window_steps
from imageprompt.joint_attention import JointEditProcessor
from imageprompt.steps import DenoisingSteps


def ip_processors(transformer) -> list:
    """The transformer's SD3.5 IP-Adapter processors (also inside an editor's wrapper)."""
    procs = [p.base if isinstance(p, JointEditProcessor) else p for p in transformer.attn_processors.values()]
    return [p for p in procs if isinstance(p, SD3IPAdapterJointAttnProcessor2_0)]


class StableDiffusion3ImagePromptPipeline(StableDiffusion3Pipeline):
    model_cpu_offload_seq = ("sdipc_image_encoder->sdipc_image_encoder_2->text_encoder->text_encoder_2->"
                             "text_encoder_3->image_encoder->transformer->vae")
    _optional_components = ["image_encoder", "feature_extractor", "sdipc_image_encoder", "sdipc_image_encoder_2",
                            "converter"]

    def __init__(self, transformer: SD3Transformer2DModel, scheduler: FlowMatchEulerDiscreteScheduler,
                 vae: AutoencoderKL, text_encoder: CLIPTextModelWithProjection, tokenizer: CLIPTokenizer,
                 text_encoder_2: CLIPTextModelWithProjection, tokenizer_2: CLIPTokenizer,
                 text_encoder_3: T5EncoderModel, tokenizer_3: T5TokenizerFast,
                 image_encoder: SiglipVisionModel | None = None, feature_extractor: SiglipImageProcessor | None = None,
                 sdipc_image_encoder: CLIPVisionModelWithProjection | None = None,
                 sdipc_image_encoder_2: CLIPVisionModelWithProjection | None = None,
                 converter: SD3Converter | None = None):
        super().__init__(transformer, scheduler, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2,
                         text_encoder_3, tokenizer_3, image_encoder, feature_extractor)
        # SD-IPC's ViT-L and bigG vision towers and conversion: components diffusers' SD3 lacks
        self.register_modules(sdipc_image_encoder=sdipc_image_encoder, sdipc_image_encoder_2=sdipc_image_encoder_2,
                              converter=converter)

    @classmethod
    def from_pipe(cls, pipeline, **kwargs):
        """A pipeline of this class over ``pipeline``'s modules (no copies), as diffusers' ``from_pipe``. Without
        ``dtype`` the modules are not cast: diffusers' ``from_pipe`` casts them to float32 unless told otherwise,
        which would change the original pipeline's modules too (the SD 1.x pipelines' rule, ``ImagePromptMixin``)."""
        if kwargs.get("dtype") is not None or kwargs.get("torch_dtype") is not None:
            pipe = super().from_pipe(pipeline, **kwargs)
        else:
            pipe = shared_modules(cls, pipeline, **kwargs)
        for name in LOADED_NAMES + ("scheduler_name",):  # what the outputs record of where the modules came from
            if hasattr(pipeline, name):
                setattr(pipe, name, getattr(pipeline, name))
        return pipe

    # ------------------------------------------------------------ SD-IPC
    @torch.no_grad()
    def encode_joint(self, prompts: list[str], device, max_sequence_length: int):
        """``(clip (B, 77, D_L + D_G), t5 (B, n, W), pooled (B, P_L + P_G), clip ids)`` by diffusers' encode_prompt."""
        prompts = [p[:MAX_PROMPT_CHARS] for p in prompts]
        embeds, _, pooled, _ = self.encode_prompt(prompts, prompts, prompts, device=device,
                                                  do_classifier_free_guidance=False,
                                                  max_sequence_length=max_sequence_length)
        width = self.text_encoder.config.hidden_size + self.text_encoder_2.config.hidden_size
        clip, t5 = split_joint_states(embeds, width)
        ids = self.tokenizer(prompts, padding="max_length", max_length=CLIP_TOKENS, truncation=True,
                             return_tensors="pt").input_ids.to(device)
        return clip, t5, pooled, ids

    @torch.no_grad()
    def convert_images(self, images: list[PIL.Image.Image], device) -> tuple[torch.Tensor, torch.Tensor]:
        """SD-IPC on SD3: ``(h (B, D_L + D_G), pooled (B, P_L + P_G))`` (the conversion in float32)."""
        missing = [n for n in ("sdipc_image_encoder", "sdipc_image_encoder_2", "converter")
                   if getattr(self, n, None) is None]
        if missing:
            raise ValueError(f"SD-IPC on SD3 needs {', '.join(missing)}: load the model with "
                             "imageprompt.load_pipeline (it adds CLIP ViT-L and bigG), or pass them")
        embeds = []
        for encoder in (self.sdipc_image_encoder, self.sdipc_image_encoder_2):
            size = encoder.config.image_size
            processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
            pixels = processor(images=[to_rgb(im) for im in images], return_tensors="pt").pixel_values
            embeds.append(encoder(pixels.to(device=device, dtype=encoder.dtype)).image_embeds.float())
        where = self.converter.device
        h, pooled = self.converter(embeds[0].to(where), embeds[1].to(where))
        dtype = self.transformer.dtype
        return h.to(device=device, dtype=dtype), pooled.to(device=device, dtype=dtype)

    @torch.no_grad()
    def image_conditioning(self, images, prompts, alpha: float, device, t5: str = "zeros",
                           t5_caption: str | None = None, max_sequence_length: int = 256) -> dict:
        """SD-IPC's ``prompt_embeds`` and ``pooled_prompt_embeds`` for ``images`` (variation when ``prompts`` is
        None, else image + text with ``alpha``); the T5 part as ``t5`` says
        (:data:`~imageprompt.conversion_sd3.T5_FILLS`)."""
        check_t5_fill(t5, t5_caption if t5_caption is not None or prompts is None else prompts[0])
        h, pooled = self.convert_images(images, device)
        rows = len(images)
        texts = prompts if prompts is not None else [""] * rows
        clip, t5_states, text_pooled, ids = self.encode_joint(texts, device, max_sequence_length)
        if prompts is None:
            clip = variation_embeds(h, clip[0, 0], length=CLIP_TOKENS)
        else:
            clip = edit_embeds(h, clip, eos_positions(ids, self.tokenizer.eos_token_id), alpha)
            pooled = pooled + alpha * text_pooled
        if t5 == "zeros":
            t5_states = torch.zeros_like(t5_states)
        elif t5 == "empty" or t5_caption is not None:  # the empty prompt's T5 states, or the caption's
            t5_states = self.encode_joint([t5_caption or ""] * rows, device, max_sequence_length)[1]
        # "caption" without one: each row's own prompt (already encoded)
        return {"prompt_embeds": joint_states(clip, t5_states).to(self.transformer.dtype),
                "pooled_prompt_embeds": pooled.to(self.transformer.dtype)}

    # ------------------------------------------------------------ IP-Adapter
    def set_ip_adapter_window(self, window) -> None:
        """Apply the IP-Adapter only between fractions ``(begin, end)`` of the steps (None: every step); step ``i``
        of ``N`` is inside when ``int(begin * N) <= i < int(end * N)``. Kept on the transformer's ``image_proj``
        (loading an adapter again resets it)."""
        if getattr(self.transformer, "image_proj", None) is None or not ip_processors(self.transformer):
            raise ValueError("no IP-Adapter is loaded: call `load_ip_adapter(...)` first")
        self.transformer.image_proj.imageprompt_window = FULL_WINDOW if window is None else check_window(window)

    def ip_adapter_window(self) -> tuple[float, float]:
        return getattr(getattr(self.transformer, "image_proj", None), "imageprompt_window", FULL_WINDOW)

    @torch.no_grad()
    def encode_ip_adapter_image(self, images, combine: str = "concat", do_classifier_free_guidance: bool = True):
        """``ip_adapter_image_embeds`` for diffusers' SD3 ``__call__``: the SigLIP features of the reference images
        (diffusers' ``encode_image``, one image at a time), combined (:func:`~imageprompt.image_embeds.combine_embeds`;
        ``concat`` joins the images' tokens), with zeros as the negative under guidance (as diffusers)."""
        if combine not in COMBINE_MODES:
            raise ValueError(f"combine mode must be one of {', '.join(COMBINE_MODES)}, got {combine!r}")
        if getattr(self, "image_encoder", None) is None:
            raise ValueError("the IP-Adapter's image encoder is not loaded (load_ip_adapter loads it)")
        device = self._execution_device
        pos = torch.cat([self.encode_image([im], device) for im in as_image_list(images)])
        pos = combine_embeds(pos, combine)
        pos = pos.reshape(1, -1, pos.shape[-1])  # concat: every image's tokens in one row
        return torch.cat([torch.zeros_like(pos), pos]) if do_classifier_free_guidance else pos

    def ip_window_hook(self, num_steps: int) -> Callable[[int], None]:
        """A ``before_step`` hook: the adapter processors' scale inside the window, 0 outside (``restore``: after)."""
        procs = ip_processors(self.transformer)
        scales = [p.scale for p in procs]
        steps = window_steps(self.ip_adapter_window(), num_steps)

        def hook(step: int | None) -> None:
            for proc, scale in zip(procs, scales):
                proc.scale = scale if step is None or step in steps else 0.0

        return hook

    # ------------------------------------------------------------ sampling
    def sample(self, *, before_step=(), after_step=(), tensor_inputs=("latents",), callback_on_step_end=None,
               callback_on_step_end_tensor_inputs=("latents",), ip_adapter_image=None, ip_adapter_image_embeds=None,
               num_inference_steps: int = 28, guidance_scale: float = 7.0, **kwargs):
        """diffusers' SD3 ``__call__`` with imageprompt's step hooks (:class:`~imageprompt.steps.DenoisingSteps`).
        An image prompt is encoded here (diffusers' own way) so that a window starting after step 0 still
        applies."""
        window = self.ip_window_hook(num_inference_steps) if ip_processors(self.transformer) else None
        if ip_adapter_image is not None and ip_adapter_image_embeds is None:
            if window is None:
                raise ValueError("`ip_adapter_image` needs an IP-Adapter: call `load_ip_adapter(...)` first")
            ip_adapter_image_embeds = self.encode_ip_adapter_image(ip_adapter_image, "concat", guidance_scale > 1)
        hooks = DenoisingSteps([*([window] if window else []), *before_step], after_step, tensor_inputs,
                               callback_on_step_end, callback_on_step_end_tensor_inputs)
        hooks.start()
        try:
            return super().__call__(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                                    ip_adapter_image_embeds=ip_adapter_image_embeds, callback_on_step_end=hooks,
                                    **kwargs)
        finally:
            if window is not None:
                window(None)

    @torch.no_grad()
    def __call__(self, image=None, prompt: str | list[str] | None = None, alpha: float = 0.5, t5: str = "zeros",
                 t5_caption: str | None = None, num_inference_steps: int = 28, guidance_scale: float = 7.0,
                 max_sequence_length: int = 256, **kwargs):
        r"""Generate from an image (SD-IPC variation), an image and text (SD-IPC editing) or text (diffusers' SD3).

        Args:
            image: a PIL image or a list of them (one row each).
            prompt: the text (with ``image``: the edit text, blended with weight ``alpha`` after the EOS token).
            t5 / t5_caption: how the T5 part is filled for an image (``zeros``, ``empty`` or ``caption``: the
                T5 states of ``t5_caption``, or of each row's ``prompt`` when it is None).
            **kwargs: the rest of diffusers' ``StableDiffusion3Pipeline.__call__`` (``negative_prompt``, ``height``,
                ``generator``, ``ip_adapter_image``, ``ip_adapter_image_embeds``, ``callback_on_step_end``, ...).
        """
        if image is not None:
            images = list(image) if isinstance(image, (list, tuple)) else [image]
            prompts = None if prompt is None else [prompt] * len(images) if isinstance(prompt, str) else list(prompt)
            kwargs.update(self.image_conditioning(images, prompts, alpha, self._execution_device, t5, t5_caption,
                                                  max_sequence_length))
        else:
            kwargs["prompt"] = prompt
        return self.sample(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                           max_sequence_length=max_sequence_length, **kwargs)
