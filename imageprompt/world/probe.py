"""Does the bundled model read its text, and do its states from EOS on carry the sentence?

SD-IPC works training-free on Stable Diffusion because the UNet reads the whole
sentence from the states at and after EOS (causal attention: every one of them
has seen the whole prompt), so an image converted into "an EOS state" and
broadcast over positions 1..76 conditions it like its caption. These probes
measure that on the bundled model:

- :class:`ReadingProbe` (printed during UNet training): denoising loss on fixed
  held-out scenes with one attribute word wrong, or with the caption's EOS state
  broadcast, relative to the true caption.
- :func:`padding_cosine`: cosine of the padding states to the EOS state.
- :func:`eos_broadcast` builds SD-IPC's conditioning shape from text alone; the
  evaluation (``imageprompt eval``, "text encoder probe") samples with it.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from imageprompt import world
from imageprompt.world.models import encode_prompts, to_vae_input, tokenize, training_schedule_config


def eos_broadcast(states: torch.Tensor, eos: torch.Tensor, words_only: bool = False) -> torch.Tensor:
    """Text states with the EOS state copied over positions 1..EOS-1 (``words_only``) or over
    every position from 1 on: the shape of SD-IPC's variation conditioning, from text alone."""
    pos = torch.arange(states.shape[1], device=states.device)
    eos = eos.to(states.device)
    mask = (pos[None] >= 1) & ((pos[None] < eos[:, None]) if words_only else (pos[None] != eos[:, None]))
    eos_state = states[torch.arange(len(states), device=states.device), eos]
    return torch.where(mask[..., None], eos_state[:, None], states)


def wrong_caption(caption: str, attribute: str, rng: np.random.Generator) -> str:
    """``caption`` with one attribute of its first object changed (colour, shape or position)."""
    specs, background = world.parse_caption(caption)
    first = specs[0]
    if attribute == "position":
        taken = {s.position for s in specs}
        options = [p for p in world.POSITIONS if p not in taken]
        if len(specs) == 2:  # swap the pair instead: a different layout of the same objects
            specs = [world.ObjectSpec(s.shape, s.color, o.position, s.size) for s, o in zip(specs, specs[::-1])]
            return world.caption_for(specs, background, with_size=any(s.size for s in specs))
        first = world.ObjectSpec(first.shape, first.color, str(rng.choice(options)), first.size)
    elif attribute == "color":
        first = world.ObjectSpec(first.shape, str(rng.choice([c for c in world.COLORS if c != first.color])),
                                 first.position, first.size)
    else:
        first = world.ObjectSpec(str(rng.choice([x for x in world.SHAPES if x != first.shape])), first.color,
                                 first.position, first.size)
    return world.caption_for([first, *specs[1:]], background, with_size=any(s.size for s in specs))


class ReadingProbe:
    """Does the UNet read the text? Denoising loss on fixed held-out scenes, noise and
    timesteps, with the true caption, with one attribute wrong, and with the true caption's
    EOS state broadcast over positions 1..76 (SD-IPC's conditioning shape). Printed as the
    loss increase over the true caption: a UNet that reads a word shows a clear increase
    for that word; one whose broadcast EOS state carries the sentence shows a small one."""

    def __init__(self, text_encoder, tokenizer, vae, *, seed, device, count=64):
        rng = np.random.default_rng([seed, 31])
        scenes = world.sample_scenes(seed + 7_777_777, 0, count)
        x = torch.from_numpy(np.stack([s.array for s in scenes])).permute(0, 3, 1, 2)
        with torch.no_grad():
            self.latents = vae.encode(to_vae_input(x.to(device))).latent_dist.mean * vae.config.scaling_factor
        gen = torch.Generator().manual_seed(seed + 41)
        self.noise = torch.randn(self.latents.shape, generator=gen).to(device)
        self.t = torch.linspace(100, 900, count).long().to(device)
        caps = [s.caption for s in scenes]
        self.conds = {"true": encode_prompts(text_encoder, tokenizer, caps, device)}
        for attr in ("color", "shape", "position"):
            wrong = [wrong_caption(c, attr, rng) for c in caps]
            self.conds[f"wrong {attr}"] = encode_prompts(text_encoder, tokenizer, wrong, device)
        eos = (tokenize(tokenizer, caps, device) == tokenizer.eos_token_id).int().argmax(1)
        self.conds["eos broadcast"] = eos_broadcast(self.conds["true"], eos)
        from diffusers import DDPMScheduler

        self.noisy = DDPMScheduler(**training_schedule_config()).add_noise(self.latents, self.noise, self.t)

    @torch.no_grad()
    def __call__(self, unet) -> dict[str, float]:
        losses = {k: F.mse_loss(unet(self.noisy, self.t, encoder_hidden_states=c).sample, self.noise).item()
                  for k, c in self.conds.items()}
        base = losses["true"]
        return {"loss": base, **{k: v / base - 1 for k, v in losses.items() if k != "true"}}

    @staticmethod
    def format(result: dict[str, float]) -> str:
        return f"probe loss {result['loss']:.4f}; " + ", ".join(
            f"{k} {100 * v:+.0f}%" for k, v in result.items() if k != "loss")


@torch.no_grad()
def caption_states(text_encoder, tokenizer, captions: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Final-layer states ``(B, 77, D)`` of ``captions`` and each one's EOS position."""
    states = encode_prompts(text_encoder, tokenizer, captions, device)
    eos = (tokenize(tokenizer, captions, device) == tokenizer.eos_token_id).int().argmax(1)
    return states, eos


def padding_cosine(states: torch.Tensor, eos: torch.Tensor) -> float:
    """Mean cosine of every padding state (after EOS) to its caption's EOS state."""
    rows = torch.arange(len(states), device=states.device)
    cos = F.cosine_similarity(states, states[rows, eos][:, None], dim=-1)
    after = torch.arange(states.shape[1], device=states.device)[None] > eos.to(states.device)[:, None]
    return float(cos[after].mean())

