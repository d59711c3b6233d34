"""Train the bundled shapes-world model: a CLIP, a VAE and a UNet in SD 1.x layout.

Reproducible from a seed. Three stages, each seeded on its own so they can be
run separately (``--stages``) and still give the same weights; by default the
VAE trains in a second process while the CLIP trains (``--no-parallel`` to
run them one after the other), then the UNet:

1. ``clip``: a ``CLIPModel`` (text and vision towers, both projections) with the
   contrastive loss on world images and captions. The text hidden size equals
   the projection size, so ``text_projection`` is square as in ViT-L/14.
2. ``vae``: an ``AutoencoderKL`` (4 latent channels, downsampling factor 4:
   64x64 images, 16x16 latents), trained mostly on 32x32 crops. The latent
   scaling factor is set to 1 / std of the latents, as SD's 0.18215.
3. ``unet``: a ``UNet2DConditionModel`` on the frozen CLIP text tower's last
   hidden states (77 tokens, padded with EOS as SD 1.x), DDPM noise-prediction
   loss, SD's scaled-linear betas, 10% caption dropout (empty prompt) so
   classifier-free guidance works. The EMA of the weights is shipped.

Outputs (in ``--out``): ``shapes-sd/`` (``StableDiffusionPipeline`` layout) and
``shapes-clip/`` (the full ``CLIPModel``, a ``CLIPImageProcessor`` and the
tokenizer). Example::

    python -m imageprompt.train_world --out checkpoints --seed 0
    python -m imageprompt.train_world --out /tmp/ck --device cuda   # faster

With the defaults, one thread per process, it took about 38 minutes of wall
time on a shared 2-core CPU (CLIP 6.5 min alongside the VAE 8.5 min, then the
UNet; see ``shapes-sd/training.json``).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from imageprompt import world
from imageprompt.tokenizer import write_clip_tokenizer

MAX_LENGTH = 77
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# Model sizes (kept here so tests and docs can quote them).
TEXT_HIDDEN = 128  # == projection dim (square text_projection, like ViT-L/14's 768x768)
VISION_HIDDEN = 96
UNET_CHANNELS = (32, 64, 128)
VAE_CHANNELS = (16, 32, 64)  # factor 4: 64x64 images -> 16x16x4 latents


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------- configs


def build_tokenizer(folder: Path):
    """The world's CLIP tokenizer: every vocabulary word is one token (see :mod:`imageprompt.tokenizer`)."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(write_clip_tokenizer(world.vocabulary(), folder, max_length=MAX_LENGTH))


def clip_config(tokenizer, image_size: int = world.IMAGE_SIZE):
    from transformers import CLIPConfig

    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_HIDDEN,
        intermediate_size=4 * TEXT_HIDDEN,
        num_hidden_layers=3,
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
        # Attention at 8x8 and 4x4 and in the mid block, none at 16x16 (it would double
        # the cost on a CPU). SD 1.x has it at 64, 32 and 16 and none at 8.
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=UNET_CHANNELS,
        layers_per_block=1,
        cross_attention_dim=TEXT_HIDDEN,
        attention_head_dim=8,
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


# ----------------------------------------------------------------------------- data


def make_dataset(seed: int, count: int) -> tuple[torch.Tensor, list[str]]:
    """World scenes 0..count-1 of ``seed``: uint8 images (N, 3, H, W) and captions."""
    scenes = world.sample_scenes(seed, 0, count)
    images = torch.from_numpy(np.stack([s.array for s in scenes])).permute(0, 3, 1, 2).contiguous()
    return images, [s.caption for s in scenes]


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


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def set_lr(opt, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr


# ----------------------------------------------------------------------------- stages


def train_clip(tokenizer, images, captions, *, seed, steps, batch, lr, device):
    from transformers import CLIPModel

    torch.manual_seed(seed + 1)
    model = CLIPModel(clip_config(tokenizer)).to(device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05, betas=(0.9, 0.98))
    gen = torch.Generator().manual_seed(seed + 11)
    n = len(captions)
    t0, running = time.time(), None
    for step in range(steps):
        set_lr(opt, lr_at(step, steps, lr, min(50, steps // 10 + 1)))
        idx = torch.randint(0, n, (batch,), generator=gen)
        caps = [captions[i] for i in idx.tolist()]
        # The causal text tower's EOS output does not depend on the padding after it, so
        # padding to the longest caption gives the same loss as padding to 77, for less work.
        ids = tokenize(tokenizer, caps, device, padding="longest")
        pixels = to_clip_input(images[idx].to(device))
        out = model(input_ids=ids, pixel_values=pixels)
        # Several images in a batch can share a caption: all of them are positives.
        same = torch.tensor([[a == b for b in caps] for a in caps], dtype=torch.float32, device=device)
        target = same / same.sum(1, keepdim=True)
        logits = out.logits_per_image
        loss = 0.5 * (
            -(target * F.log_softmax(logits, 1)).sum(1).mean() - (target * F.log_softmax(logits.T, 1)).sum(1).mean()
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        if step % 50 == 0 or step == steps - 1:
            acc = same[torch.arange(batch), logits.argmax(1)].mean().item()
            log(f"clip step {step + 1}/{steps} loss {running:.4f} i2t-acc {acc:.3f} "
                f"scale {model.logit_scale.exp().item():.1f} {time.time() - t0:.0f}s")
    model.eval()
    return model


def train_vae(images, *, seed, steps, batch, lr, device, kl_weight=1e-6, crop=32, full_fraction=0.2):
    """Reconstruction (L1 + MSE) with SD's tiny KL weight.

    Most steps see random ``crop`` x ``crop`` windows (aligned to the latent grid):
    the network is convolutional, and crops cost a fraction of whole images. The
    last ``full_fraction`` of the steps see whole images.
    """
    from diffusers import AutoencoderKL

    torch.manual_seed(seed + 2)
    vae = AutoencoderKL(**vae_config()).to(device).to(memory_format=torch.channels_last)
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed + 12)
    n = len(images)
    t0, running = time.time(), None
    for step in range(steps):
        set_lr(opt, lr_at(step, steps, lr, min(100, steps // 10 + 1)))
        idx = torch.randint(0, n, (batch,), generator=gen)
        x = images[idx]
        size = x.shape[-1]
        if crop and crop < size and step < steps * (1 - full_fraction):
            factor = 2 ** (len(VAE_CHANNELS) - 1)
            oy, ox = (torch.randint(0, (size - crop) // factor + 1, (2,), generator=gen) * factor).tolist()
            x = x[:, :, oy : oy + crop, ox : ox + crop]
        x = to_vae_input(x.to(device)).contiguous(memory_format=torch.channels_last)
        if step >= steps * (1 - full_fraction):
            x = x[: max(1, batch // 2)]  # whole images cost 4x a crop: half the batch
        post = vae.encode(x).latent_dist
        z = post.sample()
        rec = vae.decode(z).sample
        rec_loss = F.l1_loss(rec, x) + F.mse_loss(rec, x)
        loss = rec_loss + kl_weight * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        running = rec_loss.item() if running is None else 0.95 * running + 0.05 * rec_loss.item()
        if step % 50 == 0 or step == steps - 1:
            log(f"vae step {step + 1}/{steps} rec {running:.4f} {time.time() - t0:.0f}s")
    vae.eval()
    # Scale latents to unit variance as SD does (its 0.18215).
    with torch.no_grad():
        z = torch.cat([
            vae.encode(to_vae_input(images[i : i + 256].to(device))).latent_dist.mean
            for i in range(0, min(len(images), 2048), 256)
        ])
    vae.register_to_config(scaling_factor=float(1.0 / z.flatten().std()))
    log(f"vae scaling_factor {vae.config.scaling_factor:.5f}")
    vae = vae.to(memory_format=torch.contiguous_format)
    log(f"vae check: {check_vae(vae, seed, device)}")
    return vae


@torch.no_grad()
def check_vae(vae, seed: int, device, count: int = 64, save: Path | None = None) -> str:
    """Reconstruct held-out scenes; how often do the read-back objects keep shape and colour?"""
    scenes = world.sample_scenes(seed + 999_983, 0, count)
    x = torch.from_numpy(np.stack([s.array for s in scenes])).permute(0, 3, 1, 2)
    rec = vae.decode(vae.encode(to_vae_input(x.to(device))).latent_dist.mean).sample
    rec = ((rec.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    same = sum(
        [(o.shape, o.color) for o in world.detect_objects(s.array)]
        == [(o.shape, o.color) for o in world.detect_objects(r)]
        for s, r in zip(scenes, rec)
    )
    err = float(np.abs(rec.astype(np.float32) - x.permute(0, 2, 3, 1).numpy()).mean())
    if save is not None:
        from PIL import Image

        world.grid([s.image for s in scenes[:16]] + [Image.fromarray(r) for r in rec[:16]], 16).save(save)
    return f"objects kept {same}/{count}, mean abs error {err:.1f}/255"


@torch.no_grad()
def encode_prompts(text_encoder, tokenizer, prompts: list[str], device, batch: int = 256) -> torch.Tensor:
    out = []
    for i in range(0, len(prompts), batch):
        ids = tokenize(tokenizer, prompts[i : i + batch], device)
        out.append(text_encoder(ids).last_hidden_state)
    return torch.cat(out)


def train_unet(text_encoder, tokenizer, vae, images, captions, *, seed, steps, batch, lr, device,
               dropout=0.1, ema_decay=0.998, snr_gamma=5.0, offset_noise=0.0):
    from diffusers import DDPMScheduler, UNet2DConditionModel

    # Frozen inputs, computed once: text states per unique caption, VAE posteriors per image.
    unique = sorted(set(captions) | {""})
    where = {c: i for i, c in enumerate(unique)}
    log(f"unet: encoding {len(unique)} captions and {len(images)} images")
    states = encode_prompts(text_encoder, tokenizer, unique, device)
    cap_idx = torch.tensor([where[c] for c in captions])
    empty = where[""]
    means, stds = [], []
    with torch.no_grad():
        for i in range(0, len(images), 256):
            post = vae.encode(to_vae_input(images[i : i + 256].to(device))).latent_dist
            means.append(post.mean)
            stds.append(post.std)
    means, stds = torch.cat(means), torch.cat(stds)
    sf = vae.config.scaling_factor

    torch.manual_seed(seed + 3)
    unet = UNet2DConditionModel(**unet_config()).to(device)
    unet.train()
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    keys = ("beta_start", "beta_end", "beta_schedule", "num_train_timesteps", "clip_sample")
    noise_sched = DDPMScheduler(**{k: SCHEDULER_CONFIG[k] for k in keys})
    alphas = noise_sched.alphas_cumprod.to(device)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(seed + 13)
    n = len(images)
    t0, running = time.time(), None
    for step in range(steps):
        set_lr(opt, lr_at(step, steps, lr, min(100, steps // 10 + 1)))
        idx = torch.randint(0, n, (batch,), generator=gen)
        eps_z = torch.randn(means[idx].shape, generator=gen).to(device)
        latents = (means[idx] + stds[idx] * eps_z) * sf
        ci = cap_idx[idx].clone()
        ci[torch.rand(batch, generator=gen) < dropout] = empty
        cond = states[ci.to(device)]
        noise = torch.randn(latents.shape, generator=gen)
        if offset_noise:
            # Offset noise (Guttenberg 2023): a per-channel constant in the noise. With SD's
            # schedule some signal survives at t=999, so a model trained without it reads the
            # image's mean colour off the starting noise and cannot make a white or black
            # background at sampling time; with it, it learns to set the mean itself.
            noise = noise + offset_noise * torch.randn(latents.shape[0], latents.shape[1], 1, 1, generator=gen)
        noise = noise.to(device)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (batch,), generator=gen).to(device)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        pred = unet(noisy, t, encoder_hidden_states=cond).sample
        loss = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))
        if snr_gamma:  # Min-SNR weighting (Hang et al. 2023): same optimum, faster convergence
            snr = a.flatten() / (1 - a.flatten())
            loss = loss * torch.clamp(snr, max=snr_gamma) / snr
        loss = loss.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        decay = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(p, 1 - decay)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 50 == 0 or step == steps - 1:
            el = time.time() - t0
            eta = el / (step + 1) * (steps - step - 1)
            log(f"unet step {step + 1}/{steps} loss {running:.4f} {el:.0f}s (eta {eta:.0f}s)")
    return ema


# ----------------------------------------------------------------------------- saving


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


# ----------------------------------------------------------------------------- main


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="checkpoints", help="folder receiving shapes-sd/ and shapes-clip/")
    ap.add_argument("--work", default=None,
                    help="folder for intermediate stage outputs (default: a folder in the temp dir)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (1 is fastest on a small shared CPU; 0: torch's default)")
    ap.add_argument("--stages", default="clip,vae,unet", help="comma list; earlier stages are loaded from --work")
    ap.add_argument("--scenes", type=int, default=20000, help="training scenes (world indices 0..N-1)")
    ap.add_argument("--clip-steps", type=int, default=900)
    ap.add_argument("--clip-batch", type=int, default=96)
    ap.add_argument("--clip-lr", type=float, default=1e-3)
    ap.add_argument("--vae-steps", type=int, default=900)
    ap.add_argument("--vae-batch", type=int, default=32)
    ap.add_argument("--vae-lr", type=float, default=1e-3)
    ap.add_argument("--unet-steps", type=int, default=2400)
    ap.add_argument("--unet-batch", type=int, default=32)
    ap.add_argument("--unet-lr", type=float, default=1e-3)
    ap.add_argument("--snr-gamma", type=float, default=5.0, help="Min-SNR loss weighting (0: plain MSE)")
    ap.add_argument("--offset-noise", type=float, default=0.0,
                    help="offset noise strength (default 0, as the shipped model; try 0.1)")
    ap.add_argument("--fp16", action="store_true", help="save the pipeline weights in float16")
    ap.add_argument("--parallel", action=argparse.BooleanOptionalAction, default=True,
                    help="train the VAE in a second process while the CLIP trains (default: on)")
    ap.add_argument("--stages-only", action="store_true",
                    help="train the --stages among clip,vae and stop (no UNet, no pipeline saved)")
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    out = Path(args.out)
    work = Path(args.work) if args.work else Path(tempfile.gettempdir()) / f"imageprompt-train-world-{args.seed}"
    work.mkdir(parents=True, exist_ok=True)
    stages = {s.strip() for s in args.stages.split(",") if s.strip()}
    t_start = time.time()
    log(f"seed {args.seed} device {device} threads {torch.get_num_threads()} stages {sorted(stages)}")

    images, captions = make_dataset(args.seed, args.scenes)
    log(f"dataset: {len(images)} scenes, {len(set(captions))} distinct captions ({time.time() - t_start:.0f}s)")
    tokenizer = None if stages == {"vae"} else build_tokenizer(work / "tokenizer")

    from diffusers import AutoencoderKL
    from transformers import CLIPModel

    clip_dir, vae_dir = out / "shapes-clip", work / "vae"
    helper = None
    if args.parallel and "clip" in stages and "vae" in stages:
        # The stages are seeded separately, so training the VAE in a second process
        # gives the same weights as training it after the CLIP, in less wall time.
        import subprocess
        import sys

        cmd = [sys.executable, "-m", "imageprompt.train_world", *(argv if argv is not None else sys.argv[1:]),
               "--stages", "vae", "--no-parallel", "--stages-only"]
        log(f"vae stage in a second process: {' '.join(cmd[1:])}")
        helper = subprocess.Popen(cmd)
        stages.discard("vae")
    if "clip" in stages:
        t = time.time()
        clip = train_clip(tokenizer, images, captions, seed=args.seed, steps=args.clip_steps,
                          batch=args.clip_batch, lr=args.clip_lr, device=device)
        save_clip(clip.to("cpu"), tokenizer, clip_dir)
        log(f"clip done in {time.time() - t:.0f}s -> {clip_dir}")
    if "vae" in stages:
        t = time.time()
        vae = train_vae(images, seed=args.seed, steps=args.vae_steps, batch=args.vae_batch,
                        lr=args.vae_lr, device=device)
        vae.to("cpu").save_pretrained(vae_dir, safe_serialization=True)
        log(f"vae done in {time.time() - t:.0f}s -> {vae_dir}")
    if args.stages_only:
        return
    if helper is not None and helper.wait() != 0:
        raise SystemExit("the vae stage failed")
    clip = CLIPModel.from_pretrained(clip_dir).to(device).eval()
    vae = AutoencoderKL.from_pretrained(vae_dir).to(device).eval()
    text_encoder = text_tower(clip).to(device)
    if "unet" in stages:
        t = time.time()
        unet = train_unet(text_encoder, tokenizer, vae, images, captions, seed=args.seed,
                          steps=args.unet_steps, batch=args.unet_batch, lr=args.unet_lr, device=device,
                          snr_gamma=args.snr_gamma, offset_noise=args.offset_noise)
        unet.to("cpu").save_pretrained(work / "unet", safe_serialization=True)
        log(f"unet done in {time.time() - t:.0f}s")
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(work / "unet")
    sd_dir = out / "shapes-sd"
    save_pipeline(unet, vae.to("cpu"), text_encoder.to("cpu"), tokenizer, sd_dir,
                  dtype=torch.float16 if args.fp16 else torch.float32)
    info = {
        "seed": args.seed, "device": str(device), "threads": torch.get_num_threads(),
        "argv": vars(args), "wall_seconds": round(time.time() - t_start, 1),
    }
    (work / "train_info.json").write_text(json.dumps(info, indent=2))
    (sd_dir / "training.json").write_text(json.dumps(info, indent=2))
    log(f"saved {sd_dir} ({folder_mb(sd_dir):.1f} MB) and {clip_dir} ({folder_mb(clip_dir):.1f} MB); "
        f"total {time.time() - t_start:.0f}s")


if __name__ == "__main__":
    main()
