"""Tiny random Stable Diffusion 3 / 3.5-architecture components, built in code.

SD3's denoiser is an MM-DiT (``SD3Transformer2DModel``): image and text tokens attend jointly. The text is
CLIP ViT-L's and OpenCLIP bigG's penultimate states (concatenated, zero-padded to T5's width) followed by T5's
states along the sequence; the pooled conditioning is both CLIP towers' projected EOS embeddings, concatenated.
The VAE has 16 latent channels; sampling is flow matching (``FlowMatchEulerDiscreteScheduler``).

The tiny versions keep every dimension distinct: ViT-L text 32 wide (projection 24), bigG text 48 wide
(projection 40), T5 96 wide (= ``joint_attention_dim``), pooled 24 + 40 = 64, transformer 4 heads x 8 = 32,
2 joint blocks, patch 2. Everything is written through ``save_pretrained``, so it loads exactly like a
downloaded model. :func:`sd3_ip_adapter_state_dict` writes a random IP-Adapter in InstantX's SD3.5-Large layout
(the keys diffusers' ``SD3IPAdapterMixin.load_ip_adapter`` converts) for a tiny ``SiglipVisionModel``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from imageprompt.testing import TEST_WORDS
from imageprompt.testing_xl import (
    PROJECTION_G,
    PROJECTION_L,
    TINY_TEXT_G,
    TINY_TEXT_L,
    TINY_VISION_G,
    TINY_VISION_L,
    save_clip_folders,
)
from imageprompt.tokenizer_writer import write_clip_tokenizer, write_t5_tokenizer

T5_WIDTH = 96
TINY_T5 = dict(d_model=T5_WIDTH, d_kv=8, d_ff=37, num_layers=2, num_heads=4, relative_attention_num_buckets=8)
TINY_SD3_TRANSFORMER = dict(
    sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
    num_attention_heads=4, joint_attention_dim=T5_WIDTH, caption_projection_dim=32,
    pooled_projection_dim=PROJECTION_L + PROJECTION_G, pos_embed_max_size=16,
)
TINY_SD3_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(32, 64), layers_per_block=1,
    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=32,
    sample_size=32, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035,
)
TINY_SIGLIP = dict(hidden_size=48, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                   patch_size=8)
TINY_T5_LENGTH = 16  # ``max_sequence_length`` for the tiny model's T5 states

# SD 3.5 Large's transformer shapes (weights random): for speed and memory figures.
SD35_LARGE_TRANSFORMER = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=38, attention_head_dim=64,
    num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432, pooled_projection_dim=2048,
    pos_embed_max_size=192, qk_norm="rms_norm",
)


def _clip_pair(tokenizer, seed: int):
    from transformers import CLIPConfig, CLIPModel, CLIPTextModelWithProjection

    special = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                   eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    out = []
    for text, vision, projection in ((TINY_TEXT_L, TINY_VISION_L, PROJECTION_L), (TINY_TEXT_G, TINY_VISION_G,
                                                                                 PROJECTION_G)):
        clip = CLIPModel(CLIPConfig(text_config={**text, **special}, vision_config=vision, projection_dim=projection))
        config = clip.config.text_config
        config.projection_dim = projection
        tower = CLIPTextModelWithProjection(config)
        tower.text_model.load_state_dict(clip.text_model.state_dict())
        tower.text_projection.load_state_dict(clip.text_projection.state_dict())
        out += [clip, tower]
    return out


def build_sd3_components(tokenizer_dir: str | Path, seed: int = 0) -> dict:
    """Random tiny SD3 components: transformer, vae, scheduler, tokenizer(_2, _3), text_encoder(_2, _3), and the
    ViT-L / bigG ``CLIPModel``s whose text towers are ``text_encoder`` / ``text_encoder_2`` (clip_l, clip_g)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

    folder = Path(tokenizer_dir)
    path = write_clip_tokenizer(TEST_WORDS, folder / "clip")
    tokenizer = CLIPTokenizer.from_pretrained(path)
    tokenizer_2 = CLIPTokenizer.from_pretrained(path, pad_token="!")  # OpenCLIP pads with id 0, as SDXL's
    tokenizer_3 = T5TokenizerFast.from_pretrained(write_t5_tokenizer(TEST_WORDS, folder / "t5"))
    clip_l, text_encoder, clip_g, text_encoder_2 = _clip_pair(tokenizer, seed)
    text_encoder_3 = T5EncoderModel(T5Config(vocab_size=len(tokenizer_3), pad_token_id=tokenizer_3.pad_token_id,
                                             eos_token_id=tokenizer_3.eos_token_id, **TINY_T5))
    transformer = SD3Transformer2DModel(**TINY_SD3_TRANSFORMER)
    vae = AutoencoderKL(**TINY_SD3_VAE)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    return dict(transformer=transformer, vae=vae, scheduler=scheduler, tokenizer=tokenizer, tokenizer_2=tokenizer_2,
                tokenizer_3=tokenizer_3, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                text_encoder_3=text_encoder_3, clip_l=clip_l, clip_g=clip_g)


def save_tiny_sd3(folder: str | Path, seed: int = 0) -> tuple[Path, Path, Path]:
    """Write a tiny SD3 pipeline folder (diffusers' ``StableDiffusion3Pipeline``) and tiny ViT-L / bigG
    ``CLIPModel`` folders (SD-IPC's image towers). Returns ``(model_dir, clip_l_dir, clip_g_dir)``."""
    from diffusers import StableDiffusion3Pipeline

    folder = Path(folder)
    parts = build_sd3_components(folder / "_tokenizer", seed=seed)
    model_dir = folder / "tiny-sd3"
    names = ("transformer", "vae", "scheduler", "tokenizer", "tokenizer_2", "tokenizer_3", "text_encoder",
             "text_encoder_2", "text_encoder_3")
    StableDiffusion3Pipeline(**{n: parts[n] for n in names}).save_pretrained(model_dir, safe_serialization=True)
    return (model_dir, *save_clip_folders(parts, folder))


def save_tiny_siglip(folder: str | Path, seed: int = 0) -> Path:
    """A tiny ``SiglipVisionModel`` and its ``SiglipImageProcessor`` in ``folder`` (the SD3.5 IP-Adapter's encoder)."""
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(seed)
    folder = Path(folder)
    SiglipVisionModel(SiglipVisionConfig(**TINY_SIGLIP)).save_pretrained(folder, safe_serialization=True)
    size = TINY_SIGLIP["image_size"]
    SiglipImageProcessor(size={"height": size, "width": size}).save_pretrained(folder)
    return folder


# diffusers' module names -> InstantX's (the inverse of `SD3Transformer2DLoadersMixin`'s conversion)
_INSTANTX_NAMES = (("ln0", "0.norm1"), ("ln1", "0.norm2"), ("attn.to_q", "0.to_q"), ("attn.to_kv", "0.to_kv"),
                   ("attn.to_out.0", "0.to_out"), ("adaln_norm", "1.0"), ("ff.net.0.proj", "1.1"),
                   ("ff.net.2", "1.3"), ("adaln_proj", "2.1"))


def sd3_ip_adapter_state_dict(transformer, image_embed_dim: int = TINY_SIGLIP["hidden_size"], hidden_dim: int = 64,
                              num_queries: int = 8, timestep_in_dim: int = 32, seed: int = 0) -> dict:
    """A random SD3.5 IP-Adapter for ``transformer`` in InstantX's layout: ``{"image_proj": ..., "ip_adapter":
    ...}`` (the two prefixes of its ``ip-adapter.safetensors``), one processor per attention layer."""
    from diffusers.models.attention_processor import SD3IPAdapterJointAttnProcessor2_0
    from diffusers.models.embeddings import IPAdapterTimeImageProjection

    torch.manual_seed(seed)
    inner = transformer.config.attention_head_dim * transformer.config.num_attention_heads
    proj = IPAdapterTimeImageProjection(embed_dim=image_embed_dim, output_dim=inner, hidden_dim=hidden_dim,
                                        heads=hidden_dim // 64, num_queries=num_queries,
                                        timestep_in_dim=timestep_in_dim)
    image_proj = {}
    for key, value in proj.state_dict().items():
        if key.startswith("layers."):
            index, rest = key.split(".", 2)[1:]
            for ours, theirs in _INSTANTX_NAMES:
                if rest.startswith(ours + "."):
                    rest = theirs + rest[len(ours):]
                    break
            key = f"layers.{index}.{rest}"
        image_proj[key] = value.clone()
    ip_adapter = {}
    for i in range(len(transformer.attn_processors)):
        proc = SD3IPAdapterJointAttnProcessor2_0(inner, inner, transformer.config.attention_head_dim, hidden_dim)
        for name, value in proc.state_dict().items():
            ip_adapter[f"{i}.{name}"] = value.clone() + (0.1 * torch.randn_like(value) if "norm" in name else 0)
    return {"image_proj": image_proj, "ip_adapter": ip_adapter}


def save_sd3_ip_adapter(path: str | Path, state_dict: dict) -> Path:
    """Write :func:`sd3_ip_adapter_state_dict`'s dict as one safetensors file with InstantX's key prefixes."""
    from safetensors.torch import save_file

    flat = {f"{part}.{k}": v.contiguous() for part in ("image_proj", "ip_adapter") for k, v in state_dict[part].items()}
    save_file(flat, str(path))
    return Path(path)
