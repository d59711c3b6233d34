"""Benchmark rows for Stable Diffusion 3.5: ``imageprompt bench --sd3`` (smoke: ``--sd3 --tiny``).

SD 3.5 Large's shapes with random weights (speed and memory do not depend on weight values): the MM-DiT (38
joint blocks, 2432 wide), CLIP ViT-L and bigG text towers, T5-XXL's encoder, the 16-channel VAE; fp16 on a GPU,
1024x1024, 28 flow-matching steps, CFG 3.5 (diffusers' SD 3.5 Large example). Plain diffusers
``StableDiffusion3Pipeline`` against each imageprompt technique in the same process, as ratios. The full shapes
need a CUDA GPU (about 30 GB in fp16): on a CPU only ``--tiny`` runs.
"""

from __future__ import annotations

import sys

import torch

from imageprompt.bench.common import Context, Result, device_name, markdown_table, measure, peak_kind
from imageprompt.images import generators

PROMPT, SOURCE, TARGET = "a photo of a cat", "a photo of a cat on the beach", "a photo of a dog on the beach"
GUIDANCE, STEPS, T5_TOKENS = 3.5, 28, 256
SD35_TEXT_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
SD35_TEXT_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                   max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)
T5_XXL = dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, feed_forward_proj="gated-gelu")
SD35_VAE = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
                layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, sample_size=1024, use_quant_conv=False,
                use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)
SIGLIP_SO400M = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                     image_size=384, patch_size=14)


def build_context(device: str | None, dtype: str | None, steps: int, size: int | None, tiny: bool) -> Context:
    """Random SD3 components (built on the device); refuses the full shapes without a CUDA GPU."""
    import tempfile

    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from imageprompt.loading import default_device, resolve_dtype
    from imageprompt.testing_sd3 import SD35_LARGE_TRANSFORMER, build_sd3_components

    dev = torch.device(device) if device else default_device()
    if not tiny and dev.type != "cuda":
        raise ValueError("the SD 3.5 Large rows need a CUDA GPU (about 30 GB in fp16); use --tiny on a CPU")
    torch_dtype = resolve_dtype(dtype, dev)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        parts = build_sd3_components(tmp)  # tiny, and the tokenizers either way
    for name in ("clip_l", "clip_g"):
        parts.pop(name)
    if not tiny:
        tok = parts["tokenizer"]
        special = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                       vocab_size=len(tok))
        with torch.device(dev):
            parts["text_encoder"] = CLIPTextModelWithProjection(CLIPTextConfig(**SD35_TEXT_L, **special))
            parts["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(**SD35_TEXT_G, **special))
            parts["text_encoder_3"] = T5EncoderModel(T5Config(vocab_size=len(parts["tokenizer_3"]), **T5_XXL))
            parts["transformer"] = SD3Transformer2DModel(**SD35_LARGE_TRANSFORMER)
            parts["vae"] = AutoencoderKL(**SD35_VAE)
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        parts[name] = parts[name].to(dev, torch_dtype).eval()
    return Context(dev, torch_dtype, steps, size or (32 if tiny else 1024), parts, tiny)


def _plain(ctx):
    from diffusers import StableDiffusion3Pipeline

    names = ("transformer", "scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2",
             "text_encoder_3", "tokenizer_3")
    pipe = StableDiffusion3Pipeline(**{n: ctx.parts[n] for n in names}).to(ctx.device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _ours(ctx, cls_name: str = "StableDiffusion3ImagePromptPipeline"):
    import imageprompt.pipelines as ours

    pipe = getattr(ours, cls_name).from_pipe(_plain(ctx))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _kwargs(ctx) -> dict:
    return dict(num_inference_steps=ctx.steps, guidance_scale=GUIDANCE, height=ctx.size, width=ctx.size,
                max_sequence_length=16 if ctx.tiny else T5_TOKENS)


def _ip_state(ctx):
    """A random SD3.5-Large IP-Adapter (InstantX layout) and a SigLIP encoder of so400m's shapes (tiny: tiny)."""
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    from imageprompt.testing_sd3 import TINY_SIGLIP, sd3_ip_adapter_state_dict

    if "ip" not in ctx.cache:
        shape = TINY_SIGLIP if ctx.tiny else SIGLIP_SO400M
        with torch.device(ctx.device):
            encoder = SiglipVisionModel(SiglipVisionConfig(**shape)).to(ctx.dtype).eval()
        size = shape["image_size"]
        state = sd3_ip_adapter_state_dict(ctx.parts["transformer"], shape["hidden_size"],
                                          64 if ctx.tiny else 1280, 8 if ctx.tiny else 64, 32 if ctx.tiny else 320)
        ctx.cache["ip"] = (state, encoder, SiglipImageProcessor(size={"height": size, "width": size}))
    return ctx.cache["ip"]


def _with_adapter(pipe, ctx):
    state, encoder, processor = _ip_state(ctx)
    pipe.register_modules(image_encoder=encoder, feature_extractor=processor)
    pipe.load_ip_adapter({k: {n: t.clone() for n, t in v.items()} for k, v in state.items()})
    pipe.transformer.to(ctx.device, ctx.dtype)
    pipe.set_ip_adapter_scale(0.5)
    return pipe


def _noise(ctx):
    side = ctx.size // 8 if not ctx.tiny else ctx.size // 2
    return torch.randn(1, 16, side, side, generator=torch.Generator().manual_seed(0)).to(ctx.device, ctx.dtype)


def _row_plain(ctx) -> Result:
    pipe = _plain(ctx)
    return measure(ctx, lambda: pipe(PROMPT, generator=generators(0, 1), **_kwargs(ctx)), 1)


def _row_text(ctx) -> Result:
    pipe = _ours(ctx)
    return measure(ctx, lambda: pipe(prompt=PROMPT, generator=generators(0, 1), **_kwargs(ctx)), 1)


def _row_adapter(ours: bool):
    def run(ctx) -> Result:
        pipe = _with_adapter(_ours(ctx) if ours else _plain(ctx), ctx)
        image = ctx.reference_image()
        try:
            return measure(ctx, lambda: pipe(prompt=PROMPT, ip_adapter_image=image, generator=generators(0, 1),
                                             **_kwargs(ctx)), 1)
        finally:
            pipe.unload_ip_adapter()

    return run


def _row_two(ctx) -> Result:
    pipe, latents = _plain(ctx), _noise(ctx)
    result = measure(ctx, lambda: pipe([SOURCE, TARGET], latents=latents.expand(2, -1, -1, -1), **_kwargs(ctx)), 2)
    result.note = "2 prompts in one batch"
    return result


def _row_p2p(ctx) -> Result:
    pipe, latents = _ours(ctx, "StableDiffusion3PromptToPromptPipeline"), _noise(ctx)
    result = measure(ctx, lambda: pipe(SOURCE, TARGET, blend_words=["cat", "dog"], latents=latents,
                                       **_kwargs(ctx)), 2)
    result.baseline, result.note = "sd3 plain diffusers, 2 prompts", "source + edit, explicit joint attention"
    return result


def _row_inversion(ctx) -> Result:
    pipe = _ours(ctx, "StableDiffusion3PromptToPromptPipeline")
    photo, kw = ctx.reference_image(), _kwargs(ctx)
    return measure(ctx, lambda: pipe.invert(photo, SOURCE, "flow", ctx.steps, 1.0, ctx.size, ctx.size,
                                            kw["max_sequence_length"]), 1)


ROWS = {
    "sd3 plain diffusers, batch 1": _row_plain,
    "sd3 imageprompt text, batch 1": _row_text,
    "sd3 ip-adapter sd3.5-large (diffusers), batch 1": _row_adapter(False),
    "sd3 ip-adapter sd3.5-large (imageprompt), batch 1": _row_adapter(True),
    "sd3 plain diffusers, 2 prompts": _row_two,
    "sd3 p2p replace + local blend": _row_p2p,
    "sd3 flow-ODE inversion": _row_inversion,
}


def format_table(ctx: Context, results: list[tuple[str, Result]]) -> str:
    """Markdown table: each row against plain diffusers SD3 with the same image count (or its baseline)."""
    shapes = "tiny random SD3 components" if ctx.tiny else "SD 3.5 Large shapes, random weights"
    heading = (f"{shapes}, {str(ctx.dtype).replace('torch.', '')}, {ctx.size}x{ctx.size}, flow-match Euler "
               f"{ctx.steps} steps, CFG {GUIDANCE}, {device_name(ctx)}; {peak_kind(ctx)}")
    return markdown_table(ctx, results, heading, "sd3 plain")


def run(args) -> int:
    """``imageprompt bench --sd3``: the SD 3.5 rows (``--rows`` picks some)."""
    names = list(args.rows) if args.rows else list(ROWS)
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        raise ValueError(f"unknown SD3 rows {unknown}; see `imageprompt bench --sd3 --list`")
    if args.list:
        print("\n".join(names))
        return 0
    steps = args.steps if args.steps != 50 else STEPS  # 28 steps unless asked otherwise
    ctx = build_context(args.device, args.dtype, steps, args.size, args.tiny)
    if args.threads or (args.tiny and ctx.device.type == "cpu"):
        torch.set_num_threads(args.threads or 1)
    results = []
    for name in names:
        results.append((name, ROWS[name](ctx)))
        print(f"  {name}: {results[-1][1].seconds_per_image:.3f} s/image", file=sys.stderr)
    print(format_table(ctx, results))
    return 0
