"""One rule for "the same image encoder": same architecture, same weights, whatever the dtype and device.

Files made with an image encoder (image-embedding files, SD-IPC tuning files) record
its identity, :func:`encoder_identity`: the vision config (architecture) and a
fingerprint of the output projection. Another encoder is the same when
:func:`identity_mismatch` finds no difference:

- the architecture keys (:data:`VISION_KEYS`) are equal;
- each fingerprinted weight has the same shape and its 64 evenly spaced samples agree
  within a relative tolerance of 1e-2, plus a floor of 1e-3 times the weight's mean
  magnitude (:func:`same_weight`). That accepts fp16 and bf16 copies (relative rounding
  of at most 2**-9; fp16 flushes values below ~6e-8) on any device, and refuses another
  model (re-initialised or fine-tuned weights differ by far more) and a scaled copy
  (5 % is refused).
"""

from __future__ import annotations

import torch

VISION_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
               "patch_size", "projection_dim")
CONFIG_KEY = "vision_config"


def weight_fingerprint(weight: torch.Tensor, count: int = 64) -> dict:
    """Shape, mean magnitude and ``count`` evenly spaced entries (in fp32): survives fp16/bf16 casts and moves
    between devices, not another model. JSON-able."""
    flat = weight.detach().flatten()
    index = torch.linspace(0, flat.numel() - 1, count).round().long().to(flat.device)
    return {"shape": list(weight.shape), "abs_mean": flat.abs().mean(dtype=torch.float32).item(),
            "samples": flat[index].float().cpu().tolist()}


def same_weight(a: dict, b: dict, rtol: float = 1e-2) -> bool:
    """Whether two :func:`weight_fingerprint` s are of the same weight (see the module docstring)."""
    if a["shape"] != b["shape"] or len(a["samples"]) != len(b["samples"]):
        return False
    floor = 1e-3 * max(a["abs_mean"], 1e-12)  # fp16 flushes tiny values; bf16 keeps 8 bits
    return all(abs(x - y) <= rtol * abs(y) + floor for x, y in zip(a["samples"], b["samples"]))


def encoder_identity(image_encoder) -> dict:
    """What identifies an image encoder: its vision config and its output projection's fingerprint
    (``visual_projection``; an encoder without one: its first parameter, as ``first_parameter``)."""
    config = getattr(image_encoder, "config", None)
    identity = {CONFIG_KEY: {k: getattr(config, k, None) for k in VISION_KEYS}}
    projection = getattr(image_encoder, "visual_projection", None)
    if projection is not None:
        identity["visual_projection"] = weight_fingerprint(projection.weight)
    else:
        identity["first_parameter"] = weight_fingerprint(next(image_encoder.parameters()))
    return identity


def identity_mismatch(made_for: dict, here: dict) -> str | None:
    """Why the model ``made_for`` describes is not ``here``, in words, or None when they are the same.

    Both are identities such as :func:`encoder_identity` makes: :data:`CONFIG_KEY` (the architecture) and any
    number of named :func:`weight_fingerprint` s, all of which must match.
    """
    if not isinstance(made_for, dict) or not isinstance(here, dict):
        return "no identity to compare"
    was, now = made_for.get(CONFIG_KEY), here.get(CONFIG_KEY)
    if was != now:
        if not isinstance(was, dict) or not isinstance(now, dict):
            return "vision tower differs"
        diff = {k: (v, now.get(k)) for k, v in was.items() if now.get(k) != v}
        diff.update({k: (None, v) for k, v in now.items() if k not in was})
        return "vision tower differs (" + ", ".join(f"{k}: {a} in file, {b} here" for k, (a, b) in diff.items()) + ")"
    names = sorted(set(made_for) - {CONFIG_KEY})
    if names != sorted(set(here) - {CONFIG_KEY}):
        return f"different weights were fingerprinted ({', '.join(names)} in file)"
    for name in names:
        if not same_weight(made_for[name], here[name]):
            return f"same architecture but different weights ({name} differs)"
    return None


def same_encoder(a, b) -> bool:
    """Whether two image encoders are the same (architecture and weights, whatever their dtype and device)."""
    return a is b or identity_mismatch(encoder_identity(a), encoder_identity(b)) is None
