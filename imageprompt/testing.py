"""Tiny random Stable Diffusion 1.x-architecture components, built in code.

Used by the tests, the benchmark (with full SD 1.5 shapes) and anyone who wants
to try the toolkit without weights. Everything is written through the real
``save_pretrained`` path so it loads exactly like a downloaded model.
"""

from __future__ import annotations

from pathlib import Path

import torch

from imageprompt.tokenizer_writer import write_clip_tokenizer

TEST_WORDS = (
    "a an the of on in and with photo picture painting red green blue yellow black white circle square "
    "triangle cat dog house tree left right center big small beach snow sky car"
).split()

# SD 1.5's UNet / VAE / CLIP ViT-L/14 shapes (weights random): for speed and memory figures.
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8,
)
SD15_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512,
)
SD15_CLIP_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                      max_position_embeddings=77, hidden_act="quick_gelu")
SD15_CLIP_VISION = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                        image_size=224, patch_size=14, hidden_act="quick_gelu")

TINY_UNET = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32,
)
TINY_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64), layers_per_block=1,
    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=32,
    sample_size=32,
)
TINY_CLIP_TEXT = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                      max_position_embeddings=77)
TINY_CLIP_VISION = dict(hidden_size=48, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                        image_size=32, patch_size=8)


def build_components(tokenizer_dir: str | Path, full_size: bool = False, seed: int = 0) -> dict:
    """Random SD 1.x components: unet, vae, scheduler, tokenizer, clip (a ``CLIPModel``), text_encoder."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPConfig, CLIPModel, CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(TEST_WORDS, tokenizer_dir))
    text_cfg = dict(SD15_CLIP_TEXT if full_size else TINY_CLIP_TEXT)
    vision_cfg = dict(SD15_CLIP_VISION if full_size else TINY_CLIP_VISION)
    if full_size:
        text_cfg["vocab_size"] = 49408  # SD 1.x's table size, so the text encoder has its real shape
    else:
        text_cfg["vocab_size"] = len(tokenizer)
    text_cfg.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    clip = CLIPModel(CLIPConfig(text_config=text_cfg, vision_config=vision_cfg,
                                projection_dim=text_cfg["hidden_size"]))
    text_encoder = CLIPTextModel(clip.config.text_config)
    text_encoder.load_state_dict(clip.text_model.state_dict())
    unet = UNet2DConditionModel(**(SD15_UNET if full_size else TINY_UNET))
    vae = AutoencoderKL(**(SD15_VAE if full_size else TINY_VAE))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return dict(unet=unet, vae=vae, scheduler=scheduler, tokenizer=tokenizer, clip=clip, text_encoder=text_encoder)


def save_tiny_model(folder: str | Path, seed: int = 0) -> tuple[Path, Path]:
    """Write a tiny SD 1.x pipeline folder and a tiny CLIP folder; returns ``(model_dir, clip_dir)``."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPImageProcessor

    folder = Path(folder)
    parts = build_components(folder / "_tokenizer", seed=seed)
    model_dir, clip_dir = folder / "tiny-sd", folder / "tiny-clip"
    pipe = StableDiffusionPipeline(
        vae=parts["vae"], text_encoder=parts["text_encoder"], tokenizer=parts["tokenizer"], unet=parts["unet"],
        scheduler=parts["scheduler"], safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(model_dir, safe_serialization=True)
    parts["clip"].save_pretrained(clip_dir, safe_serialization=True)
    size = TINY_CLIP_VISION["image_size"]
    processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    processor.save_pretrained(clip_dir)
    parts["tokenizer"].save_pretrained(clip_dir)
    return model_dir, clip_dir


def resampler_state_dict(rand, hidden: int, dim: int, heads: int, cross: int) -> dict:
    """Random weights of an IP-Adapter Plus Resampler in the official file's key layout (``image_proj``):
    16 queries, 4 layers, heads of 64. ``rand(*shape)`` makes each tensor."""
    state = {"latents": rand(1, 16, dim), "proj_in.weight": rand(dim, hidden), "proj_in.bias": rand(dim),
             "proj_out.weight": rand(cross, dim), "proj_out.bias": rand(cross),
             "norm_out.weight": 1 + rand(cross), "norm_out.bias": rand(cross)}
    for i in range(4):
        state.update({
            f"layers.{i}.0.norm1.weight": 1 + rand(dim), f"layers.{i}.0.norm1.bias": rand(dim),
            f"layers.{i}.0.norm2.weight": 1 + rand(dim), f"layers.{i}.0.norm2.bias": rand(dim),
            f"layers.{i}.0.to_q.weight": rand(heads * 64, dim),
            f"layers.{i}.0.to_kv.weight": rand(2 * heads * 64, dim),
            f"layers.{i}.0.to_out.weight": rand(dim, heads * 64),
            f"layers.{i}.1.0.weight": 1 + rand(dim), f"layers.{i}.1.0.bias": rand(dim),
            f"layers.{i}.1.1.weight": rand(4 * dim, dim), f"layers.{i}.1.3.weight": rand(dim, 4 * dim),
        })
    return state


def _config_value(config, name: str):
    return config[name] if isinstance(config, dict) else getattr(config, name)


def ip_adapter_state_dict(unet, kind: str = "sd15", encoder_config=None, seed: int = 0, *, scale: float = 0.2,
                          resampler_dim: int = 64, image_proj: dict | None = None,
                          copy_key_values: bool = False) -> dict:
    """An IP-Adapter state dict in the official checkpoint layout for ``unet``: ``{"image_proj": ...,
    "ip_adapter": {"{i}.to_k_ip.weight": ..., "{i}.to_v_ip.weight": ...}}`` with random weights.

    ``kind``: ``sd15`` (and ``sdxl``: a Linear to 4 tokens + LayerNorm, from the encoder's ``projection_dim``),
    ``full-face`` (an MLP on ``hidden_size``) or ``plus`` (the Resampler of :func:`resampler_state_dict`,
    ``resampler_dim`` wide, heads of 64). ``encoder_config``: the image encoder's config (or a dict of it).
    Each tensor is ``randn * scale`` from a generator seeded with ``seed``; LayerNorm weights are ``1 + randn *
    scale``. ``image_proj``: use these projection weights instead (e.g. a freshly initialised
    ``ImageProjection``); ``copy_key_values``: ``to_k_ip``/``to_v_ip`` start as each layer's own ``to_k``/``to_v``
    (IP-Adapter's training initialisation) instead of random.

    The official ids count every attention processor of the UNet in diffusers' order, so the cross-attention
    (``attn2``) layers have the odd ids; ``encoder_hid_proj`` (an image projection already loaded) is left out.
    """
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g) * scale

    cross = unet.config.cross_attention_dim
    if image_proj is not None:
        proj = {k: v.detach().float().cpu().clone() for k, v in image_proj.items()}
    elif kind in ("sd15", "sdxl"):
        emb = _config_value(encoder_config, "projection_dim")
        proj = {"proj.weight": rand(4 * cross, emb), "proj.bias": rand(4 * cross),
                "norm.weight": 1 + rand(cross), "norm.bias": rand(cross)}
    elif kind == "full-face":
        hid = _config_value(encoder_config, "hidden_size")
        proj = {"proj.0.weight": rand(hid, hid), "proj.0.bias": rand(hid), "proj.2.weight": rand(cross, hid),
                "proj.2.bias": rand(cross), "proj.3.weight": 1 + rand(cross), "proj.3.bias": rand(cross)}
    elif kind == "plus":
        if resampler_dim % 64:
            raise ValueError(f"the Resampler's width must be a multiple of its heads of 64, got {resampler_dim}")
        proj = resampler_state_dict(rand, _config_value(encoder_config, "hidden_size"), resampler_dim,
                                    resampler_dim // 64, cross)
    else:
        raise ValueError(f"kind must be sd15, sdxl, full-face or plus, got {kind!r}")
    ip = {}
    names = [n for n in unet.attn_processors if not n.startswith("encoder_hid_proj.")]
    for key_id, name in enumerate(names):
        if not name.endswith("attn2.processor"):
            continue
        attn = unet.get_submodule(name[: -len(".processor")])
        if copy_key_values:
            key, value = (w.weight.detach().float().cpu().clone() for w in (attn.to_k, attn.to_v))
        else:
            key, value = rand(attn.to_k.out_features, cross), rand(attn.to_v.out_features, cross)
        ip[f"{key_id}.to_k_ip.weight"], ip[f"{key_id}.to_v_ip.weight"] = key, value
    return {"image_proj": proj, "ip_adapter": ip}


def random_controlnet(unet, seed: int = 5, scale_factor: int = 2, std: float = 0.3):
    """diffusers' ``ControlNetModel.from_unet`` of ``unet`` (its conditioning embedding downsampling by
    ``scale_factor``, the VAE's), with random zero convolutions: a fresh ControlNet adds nothing at any scale."""
    import math

    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    channels = tuple(8 * 2**i for i in range(int(math.log2(scale_factor)) + 1))
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=channels).eval()
    with torch.no_grad():
        for block in [*net.controlnet_down_blocks, net.controlnet_mid_block]:
            for p in block.parameters():
                p.normal_(0, std)
    return net


def toolbox_images(size: int = 32, seed: int = 7) -> dict:
    """A random control image, a photo (a yellow square on blue) and a mask of its left half, ``size`` square."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    photo = Image.new("RGB", (size, size), (30, 60, 200))
    photo.paste((240, 200, 20), (size // 4, size // 4, 3 * size // 4, 3 * size // 4))
    mask = Image.new("L", (size, size), 0)
    mask.paste(255, (0, 0, size // 2, size))
    return {"control": Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)), "photo": photo,
            "mask": mask}
