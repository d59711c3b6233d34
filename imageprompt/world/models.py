"""The bundled shapes-world model's architecture: sizes, the configs of its CLIP, VAE and
UNet (SD 1.x layout, scaled down), its input conventions, and how it is saved.

Kept apart from the training loops (:mod:`imageprompt.world.train`) so that the
probes and tests can build and read the model without the training code.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from imageprompt import world
from imageprompt.world.tokenizer import write_clip_tokenizer

MAX_LENGTH = 77
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# Model sizes (kept here so tests and docs can quote them).
TEXT_HIDDEN = 128  # == projection dim (square text_projection, like ViT-L/14's 768x768)
VISION_HIDDEN = 96
TEXT_LAYERS = 4
UNET_CHANNELS = (48, 96, 128)
VAE_CHANNELS = (16, 32, 64)  # factor 4: 64x64 images -> 16x16x4 latents


def build_tokenizer(folder: Path):
    """The world's CLIP tokenizer: every vocabulary word is one token (see :mod:`imageprompt.world.tokenizer`)."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(write_clip_tokenizer(world.vocabulary(), folder, max_length=MAX_LENGTH))


def clip_config(tokenizer, image_size: int = world.IMAGE_SIZE):
    from transformers import CLIPConfig

    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_HIDDEN,
        intermediate_size=4 * TEXT_HIDDEN,
        num_hidden_layers=TEXT_LAYERS,
        num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH,
        hidden_act="quick_gelu",
        projection_dim=TEXT_HIDDEN,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = dict(
        hidden_size=VISION_HIDDEN,
        intermediate_size=4 * VISION_HIDDEN,
        num_hidden_layers=4,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=16,  # 4x4 patches: enough for five positions, cheap on a CPU
        hidden_act="quick_gelu",
        projection_dim=TEXT_HIDDEN,
    )
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=TEXT_HIDDEN)


def vae_config(image_size: int = world.IMAGE_SIZE) -> dict:
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(VAE_CHANNELS),
        up_block_types=("UpDecoderBlock2D",) * len(VAE_CHANNELS),
        block_out_channels=VAE_CHANNELS,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,  # >= 4 channels per group: per-channel norms would erase colour
        mid_block_add_attention=False,  # local only, so crops train it as well as whole images
        sample_size=image_size,
    )


def unet_config(image_size: int = world.IMAGE_SIZE) -> dict:
    return dict(
        sample_size=image_size // 2 ** (len(VAE_CHANNELS) - 1),  # latent side
        in_channels=4,
        out_channels=4,
        # SD 1.x's layout: cross-attention at the highest latent resolutions (here 16x16 and
        # 8x8), plain ResNet blocks at the lowest (4x4), attention in the mid block. Layout
        # comes from self-attention at the high levels, which prompt-to-prompt relies on, and
        # its local-blend mask is read from the 16x16 cross-attention maps.
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=UNET_CHANNELS,
        layers_per_block=1,
        cross_attention_dim=TEXT_HIDDEN,
        attention_head_dim=4,  # diffusers' legacy name: the number of heads (SD 1.x: 8)
        norm_num_groups=8,  # >= 4 channels per group
    )


SCHEDULER_CONFIG = dict(  # SD 1.5's scheduler/scheduler_config.json
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    clip_sample=False,
    set_alpha_to_one=False,
    skip_prk_steps=True,
    steps_offset=1,
    trained_betas=None,
)


def training_schedule_config() -> dict:
    """SD 1.x's training noise schedule (the DDPMScheduler part of :data:`SCHEDULER_CONFIG`)."""
    keys = ("beta_start", "beta_end", "beta_schedule", "num_train_timesteps", "clip_sample")
    return {k: SCHEDULER_CONFIG[k] for k in keys}


def to_vae_input(images_u8: torch.Tensor) -> torch.Tensor:
    return images_u8.float() / 127.5 - 1.0


def to_clip_input(images_u8: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(CLIP_MEAN, device=images_u8.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=images_u8.device).view(1, 3, 1, 1)
    return (images_u8.float() / 255.0 - mean) / std


def tokenize(tokenizer, captions: list[str], device, padding: str = "max_length") -> torch.Tensor:
    """Token ids padded with EOS to 77 (as SD 1.x), or to the batch's longest with ``padding="longest"``."""
    return tokenizer(
        captions, padding=padding, max_length=MAX_LENGTH, truncation=True, return_tensors="pt"
    ).input_ids.to(device)


@torch.no_grad()
def encode_prompts(text_encoder, tokenizer, prompts: list[str], device, batch: int = 256) -> torch.Tensor:
    out = []
    for i in range(0, len(prompts), batch):
        ids = tokenize(tokenizer, prompts[i : i + batch], device)
        out.append(text_encoder(ids).last_hidden_state)
    return torch.cat(out)


def save_clip(model, tokenizer, folder: Path) -> None:
    from transformers import CLIPImageProcessor

    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    copy_slow_tokenizer_files(tokenizer, folder)
    size = model.config.vision_config.image_size
    CLIPImageProcessor(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    ).save_pretrained(folder)


def text_tower(clip_model):
    """The CLIP's text tower as a ``CLIPTextModel`` (what SD 1.x calls text_encoder)."""
    from transformers import CLIPTextModel

    te = CLIPTextModel(clip_model.config.text_config)
    inner = te.text_model if hasattr(te, "text_model") else te  # transformers 4 wraps the tower
    inner.load_state_dict(clip_model.text_model.state_dict())
    return te.eval()


def save_pipeline(unet, vae, text_encoder, tokenizer, folder: Path, dtype=torch.float32) -> None:
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=PNDMScheduler.from_config(SCHEDULER_CONFIG), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.to(dtype=dtype)
    if folder.exists():
        shutil.rmtree(folder)
    pipe.save_pretrained(folder, safe_serialization=True)
    copy_slow_tokenizer_files(tokenizer, folder / "tokenizer")


def copy_slow_tokenizer_files(tokenizer, folder: Path) -> None:
    """Also ship vocab.json/merges.txt (transformers 5 saves only tokenizer.json)."""
    src = Path(tokenizer.name_or_path)
    for name in ("vocab.json", "merges.txt"):
        if (src / name).is_file() and not (folder / name).exists():
            shutil.copy(src / name, folder / name)


def folder_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20
