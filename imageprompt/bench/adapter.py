"""Benchmark rows for IP-Adapter (sd15 and plus formats): diffusers' own support and imageprompt's, vs plain.

Random weights in the official layout for the benchmark's UNet, and a random
image encoder with ViT-H/14's shapes (tiny shapes with ``--tiny``): speed and
memory do not depend on weight values. Both implementations run the same text
prompt plus one image prompt; the diffusers rows show what an adapter costs
anyway (the image encoder's weights, the extra attention), the imageprompt rows
what imageprompt's attention layer adds on top.
"""

from __future__ import annotations

import torch

from imageprompt.bench.common import measure
from imageprompt.images import generators
from imageprompt.testing import ip_adapter_state_dict

VIT_H = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
             image_size=224, patch_size=14, projection_dim=1024, hidden_act="gelu")
TINY_ENCODER = dict(hidden_size=48, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                    image_size=32, patch_size=8, projection_dim=40)


def _adapter_parts(ctx, kind: str):
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    if "ip_encoder" not in ctx.cache:
        torch.manual_seed(0)
        config = CLIPVisionConfig(**(TINY_ENCODER if ctx.tiny else VIT_H))
        encoder = CLIPVisionModelWithProjection(config).to(ctx.device, ctx.dtype).eval()
        size = config.image_size
        ctx.cache["ip_encoder"] = (encoder, CLIPImageProcessor(size=size, crop_size=size))
    key = f"ip_state_{kind}"
    if key not in ctx.cache:
        unet = ctx.parts["unet"]
        unet.encoder_hid_proj = None
        # plus: the Resampler with 16 queries, depth 4, heads of 64 (SD 1.5: 12 heads, width 768)
        cross = unet.config.cross_attention_dim
        ctx.cache[key] = ip_adapter_state_dict(unet, kind, ctx.cache["ip_encoder"][0].config, scale=0.02,
                                               resampler_dim=cross if cross % 64 == 0 else 64)
    return ctx.cache[key], ctx.cache["ip_encoder"]


def _kwargs(ctx):
    return dict(num_inference_steps=ctx.steps, guidance_scale=7.5, height=ctx.size, width=ctx.size)


def _diffusers(kind: str, batch: int = 1):
    def run(ctx):
        from diffusers import StableDiffusionPipeline

        state, (encoder, processor) = _adapter_parts(ctx, kind)
        plain = ctx.plain_pipeline()
        p = ctx.parts
        pipe = StableDiffusionPipeline(vae=p["vae"], text_encoder=p["text_encoder"], tokenizer=p["tokenizer"],
                                       unet=p["unet"], scheduler=p["scheduler"], safety_checker=None,
                                       feature_extractor=processor, image_encoder=encoder,
                                       requires_safety_checker=False).to(ctx.device)
        del plain
        pipe.set_progress_bar_config(disable=True)
        pipe.load_ip_adapter({k: {n: t.clone() for n, t in v.items()} for k, v in state.items()}, subfolder=None,
                             weight_name="random.safetensors", image_encoder_folder=None)
        image = ctx.reference_image()
        try:
            return measure(ctx, lambda: pipe("a photo of a cat", ip_adapter_image=image, num_images_per_prompt=batch,
                                             generator=generators(0, batch), **_kwargs(ctx)), batch)
        finally:
            pipe.unload_ip_adapter()

    return run


def _imageprompt(kind: str, batch: int = 1):
    def run(ctx):
        state, (encoder, _) = _adapter_parts(ctx, kind)
        pipe = ctx.imageprompt_pipeline()
        pipe.set_progress_bar_config(disable=True)
        pipe.load_ip_adapter(state, image_encoder=encoder)
        image = ctx.reference_image()
        try:
            return measure(ctx, lambda: pipe(prompt="a photo of a cat", ip_adapter_image=image,
                                             num_images_per_prompt=batch, generator=generators(0, batch),
                                             **_kwargs(ctx)), batch)
        finally:
            pipe.unload_ip_adapter()

    return run


ROWS = {
    "ip-adapter sd15 (diffusers), batch 1": _diffusers("sd15"),
    "ip-adapter sd15 (imageprompt), batch 1": _imageprompt("sd15"),
    "ip-adapter plus (diffusers), batch 1": _diffusers("plus"),
    "ip-adapter plus (imageprompt), batch 1": _imageprompt("plus"),
    "ip-adapter sd15 (diffusers), batch 8": _diffusers("sd15", 8),
    "ip-adapter sd15 (imageprompt), batch 8": _imageprompt("sd15", 8),
}
