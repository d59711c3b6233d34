"""Train a ControlNet for the bundled shapes-world model: ``imageprompt train-controlnet``.

The recipe of Zhang et al., "Adding Conditional Control to Text-to-Image Diffusion
Models" (2023) as diffusers' ``examples/controlnet/train_controlnet.py`` runs it: a
``ControlNetModel.from_unet`` copy of the frozen UNet's encoder and middle block with
zero convolutions; the UNet, VAE and text encoder stay frozen; the loss is the UNet's
noise prediction with the ControlNet's down/mid residuals added; the empty prompt
replaces the caption 10% of the time (``--caption-dropout``, the example's
``--proportion_empty_prompts``), so the control alone must carry the layout.

The control is the scene's **silhouette**: white where any object is, black elsewhere,
3 channels in [0, 1] (diffusers' control-image convention), rendered from the world's
scene description (:func:`silhouette`). Scenes are the world's training scenes
(``world.sample_scenes(seed, 0, N)``, as the UNet's); the eval row
(``imageprompt eval --suite world --only ControlNet``) uses other scenes.

Noise as the bundled UNet was trained (:mod:`imageprompt.world.train`): latents drawn
from the VAE posterior, DDPM with SD's scaled-linear schedule (``DDPMScheduler.add_noise``),
offset noise 0.1 and Min-SNR weighting (gamma 5). Because the bundled VAE downsamples
by 4 (not SD's 8), the conditioning embedding has three stages (two stride-2 convs):
``conditioning_embedding_out_channels=(16, 32, 64)``.

Saved with ``save_pretrained`` (safetensors, fp32) to ``--out`` every
``--checkpoint-every`` steps and at the end, with ``training.json`` (arguments, step
reached, wall time, loss); loadable by ``ControlNetModel.from_pretrained``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np

from imageprompt import world

# The conditioning embedding downsamples the control image to the latents' size: one stride-2 conv per
# halving. SD's (16, 32, 96, 256) is for its VAE's factor 8; the bundled VAE's factor is 4.
CONDITIONING_CHANNELS = {1: (16,), 2: (16, 32), 4: (16, 32, 64), 8: (16, 32, 96, 256)}


def silhouette(scene: world.Scene):
    """The control image of ``scene``: its objects' masks, white on black, RGB (a PIL image)."""
    from PIL import Image

    size = scene.image.size[::-1]
    mask = np.zeros(size, dtype=bool)
    for obj in scene.objects:
        mask |= obj.mask
    return Image.fromarray(np.repeat(mask[..., None] * np.uint8(255), 3, axis=2))


def controlnet_from_unet(unet, vae_scale_factor: int, seed: int = 0):
    """A fresh ControlNet from ``unet`` (its encoder's weights copied, zero convolutions) for control images
    ``vae_scale_factor`` times the latents' side."""
    import torch
    from diffusers import ControlNetModel

    if vae_scale_factor not in CONDITIONING_CHANNELS:
        raise ValueError(f"no conditioning embedding for a VAE factor of {vae_scale_factor}")
    torch.manual_seed(seed)
    return ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=CONDITIONING_CHANNELS[vae_scale_factor])


def make_data(pipe, seed: int, count: int, device="cpu"):
    """Frozen inputs, computed once: VAE posterior (mean, std), control images in [0, 1],
    text states per unique caption (the empty prompt included) and each scene's caption index.
    Scenes are drawn at the model's resolution (``unet.config.sample_size * vae_scale_factor``)."""
    import torch

    from imageprompt.world.models import encode_prompts, to_vae_input

    size = int(pipe.unet.config.sample_size * pipe.vae_scale_factor)
    scenes = world.sample_scenes(seed, 0, count, size=size)
    images = torch.from_numpy(np.stack([s.array for s in scenes])).permute(0, 3, 1, 2)
    controls = torch.from_numpy(np.stack([np.asarray(silhouette(s)) for s in scenes])).permute(0, 3, 1, 2)
    captions = [s.caption for s in scenes]
    unique = sorted(set(captions) | {""})
    where = {c: i for i, c in enumerate(unique)}
    states = encode_prompts(pipe.text_encoder, pipe.tokenizer, unique, device)
    means, stds = [], []
    with torch.no_grad():
        for i in range(0, len(images), 256):
            post = pipe.vae.encode(to_vae_input(images[i : i + 256].to(device))).latent_dist
            means.append(post.mean)
            stds.append(post.std)
    return {"means": torch.cat(means), "stds": torch.cat(stds), "controls": controls.float() / 255.0,
            "states": states, "caption_index": torch.tensor([where[c] for c in captions]), "empty": where[""]}


def training_loss(unet, controlnet, scheduler, data, idx, gen, *, scaling_factor, caption_dropout=0.1,
                  offset_noise=0.1, snr_gamma=5.0, device="cpu"):
    """diffusers' ControlNet loss on the scenes ``idx``: the frozen UNet's noise prediction with the
    ControlNet's residuals, against the noise; offset noise and Min-SNR weighting as the UNet's."""
    import torch
    import torch.nn.functional as F
    from diffusers.training_utils import compute_snr

    eps = torch.randn(data["means"][idx].shape, generator=gen)
    latents = ((data["means"][idx] + data["stds"][idx] * eps) * scaling_factor).to(device)
    ci = data["caption_index"][idx].clone()
    ci[torch.rand(len(idx), generator=gen) < caption_dropout] = data["empty"]
    text = data["states"][ci.to(data["states"].device)].to(device)
    noise = torch.randn(latents.shape, generator=gen)
    if offset_noise:
        noise = noise + offset_noise * torch.randn(latents.shape[0], latents.shape[1], 1, 1, generator=gen)
    noise = noise.to(device)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (len(idx),), generator=gen).to(device)
    noisy = scheduler.add_noise(latents, noise, t)
    down, mid = controlnet(noisy, t, encoder_hidden_states=text, controlnet_cond=data["controls"][idx].to(device),
                           return_dict=False)
    pred = unet(noisy, t, encoder_hidden_states=text, down_block_additional_residuals=down,
                mid_block_additional_residual=mid).sample
    loss = F.mse_loss(pred.float(), noise.float(), reduction="none").mean(dim=(1, 2, 3))
    if snr_gamma:
        snr = compute_snr(scheduler, t)
        loss = loss * torch.clamp(snr, max=snr_gamma) / snr
    return loss.mean()


def save_controlnet(controlnet, out: Path, record: dict) -> Path:
    """``save_pretrained`` (safetensors) into a sibling folder, then swapped in: a killed run leaves a whole one."""
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    controlnet.save_pretrained(tmp, safe_serialization=True)
    (tmp / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def train(pipe, out, *, steps=1000, batch=32, lr=3e-4, scenes=8000, seed=0, caption_dropout=0.1,
          offset_noise=0.1, snr_gamma=5.0, checkpoint_every=200, device="cpu", log=print, args=None) -> dict:
    """Train a ControlNet for ``pipe`` (a ``StableDiffusionPipeline`` of the shapes world) and save it to ``out``."""
    import torch
    from diffusers import DDPMScheduler

    from imageprompt.world.models import training_schedule_config
    from imageprompt.world.train_stages import batches

    t0 = time.time()
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.requires_grad_(False).eval().to(device)
    data = make_data(pipe, seed, scenes, device)
    log(f"controlnet: {scenes} scenes encoded ({time.time() - t0:.0f}s)")
    controlnet = controlnet_from_unet(pipe.unet, pipe.vae_scale_factor, seed).to(device).train()
    scheduler = DDPMScheduler(**training_schedule_config())
    opt = torch.optim.AdamW(controlnet.parameters(), lr=lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(seed + 29)
    record = {"args": args or {}, "steps": steps, "step": 0, "wall_seconds": 0.0, "loss": None,
              "threads": torch.get_num_threads(), "device": str(device)}
    running, t1 = None, time.time()
    warmup = min(100, steps // 10 + 1)
    for step, idx in batches(opt, len(data["means"]), batch, steps, lr, warmup, gen):
        loss = training_loss(pipe.unet, controlnet, scheduler, data, idx, gen,
                             scaling_factor=pipe.vae.config.scaling_factor, caption_dropout=caption_dropout,
                             offset_noise=offset_noise, snr_gamma=snr_gamma, device=device)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(controlnet.parameters(), 1.0)
        opt.step()
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        done = step + 1
        if done % 25 == 0 or done == steps:
            el = time.time() - t1
            log(f"controlnet step {done}/{steps} loss {running:.4f} {el:.0f}s "
                f"({el / done:.2f} s/step, eta {el / done * (steps - done):.0f}s)")
        if (checkpoint_every and done % checkpoint_every == 0) or done == steps:
            record.update(step=done, wall_seconds=round(time.time() - t0, 1), loss=round(running, 5))
            save_controlnet(controlnet, out, record)
            log(f"controlnet: saved step {done} -> {out}")
    return {"controlnet": controlnet, "path": Path(out), "record": record}


# ----------------------------------------------------------------------------- command line


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="the shapes-world pipeline folder (default: the bundled one)")
    parser.add_argument("--out", default=None, help="output folder (default: checkpoints/shapes-controlnet)")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-4, help="peak learning rate (warm-up, then cosine to 10%%)")
    parser.add_argument("--scenes", type=int, default=8000, help="training scenes (world indices 0..N-1 of --seed)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--caption-dropout", type=float, default=0.1, help="fraction trained on the empty prompt")
    parser.add_argument("--offset-noise", type=float, default=0.1)
    parser.add_argument("--snr-gamma", type=float, default=5.0, help="Min-SNR weighting (0: plain MSE)")
    parser.add_argument("--checkpoint-every", type=int, default=200, help="save every N steps (0: only at the end)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")


def _run(args) -> int:
    import torch
    from diffusers import StableDiffusionPipeline

    from imageprompt.checkpoints import BUNDLED_CONTROLNET, BUNDLED_MODEL
    from imageprompt.world.train_stages import log

    if args.threads:
        torch.set_num_threads(args.threads)
    for name in ("steps", "batch", "scenes"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be at least 1")
    model = Path(args.model) if args.model else BUNDLED_MODEL
    out = Path(args.out) if args.out else BUNDLED_CONTROLNET
    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False)
    recorded = {k: v for k, v in vars(args).items() if k != "func"}
    result = train(pipe, out, steps=args.steps, batch=args.batch, lr=args.lr, scenes=args.scenes, seed=args.seed,
                   caption_dropout=args.caption_dropout, offset_noise=args.offset_noise, snr_gamma=args.snr_gamma,
                   checkpoint_every=args.checkpoint_every, device=args.device, log=log, args=recorded)
    print(result["path"])
    return 0


def register(subparsers) -> None:
    """``imageprompt train-controlnet``: add to the command line's COMMAND_MODULES."""
    parser = subparsers.add_parser(
        "train-controlnet", help="train a silhouette ControlNet for the bundled shapes-world model",
        description="Train a ControlNet (ControlNetModel.from_unet of the frozen UNet) on the shapes world's "
                    "scenes, conditioned on each scene's silhouette; saves it with save_pretrained.")
    _add_arguments(parser)
    parser.set_defaults(func=_run)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    _add_arguments(parser)
    return _run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
