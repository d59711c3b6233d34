"""SD-IPC tuning: deep visual prompts in CLIP's vision tower, trained through the frozen UNet.

Ding et al., "Closed-form image-to-prompt conversion" (SD-IPC), Sec. 4: the
closed-form conversion ``h = scale * (e @ pinv(W_t).T) / ||.||`` gets sharper
when CLIP's image embedding ``e`` is adapted to a domain (about 100 images) or
to the reference image itself (about 30 iterations, "online"). What is tuned is
the authors' choice: deep visual prompt tuning (Jia et al., "Visual Prompt
Tuning", ECCV 2022, VPT-deep) of the vision tower; optionally LoRA (Hu et al.)
on the UNet's cross-attention key/value projections. The conversion matrix,
its scale and every base weight stay frozen. The loss is Stable Diffusion's own
noise-prediction loss (Ho et al., Eq. 14) with the converted image prompt as
the conditioning.

The prompts enter the vision tower through forward hooks on transformers' CLIP
layers (no copied transformers code), so the pipeline's ``image_encoder`` stays
a ``CLIPVisionModelWithProjection`` and ``.image_embeds`` works unchanged.

A tuning is one safetensors file: the prompt tensors (and LoRA weights), the
settings, and an identity of the CLIP it was made for, which
:func:`load_tuning` checks before it changes anything.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

FORMAT = "imageprompt/sdipc-tuning"
FORMAT_VERSION = "1"
MODES = ("online", "domain")
MIXED_PRECISION = ("auto", "no", "fp16", "bf16")
LORA_ADAPTER = "imageprompt_sdipc"
LORA_TARGETS = ("attn2.to_k", "attn2.to_v")
PROMPTS_ATTR = "imageprompt_visual_prompts"  # submodule of the image encoder, so it moves with it
CHECKPOINT_KEY = "imageprompt/sdipc-tuning-checkpoint"


class TuningFileError(ValueError):
    """A tuning file that cannot be used with this pipeline; the message is meant for the user."""


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


# ------------------------------------------------------------ the prompts
class DeepVisualPrompts(nn.Module):
    """VPT-deep prompts: per layer ``num_tokens`` learned tokens, a shared ``Linear``, dropout.

    Layer ``i``'s tokens are ``dropout(proj(prompts[i]))``; they sit right after
    CLS and replace the previous layer's prompt outputs (Jia et al., Sec. 3.2).
    """

    def __init__(self, num_layers: int, num_tokens: int, hidden_size: int, patch_size: int, dropout: float = 0.1):
        super().__init__()
        self.num_tokens = num_tokens
        self.prompts = nn.Parameter(torch.empty(num_layers, num_tokens, hidden_size))
        self.proj = nn.Linear(hidden_size, hidden_size)
        self.dropout = nn.Dropout(dropout)
        # VPT's initialisation: Xavier-uniform over a patch's fan-in, He-normal projection.
        bound = math.sqrt(6.0 / float(3 * patch_size**2 + hidden_size))
        nn.init.uniform_(self.prompts, -bound, bound)
        nn.init.kaiming_normal_(self.proj.weight, a=0, mode="fan_out")
        nn.init.zeros_(self.proj.bias)

    @classmethod
    def for_encoder(cls, image_encoder, num_tokens: int = 50, dropout: float = 0.1) -> DeepVisualPrompts:
        cfg = image_encoder.config
        return cls(cfg.num_hidden_layers, num_tokens, cfg.hidden_size, cfg.patch_size, dropout)

    def tokens(self, layer: int, batch: int, like: torch.Tensor) -> torch.Tensor:
        """``(batch, num_tokens, hidden)`` tokens of ``layer`` in ``like``'s dtype (dropout per sample)."""
        proj = self.proj(self.prompts[layer].to(self.proj.weight.dtype))
        return self.dropout(proj.expand(batch, -1, -1)).to(like.dtype)


def attach_visual_prompts(image_encoder, prompts: DeepVisualPrompts) -> DeepVisualPrompts:
    """Insert ``prompts`` into ``image_encoder`` (a ``CLIPVisionModelWithProjection``) with forward hooks.

    After the pre-layernorm the sequence ``[CLS, patches]`` becomes ``[CLS, P_0, patches]``;
    before layer ``i >= 1`` the prompt outputs are replaced by ``P_i``. CLS stays at
    position 0, so ``pooler_output`` and ``image_embeds`` keep their meaning.
    ``last_hidden_state`` carries the prompt tokens after CLS.
    """
    detach_visual_prompts(image_encoder)
    vision = image_encoder.vision_model
    layers = vision.encoder.layers
    if prompts.prompts.shape[0] != len(layers) or prompts.prompts.shape[2] != image_encoder.config.hidden_size:
        raise TuningFileError(
            f"visual prompts of shape {tuple(prompts.prompts.shape)} do not fit a vision tower with "
            f"{len(layers)} layers of width {image_encoder.config.hidden_size}"
        )
    n = prompts.num_tokens

    def insert_first(module, args, output):
        return torch.cat([output[:, :1], prompts.tokens(0, output.shape[0], output), output[:, 1:]], dim=1)

    def replace_at(layer):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            hidden = torch.cat([hidden[:, :1], prompts.tokens(layer, hidden.shape[0], hidden), hidden[:, 1 + n :]], 1)
            if args:
                return (hidden, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": hidden}

        return hook

    handles = [vision.pre_layrnorm.register_forward_hook(insert_first)]
    handles += [layers[i].register_forward_pre_hook(replace_at(i), with_kwargs=True) for i in range(1, len(layers))]
    prompts._hook_handles = handles
    prompts.to(device=image_encoder.device)  # stays float32: tokens are cast where they enter
    image_encoder.add_module(PROMPTS_ATTR, prompts)
    return prompts


def detach_visual_prompts(image_encoder) -> DeepVisualPrompts | None:
    """Remove the prompts (and their hooks) from ``image_encoder``; returns them, or None."""
    prompts = getattr(image_encoder, PROMPTS_ATTR, None)
    if prompts is None:
        return None
    for handle in getattr(prompts, "_hook_handles", []):
        handle.remove()
    prompts._hook_handles = []
    delattr(image_encoder, PROMPTS_ATTR)
    return prompts


def visual_prompts_of(pipe) -> DeepVisualPrompts | None:
    return getattr(pipe.image_encoder, PROMPTS_ATTR, None)


# ------------------------------------------------------------------- LoRA
def add_unet_lora(unet, rank: int, alpha: float | None = None) -> list[nn.Parameter]:
    """LoRA (peft) on the UNet's cross-attention ``to_k``/``to_v``; returns its float32 parameters."""
    try:
        from peft import LoraConfig
    except ImportError:
        raise ImportError("LoRA tuning needs peft: pip install 'imageprompt[tune]'") from None
    if LORA_ADAPTER in (getattr(unet, "peft_config", None) or {}):
        unet.delete_adapters(LORA_ADAPTER)
    config = LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian",
                        target_modules=list(LORA_TARGETS))
    unet.add_adapter(config, adapter_name=LORA_ADAPTER)
    params = lora_parameters(unet)
    for p in params.values():
        p.data = p.data.float()  # float32 master weights; peft casts the input to them
    return list(params.values())


def lora_parameters(unet) -> dict[str, nn.Parameter]:
    """The parameters of imageprompt's LoRA adapter in ``unet``, by name (empty when there is none)."""
    return {k: p for k, p in unet.named_parameters() if "lora_" in k and f".{LORA_ADAPTER}." in k}


def lora_settings(unet) -> dict | None:
    config = (getattr(unet, "peft_config", None) or {}).get(LORA_ADAPTER)
    return None if config is None else {"rank": config.r, "alpha": config.lora_alpha}


# ------------------------------------------------------------ CLIP identity
def weight_fingerprint(weight: torch.Tensor, count: int = 64) -> dict:
    """Shape, mean magnitude and ``count`` evenly spaced entries: survives fp16/bf16 casts, not another model."""
    flat = weight.detach().float().flatten().cpu()
    index = torch.linspace(0, flat.numel() - 1, count).round().long()
    return {"shape": list(weight.shape), "abs_mean": flat.abs().mean().item(), "samples": flat[index].tolist()}


def same_weight(a: dict, b: dict, rtol: float = 1e-2) -> bool:
    if a["shape"] != b["shape"] or len(a["samples"]) != len(b["samples"]):
        return False
    floor = 1e-3 * max(a["abs_mean"], 1e-12)  # fp16 flushes tiny values; bf16 keeps 8 bits
    return all(abs(x - y) <= rtol * abs(y) + floor for x, y in zip(a["samples"], b["samples"]))


VISION_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
               "patch_size", "projection_dim")


def clip_identity(pipe) -> dict:
    """What identifies the CLIP a tuning belongs to: vision config and both projections' fingerprints."""
    cfg = pipe.image_encoder.config
    return {
        "vision_config": {k: getattr(cfg, k) for k in VISION_KEYS},
        "visual_projection": weight_fingerprint(pipe.image_encoder.visual_projection.weight),
        "text_projection": weight_fingerprint(pipe.converter.text_projection.weight),
    }


def identity_mismatch(made_for: dict, here: dict) -> str | None:
    """Why ``made_for`` is not ``here``, in words, or None when they match."""
    if made_for["vision_config"] != here["vision_config"]:
        diff = {k: (v, here["vision_config"].get(k)) for k, v in made_for["vision_config"].items()
                if here["vision_config"].get(k) != v}
        return "vision tower differs (" + ", ".join(f"{k}: {a} in file, {b} here" for k, (a, b) in diff.items()) + ")"
    for name in ("visual_projection", "text_projection"):
        if not same_weight(made_for[name], here[name]):
            return f"same architecture but different weights ({name} differs)"
    return None


# ------------------------------------------------------------------- data
@dataclass
class TuningData:
    """Per-image tensors computed once: VAE latent mean and std (scaled) and CLIP pixels."""

    latent_mean: torch.Tensor
    latent_std: torch.Tensor
    clip_pixels: torch.Tensor

    def __len__(self) -> int:
        return self.latent_mean.shape[0]


def clip_pixel_values(pipe, images) -> torch.Tensor:
    """CLIP inputs exactly as :meth:`StableDiffusionImagePromptPipeline.encode_images` preprocesses them."""
    from transformers import CLIPImageProcessor

    from imageprompt.images import to_rgb

    processor = pipe.feature_extractor
    if processor is None:
        size = pipe.image_encoder.config.image_size
        processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return processor(images=[to_rgb(im) for im in images], return_tensors="pt").pixel_values


@torch.no_grad()
def prepare_images(pipe, images, resolution: int | None = None, batch: int = 8) -> TuningData:
    """Encode ``images`` once: VAE latents at ``resolution`` (centre crop) and CLIP pixels."""
    from imageprompt.images import to_rgb

    if not images:
        raise ValueError("no images to tune on")
    device, vae = pipe._execution_device, pipe.vae
    resolution = resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    if resolution % pipe.vae_scale_factor:
        raise ValueError(f"resolution must be a multiple of {pipe.vae_scale_factor}, got {resolution}")
    means, stds, clips = [], [], []
    for start in range(0, len(images), batch):
        chunk = [to_rgb(im) for im in images[start : start + batch]]
        pixels = pipe.image_processor.preprocess(chunk, height=resolution, width=resolution, resize_mode="crop")
        dist = vae.encode(pixels.to(device=device, dtype=vae.dtype)).latent_dist
        scale = vae.config.scaling_factor
        means.append((dist.mean.float() * scale).cpu())
        stds.append((dist.std.float() * scale).cpu())
        clips.append(clip_pixel_values(pipe, chunk))
    return TuningData(torch.cat(means), torch.cat(stds), torch.cat(clips))


# ------------------------------------------------------------------- loss
@dataclass
class StepInputs:
    """Everything random in one step, drawn from a seed, so a step can be replayed exactly."""

    index: torch.Tensor
    timesteps: torch.Tensor
    noise: torch.Tensor
    latent_noise: torch.Tensor

    @classmethod
    def draw(cls, data: TuningData, batch: int, num_train_timesteps: int, seed: int, shuffle: bool, start: int = 0):
        """``shuffle``: a random subset of the images (domain); else images ``start, start+1, ...`` in turn."""
        g = torch.Generator("cpu").manual_seed(seed)
        n = len(data)
        if shuffle and n > 1:
            index = torch.randperm(n, generator=g)[:batch]
            if batch > n:
                index = torch.cat([index, torch.randint(0, n, (batch - n,), generator=g)])
        else:
            index = torch.arange(start, start + batch) % n
        shape = (batch, *data.latent_mean.shape[1:])
        timesteps = torch.randint(0, num_train_timesteps, (batch,), generator=g)
        return cls(index, timesteps, torch.randn(shape, generator=g), torch.randn(shape, generator=g))


def step_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step * 7919 + 1) % (2**63)


def training_scheduler(pipe):
    """DDPM's forward process with the model's betas and prediction type (what SD was trained with)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(pipe.scheduler.config)


def denoising_loss(pipe, data: TuningData, inputs: StepInputs, scheduler, bos_state: torch.Tensor,
                   autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Noise-prediction loss (Ho et al., Eq. 14) with the SD-IPC variation prompt as conditioning.

    Gradients reach the visual prompts through the vision tower and the
    (frozen) conversion, and the LoRA weights through the UNet.
    """
    from imageprompt.conversion import variation_embeds

    device = pipe._execution_device
    idx = inputs.index
    latents = data.latent_mean[idx] + data.latent_std[idx] * inputs.latent_noise
    latents, noise = latents.to(device), inputs.noise.to(device)
    timesteps = inputs.timesteps.to(device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    if scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    elif scheduler.config.prediction_type == "sample":
        target = latents
    else:
        target = noise
    encoder = pipe.image_encoder
    with _autocast(device, autocast_dtype):
        embeds = encoder(data.clip_pixels[idx].to(device=device, dtype=encoder.dtype)).image_embeds
        with _autocast(device, None):  # the fixed conversion runs in float32, as at inference
            h = pipe.converter(embeds.float())
        cond = variation_embeds(h, bos_state.float(), length=pipe.model_max_length).to(pipe.unet.dtype)
        pred = pipe.unet(noisy.to(pipe.unet.dtype), timesteps, encoder_hidden_states=cond, return_dict=False)[0]
    return F.mse_loss(pred.float(), target.float())


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return torch.autocast(device_type=device.type, enabled=False)
    return torch.autocast(device_type=device.type, dtype=dtype)


def _autocast_dtype(pipe, mixed_precision: str) -> torch.dtype | None:
    if mixed_precision == "auto":
        dtype = pipe.unet.dtype
        return dtype if dtype in (torch.float16, torch.bfloat16) else None
    return {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}[mixed_precision]


@torch.no_grad()
def evaluation_loss(pipe, data: TuningData, seed: int = 1234, rounds: int = 4, batch: int = 4) -> float:
    """Mean loss over fixed noise and timesteps (``seed``), dropout off: comparable before and after tuning."""
    prompts = visual_prompts_of(pipe)
    was_training = prompts.training if prompts is not None else False
    if prompts is not None:
        prompts.eval()
    scheduler = training_scheduler(pipe)
    bos = empty_prompt_bos(pipe)
    timesteps = scheduler.config.num_train_timesteps
    total = 0.0
    for r in range(rounds):
        inputs = StepInputs.draw(data, batch, timesteps, step_seed(seed, r), shuffle=False, start=r * batch)
        total += denoising_loss(pipe, data, inputs, scheduler, bos).item()
    if prompts is not None:
        prompts.train(was_training)
    return total / rounds


def empty_prompt_bos(pipe) -> torch.Tensor:
    """The empty prompt's BOS state: position 0 of SD-IPC's variation conditioning."""
    states, _ = pipe.encode_text([""], pipe._execution_device)
    return states[0, 0]


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
    modules = [pipe.unet, pipe.image_encoder, pipe.vae, pipe.text_encoder, pipe.converter]
    flags = [[(p, p.requires_grad) for p in m.parameters()] for m in modules]
    for m in modules:
        m.requires_grad_(False)
    encoder_training = pipe.image_encoder.training
    if checkpointing:
        pipe.unet.enable_gradient_checkpointing()
        _encoder_checkpointing(pipe.image_encoder, True)
        pipe.image_encoder.train()  # transformers checkpoints only in training mode; CLIP has no dropout
    try:
        yield
    finally:
        for group in flags:
            for p, flag in group:
                p.requires_grad_(flag)
        if checkpointing:
            pipe.unet.disable_gradient_checkpointing()
            _encoder_checkpointing(pipe.image_encoder, False)
            pipe.image_encoder.train(encoder_training)


def _encoder_checkpointing(encoder, enable: bool) -> None:
    """transformers >= 5 calls it activation checkpointing; older versions gradient checkpointing."""
    kwargs = {"use_reentrant": False}
    if hasattr(encoder, "activation_checkpointing_enable"):
        encoder.activation_checkpointing_enable(kwargs) if enable else encoder.activation_checkpointing_disable()
    elif enable:
        encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        encoder.gradient_checkpointing_disable()


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
    data = images_or_data if isinstance(images_or_data, TuningData) else prepare_images(
        pipe, list(images_or_data), config.resolution)
    device = pipe._execution_device

    # 1. The trainable parts: visual prompts (fresh or continued) and optional LoRA
    prompts = visual_prompts_of(pipe)
    continued = prompts is not None and prompts.num_tokens == config.num_tokens
    if not continued:
        with _seeded(device, config.seed):
            prompts = DeepVisualPrompts.for_encoder(pipe.image_encoder, config.num_tokens, config.dropout)
    prompts.dropout.p = config.dropout
    prompts.float()
    attach_visual_prompts(pipe.image_encoder, prompts)
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


# -------------------------------------------------------------- the file
def _state_tensors(pipe) -> dict[str, torch.Tensor]:
    prompts = visual_prompts_of(pipe)
    if prompts is None:
        raise ValueError("the pipeline has no visual prompts to save: tune it (or load a tuning) first")
    tensors = {f"visual_prompts.{k}": v for k, v in prompts.state_dict().items()}
    tensors.update({f"unet_lora.{k}": v for k, v in lora_parameters(pipe.unet).items()})
    return {k: v.detach().float().contiguous().cpu() for k, v in tensors.items()}


def _metadata(pipe, settings: dict) -> dict[str, str]:
    import imageprompt

    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "settings": json.dumps(settings, sort_keys=True),
        "clip": json.dumps(clip_identity(pipe)),
        "clip_name": str(getattr(pipe, "clip_name", "") or ""),
        "model_name": str(getattr(pipe, "model_name", "") or ""),
        "imageprompt": imageprompt.__version__,
    }


def _write_atomic(tensors: dict, path: Path, metadata: dict) -> Path:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_tuning(pipe, path: str | os.PathLike, settings: dict | None = None) -> Path:
    """Write the pipeline's tuning (visual prompts, LoRA) to one safetensors file, atomically."""
    settings = settings or getattr(pipe, "_imageprompt_tuning_settings", None) or {}
    settings = {**settings, "lora": lora_settings(pipe.unet)}
    return _write_atomic(_state_tensors(pipe), Path(path), _metadata(pipe, settings))


def read_tuning_metadata(path: str | os.PathLike) -> dict:
    """The header of a tuning file (``settings`` and ``clip`` decoded), or :class:`TuningFileError`."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise TuningFileError(f"{path}: no such tuning file")
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = dict(handle.metadata() or {})
            keys = list(handle.keys())
    except Exception as err:
        raise TuningFileError(f"{path}: not a safetensors file ({str(err)[:200]})") from None
    if meta.get("format") not in (FORMAT, CHECKPOINT_KEY):
        raise TuningFileError(f"{path}: not an imageprompt SD-IPC tuning file (no '{FORMAT}' in its metadata)")
    if meta.get("format_version") != FORMAT_VERSION:
        raise TuningFileError(f"{path}: tuning format version {meta.get('format_version')!r}; "
                              f"this imageprompt reads version {FORMAT_VERSION}")
    try:
        meta["settings"] = json.loads(meta["settings"])
        meta["clip"] = json.loads(meta["clip"])
    except (KeyError, json.JSONDecodeError):
        raise TuningFileError(f"{path}: damaged tuning metadata") from None
    meta["keys"] = keys
    return meta


def check_tuning_file(pipe, path: str | os.PathLike) -> dict:
    """Read ``path``'s header and refuse, with a clear message, a file made for another CLIP."""
    meta = read_tuning_metadata(path)
    why = identity_mismatch(meta["clip"], clip_identity(pipe))
    if why:
        made_for = meta.get("clip_name") or "unknown CLIP"
        here = getattr(pipe, "clip_name", None) or "this pipeline's CLIP"
        raise TuningFileError(
            f"{path} was tuned for another CLIP ({made_for}), not {here}: {why}. "
            f"Load the pipeline with the CLIP it was made for (--clip {made_for}) or tune again."
        )
    return meta


def load_tuning(pipe, path: str | os.PathLike) -> dict:
    """Load a tuning file into ``pipe`` (replacing any tuning it had); returns its settings.

    Raises :class:`TuningFileError` before changing anything when the file is not
    a tuning file or was made for another CLIP.
    """
    from safetensors.torch import load_file

    meta = check_tuning_file(pipe, path)
    tensors = load_file(str(path))
    _apply_state(pipe, tensors, meta["settings"], path)
    settings = dict(meta["settings"])
    pipe._imageprompt_tuning_settings = settings
    return settings


def _apply_state(pipe, tensors: dict, settings: dict, source) -> None:
    prompt_state = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("visual_prompts.")}
    if "prompts" not in prompt_state:
        raise TuningFileError(f"{source}: no visual prompts in the file")
    layers, tokens, hidden = prompt_state["prompts"].shape
    cfg = pipe.image_encoder.config
    prompts = DeepVisualPrompts(layers, tokens, hidden, cfg.patch_size, settings.get("dropout", 0.1))
    try:
        prompts.load_state_dict(prompt_state)
    except RuntimeError as err:
        raise TuningFileError(f"{source}: visual prompts do not match ({str(err)[:200]})") from None
    lora_state = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("unet_lora.")}
    remove_tuning(pipe)
    attach_visual_prompts(pipe.image_encoder, prompts.eval())
    if lora_state:
        lora = settings.get("lora") or {}
        add_unet_lora(pipe.unet, int(lora.get("rank", 4)), lora.get("alpha"))
        params = lora_parameters(pipe.unet)
        wrong = sorted(set(lora_state) ^ set(params))
        if wrong or any(params[k].shape != v.shape for k, v in lora_state.items()):
            remove_tuning(pipe)
            raise TuningFileError(f"{source}: its UNet LoRA does not fit this UNet (e.g. {wrong[:2]})")
        with torch.no_grad():
            for k, v in lora_state.items():
                params[k].copy_(v)
        for p in params.values():
            p.requires_grad_(False)


def remove_tuning(pipe) -> None:
    """Undo :func:`load_tuning` / :func:`tune`: detach the prompts and delete the LoRA adapter."""
    detach_visual_prompts(pipe.image_encoder)
    if LORA_ADAPTER in (getattr(pipe.unet, "peft_config", None) or {}):
        pipe.unet.delete_adapters(LORA_ADAPTER)
    pipe._imageprompt_tuning_settings = None


# ------------------------------------------------------------ checkpoints
RESUME_KEYS = ("mode", "lr", "batch_size", "num_tokens", "dropout", "lora_rank", "lora_alpha", "lora_lr",
               "weight_decay", "resolution", "seed")


def save_checkpoint(pipe, path, optimizer, scaler, settings: dict, step: int, data_id: str = "") -> Path:
    """The tuning file plus the optimiser state and the step, to resume a domain run."""
    tensors = _state_tensors(pipe)
    state = optimizer.state_dict()
    for index, values in state["state"].items():
        for key, value in values.items():
            tensors[f"optimizer.{index}.{key}"] = torch.as_tensor(value).detach().float().contiguous().cpu()
    meta = _metadata(pipe, settings)
    meta.update(format=CHECKPOINT_KEY, step=str(step), data_id=data_id,
                grad_scaler=json.dumps({k: float(v) if isinstance(v, float) else v
                                        for k, v in scaler.state_dict().items()}))
    return _write_atomic(tensors, Path(path), meta)


def load_checkpoint(pipe, path, optimizer, scaler, settings: dict, data_id: str = "") -> int:
    """Restore weights and optimiser from :func:`save_checkpoint`; returns the step to continue from."""
    from safetensors import safe_open

    meta = check_tuning_file(pipe, path)
    with safe_open(str(path), framework="pt") as handle:
        raw = handle.metadata()
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    if raw.get("format") != CHECKPOINT_KEY:
        raise TuningFileError(f"{path}: not a tuning checkpoint")
    before = {k: meta["settings"].get(k) for k in RESUME_KEYS}
    now = {k: settings.get(k) for k in RESUME_KEYS}
    if before != now or raw.get("data_id", "") != data_id:
        changed = [k for k in RESUME_KEYS if before[k] != now[k]] + (["data"] if raw.get("data_id", "") != data_id
                                                                      else [])
        raise TuningFileError(f"{path}: checkpoint of another run (differs in {', '.join(changed)}); "
                              "delete it or run without --resume")
    prompts = visual_prompts_of(pipe)
    lora = lora_parameters(pipe.unet)
    with torch.no_grad():
        for k, v in prompts.state_dict(keep_vars=True).items():
            v.copy_(tensors[f"visual_prompts.{k}"])
        for k, v in lora.items():
            v.copy_(tensors[f"unet_lora.{k}"])
    state = optimizer.state_dict()
    for index in range(sum(len(g["params"]) for g in state["param_groups"])):
        keys = [k.split(".", 2)[2] for k in tensors if k.startswith(f"optimizer.{index}.")]
        if keys:
            state["state"][index] = {k: tensors[f"optimizer.{index}.{k}"] for k in keys}
    optimizer.load_state_dict(state)
    scaler.load_state_dict(json.loads(raw.get("grad_scaler", "{}")) or scaler.state_dict())
    return int(raw["step"])


def describe(settings: dict) -> dict:
    """The few settings worth recording next to a generated image."""
    keep = ("mode", "steps", "lr", "batch_size", "num_tokens", "seed", "final_loss")
    return {k: settings.get(k) for k in keep} | {"lora": settings.get("lora")}


__all__ = [
    "TuningConfig", "TuningData", "TuningOutput", "TuningFileError", "DeepVisualPrompts", "attach_visual_prompts",
    "detach_visual_prompts", "add_unet_lora", "clip_identity", "prepare_images", "denoising_loss",
    "evaluation_loss", "tune", "tune_online", "tune_domain", "save_tuning", "load_tuning", "remove_tuning",
    "read_tuning_metadata", "check_tuning_file", "save_checkpoint", "load_checkpoint", "describe",
]
