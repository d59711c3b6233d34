"""Real-image inversion for prompt-to-prompt editing of photos.

- DDIM inversion (Song et al., "Denoising Diffusion Implicit Models", 2021,
  Eq. 13 run backwards; Dhariwal & Nichol, 2021): the deterministic DDIM update
  applied from the clean latent towards noise, with the source prompt and no
  guidance.
- Null-text inversion (Mokady et al., "Null-text Inversion for Editing Real
  Images using Guided Diffusion Models", CVPR 2023, Algorithm 1): starting from
  the DDIM trajectory, optimise one unconditional embedding per step so that
  guided sampling retraces it (Adam, lr 1e-2 * (1 - i/100), up to 10 inner
  steps, stop when the loss is below 1e-5 + 2e-5 * i).
- Negative-prompt inversion (Miyake et al., "Negative-prompt Inversion: Fast
  Image Inversion for Editing with Text-guided Diffusion Models", 2023): no
  optimisation; the source prompt's embedding is used as the unconditional one.
- Direct Inversion (Ju et al., "PnP Inversion: Boosting Diffusion-based Editing
  with 3 Lines of Code", ICLR 2024): no optimisation; the DDIM trajectory
  ``z*_0 .. z*_T`` is kept, and after every step of the edit the gap
  ``z*_{t-1} - z_src,t-1`` is added to the source branch only
  (:func:`direct_correction`), so the source retraces the inversion exactly and
  the targets, unchanged, read the source's attention from the photo's own path.

All functions expect a DDIM scheduler whose ``set_timesteps`` has been called
for the run (the same steps and spacing as the edit). Inversion refuses other
schedulers and ``eta != 0`` (:func:`check_sampler`), and runs in float32 even
when the pipeline samples in fp16/bf16 (:func:`float32_modules`): the VAE
encode and the inversion steps, with the results cast back to the UNet's dtype.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import PIL.Image
import torch
import torch.nn.functional as F

from imageprompt.progress import INVERTING, labelled

METHODS = ("null-text", "negative-prompt", "ddim", "direct")


@dataclass
class Inversion:
    """What an edit of a real photo starts from.

    ``latents``: the inverted noise ``x_T`` ``(1, C, h, w)``; ``uncond_embeds``:
    one unconditional embedding per step (null-text), one for all steps
    (negative-prompt: the source embedding), or None (DDIM and direct: the empty
    prompt); ``trajectory``: the DDIM latents ``x_0 .. x_T`` (direct: the path the
    edit's source branch is pulled back onto); ``cond_embeds``: one conditional
    embedding of the source prompt per step (Dynamic Prompt Learning,
    :mod:`imageprompt.dpl`: its learned noun tokens), or None (the prompt as encoded);
    ``cond_tokens``: DPL's learned input embeddings per step, ``{noun: (tokens, D)}``
    (the edit puts them into the target prompts' same nouns too).
    """

    latents: torch.Tensor
    uncond_embeds: list[torch.Tensor] | torch.Tensor | None
    trajectory: list[torch.Tensor]
    method: str
    num_inference_steps: int
    guidance_scale: float
    cond_embeds: list[torch.Tensor] | None = None
    cond_tokens: list[dict[str, torch.Tensor]] | None = None

    def uncond_at(self, step: int) -> torch.Tensor | None:
        if isinstance(self.uncond_embeds, list):
            return self.uncond_embeds[step]
        return self.uncond_embeds

    def cond_at(self, step: int) -> torch.Tensor | None:
        return None if self.cond_embeds is None else self.cond_embeds[step]


def check_sampler(scheduler, eta: float = 0.0) -> None:
    """Refuse what inversion cannot be retraced with: a scheduler other than DDIM, or DDIM with ``eta != 0``."""
    from diffusers import DDIMScheduler

    if not isinstance(scheduler, DDIMScheduler):
        raise ValueError(f"inversion needs the DDIM scheduler, the pipeline has {type(scheduler).__name__}; "
                         "load it with scheduler ddim")
    if eta != 0:
        raise ValueError(f"inversion needs deterministic DDIM sampling (eta 0), got eta {eta}: "
                         "noise added while sampling would leave the inverted path")


def direct_correction(latents: torch.Tensor, inversion: Inversion, step: int) -> torch.Tensor:
    """Direct Inversion after edit step ``step``: add ``z*_{t-1} - z_src,t-1`` to the source row (row 0) only.

    ``latents``: the batch after the scheduler step (source first, then the targets); ``z*_{t-1}`` is
    ``inversion.trajectory[T - step - 1]``. The targets are returned untouched.
    """
    trajectory = inversion.trajectory
    target = trajectory[len(trajectory) - step - 2].to(device=latents.device, dtype=latents.dtype)
    gap = target[0] - latents[0]
    latents = latents.clone()
    latents[0] = latents[0] + gap
    return latents


@contextmanager
def float32_modules(*modules: torch.nn.Module) -> Iterator[None]:
    """Run ``modules`` in float32 for the block and restore their dtypes after (fp16/bf16 -> fp32 -> back is exact).

    Inverting in half precision drifts or overflows to NaN latents (black images)."""
    dtypes = [module.dtype for module in modules]
    try:
        for module, dtype in zip(modules, dtypes):
            if dtype != torch.float32:
                module.to(torch.float32)
        yield
    finally:
        for module, dtype in zip(modules, dtypes):
            if dtype != torch.float32:
                module.to(dtype)


def ddim_step(scheduler, noise: torch.Tensor, t: int, latents: torch.Tensor) -> torch.Tensor:
    """Deterministic DDIM update ``x_t -> x_{t-1}``: diffusers' ``DDIMScheduler.step`` with eta 0
    (differentiable: null-text inversion optimises through it)."""
    return scheduler.step(noise, t, latents, eta=0.0, return_dict=False)[0]


def inverse_scheduler(scheduler):
    """diffusers' ``DDIMInverseScheduler`` on ``scheduler``'s config and step count, so that
    inversion and sampling use the same timestep pairs."""
    import inspect

    from diffusers import DDIMInverseScheduler

    known = inspect.signature(DDIMInverseScheduler.__init__).parameters  # PNDM-only keys would only warn
    inverse = DDIMInverseScheduler.from_config({k: v for k, v in scheduler.config.items() if k in known})
    inverse.set_timesteps(scheduler.num_inference_steps)
    return inverse


def ddim_inverse_step(inverse, noise: torch.Tensor, t: int, latents: torch.Tensor) -> torch.Tensor:
    """DDIM run backwards, ``x_{t-1} -> x_t``, with the noise predicted at ``t``
    (``inverse``: an :func:`inverse_scheduler`)."""
    return inverse.step(noise, t, latents, return_dict=False)[0]


@torch.no_grad()
def encode_image(pipe, image: PIL.Image.Image, height: int, width: int) -> torch.Tensor:
    """The photo's VAE latent (the distribution's mean, scaled), resized to ``height x width``."""
    pixels = pipe.image_processor.preprocess(image.convert("RGB"), height=height, width=width)
    pixels = pixels.to(device=pipe.vae.device, dtype=pipe.vae.dtype)
    latents = pipe.vae.encode(pixels).latent_dist.mean
    return latents * pipe.vae.config.scaling_factor


def _noise(pipe, latents, t, context):
    return pipe.unet(latents, t, encoder_hidden_states=context, return_dict=False)[0]


@torch.no_grad()
def ddim_inversion(pipe, latents: torch.Tensor, cond: torch.Tensor, timesteps) -> list[torch.Tensor]:
    """DDIM inversion with the conditional embedding and no guidance; returns ``[x_0, ..., x_T]``."""
    trajectory = [latents]
    inverse = inverse_scheduler(pipe.scheduler)
    with labelled(pipe, f"{INVERTING} (DDIM)"), pipe.progress_bar(total=len(timesteps)) as bar:
        for t in reversed(timesteps):
            noise = _noise(pipe, latents, t, cond)
            latents = ddim_inverse_step(inverse, noise.float(), t, latents.float()).to(latents.dtype)
            trajectory.append(latents)
            bar.update()
    return trajectory


def null_text_inversion(pipe, trajectory: list[torch.Tensor], cond, uncond: torch.Tensor, timesteps,
                        guidance_scale: float = 7.5, num_inner_steps: int = 10, epsilon: float = 1e-5,
                        learning_rate: float = 1e-2) -> list[torch.Tensor]:
    """Null-text inversion (Mokady et al. 2023, Algorithm 1): one optimised unconditional embedding per step.

    ``trajectory`` is the DDIM inversion ``[x_0, ..., x_T]``. At step ``i`` the
    null embedding (float32, initialised from the previous step's) is tuned with
    Adam so that the guided DDIM step from the current latent lands on
    ``trajectory[T - i - 1]``; the inner loop stops early once the loss is below
    ``epsilon + 2e-5 * i``. The progress bar counts inner steps. ``cond`` may also be a
    callable ``(i, t, latents) -> embedding`` giving each step's conditional embedding
    (Dynamic Prompt Learning tunes it first, :mod:`imageprompt.dpl`).
    """
    dtype = pipe.unet.dtype
    null = uncond.detach().float().clone()
    latents = trajectory[-1]
    embeds = []
    total = len(timesteps) * num_inner_steps
    with labelled(pipe, f"{INVERTING} (null-text)"), pipe.progress_bar(total=total) as bar:
        for i, t in enumerate(timesteps):
            target = trajectory[len(trajectory) - i - 2].float()
            step_cond = cond(i, t, latents) if callable(cond) else cond
            with torch.no_grad():
                noise_cond = _noise(pipe, latents, t, step_cond).float()
            null = null.detach().requires_grad_(True)
            optimizer = torch.optim.Adam([null], lr=learning_rate * (1.0 - i / 100.0))
            done = 0
            for _ in range(num_inner_steps):
                with torch.enable_grad():
                    noise_uncond = _noise(pipe, latents, t, null.to(dtype)).float()
                    noise = noise_uncond + guidance_scale * (noise_cond - noise_uncond)
                    loss = F.mse_loss(ddim_step(pipe.scheduler, noise, t, latents.float()), target)
                    optimizer.zero_grad()
                    loss.backward(inputs=[null])  # gradients for the embedding only, never the UNet
                optimizer.step()
                done += 1
                bar.update()
                if loss.item() < epsilon + i * 2e-5:
                    break
            bar.update(num_inner_steps - done)
            null = null.detach()
            embeds.append(null.to(dtype, copy=True))  # the next step optimises `null` in place
            with torch.no_grad():
                noise_uncond = _noise(pipe, latents, t, null.to(dtype)).float()
                noise = noise_uncond + guidance_scale * (noise_cond - noise_uncond)
                latents = ddim_step(pipe.scheduler, noise, t, latents.float()).to(latents.dtype)
    return embeds


def negative_prompt_inversion(cond: torch.Tensor) -> torch.Tensor:
    """Negative-prompt inversion (Miyake et al. 2023): the source embedding replaces the null one at every step."""
    return cond.detach().clone()


def invert(pipe, image: PIL.Image.Image, prompt_embeds: torch.Tensor, method: str = "null-text",
           num_inference_steps: int = 50, guidance_scale: float = 7.5, height: int | None = None,
           width: int | None = None, num_inner_steps: int = 10, early_stop_epsilon: float = 1e-5) -> Inversion:
    """Invert a photo described by ``prompt_embeds`` ``(1, 77, D)`` with ``method`` (see :data:`METHODS`).

    Runs in float32 (UNet and VAE upcast for the call when they are fp16/bf16); the latents, trajectory and
    embeddings come back in the UNet's own dtype."""
    if method not in METHODS:
        raise ValueError(f"unknown inversion {method!r}; choose from {', '.join(METHODS)}")
    check_sampler(pipe.scheduler)
    if not isinstance(num_inner_steps, int) or num_inner_steps < 1:
        raise ValueError(f"`num_inner_steps` must be a positive integer, got {num_inner_steps!r}")
    device = pipe._execution_device
    dtype = pipe.unet.dtype
    height = height or pipe.unet.config.sample_size * pipe.vae_scale_factor
    width = width or pipe.unet.config.sample_size * pipe.vae_scale_factor
    pipe.scheduler.set_timesteps(num_inference_steps, device=device)
    timesteps = pipe.scheduler.timesteps
    with float32_modules(pipe.unet, pipe.vae):
        cond = prompt_embeds.to(device=device, dtype=torch.float32)
        latents = encode_image(pipe, image, height, width).float()
        trajectory = ddim_inversion(pipe, latents, cond, timesteps)
        if method == "null-text":
            empty, _ = pipe.encode_text([""], device)
            uncond = null_text_inversion(pipe, trajectory, cond, empty.float(), timesteps, guidance_scale,
                                         num_inner_steps, early_stop_epsilon)
            uncond = [u.to(dtype) for u in uncond]
        elif method == "negative-prompt":
            uncond = negative_prompt_inversion(cond).to(dtype)
        else:
            uncond = None
    trajectory = [x.to(dtype) for x in trajectory]
    return Inversion(trajectory[-1], uncond, trajectory, method, num_inference_steps, guidance_scale)
