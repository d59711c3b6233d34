"""Train the bundled shapes-world model: a CLIP, a VAE and a UNet in SD 1.x layout.

Reproducible from a seed. Three stages, each seeded on its own so they can be
run separately (``--stages``) and still give the same weights; by default the
VAE trains in a second process while the CLIP trains (``--no-parallel`` to
run them one after the other), then the UNet. Why each choice: ``docs/bundled-model.md``.

1. ``clip``: a ``CLIPModel`` (text and vision towers, both projections; square
   ``text_projection`` as in ViT-L/14) with the contrastive loss at the EOS token
   *and* at a random padding position (captions padded with EOS to 77, as SD 1.x),
   padding states pulled towards the EOS state, an image-text alignment term, and
   hard negatives (the same scene with the objects moved).
2. ``vae``: an ``AutoencoderKL`` (4 latent channels, downsampling factor 4:
   64x64 images, 16x16 latents), trained mostly on 32x32 crops. The latent
   scaling factor is set to 1 / std of the latents, as SD's 0.18215.
3. ``unet``: a ``UNet2DConditionModel`` in SD 1.5's layout (cross-attention at the
   highest latent resolutions, none at the lowest) on the frozen text tower's last
   hidden states; DDPM noise-prediction loss with SD's scaled-linear betas, offset
   noise, Min-SNR weighting, 10% caption dropout (classifier-free guidance) and 30%
   word-state dropout (word states replaced by the EOS state: text only). The EMA of
   the weights is shipped; a reading probe is printed every 250 steps
   (:mod:`imageprompt.world.probe`).

Outputs (in ``--out``): ``shapes-sd/`` (``StableDiffusionPipeline`` layout) and
``shapes-clip/`` (the full ``CLIPModel``, a ``CLIPImageProcessor`` and the
tokenizer). Example::

    python -m imageprompt.world.train --out checkpoints --seed 0
    python -m imageprompt.world.train --out /tmp/ck --device cuda   # faster

The UNet stage checkpoints its whole training state (weights, EMA, optimizer, RNG,
step: :mod:`imageprompt.world.checkpointing`) every ``--checkpoint-every`` steps, and
continues from one exactly with ``--resume DIR``; ``--init-from checkpoints/shapes-sd``
fine-tunes the shipped weights. ``shapes-sd/training.json`` lists every run::

    python -m imageprompt.world.train --resume /tmp/imageprompt-train-world-0/unet-checkpoint

Wall time of the shipped run on the shared 2-core CPU: see ``docs/bundled-model.md``.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from imageprompt import world
from imageprompt.world.checkpointing import (
    load_training_state,
    new_run,
    read_runs,
    read_state_json,
    save_training_state,
    write_runs,
)
from imageprompt.world.models import (
    build_tokenizer,
    encode_prompts,
    folder_mb,
    save_clip,
    save_pipeline,
    text_tower,
    to_vae_input,
    tokenize,
    training_schedule_config,
    unet_config,
)
from imageprompt.world.probe import ReadingProbe, eos_broadcast
from imageprompt.world.train_stages import (  # noqa: F401 (the stages' public names, as before)
    batches,
    check_vae,
    dataset_backgrounds,
    log,
    lr_at,
    moved_scene,
    set_lr,
    train_clip,
    train_vae,
)


def make_dataset(seed: int, count: int) -> tuple[torch.Tensor, list[str]]:
    """World scenes 0..count-1 of ``seed``: uint8 images (N, 3, H, W) and captions."""
    scenes = world.sample_scenes(seed, 0, count)
    images = torch.from_numpy(np.stack([s.array for s in scenes])).permute(0, 3, 1, 2).contiguous()
    return images, [s.caption for s in scenes]


def object_weights(images: torch.Tensor, factor: int = 4, threshold: float = 30.0) -> torch.Tensor:
    """Per latent pixel, the fraction of its ``factor`` x ``factor`` image pixels that are not
    background (the corner colour): (N, 1, H/factor, W/factor), in [0, 1]."""
    out = []
    for i in range(0, len(images), 1024):
        x = images[i : i + 1024].float()
        fg = ((x - x[:, :, :1, :1]).abs().sum(1, keepdim=True) > threshold).float()
        out.append(F.avg_pool2d(fg, factor))
    return torch.cat(out)


def train_unet(text_encoder, tokenizer, vae, images, captions, *, seed, steps, batch, lr, device,
               dropout=0.1, word_dropout=0.3, ema_decay=0.999, snr_gamma=5.0, offset_noise=0.1,
               probe_every=250, object_weight=0.0, init_from=None, resume=None, checkpoint_dir=None,
               checkpoint_every=0, stop_after=None, record=None, runs=None, gen_seed=None, run_start=None):
    """DDPM noise prediction on the frozen text states, with:

    - ``dropout``: the empty prompt instead of the caption (classifier-free guidance);
    - ``word_dropout``: the word states replaced by the caption's EOS state (half of these
      over positions 1..EOS-1, half over every position from 1), so that the UNet learns to
      read the whole sentence from the states from EOS on, as SD's UNet does. Text only: the
      UNet never sees image-derived conditioning;
    - ``offset_noise`` (Guttenberg 2023): with SD's schedule some signal survives at t=999,
      so a model trained without it takes the image's mean colour from the starting noise
      (grey backgrounds); with it, the model learns to set the mean itself;
    - Min-SNR loss weighting (Hang et al. 2023) and an EMA of the weights, which is returned;
    - ``object_weight``: the loss at latent pixels covering an object weighted ``1 + object_weight``
      (normalised to mean 1 per image; 0: plain).

    Resuming (:mod:`imageprompt.world.checkpointing`): with ``checkpoint_dir`` and
    ``checkpoint_every``, the whole training state (weights, EMA, optimizer, RNG, step) is saved
    every ``checkpoint_every`` steps and at the end; ``resume`` (such a folder) continues from
    it exactly, bit for bit; ``stop_after`` stops (with a checkpoint) after that step.
    ``init_from`` (a UNet folder, e.g. ``checkpoints/shapes-sd/unet``) starts from trained
    weights (their EMA too) with a fresh optimizer and schedule: a fine-tuning continuation.
    ``record`` (a dict, the current run of ``training.json``, one of ``runs``) gets the step
    reached and the wall time; ``gen_seed`` seeds the batch/noise generator (``seed + 13``).
    Returns ``(ema_unet, finished)``; ``finished`` is False after ``stop_after``.
    """
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from diffusers.training_utils import EMAModel, compute_snr

    # Frozen inputs, computed once: text states per unique caption, VAE posteriors per image.
    unique = sorted(set(captions) | {""})
    where = {c: i for i, c in enumerate(unique)}
    log(f"unet: encoding {len(unique)} captions and {len(images)} images")
    states = encode_prompts(text_encoder, tokenizer, unique, device)
    eos_all = torch.cat([(tokenize(tokenizer, unique[i : i + 512], device) == tokenizer.eos_token_id).int().argmax(1)
                         for i in range(0, len(unique), 512)])
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
    probe = ReadingProbe(text_encoder, tokenizer, vae, seed=seed, device=device) if probe_every else None

    weights = object_weights(images) if object_weight else None

    torch.manual_seed(seed + 3)
    unet = UNet2DConditionModel(**unet_config()).to(device)
    if init_from is not None:
        unet.load_state_dict(UNet2DConditionModel.from_pretrained(init_from).state_dict())
        log(f"unet: starting from the weights in {init_from}")
    unet.train()
    # EMAModel's default decay warm-up: min(decay, (1 + step) / (10 + step))
    ema = EMAModel(unet.parameters(), decay=ema_decay, model_cls=UNet2DConditionModel, model_config=unet.config)
    ema_unet = copy.deepcopy(unet).eval().requires_grad_(False)  # what the probe reads, refreshed from `ema`
    noise_sched = DDPMScheduler(**training_schedule_config())
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(seed + 13 if gen_seed is None else gen_seed)
    start, running = 0, None
    if resume is not None:
        meta = load_training_state(resume, model=unet, ema=ema, optimizer=opt, generator=gen)
        start, running = meta["step"], meta["extra"].get("running_loss")
        log(f"unet: resumed from {resume} at step {start}/{steps}")
    t0 = time.time()

    def checkpoint(done: int) -> None:
        if record is not None:
            record["unet_steps_to"] = done
            record["unet_wall_seconds"] = round(time.time() - t0, 1)
            record["wall_seconds"] = round(time.time() - (run_start or t0), 1)
        if checkpoint_dir is not None:
            save_training_state(checkpoint_dir, model=unet, ema=ema, optimizer=opt, generator=gen, step=done,
                                args=(record or {}).get("args", {}), runs=runs or [],
                                extra={"running_loss": running})
            log(f"unet: checkpoint at step {done} -> {checkpoint_dir}")

    for step, idx in batches(opt, len(images), batch, steps, lr, min(100, steps // 10 + 1), gen, start=start):
        eps_z = torch.randn(means[idx].shape, generator=gen).to(device)
        latents = (means[idx] + stds[idx] * eps_z) * sf
        ci = cap_idx[idx].clone()
        u = torch.rand(batch, generator=gen)
        ci[u < dropout] = empty
        cond = states[ci.to(device)]
        words = (u >= dropout) & (u < dropout + word_dropout / 2)
        every = (u >= dropout + word_dropout / 2) & (u < dropout + word_dropout)
        for sel, words_only in ((words, True), (every, False)):
            if sel.any():
                sel = sel.to(device)
                cond[sel] = eos_broadcast(cond[sel], eos_all[ci[sel.cpu()]], words_only=words_only)
        noise = torch.randn(latents.shape, generator=gen)
        if offset_noise:
            noise = noise + offset_noise * torch.randn(latents.shape[0], latents.shape[1], 1, 1, generator=gen)
        noise = noise.to(device)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (batch,), generator=gen).to(device)
        noisy = noise_sched.add_noise(latents, noise, t)
        pred = unet(noisy, t, encoder_hidden_states=cond).sample
        loss = F.mse_loss(pred, noise, reduction="none")
        if weights is not None:
            w = 1 + object_weight * weights[idx].to(device)
            loss = loss * (w / w.mean(dim=(2, 3), keepdim=True))
        loss = loss.mean(dim=(1, 2, 3))
        if snr_gamma:  # Min-SNR weighting (Hang et al. 2023): same optimum, faster convergence
            snr = compute_snr(noise_sched, t)
            loss = loss * torch.clamp(snr, max=snr_gamma) / snr
        loss = loss.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        ema.step(unet.parameters())
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 50 == 0 or step == steps - 1:
            el = time.time() - t0
            eta = el / (step + 1) * (steps - step - 1)
            log(f"unet step {step + 1}/{steps} loss {running:.4f} {el:.0f}s (eta {eta:.0f}s)")
        if probe is not None and ((step + 1) % probe_every == 0 or step == steps - 1):
            ema.copy_to(ema_unet.parameters())
            log(f"unet step {step + 1} {ReadingProbe.format(probe(ema_unet))} (EMA weights)")
        done = step + 1
        if stop_after is not None and done >= stop_after and done < steps:
            checkpoint(done)
            log(f"unet: stopped after step {done} (--stop-after); continue with --resume {checkpoint_dir}")
            ema.copy_to(ema_unet.parameters())
            return ema_unet, False
        if checkpoint_every and done % checkpoint_every == 0 and done < steps:
            checkpoint(done)
    checkpoint(steps)
    ema.copy_to(ema_unet.parameters())
    return ema_unet, True


# ----------------------------------------------------------------------------- main


def _parser() -> argparse.ArgumentParser:
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
    ap.add_argument("--clip-steps", type=int, default=1200)
    ap.add_argument("--clip-batch", type=int, default=96)
    ap.add_argument("--clip-lr", type=float, default=1e-3)
    ap.add_argument("--vae-steps", type=int, default=900)
    ap.add_argument("--vae-batch", type=int, default=32)
    ap.add_argument("--vae-lr", type=float, default=1e-3)
    ap.add_argument("--unet-steps", type=int, default=4000)
    ap.add_argument("--unet-batch", type=int, default=32)
    ap.add_argument("--unet-lr", type=float, default=1e-3)
    ap.add_argument("--snr-gamma", type=float, default=5.0, help="Min-SNR loss weighting (0: plain MSE)")
    ap.add_argument("--offset-noise", type=float, default=0.1, help="offset noise strength (0: none)")
    ap.add_argument("--word-dropout", type=float, default=0.3,
                    help="fraction of UNet samples whose word states are replaced by the EOS state")
    ap.add_argument("--object-weight", type=float, default=0.0,
                    help="UNet loss at latent pixels covering an object weighted 1 + this (0: plain)")
    ap.add_argument("--probe-every", type=int, default=250, help="UNet steps between reading probes (0: none)")
    ap.add_argument("--hard-negatives", type=float, default=0.25,
                    help="fraction of each CLIP batch added again with the objects moved")
    ap.add_argument("--fp16", action="store_true", help="save the pipeline weights in float16")
    ap.add_argument("--parallel", action=argparse.BooleanOptionalAction, default=True,
                    help="train the VAE in a second process while the CLIP trains (default: on)")
    ap.add_argument("--stages-only", action="store_true",
                    help="train the --stages among clip,vae and stop (no UNet, no pipeline saved)")
    # continuing
    ap.add_argument("--clip-from", default=None, help="the CLIP folder (default: OUT/shapes-clip)")
    ap.add_argument("--vae-from", default=None,
                    help="the VAE folder (default: WORK/vae, else INIT_FROM/vae with --init-from)")
    ap.add_argument("--init-from", default=None,
                    help="start the UNet from trained weights: a pipeline folder (e.g. checkpoints/shapes-sd) "
                         "or a UNet folder; fresh optimizer and learning-rate schedule over --unet-steps "
                         "(fine-tuning continuation); its training.json runs are carried over")
    ap.add_argument("--checkpoint-every", type=int, default=250,
                    help="save the UNet training state every N steps (0: only at the end)")
    ap.add_argument("--checkpoint-dir", default=None, help="where (default: WORK/unet-checkpoint)")
    ap.add_argument("--stop-after", type=int, default=None,
                    help="stop the UNet stage after this step, with a checkpoint (continue with --resume)")
    ap.add_argument("--resume", default=None,
                    help="continue the UNet stage from a checkpoint folder, exactly; the run's arguments are "
                         "taken from the checkpoint, and options given here override them")
    return ap


# Options of the run that a --resume does not take from the checkpoint.
_NOT_RESUMED = ("resume", "stop_after", "stages_only", "parallel")


def main(argv=None) -> None:
    import sys

    ap = _parser()
    args = ap.parse_args(argv)
    resume_meta = None
    if args.resume:
        resume_meta = read_state_json(Path(args.resume))
        ap.set_defaults(**{k: v for k, v in resume_meta["args"].items() if k not in _NOT_RESUMED})
        args = ap.parse_args(argv)
        args.stages = "unet"

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    out = Path(args.out)
    work = Path(args.work) if args.work else Path(tempfile.gettempdir()) / f"imageprompt-train-world-{args.seed}"
    work.mkdir(parents=True, exist_ok=True)
    stages = {s.strip() for s in args.stages.split(",") if s.strip()}
    t_start = time.time()
    log(f"seed {args.seed} device {device} threads {torch.get_num_threads()} stages {sorted(stages)}")

    # training.json: every run that led to the weights (this one is appended).
    init_dir = None
    if args.init_from:
        init_dir = Path(args.init_from)
        init_dir = init_dir / "unet" if (init_dir / "unet" / "config.json").is_file() else init_dir
    if resume_meta is not None:
        runs, kind, source = list(resume_meta["runs"]), "resume", args.resume
        steps_from = resume_meta["step"]
    elif init_dir is not None:
        runs, kind, source, steps_from = read_runs(init_dir.parent / "training.json"), "init-from", args.init_from, 0
    else:
        runs, kind, source, steps_from = [], "fresh", None, 0
    recorded = {k: v for k, v in vars(args).items() if k not in ("resume", "stop_after")}
    run = new_run(argv, recorded, kind=kind, steps_from=steps_from, source=source)
    runs.append(run)

    images, captions = make_dataset(args.seed, args.scenes)
    log(f"dataset: {len(images)} scenes, {len(set(captions))} distinct captions ({time.time() - t_start:.0f}s)")
    tokenizer = None if stages == {"vae"} else build_tokenizer(work / "tokenizer")

    from diffusers import AutoencoderKL
    from transformers import CLIPModel

    clip_dir = Path(args.clip_from) if args.clip_from else out / "shapes-clip"
    vae_dir = work / "vae"
    helper = None
    if args.parallel and "clip" in stages and "vae" in stages:
        # The stages are seeded separately, so training the VAE in a second process
        # gives the same weights as training it after the CLIP, in less wall time.
        import subprocess

        cmd = [sys.executable, "-m", "imageprompt.world.train", *(argv if argv is not None else sys.argv[1:]),
               "--stages", "vae", "--no-parallel", "--stages-only"]
        log(f"vae stage in a second process: {' '.join(cmd[1:])}")
        helper = subprocess.Popen(cmd)
        stages.discard("vae")
    if "clip" in stages:
        t = time.time()
        clip = train_clip(tokenizer, images, captions, seed=args.seed, steps=args.clip_steps,
                          batch=args.clip_batch, lr=args.clip_lr, device=device,
                          hard_negatives=args.hard_negatives)
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
    if args.vae_from:
        vae_dir = Path(args.vae_from)
    elif not (vae_dir / "config.json").is_file() and init_dir is not None:
        vae_dir = init_dir.parent / "vae"
    clip = CLIPModel.from_pretrained(clip_dir).to(device).eval()
    vae = AutoencoderKL.from_pretrained(vae_dir).to(device).eval()
    text_encoder = text_tower(clip).to(device)
    if "unet" in stages:
        t = time.time()
        ckpt_dir = Path(args.checkpoint_dir) if args.checkpoint_dir else work / "unet-checkpoint"
        unet, finished = train_unet(
            text_encoder, tokenizer, vae, images, captions, seed=args.seed,
            steps=args.unet_steps, batch=args.unet_batch, lr=args.unet_lr, device=device,
            snr_gamma=args.snr_gamma, offset_noise=args.offset_noise, word_dropout=args.word_dropout,
            object_weight=args.object_weight, probe_every=args.probe_every,
            init_from=init_dir if resume_meta is None else None, resume=args.resume,
            checkpoint_dir=ckpt_dir, checkpoint_every=args.checkpoint_every, stop_after=args.stop_after,
            record=run, runs=runs, run_start=t_start,
            # a continuation from trained weights draws other batches and noise than its first run did
            gen_seed=args.seed + 13 + 7919 * (len(runs) - 1) if kind == "init-from" else None,
        )
        if not finished:
            log(f"unet stopped at step {run['unet_steps_to']}/{args.unet_steps}: "
                f"python -m imageprompt.world.train --resume {ckpt_dir}")
            return
        unet.to("cpu").save_pretrained(work / "unet", safe_serialization=True)
        log(f"unet done in {time.time() - t:.0f}s")
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(work / "unet")
    sd_dir = out / "shapes-sd"
    save_pipeline(unet, vae.to("cpu"), text_encoder.to("cpu"), tokenizer, sd_dir,
                  dtype=torch.float16 if args.fp16 else torch.float32)
    run["wall_seconds"] = round(time.time() - t_start, 1)
    run["threads"], run["device"] = torch.get_num_threads(), str(device)
    write_runs(work / "train_info.json", runs)
    write_runs(sd_dir / "training.json", runs)
    log(f"saved {sd_dir} ({folder_mb(sd_dir):.1f} MB) and {clip_dir} ({folder_mb(clip_dir):.1f} MB); "
        f"total {time.time() - t_start:.0f}s")


if __name__ == "__main__":
    main()
