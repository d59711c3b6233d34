"""SD-IPC tuning runs: :class:`TuningConfig` and the domain and online loops.

Domain tuning takes a few hundred steps on about 100 images of one domain;
online tuning about 30 iterations on the reference image(s), just before
generating. Both train the visual prompts (and optional UNet LoRA) on the
noise-prediction loss, every base weight frozen; domain runs can checkpoint
and resume.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from imageprompt.tuning.files import load_checkpoint, save_checkpoint
from imageprompt.tuning.lora import add_unet_lora, lora_parameters, lora_settings
from imageprompt.tuning.loss import (
    StepInputs,
    TuningData,
    denoising_loss,
    empty_prompt_bos,
    prepare_images,
    step_seed,
    training_scheduler,
)
from imageprompt.tuning.prompts import DeepVisualPrompts, attach_visual_prompts, visual_prompts_of

MODES = ("online", "domain")
MIXED_PRECISION = ("auto", "no", "fp16", "bf16")


# ------------------------------------------------------------------ settings
@dataclass
class TuningConfig:
    """Settings of one tuning run. :meth:`online` and :meth:`domain` give each mode's defaults.

    The authors' learning rates are not public; the defaults here are AdamW
    rates that lower the loss steadily in a few dozen steps.
    """

    mode: str = "online"
    steps: int = 30
    lr: float = 2e-3
    batch_size: int = 4
    num_tokens: int = 50  # per layer; the authors use 50 with ViT-L/14
    dropout: float = 0.1
    lora_rank: int = 0  # 0: prompts only
    lora_alpha: float | None = None  # default: the rank (scaling 1)
    lora_lr: float = 1e-4
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    resolution: int | None = None  # default: the UNet's native size
    seed: int = 0
    mixed_precision: str = "auto"  # auto: autocast in the pipeline's dtype (fp16 adds a grad scaler)
    gradient_checkpointing: bool = False

    @classmethod
    def online(cls, **overrides) -> TuningConfig:
        """About 30 iterations on the reference image(s), just before generating."""
        return cls(**{"mode": "online", "steps": 30, "lr": 2e-3, **overrides})

    @classmethod
    def domain(cls, **overrides) -> TuningConfig:
        """A few hundred steps on about 100 images of one domain."""
        return cls(**{"mode": "domain", "steps": 300, "lr": 1e-3, **overrides})

    def check(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        for name in ("steps", "batch_size", "num_tokens"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.lora_rank < 0:
            raise ValueError(f"lora_rank must be >= 0, got {self.lora_rank}")
        if not (self.lr > 0 and self.lora_lr > 0):
            raise ValueError("learning rates must be positive")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"mixed_precision must be one of {MIXED_PRECISION}, got {self.mixed_precision!r}")
        if self.resolution is not None and self.resolution < 8:
            raise ValueError(f"resolution must be at least 8, got {self.resolution}")


# --------------------------------------------------------------- training
@dataclass
class TuningOutput:
    """``losses``: training loss per step (this run); ``settings``: what the file records."""

    losses: list[float] = field(default_factory=list)
    settings: dict = field(default_factory=dict)
    start_step: int = 0


@contextlib.contextmanager
def _frozen_base(pipe, checkpointing: bool):
    """Freeze every base weight (restored after) and optionally turn on gradient checkpointing."""
    modules = [pipe.unet, pipe.sdipc_image_encoder, pipe.vae, pipe.text_encoder, pipe.converter]
    flags = [[(p, p.requires_grad) for p in m.parameters()] for m in modules]
    for m in modules:
        m.requires_grad_(False)
    encoder_training = pipe.sdipc_image_encoder.training
    if checkpointing:
        pipe.unet.enable_gradient_checkpointing()
        _encoder_checkpointing(pipe.sdipc_image_encoder, True)
        pipe.sdipc_image_encoder.train()  # transformers checkpoints only in training mode; CLIP has no dropout
    try:
        yield
    finally:
        for group in flags:
            for p, flag in group:
                p.requires_grad_(flag)
        if checkpointing:
            pipe.unet.disable_gradient_checkpointing()
            _encoder_checkpointing(pipe.sdipc_image_encoder, False)
            pipe.sdipc_image_encoder.train(encoder_training)


def _encoder_checkpointing(encoder, enable: bool) -> None:
    """transformers >= 5 calls it activation checkpointing; older versions gradient checkpointing."""
    kwargs = {"use_reentrant": False}
    if hasattr(encoder, "activation_checkpointing_enable"):
        encoder.activation_checkpointing_enable(kwargs) if enable else encoder.activation_checkpointing_disable()
    elif enable:
        encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        encoder.gradient_checkpointing_disable()


def _autocast_dtype(pipe, mixed_precision: str) -> torch.dtype | None:
    if mixed_precision == "auto":
        dtype = pipe.unet.dtype
        return dtype if dtype in (torch.float16, torch.bfloat16) else None
    return {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}[mixed_precision]


def tune(pipe, images_or_data, config: TuningConfig, progress: bool = True, checkpoint: str | os.PathLike | None = None,
         checkpoint_every: int = 0, resume: bool = False, data_id: str = "") -> TuningOutput:
    """Tune the pipeline's visual prompts (and LoRA) on ``images_or_data``; they stay attached.

    Continues from prompts already attached (e.g. a loaded domain tuning) when
    their token count matches ``config.num_tokens``; otherwise starts fresh,
    seeded by ``config.seed``. With ``checkpoint`` and ``checkpoint_every``, the
    state (weights and optimiser) is written there every so many steps;
    ``resume`` continues from it when it exists. ``data_id`` names the data so a
    checkpoint is never resumed on other data.
    """
    config.check()
    if getattr(pipe, "image_encoder_2", None) is not None:  # SDXL's two-tower conversion has no tuning yet
        raise ValueError("SD-IPC tuning (--online-steps, --tuned, imageprompt tune) is for SD 1.x models; "
                         "it is not available on SDXL")
    data = images_or_data if isinstance(images_or_data, TuningData) else prepare_images(
        pipe, list(images_or_data), config.resolution)
    device = pipe._execution_device
    pipe.sdipc_image_encoder.to(device)  # a variation may have sent it to its `vision_tower_home` between calls

    # 1. The trainable parts: visual prompts (fresh or continued) and optional LoRA
    prompts = visual_prompts_of(pipe)
    continued = prompts is not None and prompts.num_tokens == config.num_tokens
    if not continued:
        with _seeded(device, config.seed):
            prompts = DeepVisualPrompts.for_encoder(pipe.sdipc_image_encoder, config.num_tokens, config.dropout)
    prompts.dropout.p = config.dropout
    prompts.float()
    attach_visual_prompts(pipe.sdipc_image_encoder, prompts)
    groups = [{"params": list(prompts.parameters()), "lr": config.lr, "weight_decay": config.weight_decay}]
    lora = list(lora_parameters(pipe.unet).values())
    if config.lora_rank and not lora:
        with _seeded(device, config.seed + 1):
            lora = add_unet_lora(pipe.unet, config.lora_rank, config.lora_alpha)
    if config.lora_rank:
        for p in lora:
            p.data = p.data.float()
        groups.append({"params": lora, "lr": config.lora_lr, "weight_decay": config.weight_decay})
    trainable = [p for g in groups for p in g["params"]]
    optimizer = torch.optim.AdamW(groups)
    autocast_dtype = _autocast_dtype(pipe, config.mixed_precision)
    scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype == torch.float16)
    settings = tuning_settings(pipe, config)

    # 2. Resume from a checkpoint of the same run
    start = 0
    if resume and checkpoint is not None and Path(checkpoint).exists():
        start = load_checkpoint(pipe, checkpoint, optimizer, scaler, settings, data_id)

    # 3. The loop: every random draw comes from (seed, step), so a resumed run replays the same steps
    scheduler = training_scheduler(pipe)
    bos = empty_prompt_bos(pipe)
    output = TuningOutput(settings=settings, start_step=start)
    bar = _progress(total=config.steps, initial=start, disable=not progress, desc=f"tune {config.mode}")
    prompts.train()
    with _frozen_base(pipe, config.gradient_checkpointing):
        for p in trainable:
            p.requires_grad_(True)
        for step in range(start, config.steps):
            seed = step_seed(config.seed, step)
            inputs = StepInputs.draw(data, config.batch_size, scheduler.config.num_train_timesteps, seed,
                                     shuffle=config.mode == "domain")
            with _seeded(device, seed):
                loss = denoising_loss(pipe, data, inputs, scheduler, bos, autocast_dtype)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            output.losses.append(loss.item())
            bar.set_postfix(loss=f"{output.losses[-1]:.4f}")
            bar.update()
            done = step + 1
            if checkpoint is not None and checkpoint_every and done % checkpoint_every == 0 and done < config.steps:
                save_checkpoint(pipe, checkpoint, optimizer, scaler, settings, done, data_id)
    bar.close()
    prompts.eval()
    for p in trainable:
        p.requires_grad_(False)
    settings["final_loss"] = output.losses[-1] if output.losses else None
    pipe._imageprompt_tuning_settings = settings
    return output


def tune_online(pipe, images, config: TuningConfig | None = None, **kwargs) -> TuningOutput:
    """SD-IPC online tuning: about 30 iterations on the reference image(s) themselves."""
    return tune(pipe, images, config or TuningConfig.online(), **kwargs)


def tune_domain(pipe, images, config: TuningConfig | None = None, **kwargs) -> TuningOutput:
    """SD-IPC domain tuning: a few hundred steps on about 100 images of one domain."""
    return tune(pipe, images, config or TuningConfig.domain(), **kwargs)


@contextlib.contextmanager
def _seeded(device: torch.device, seed: int):
    """Draws (initialisation, dropout masks) from ``seed`` without disturbing the caller's random state."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type=device.type if devices else "cuda"):
        torch.manual_seed(seed)
        yield


def _progress(**kwargs):
    from tqdm.auto import tqdm

    return tqdm(dynamic_ncols=True, leave=False, **kwargs)


def tuning_settings(pipe, config: TuningConfig) -> dict:
    settings = asdict(config)
    prompts = visual_prompts_of(pipe)
    if prompts is not None:
        settings["num_tokens"] = prompts.num_tokens
    settings["lora"] = lora_settings(pipe.unet)
    return settings


def describe(settings: dict) -> dict:
    """The few settings worth recording next to a generated image."""
    keep = ("mode", "steps", "lr", "batch_size", "num_tokens", "seed", "final_loss")
    return {k: settings.get(k) for k in keep} | {"lora": settings.get("lora")}

