"""Benchmark rows for Stable Diffusion XL: ``imageprompt bench --sdxl`` (smoke: ``--sdxl --tiny``).

SDXL base's shapes with random weights (speed and memory do not depend on weight
values), fp16 on a GPU, 1024x1024, DDIM 30 steps by default, CFG 5.0 (diffusers'
SDXL default): plain diffusers ``StableDiffusionXLPipeline`` against each
imageprompt technique in the same process, as ratios. The image encoders have
the real towers' shapes: CLIP ViT-L/14 and OpenCLIP bigG/14 for SD-IPC, bigG for
``ip-adapter_sdxl``, ViT-H/14 for ``ip-adapter-plus_sdxl_vit-h``.
"""

from __future__ import annotations

import sys

import torch

from imageprompt.bench.common import Context, Result, device_name, markdown_table, measure, peak_kind
from imageprompt.images import generators
from imageprompt.testing import ip_adapter_state_dict

PROMPT, SOURCE, TARGET = "a photo of a cat", "a photo of a cat on the beach", "a photo of a dog on the beach"
GUIDANCE = 5.0
VIT_L = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
             image_size=224, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
BIGG = dict(hidden_size=1664, intermediate_size=8192, num_hidden_layers=48, num_attention_heads=16,
            image_size=224, patch_size=14, projection_dim=1280, hidden_act="gelu")
VIT_H = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
             image_size=224, patch_size=14, projection_dim=1024, hidden_act="gelu")
TINY_VISION = dict(hidden_size=48, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                   image_size=32, patch_size=8)


# ------------------------------------------------------------------ context
def build_context(device: str | None, dtype: str | None, steps: int, size: int | None, tiny: bool) -> Context:
    """Random SDXL components (built on the device: the full UNet is 2.6 B parameters)."""
    import tempfile

    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from imageprompt.loading import default_device, resolve_dtype
    from imageprompt.testing_xl import (
        PROJECTION_L,
        SDXL_TEXT_G,
        SDXL_TEXT_L,
        SDXL_UNET,
        SDXL_VAE,
        build_sdxl_components,
    )

    dev = torch.device(device) if device else default_device()
    torch_dtype = resolve_dtype(dtype, dev)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        parts = build_sdxl_components(tmp)  # tiny, and the tokenizers either way
    if tiny:
        parts["text_projection_l"] = parts.pop("clip_l").text_projection
        encoders = {"l": (TINY_VISION, PROJECTION_L), "g": (TINY_VISION, parts["text_encoder_2"].config.projection_dim),
                    "h": (TINY_VISION, 40)}
    else:
        with torch.device(dev):
            special = dict(bos_token_id=parts["tokenizer"].bos_token_id, eos_token_id=parts["tokenizer"].eos_token_id,
                           pad_token_id=parts["tokenizer"].pad_token_id)
            parts["text_encoder"] = CLIPTextModel(CLIPTextConfig(**SDXL_TEXT_L, **special))
            parts["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_TEXT_G, **special))
            parts["text_projection_l"] = torch.nn.Linear(768, 768, bias=False)
            parts["unet"] = UNet2DConditionModel(**SDXL_UNET)
            parts["vae"] = AutoencoderKL(**SDXL_VAE)
        encoders = {"l": (VIT_L, 768), "g": (BIGG, 1280), "h": (VIT_H, 1024)}
    parts.pop("clip_l", None)
    parts.pop("clip_g", None)
    parts["scheduler"] = DDIMScheduler.from_config(parts["scheduler"].config)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        parts[name] = parts[name].to(dev, torch_dtype).eval()
    parts["text_projection_l"] = parts["text_projection_l"].to(dev)
    ctx = Context(dev, torch_dtype, steps, size or (32 if tiny else 1024), parts, tiny)
    ctx.cache["encoder_shapes"] = encoders
    return ctx


def _vision(ctx, which: str):
    """A random ``CLIPVisionModelWithProjection`` with the shapes of ViT-L (``l``), bigG (``g``) or ViT-H (``h``)."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    key = f"vision_{which}"
    if key not in ctx.cache:
        shape, projection = ctx.cache["encoder_shapes"][which]
        torch.manual_seed(1)
        with torch.device(ctx.device):
            model = CLIPVisionModelWithProjection(CLIPVisionConfig(**{**shape, "projection_dim": projection}))
        size = model.config.image_size
        ctx.cache[key] = (model.to(ctx.dtype).eval(), CLIPImageProcessor(size=size, crop_size=size))
    return ctx.cache[key]


def plain_pipeline(ctx):
    """diffusers' own StableDiffusionXLPipeline on the shared weights, with its default SDPA processors."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.models.attention_processor import AttnProcessor2_0

    p = ctx.parts
    p["unet"].encoder_hid_proj = None
    p["unet"].config.encoder_hid_dim_type = None
    p["unet"].set_attn_processor(AttnProcessor2_0())
    pipe = StableDiffusionXLPipeline(vae=p["vae"], text_encoder=p["text_encoder"], text_encoder_2=p["text_encoder_2"],
                                     tokenizer=p["tokenizer"], tokenizer_2=p["tokenizer_2"], unet=p["unet"],
                                     scheduler=p["scheduler"], add_watermarker=False).to(ctx.device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def imageprompt_pipeline(ctx):
    """imageprompt's SDXL pipeline (SD-IPC parts included) on the same weights."""
    from imageprompt.conversion_xl import SDXLConverter
    from imageprompt.pipelines import StableDiffusionXLImagePromptPipeline

    p = ctx.parts
    if "converter" not in ctx.cache:
        ctx.cache["converter"] = SDXLConverter.from_encoders(p["text_projection_l"], p["text_encoder"],
                                                             p["text_encoder_2"], p["tokenizer"], p["tokenizer_2"])
    pipe = StableDiffusionXLImagePromptPipeline(
        vae=p["vae"], text_encoder=p["text_encoder"], text_encoder_2=p["text_encoder_2"], tokenizer=p["tokenizer"],
        tokenizer_2=p["tokenizer_2"], unet=p["unet"], scheduler=p["scheduler"],
        sdipc_image_encoder=_vision(ctx, "l")[0], sdipc_image_encoder_2=_vision(ctx, "g")[0],
        converter=ctx.cache["converter"]).to(ctx.device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _kwargs(ctx) -> dict:
    return dict(num_inference_steps=ctx.steps, guidance_scale=GUIDANCE, height=ctx.size, width=ctx.size)


def _reference(ctx):
    import numpy as np
    from PIL import Image

    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8))


# --------------------------------------------------------------------- rows
def _plain(ctx) -> Result:
    pipe = plain_pipeline(ctx)
    return measure(ctx, lambda: pipe(PROMPT, generator=generators(0, 1), **_kwargs(ctx)), 1)


def _text(ctx) -> Result:
    pipe = imageprompt_pipeline(ctx)
    return measure(ctx, lambda: pipe(prompt=PROMPT, generator=generators(0, 1), **_kwargs(ctx)), 1)


def _variation(ctx) -> Result:
    pipe, image = imageprompt_pipeline(ctx), _reference(ctx)
    return measure(ctx, lambda: pipe(image=image, generator=generators(0, 1), **_kwargs(ctx)), 1)


def _adapter_state(ctx, kind: str):
    """Random weights in the official layout: ``sdxl`` (ip-adapter_sdxl: bigG embeds, a Linear to 4 tokens) or
    ``plus`` (ip-adapter-plus_sdxl_vit-h: a Resampler 1280 wide, 20 heads of 64, on ViT-H's hidden states)."""
    key = f"state_{kind}"
    if key not in ctx.cache:
        unet = ctx.parts["unet"]
        unet.encoder_hid_proj = None
        encoder = _vision(ctx, "g" if kind == "sdxl" else "h")[0]
        ctx.cache[key] = ip_adapter_state_dict(unet, kind, encoder.config, scale=0.02,
                                               resampler_dim=64 if ctx.tiny else 1280)
    return ctx.cache[key]


def _copy(state: dict) -> dict:
    return {k: {n: t.clone() for n, t in v.items()} for k, v in state.items()}


def _ip_diffusers(kind: str):
    def run(ctx) -> Result:
        state = _adapter_state(ctx, kind)
        encoder, processor = _vision(ctx, "g" if kind == "sdxl" else "h")
        pipe = plain_pipeline(ctx)
        pipe.register_modules(image_encoder=encoder, feature_extractor=processor)
        pipe.load_ip_adapter(_copy(state), subfolder=None, weight_name="random.safetensors",
                             image_encoder_folder=None)
        image = _reference(ctx)
        try:
            return measure(ctx, lambda: pipe(PROMPT, ip_adapter_image=image, generator=generators(0, 1),
                                             **_kwargs(ctx)), 1)
        finally:
            pipe.unload_ip_adapter()

    return run


def _ip_imageprompt(kind: str):
    def run(ctx) -> Result:
        state = _adapter_state(ctx, kind)
        encoder, _ = _vision(ctx, "g" if kind == "sdxl" else "h")
        pipe = imageprompt_pipeline(ctx)
        pipe.load_ip_adapter(_copy(state), image_encoder=encoder)
        image = _reference(ctx)
        try:
            return measure(ctx, lambda: pipe(prompt=PROMPT, ip_adapter_image=image, generator=generators(0, 1),
                                             **_kwargs(ctx)), 1)
        finally:
            pipe.unload_ip_adapter()

    return run


def _noise(ctx):
    side = ctx.size // 8 if not ctx.tiny else ctx.size // 2
    gen = torch.Generator("cpu").manual_seed(0)
    return torch.randn(1, 4, side, side, generator=gen).to(ctx.device, ctx.dtype)


def _two_plain(ctx) -> Result:
    pipe, latents = plain_pipeline(ctx), _noise(ctx)
    result = measure(ctx, lambda: pipe([SOURCE, TARGET], latents=latents.expand(2, -1, -1, -1), **_kwargs(ctx)), 2)
    result.note = "2 prompts in one batch"
    return result


def _p2p(ctx) -> Result:
    from imageprompt.pipelines.loading import prompt_to_prompt_from

    pipe, latents = prompt_to_prompt_from(imageprompt_pipeline(ctx)), _noise(ctx)
    pipe.set_progress_bar_config(disable=True)
    result = measure(ctx, lambda: pipe(SOURCE, TARGET, mode="replace", blend_words=["cat", "dog"], latents=latents,
                                       **_kwargs(ctx)), 2)
    result.baseline, result.note = "sdxl plain diffusers, 2 prompts", "source + edit"
    return result


def _inversion(method: str):
    def run(ctx) -> Result:
        from imageprompt.pipelines.loading import prompt_to_prompt_from

        pipe = prompt_to_prompt_from(imageprompt_pipeline(ctx))
        pipe.set_progress_bar_config(disable=True)
        photo = _reference(ctx)
        return measure(ctx, lambda: pipe.invert(photo, SOURCE, method, ctx.steps, GUIDANCE, ctx.size, ctx.size,
                                                num_inner_steps=10), 1)

    return run


ROWS = {
    "sdxl plain diffusers, batch 1": _plain,
    "sdxl imageprompt text, batch 1": _text,
    "sdxl imageprompt variation, batch 1": _variation,
    "sdxl ip-adapter_sdxl (diffusers), batch 1": _ip_diffusers("sdxl"),
    "sdxl ip-adapter_sdxl (imageprompt), batch 1": _ip_imageprompt("sdxl"),
    "sdxl ip-adapter-plus_sdxl_vit-h (diffusers), batch 1": _ip_diffusers("plus"),
    "sdxl ip-adapter-plus_sdxl_vit-h (imageprompt), batch 1": _ip_imageprompt("plus"),
    "sdxl plain diffusers, 2 prompts": _two_plain,
    "sdxl p2p replace + local blend": _p2p,
    "sdxl negative-prompt inversion": _inversion("negative-prompt"),
    "sdxl null-text inversion, 10 inner steps": _inversion("null-text"),
}
SMOKE_ROWS = tuple(name for name in ROWS if "null-text" not in name)


def format_table(ctx: Context, results: list[tuple[str, Result]]) -> str:
    """Markdown table: each row against plain diffusers SDXL with the same image count (or its baseline)."""
    shapes = "tiny random SDXL components" if ctx.tiny else "SDXL base shapes, random weights"
    heading = (f"{shapes}, {str(ctx.dtype).replace('torch.', '')}, {ctx.size}x{ctx.size}, DDIM {ctx.steps} steps, "
               f"CFG {GUIDANCE}, {device_name(ctx)}; {peak_kind(ctx)}")
    return markdown_table(ctx, results, heading, "sdxl plain")


def run(args) -> int:
    """``imageprompt bench --sdxl``: the SDXL rows (``--rows`` picks some; ``--tiny`` runs all but null-text)."""
    if args.rows:
        unknown = [n for n in args.rows if n not in ROWS]
        if unknown:
            raise ValueError(f"unknown SDXL rows {unknown}; see `imageprompt bench --sdxl --list`")
        names = list(args.rows)
    else:
        names = list(SMOKE_ROWS) if args.smoke or (args.tiny and not args.all) else list(ROWS)
    if args.list:
        print("\n".join(names))
        return 0
    steps = args.steps if args.steps != 50 else 30  # SDXL's rows: 30 steps unless asked otherwise
    ctx = build_context(args.device, args.dtype, steps, args.size, args.tiny)
    threads = args.threads or (1 if args.tiny and ctx.device.type == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    results = []
    for name in names:
        results.append((name, ROWS[name](ctx)))
        print(f"  {name}: {results[-1][1].seconds_per_image:.3f} s/image", file=sys.stderr)
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()
    print(format_table(ctx, results))
    return 0
