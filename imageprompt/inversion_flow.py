"""Inversion of real photos for flow-matching models (SD3 / 3.5): the flow ODE run backwards.

DDIM inversion (:mod:`imageprompt.inversion`) inverts a noise-prediction sampler. SD3 samples the flow ODE
``dx/dsigma = v(x, sigma)`` from ``sigma = 1`` (noise) to 0 (image) with Euler steps
(``FlowMatchEulerDiscreteScheduler``: ``x_{i+1} = x_i + (sigma_{i+1} - sigma_i) v(x_i, sigma_i)``). The inverse runs
the same ODE from the photo's latents up to ``sigma = 1`` on the *same* sigmas, one Euler step each:

    x_i = x_{i+1} + (sigma_i - sigma_{i+1}) v(x_{i+1}, sigma_i)

the velocity at the point we have, evaluated at the timestep the sampler will use there (the unknown
``v(x_i, sigma_i)`` of the exact inverse is replaced by ``v(x_{i+1}, sigma_i)``; the error per step is the change
of ``v`` over one step, so it falls as the steps grow). This is the plain inversion RF-Inversion (Rout et al.,
ICLR 2025) starts from, without its controller that pulls the path towards the photo (parameters ``gamma`` /
``eta`` that trade faithfulness for editability), and FireFlow (Deng et al. 2024) refines with a
midpoint-like step. The plain one is the default: no parameters, ``N`` transformer calls, and exact as the step
shrinks, so what prompt-to-prompt edits is the model's own trajectory of the photo. RF-Inversion's two
controllers are options (``gamma``, ``eta``: :mod:`imageprompt.rf_inversion`). Reconstruction measured: ``docs/sd3.md``.
"""

from __future__ import annotations

from dataclasses import dataclass

import PIL.Image
import torch

from imageprompt.rf_inversion import toward_noise


@dataclass
class FlowInversion:
    """A photo inverted with :func:`invert_flow`: ``latents`` at ``sigma = 1`` (the sampler's start) for
    ``prompt`` under ``guidance_scale``; ``image_latents``: the photo's own (VAE) latents."""

    latents: torch.Tensor
    image_latents: torch.Tensor
    prompt: str
    num_inference_steps: int
    guidance_scale: float
    method: str = "flow"
    gamma: float = 0.0  # RF-Inversion's controller towards a noise sample (0: the plain ODE)
    eta: float = 0.0  # RF-Inversion's controller towards the photo while editing (0: none)
    eta_steps: tuple = (0.0, 0.25)  # the editing steps it acts in (fractions)


@torch.no_grad()
def photo_latents(pipe, image: PIL.Image.Image, height: int, width: int) -> torch.Tensor:
    """The photo's latents as SD3 reads them: the VAE mean, shifted and scaled (``(z - shift) * scale``)."""
    pixels = pipe.image_processor.preprocess(image, height=height, width=width)
    pixels = pixels.to(device=pipe._execution_device, dtype=pipe.vae.dtype)
    z = pipe.vae.encode(pixels).latent_dist.mean
    shift = getattr(pipe.vae.config, "shift_factor", None) or 0.0
    return (z - shift) * pipe.vae.config.scaling_factor


def sampling_sigmas(scheduler, num_inference_steps: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sigmas (N + 1,), timesteps (N,))`` exactly as diffusers' SD3 loop will use them."""
    if scheduler.config.get("use_dynamic_shifting", False):
        raise ValueError("flow inversion needs a fixed shift (SD3 / 3.5's scheduler); this scheduler shifts "
                         "with the image size")
    scheduler.set_timesteps(num_inference_steps, device=device)
    return scheduler.sigmas.clone(), scheduler.timesteps.clone()


@torch.no_grad()
def invert_flow(pipe, image: PIL.Image.Image, prompt: str, num_inference_steps: int = 28,
                guidance_scale: float = 1.0, height: int | None = None, width: int | None = None,
                max_sequence_length: int = 256, gamma: float = 0.0, eta: float = 0.0, eta_steps=(0.0, 0.25),
                seed: int = 0) -> FlowInversion:
    """Invert ``image`` described by ``prompt`` (see the module docstring); ``guidance_scale > 1`` inverts under
    classifier-free guidance with the empty negative prompt, as the edit will sample. ``gamma`` / ``eta`` /
    ``eta_steps``: RF-Inversion's controllers (:mod:`imageprompt.rf_inversion`; ``seed`` draws its noise sample);
    all 0: the plain ODE."""
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must lie in [0, 1], got {gamma}")
    if not isinstance(image, PIL.Image.Image):
        raise TypeError("`image` must be a PIL image")
    size = pipe.default_sample_size * pipe.vae_scale_factor
    height, width = height or size, width or size
    device, dtype = pipe._execution_device, pipe.transformer.dtype
    guided = guidance_scale > 1.0
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
        prompt, prompt, prompt, device=device, do_classifier_free_guidance=guided,
        max_sequence_length=max_sequence_length)
    if guided:
        embeds, pooled = torch.cat([negative, embeds]), torch.cat([negative_pooled, pooled])
    clean = photo_latents(pipe, image, height, width).to(dtype)
    sigmas, timesteps = sampling_sigmas(pipe.scheduler, num_inference_steps, device)
    x = clean
    noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(seed)).to(clean.device, torch.float32)
    for i in reversed(range(len(timesteps))):  # from sigma_{i+1} up to sigma_i
        rows = torch.cat([x, x]) if guided else x
        v = pipe.transformer(hidden_states=rows, timestep=timesteps[i].expand(rows.shape[0]),
                             encoder_hidden_states=embeds, pooled_projections=pooled, return_dict=False)[0]
        if guided:
            uncond, cond = v.chunk(2)
            v = uncond + guidance_scale * (cond - uncond)
        v = toward_noise(v.float(), x.float(), float(sigmas[i + 1]), noise, gamma)
        x = (x.float() + (sigmas[i] - sigmas[i + 1]) * v).to(dtype)
    return FlowInversion(x, clean, prompt, num_inference_steps, float(guidance_scale), "flow", float(gamma),
                         float(eta), tuple(eta_steps))


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two images in [0, 1]."""
    mse = (a.float() - b.float()).pow(2).mean().item()
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(1.0 / mse)).item()
