"""Train an IP-Adapter (sd15 format) on image-caption pairs: ``imageprompt train-adapter DATA --out FILE``.

The recipe of Ye et al., "IP-Adapter" (2023), Sec. 3.3 and their training script:
the UNet, VAE, text encoder and image encoder stay frozen; only the image
projection (``Linear(embed -> 4 x cross_dim)`` + LayerNorm) and each
cross-attention layer's ``to_k_ip``/``to_v_ip`` train, the latter initialised
from the layer's ``to_k``/``to_v``. Loss: the ordinary noise-prediction MSE.
Text, image and both are dropped 5% of the time each (for classifier-free
guidance). AdamW, lr 1e-4, weight decay 0.01.

Runs through accelerate: ``accelerate launch -m imageprompt train-adapter ...``
trains on several GPUs. Checkpoints (adapter + optimizer + step) are written
every ``--checkpoint-every`` steps next to ``--out``; ``--resume latest``
continues from the newest. The result is the official file format, loadable by
``pipe.load_ip_adapter`` in imageprompt and in diffusers.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from imageprompt.images import IMAGE_SUFFIXES, read_jsonl

logger = logging.getLogger(__name__)

DROP_RATE = 0.05  # each of: text only, image only, both (the paper's 0.05)


# ------------------------------------------------------------------ data
def read_pairs(data: str | Path) -> list[tuple[Path, str]]:
    """Image-caption pairs from a folder (``x.png`` + ``x.txt``) or a JSONL file (``{"image", "caption"|"text"}``)."""
    data = Path(data)
    if data.is_dir():
        pairs = []
        for image in sorted(p for p in data.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
            caption = image.with_suffix(".txt")
            pairs.append((image, caption.read_text(encoding="utf-8").strip() if caption.exists() else ""))
    elif data.is_file() and data.suffix.lower() in (".jsonl", ".json"):
        pairs = []
        for number, row in read_jsonl(data):
            try:
                image = Path(row["image"])
                caption = str(row.get("caption", row.get("text", "")))
            except (KeyError, TypeError) as err:
                raise ValueError(f"{data}:{number}: expected {{\"image\": ..., \"caption\": ...}} ({err})") from None
            pairs.append((image if image.is_absolute() else data.parent / image, caption))
    else:
        raise FileNotFoundError(f"{data}: not a folder of images nor a .jsonl file")
    if not pairs:
        raise ValueError(f"{data}: no image-caption pairs found")
    missing = [str(p) for p, _ in pairs if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} images missing, e.g. {missing[0]}")
    return pairs


def center_crop(image: Image.Image, size: int) -> Image.Image:
    image = image.convert("RGB")
    scale = size / min(image.size)
    image = image.resize((max(size, round(image.width * scale)), max(size, round(image.height * scale))),
                         Image.Resampling.BICUBIC)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    return image.crop((left, top, left + size, top + size))


class ImageCaptionDataset(torch.utils.data.Dataset):
    """VAE pixels in [-1, 1], the image encoder's pixels, and token ids, per pair."""

    def __init__(self, pairs, resolution: int, tokenizer, feature_extractor):
        self.pairs, self.resolution = pairs, resolution
        self.tokenizer, self.feature_extractor = tokenizer, feature_extractor

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict:
        path, caption = self.pairs[index]
        with Image.open(path) as im:
            image = im.convert("RGB")
        pixels = np.asarray(center_crop(image, self.resolution), dtype=np.float32) / 127.5 - 1.0
        ids = self.tokenizer(caption, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids[0]
        clip = self.feature_extractor(images=image, return_tensors="pt").pixel_values[0]
        return {"pixels": torch.from_numpy(pixels).permute(2, 0, 1), "clip_pixels": clip, "input_ids": ids}


# ----------------------------------------------------------------- model
def initial_state_dict(unet, image_embed_dim: int, seed: int = 0) -> dict:
    """An official-format sd15 state: random projection, ``to_k_ip``/``to_v_ip`` copied from ``to_k``/``to_v``."""
    from diffusers.models.embeddings import ImageProjection

    from imageprompt.testing import ip_adapter_state_dict

    torch.manual_seed(seed)
    cross = unet.config.cross_attention_dim
    proj = ImageProjection(image_embed_dim=image_embed_dim, cross_attention_dim=cross, num_image_text_embeds=4)
    image_proj = {"proj.weight": proj.image_embeds.weight.data, "proj.bias": proj.image_embeds.bias.data,
                  "norm.weight": proj.norm.weight.data, "norm.bias": proj.norm.bias.data}
    return ip_adapter_state_dict(unet, "sd15", image_proj=image_proj, copy_key_values=True)


def save_adapter(state: dict, path: str | Path) -> Path:
    """Write the official format atomically: flattened ``image_proj.*``/``ip_adapter.*`` (.safetensors) or a .bin."""
    from imageprompt.images import atomic_write

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".bin":
        return atomic_write(path, lambda handle: torch.save(state, handle))
    from safetensors.torch import save

    data = save({f"{part}.{k}": v.contiguous() for part in state for k, v in state[part].items()},
                metadata={"format": "pt"})
    return atomic_write(path, lambda handle: handle.write(data))


@dataclass
class TrainingParts:
    unet: object
    vae: object
    text_encoder: object
    tokenizer: object
    noise_scheduler: object
    image_encoder: object
    feature_extractor: object
    adapter: object  # imageprompt.ip_adapter.IPAdapter (its modules live inside the UNet)


def build_training_parts(pipe, image_encoder=None, feature_extractor=None, init: dict | None = None,
                         seed: int = 0) -> TrainingParts:
    """Frozen SD parts from ``pipe``; a fresh (or ``init``) sd15 adapter installed in its UNet, trainable."""
    from diffusers import DDPMScheduler

    from imageprompt.ip_adapter import build_adapters, install_adapters

    image_encoder = image_encoder if image_encoder is not None else pipe.sdipc_image_encoder
    feature_extractor = feature_extractor if feature_extractor is not None else pipe.feature_extractor
    for module in (pipe.unet, pipe.vae, pipe.text_encoder, image_encoder):
        module.requires_grad_(False).eval()
    state = init or initial_state_dict(pipe.unet, image_encoder.config.projection_dim, seed)
    adapter, = build_adapters(pipe, [state], [(image_encoder, feature_extractor)], ["trained"])
    install_adapters(pipe.unet, [adapter])
    for param in adapter_parameters(adapter):
        param.data = param.data.float()
        param.requires_grad_(True)
    adapter.projection.train()
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    return TrainingParts(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, scheduler, image_encoder,
                         feature_extractor, adapter)


def adapter_parameters(adapter) -> list[torch.nn.Parameter]:
    params = list(adapter.projection.parameters())
    for k, v in adapter.keys_values.values():
        params += [k.weight, v.weight]
    return params


def training_loss(parts: TrainingParts, batch: dict, generator: torch.Generator | None = None,
                  timesteps: torch.Tensor | None = None, drop: bool = True) -> torch.Tensor:
    """Noise-prediction MSE with IP-Adapter's condition dropout (5% text, 5% image, 5% both)."""
    device = batch["pixels"].device
    dtype = parts.vae.dtype
    with torch.no_grad():
        latents = parts.vae.encode(batch["pixels"].to(dtype)).latent_dist.mean * parts.vae.config.scaling_factor
        image_embeds = parts.image_encoder(batch["clip_pixels"].to(parts.image_encoder.dtype)).image_embeds
        ids = batch["input_ids"]
        if drop:
            r = torch.rand(len(ids), generator=generator, device="cpu").to(device)
            drop_text = (r < DROP_RATE) | ((r >= 2 * DROP_RATE) & (r < 3 * DROP_RATE))
            drop_image = r >= DROP_RATE
            drop_image &= r < 3 * DROP_RATE
            empty = parts.tokenizer("", padding="max_length", max_length=ids.shape[1], return_tensors="pt").input_ids
            ids = torch.where(drop_text[:, None], empty.to(ids.device), ids)
            image_embeds = image_embeds * (~drop_image).to(image_embeds.dtype)[:, None]
        text = parts.text_encoder(ids)[0]
    noise = torch.randn(latents.shape, generator=generator, device="cpu").to(device, latents.dtype)
    if timesteps is None:
        steps = parts.noise_scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, steps, (len(latents),), generator=generator, device="cpu")
    timesteps = timesteps.to(device)
    noisy = parts.noise_scheduler.add_noise(latents, noise, timesteps)
    target = noise
    if parts.noise_scheduler.config.prediction_type == "v_prediction":
        target = parts.noise_scheduler.get_velocity(latents, noise, timesteps)
    pred = parts.unet(noisy, timesteps, text, added_cond_kwargs={"image_embeds": [image_embeds[:, None]]}).sample
    return F.mse_loss(pred.float(), target.float())


# ------------------------------------------------------------ checkpoints
def checkpoint_dir(out: Path) -> Path:
    return out.with_name(out.stem + "-checkpoints")


def latest_checkpoint(out: Path) -> Path | None:
    found = sorted(checkpoint_dir(out).glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    return found[-1] if found else None


def write_checkpoint(parts: TrainingParts, optimizer, step: int, out: Path) -> Path:
    folder = checkpoint_dir(out) / f"step-{step}"
    folder.mkdir(parents=True, exist_ok=True)
    save_adapter(parts.adapter.state_dict(), folder / "adapter.safetensors")
    torch.save(optimizer.state_dict(), folder / "optimizer.pt")
    (folder / "state.json").write_text(json.dumps({"step": step}))
    return folder


def read_checkpoint_state(folder: Path) -> tuple[dict, dict, int]:
    """``(adapter_state, optimizer_state, step)``; everything read without unpickling code."""
    from imageprompt.adapter_files import read_checkpoint

    adapter = read_checkpoint(folder / "adapter.safetensors")
    optimizer = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True)
    step = json.loads((folder / "state.json").read_text())["step"]
    return adapter, optimizer, int(step)


# --------------------------------------------------------------- training
def train(pipe, pairs, out: str | Path, steps: int = 1000, batch_size: int = 4, resolution: int | None = None,
          learning_rate: float = 1e-4, weight_decay: float = 0.01, checkpoint_every: int = 500,
          resume: str | None = None, seed: int = 0, mixed_precision: str = "no",
          gradient_accumulation_steps: int = 1, image_encoder=None, feature_extractor=None,
          progress: bool = True) -> dict:
    """Train an sd15-format adapter on ``pairs`` and save it to ``out``; returns ``{"losses", "path", "step"}``.

    ``resolution``: side of the square training crops (default: the model's own size,
    ``unet.config.sample_size * vae_scale_factor``).
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    out = Path(out)
    if resolution is None:
        resolution = int(pipe.unet.config.sample_size * pipe.vae_scale_factor)
    accelerator = Accelerator(mixed_precision=mixed_precision, gradient_accumulation_steps=gradient_accumulation_steps)
    set_seed(seed)
    init, optimizer_state, start = None, None, 0
    if resume:
        folder = latest_checkpoint(out) if resume == "latest" else Path(resume)
        if folder is None or not (folder / "state.json").exists():
            raise FileNotFoundError(f"no checkpoint to resume from ({resume}; looked in {checkpoint_dir(out)})")
        init, optimizer_state, start = read_checkpoint_state(folder)
        accelerator.print(f"resuming from {folder} (step {start})")
    parts = build_training_parts(pipe, image_encoder, feature_extractor, init, seed)
    parts.vae.to(accelerator.device)
    parts.text_encoder.to(accelerator.device)
    parts.image_encoder.to(accelerator.device)
    params = adapter_parameters(parts.adapter)
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    dataset = ImageCaptionDataset(pairs, resolution, parts.tokenizer, parts.feature_extractor)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True,
                                         drop_last=len(dataset) >= batch_size,
                                         generator=torch.Generator().manual_seed(seed))
    unet, optimizer, loader = accelerator.prepare(parts.unet, optimizer, loader)
    parts.unet = unet
    generator = torch.Generator().manual_seed(seed + accelerator.process_index + 1000 * start)
    losses, step = [], start
    bar = tqdm(total=steps, initial=start, disable=not (progress and accelerator.is_main_process), desc="train-adapter")
    epochs = math.ceil(max(steps - start, 0) / max(len(loader), 1)) + 1
    for _ in range(epochs):
        for batch in loader:
            if step >= steps:
                break
            with accelerator.accumulate(unet):
                with accelerator.autocast():
                    loss = training_loss(parts, batch, generator)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(params, 1.0)
                optimizer.step()
                optimizer.zero_grad()
            if not accelerator.sync_gradients:
                continue
            step += 1
            losses.append(accelerator.gather(loss.detach()[None]).mean().item())
            bar.update()
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            if checkpoint_every and step % checkpoint_every == 0 and step < steps and accelerator.is_main_process:
                write_checkpoint(parts, optimizer, step, out)
            accelerator.wait_for_everyone()
    bar.close()
    if accelerator.is_main_process:
        save_adapter(parts.adapter.state_dict(), out)
    accelerator.wait_for_everyone()
    return {"losses": losses, "path": out, "step": step}
