"""How much the T5 fill of SD-IPC's SD3 conditioning matters: ``python -m imageprompt.bench.sd3_t5``.

Two measures, on final latents from one noise (``docs/sd3.md`` has the figures and what they do and do not say):

- ``text``: for a text prompt ``P``, the CLIP parts of ``P`` with the T5 part filled as SD-IPC would fill it
  (zeros, the empty prompt's T5 states) against ``P`` as diffusers conditions it (T5 of ``P``), as a fraction of
  the change a *different* prompt makes: 0 = the fill loses nothing of T5, 1 = as far as another prompt;
- ``variation``: SD-IPC variations of one image with each fill (zeros, empty, a caption), pairwise, as the same
  fraction.

With random weights (the tiny model) the numbers say how strongly the MM-DiT reads the T5 tokens, not whether a
fill is *good*: that needs SD 3.5's weights and image similarity.
"""

from __future__ import annotations

import torch

PROMPTS = ("a red cat", "a blue square on the beach", "a photo of a small dog", "a green tree in the snow")


def _latents(pipe, noise, steps, t5_length, **cond):
    return pipe.sample(latents=noise.clone(), num_inference_steps=steps, guidance_scale=4.0, output_type="latent",
                       height=noise.shape[-2] * pipe.vae_scale_factor, width=noise.shape[-1] * pipe.vae_scale_factor,
                       max_sequence_length=t5_length, **cond).images.float()


@torch.no_grad()
def t5_fill_report(pipe, image, prompts=PROMPTS, steps: int = 4, t5_length: int = 16, seed: int = 0) -> dict:
    """``{"text": {fill: fraction}, "variation": {"a-b": fraction}}`` (see the module docstring)."""
    from imageprompt.conversion_sd3 import joint_states

    side = pipe.default_sample_size
    noise = torch.randn(1, pipe.transformer.config.in_channels, side, side,
                        generator=torch.Generator().manual_seed(seed)).to(pipe.device, pipe.transformer.dtype)
    device = pipe.device
    empty_t5 = pipe.encode_joint([""], device, t5_length)[1]
    text = {"zeros": [], "empty": []}
    full = {p: _latents(pipe, noise, steps, t5_length, prompt=p) for p in prompts}
    for i, prompt in enumerate(prompts):
        other = full[prompts[(i + 1) % len(prompts)]]
        scale = (other - full[prompt]).norm()
        clip, t5, pooled, _ = pipe.encode_joint([prompt], device, t5_length)
        for fill, states in (("zeros", torch.zeros_like(t5)), ("empty", empty_t5)):
            x = _latents(pipe, noise, steps, t5_length, prompt_embeds=joint_states(clip, states),
                         pooled_prompt_embeds=pooled)
            text[fill].append(((x - full[prompt]).norm() / scale).item())
    variations = {}
    for fill in ("zeros", "empty", "caption"):
        cond = pipe.image_conditioning([image], None, 0.5, device, fill, prompts[0] if fill == "caption" else None,
                                       t5_length)
        variations[fill] = _latents(pipe, noise, steps, t5_length, **cond)
    scale = (full[prompts[1]] - full[prompts[0]]).norm()
    pairs = {f"{a}-{b}": ((variations[a] - variations[b]).norm() / scale).item()
             for a, b in (("zeros", "empty"), ("zeros", "caption"), ("empty", "caption"))}
    return {"text": {k: sum(v) / len(v) for k, v in text.items()}, "variation": pairs}


def main() -> None:
    import tempfile

    import numpy as np
    from PIL import Image

    from imageprompt.pipelines.loading import load_pipeline
    from imageprompt.testing_sd3 import save_tiny_sd3

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        model, clip_l, clip_g = save_tiny_sd3(tmp)
        pipe = load_pipeline(str(model), str(clip_l), device="cpu", dtype="fp32", clip_2=str(clip_g))
        pipe.set_progress_bar_config(disable=True)
        image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 48, 3), dtype=np.uint8))
        report = t5_fill_report(pipe, image)
    print("tiny random SD3, 4 steps, CFG 4: distance as a fraction of a prompt change")
    for part, values in report.items():
        print(part, {k: round(v, 3) for k, v in values.items()})


if __name__ == "__main__":
    main()
