"""The CLIP and VAE stages of :mod:`imageprompt.world.train`, and the loop helpers all stages share
(the step log, the learning-rate schedule and the batch sampler). Why each choice:
``docs/bundled-model.md``."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from imageprompt import world
from imageprompt.world.models import (
    MAX_LENGTH,
    VAE_CHANNELS,
    clip_config,
    to_clip_input,
    to_vae_input,
    tokenize,
    vae_config,
)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------- data


def moved_scene(caption: str, background: str, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """A hard negative for ``caption``: the same objects, moved (another position; for two
    objects, swapped or in the other layout), drawn on ``background``, with its caption."""
    specs, named_bg = world.parse_caption(caption)
    with_size = any(s.size for s in specs)
    positions = [s.position for s in specs]
    if len(specs) == 1:
        choices = [(p,) for p in world.POSITIONS if p != positions[0]]
    else:
        choices = [lay for layout in world.PAIR_LAYOUTS for lay in (layout, layout[::-1]) if list(lay) != positions]
    new_pos = choices[int(rng.integers(len(choices)))]
    moved = [world.ObjectSpec(s.shape, s.color, p, s.size) for s, p in zip(specs, new_pos)]
    order = {p: i for i, p in enumerate(world.POSITIONS)}
    if len(moved) == 2:  # captions list a pair in layout order (left before right, top before bottom)
        layout = next(lay for lay in world.PAIR_LAYOUTS if set(lay) == {s.position for s in moved})
        order = {p: i for i, p in enumerate(layout)}
    moved.sort(key=lambda s: order[s.position])
    scene = world.render(moved, background, rng, caption="")
    return scene.array, world.caption_for(moved, named_bg, with_size=with_size)


def dataset_backgrounds(images: torch.Tensor) -> list[str]:
    """The background name of each uint8 image (its corner pixel is always background)."""
    names = list(world.BACKGROUNDS)
    refs = torch.tensor([world.BACKGROUNDS[n] for n in names], dtype=torch.float32)
    corners = images[:, :, 0, 0].float()
    return [names[i] for i in torch.cdist(corners, refs).argmin(1).tolist()]


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine to 10% of the peak. Kept rather than diffusers'
    ``get_cosine_schedule_with_warmup`` (which ends at 0): the shipped weights were trained with it."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def set_lr(opt, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr


def batches(opt, count: int, batch: int, steps: int, lr: float, warmup: int, gen: torch.Generator,
            start: int = 0):
    """``(step, indices)`` for each step from ``start``: the step's learning rate is set first,
    then ``batch`` random indices below ``count`` are drawn from ``gen``."""
    for step in range(start, steps):
        set_lr(opt, lr_at(step, steps, lr, warmup))
        yield step, torch.randint(0, count, (batch,), generator=gen)


# ----------------------------------------------------------------------------- stages


def _contrastive(img, txt, caps, scale):
    """Symmetric InfoNCE; several images in a batch can share a caption: all are positives."""
    same = torch.tensor([[a == b for b in caps] for a in caps], dtype=torch.float32, device=img.device)
    target = same / same.sum(1, keepdim=True)
    logits = scale * img @ txt.T
    loss = 0.5 * (-(target * F.log_softmax(logits, 1)).sum(1).mean()
                  - (target * F.log_softmax(logits.T, 1)).sum(1).mean())
    return loss, same[torch.arange(len(caps)), logits.argmax(1)].mean()


def train_clip(tokenizer, images, captions, *, seed, steps, batch, lr, device, hard_negatives=0.25,
               align_weight=0.5, pad_weight=1.0):
    """CLIP's contrastive loss, plus three things that make the tiny CLIP behave like ViT-L/14
    in the properties SD-IPC relies on (see docs/bundled-model.md):

    - every state from EOS on carries the sentence: the contrastive loss is also taken at a
      random padding position (captions padded with EOS to 77, as SD 1.x), and padding states
      are pulled towards the EOS state (``pad_weight``);
    - a small modality gap: matched image and text embeddings are pulled together
      (``align_weight``: ``1 - cos``), so the pseudo-inverse of the text projection maps an
      image embedding near its caption's EOS state;
    - position survives pooling: a ``hard_negatives`` fraction of each batch is added again
      with the objects moved (:func:`moved_scene`).
    """
    from transformers import CLIPModel

    torch.manual_seed(seed + 1)
    model = CLIPModel(clip_config(tokenizer)).to(device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05, betas=(0.9, 0.98))
    gen = torch.Generator().manual_seed(seed + 11)
    rng = np.random.default_rng([seed, 21])
    backgrounds = dataset_backgrounds(images) if hard_negatives else None
    eos_id = tokenizer.eos_token_id
    t0, running = time.time(), None
    for step, idx in batches(opt, len(captions), batch, steps, lr, min(50, steps // 10 + 1), gen):
        caps = [captions[i] for i in idx.tolist()]
        pix = images[idx]
        k = int(batch * hard_negatives)
        if k:
            moved = [moved_scene(captions[i], backgrounds[i], rng) for i in idx[:k].tolist()]
            pix = torch.cat([pix, torch.from_numpy(np.stack([m[0] for m in moved])).permute(0, 3, 1, 2)])
            caps = caps + [m[1] for m in moved]
        ids = tokenize(tokenizer, caps, device)  # padded with EOS to 77, as SD 1.x
        out = model(input_ids=ids, pixel_values=to_clip_input(pix.to(device)), output_hidden_states=False)
        img = F.normalize(out.image_embeds, dim=-1)
        txt = F.normalize(out.text_embeds, dim=-1)
        scale = model.logit_scale.exp()
        loss_eos, acc = _contrastive(img, txt, caps, scale)
        # A random position from EOS to 76 per caption: its state, projected, must match too.
        states = out.text_model_output.last_hidden_state
        eos = (ids == eos_id).int().argmax(1)
        rows = torch.arange(len(caps), device=device)
        pos = eos + (torch.rand(len(caps), generator=gen) * (MAX_LENGTH - eos.cpu())).long().to(device)
        pad_states = states[rows, pos]
        pad = F.normalize(model.text_projection(pad_states), dim=-1)
        loss_pad, _ = _contrastive(img, pad, caps, scale)
        loss = 0.5 * (loss_eos + loss_pad)
        loss = loss + pad_weight * (1 - F.cosine_similarity(pad_states, states[rows, eos], dim=-1)).mean()
        ramp = min(1.0, step / (0.3 * steps))  # let the contrastive loss spread the captions first
        loss = loss + ramp * align_weight * (1 - (img * txt).sum(-1)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        if step % 50 == 0 or step == steps - 1:
            with torch.no_grad():
                cos = (img * txt).sum(-1).mean().item()
            log(f"clip step {step + 1}/{steps} loss {running:.4f} i2t-acc {acc.item():.3f} "
                f"img-txt cos {cos:.3f} scale {scale.item():.1f} {time.time() - t0:.0f}s")
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
    t0, running = time.time(), None
    for step, idx in batches(opt, len(images), batch, steps, lr, min(100, steps // 10 + 1), gen):
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
