"""RF-Inversion's two controllers (Rout et al., "Semantic Image Inversion and Editing using Rectified
Stochastic Differential Equations", ICLR 2025), in SD3's convention (``sigma`` 0: image, 1: noise; the velocity
``v = dx/dsigma``).

- **Inversion** (image -> noise) steers the plain flow ODE towards one noise sample ``y1`` with strength ``gamma``:
  ``v + gamma * ((y1 - x) / (1 - sigma) - v)``. ``gamma = 0`` is the plain inversion
  (:mod:`imageprompt.inversion_flow`); ``gamma = 1`` lands exactly on ``y1`` (a Gaussian sample: most editable,
  least faithful).
- **Editing** (noise -> image) steers the sampler towards the photo's latents ``y0`` with strength ``eta`` in the
  steps of ``eta_steps`` (the paper: the first steps, up to its stopping time ``tau``):
  ``v + eta * ((x - y0) / sigma - v)``. ``eta = 1`` in every step ends exactly on ``y0``.

diffusers' loop takes the Euler step itself; :class:`PhotoGuide` applies the editing controller after it, as the
same Euler step with the controlled velocity would have given, from the step's start ``x_i`` and end ``x_{i+1}``
(``v = (x_{i+1} - x_i) / (sigma_{i+1} - sigma_i)``).
"""

from __future__ import annotations

import torch


def toward_noise(v: torch.Tensor, x: torch.Tensor, sigma: float, noise: torch.Tensor, gamma: float) -> torch.Tensor:
    """The inversion's controlled velocity at ``x`` (noise level ``sigma`` < 1)."""
    if gamma == 0:
        return v
    return v + gamma * ((noise - x) / (1.0 - sigma) - v)


class PhotoGuide:
    """The editing controller as an ``after_step`` hook (:class:`~imageprompt.steps.DenoisingSteps`): pulls every
    row towards ``image_latents`` with ``eta`` in the steps ``int(begin * N) <= i < int(end * N)``."""

    def __init__(self, image_latents: torch.Tensor, sigmas: torch.Tensor, eta: float, eta_steps=(0.0, 0.25)):
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta must lie in [0, 1], got {eta}")
        begin, end = (float(s) for s in eta_steps)
        if not 0.0 <= begin <= end <= 1.0:
            raise ValueError(f"eta_steps must be (begin, end) in [0, 1], got {eta_steps!r}")
        self.target, self.sigmas, self.eta = image_latents, sigmas, float(eta)
        steps = len(sigmas) - 1
        self.steps = range(int(begin * steps), int(end * steps))
        self.start: torch.Tensor | None = None

    def begin(self, latents: torch.Tensor) -> None:
        """The starting latents of the loop (the step's start of step 0)."""
        self.start = latents.clone()

    def __call__(self, pipe, step: int, tensors: dict) -> dict:
        end = tensors["latents"]
        if self.eta > 0 and step in self.steps and self.start is not None:
            sigma, after = float(self.sigmas[step]), float(self.sigmas[step + 1])
            x = self.start.float()
            pulled = x + (after - sigma) * (x - self.target.to(x)) / sigma  # the Euler step of the pull alone
            end = ((1 - self.eta) * end.float() + self.eta * pulled).to(end.dtype)
            tensors["latents"] = end
        self.start = end.clone()
        return tensors
