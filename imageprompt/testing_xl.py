"""Tiny random Stable Diffusion XL-architecture components, built in code.

SDXL has two text encoders: CLIP ViT-L's text tower (``CLIPTextModel``) and
OpenCLIP bigG's (``CLIPTextModelWithProjection``, whose projected EOS state is
SDXL's pooled conditioning). Their penultimate-layer states are concatenated
along the feature axis (768 + 1280 = 2048 = the UNet's ``cross_attention_dim``),
and the UNet adds the pooled embedding and six size/crop numbers
(``addition_embed_type="text_time"``).

The tiny versions keep every dimension distinct so a mixed-up one cannot go
unnoticed: ViT-L text 32 wide (projection 24), bigG text 48 wide (projection 40),
cross-attention 80, ViT-L-shaped vision tower 36 wide (projection 24), bigG-shaped
vision tower 44 wide (projection 40). Everything is written through the real
``save_pretrained`` path, so it loads exactly like a downloaded model.

:func:`save_tiny_sdxl` writes a plain SDXL pipeline folder (diffusers'
``StableDiffusionXLPipeline``), a ViT-L ``CLIPModel`` folder and a bigG
``CLIPModel`` folder, whose text tower is the SDXL folder's ``text_encoder_2``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from imageprompt.testing import TEST_WORDS, TINY_VAE
from imageprompt.tokenizer_writer import write_clip_tokenizer

TINY_TEXT_L = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4,
                   max_position_embeddings=77, hidden_act="gelu")
TINY_TEXT_G = dict(hidden_size=48, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4,
                   max_position_embeddings=77, hidden_act="gelu")
TINY_VISION_L = dict(hidden_size=36, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                     image_size=32, patch_size=8)
TINY_VISION_G = dict(hidden_size=44, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                     image_size=32, patch_size=8)
PROJECTION_L, PROJECTION_G = 24, 40
TINY_SDXL_UNET = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
    projection_class_embeddings_input_dim=6 * 8 + PROJECTION_G,
    cross_attention_dim=TINY_TEXT_L["hidden_size"] + TINY_TEXT_G["hidden_size"], norm_num_groups=32,
)

# SDXL base's UNet and VAE shapes (weights random): for speed and memory figures.
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(5, 10, 20), use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=256, transformer_layers_per_block=(1, 2, 10),
    projection_class_embeddings_input_dim=2816, cross_attention_dim=2048, upcast_attention=False,
)
SDXL_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=1024,
    scaling_factor=0.13025,
)
SDXL_TEXT_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   max_position_embeddings=77, hidden_act="quick_gelu", vocab_size=49408)
SDXL_TEXT_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                   max_position_embeddings=77, hidden_act="gelu", vocab_size=49408, projection_dim=1280)


def _tokenizers(folder: Path):
    """Two tokenizers over one vocabulary, as SDXL's: the second pads with ``!`` (OpenCLIP's pad id 0)."""
    from transformers import CLIPTokenizer

    path = write_clip_tokenizer(TEST_WORDS, folder)
    tokenizer = CLIPTokenizer.from_pretrained(path)
    tokenizer_2 = CLIPTokenizer.from_pretrained(path, pad_token="!")
    return tokenizer, tokenizer_2


def build_sdxl_components(tokenizer_dir: str | Path, seed: int = 0) -> dict:
    """Random tiny SDXL components: unet, vae, scheduler, tokenizer(_2), text_encoder(_2), clip_l, clip_g."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPConfig, CLIPModel, CLIPTextModel, CLIPTextModelWithProjection

    tokenizer, tokenizer_2 = _tokenizers(Path(tokenizer_dir))
    special = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                   eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    clip_l = CLIPModel(CLIPConfig(text_config={**TINY_TEXT_L, **special}, vision_config=TINY_VISION_L,
                                  projection_dim=PROJECTION_L))
    clip_g = CLIPModel(CLIPConfig(text_config={**TINY_TEXT_G, **special}, vision_config=TINY_VISION_G,
                                  projection_dim=PROJECTION_G))
    text_encoder = CLIPTextModel(clip_l.config.text_config)
    getattr(text_encoder, "text_model", text_encoder).load_state_dict(clip_l.text_model.state_dict())
    config_g = clip_g.config.text_config
    config_g.projection_dim = PROJECTION_G
    text_encoder_2 = CLIPTextModelWithProjection(config_g)
    text_encoder_2.text_model.load_state_dict(clip_g.text_model.state_dict())
    text_encoder_2.text_projection.load_state_dict(clip_g.text_projection.state_dict())
    unet = UNet2DConditionModel(**TINY_SDXL_UNET)
    vae = AutoencoderKL(**TINY_VAE)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    return dict(unet=unet, vae=vae, scheduler=scheduler, tokenizer=tokenizer, tokenizer_2=tokenizer_2,
                text_encoder=text_encoder, text_encoder_2=text_encoder_2, clip_l=clip_l, clip_g=clip_g)


def save_tiny_sdxl(folder: str | Path, seed: int = 0) -> tuple[Path, Path, Path]:
    """Write a tiny SDXL pipeline folder and tiny ViT-L / bigG ``CLIPModel`` folders.

    Returns ``(model_dir, clip_l_dir, clip_g_dir)``.
    """
    from diffusers import StableDiffusionXLPipeline

    folder = Path(folder)
    parts = build_sdxl_components(folder / "_tokenizer", seed=seed)
    model_dir = folder / "tiny-sdxl"
    pipe = StableDiffusionXLPipeline(
        vae=parts["vae"], text_encoder=parts["text_encoder"], text_encoder_2=parts["text_encoder_2"],
        tokenizer=parts["tokenizer"], tokenizer_2=parts["tokenizer_2"], unet=parts["unet"],
        scheduler=parts["scheduler"], add_watermarker=False,
    )
    pipe.save_pretrained(model_dir, safe_serialization=True)
    return (model_dir, *save_clip_folders(parts, folder))


def save_clip_folders(parts: dict, folder: Path) -> tuple[Path, Path]:
    """``parts``' two full CLIPs (ViT-L and bigG: SD-IPC's image towers) as ``--clip``/``--clip-2`` folders."""
    from transformers import CLIPImageProcessor

    dirs = []
    for name, clip in (("tiny-clip-l", parts["clip_l"]), ("tiny-clip-bigg", parts["clip_g"])):
        clip.save_pretrained(folder / name, safe_serialization=True)
        size = clip.config.vision_config.image_size
        CLIPImageProcessor(size={"shortest_edge": size},
                           crop_size={"height": size, "width": size}).save_pretrained(folder / name)
        parts["tokenizer"].save_pretrained(folder / name)
        dirs.append(folder / name)
    return dirs[0], dirs[1]
