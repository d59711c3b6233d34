"""The tuning objective: images encoded once, and Stable Diffusion's noise-prediction loss through SD-IPC.

Every random draw of a step comes from one seed (:class:`StepInputs`), so a
step can be replayed exactly and a resumed run repeats the same steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from imageprompt.tuning.prompts import visual_prompts_of


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
        size = pipe.sdipc_image_encoder.config.image_size
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
    encoder = pipe.sdipc_image_encoder
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

