"""InstantStyle's per-block adapter scales, expanded to the UNet's attention layers.

A scale is a number (every layer) or a dict naming parts of the UNet, as diffusers'
``set_ip_adapter_scale`` takes it:

- ``"mid"``: a number (or a one-entry list) for the mid block's attention;
- ``"down"`` / ``"up"``: a number for every attention of that half, or a dict
  ``{"block_i": value}`` where ``value`` is a number (every attention of block ``i``), a
  one-entry list (the same), or one number per attention of the block (down blocks have
  ``layers_per_block`` attentions, up blocks one more).

Layers not named get 0, e.g. ``{"up": {"block_0": [0.0, 1.0, 0.0]}}`` keeps only SDXL's
style layer. Block indices count all of the UNet's down (up) blocks, with or without
attention; naming a block without attention is an error.
"""

from __future__ import annotations

PARTS = ("down", "mid", "up")


def _one(value, where: str) -> float:
    if isinstance(value, list):
        if len(value) != 1:
            raise ValueError(f"expected 1 scale for {where}, got {len(value)}")
        value = value[0]
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"the scale for {where} must be a number, got {value!r}") from None


def expand_block_scales(unet, scale, default: float = 0.0) -> float | dict[str, float]:
    """A number unchanged; a per-block dict as ``{attention module prefix: scale}`` covering every attention
    block of ``unet`` (e.g. ``"up_blocks.1.attentions.0"``), the unnamed ones at ``default``."""
    if not isinstance(scale, dict):
        return scale
    unknown = sorted(set(scale) - set(PARTS), key=str)
    if unknown:
        raise ValueError(f"per-block scales name {', '.join(map(repr, unknown))}: use 'down', 'mid' and 'up'")
    out = {}
    mid = getattr(unet, "mid_block", None)
    if getattr(mid, "attentions", None):
        out["mid_block.attentions.0"] = _one(scale.get("mid", default), "mid")
    elif "mid" in scale:
        raise ValueError("this UNet's mid block has no attention: 'mid' cannot be scaled")
    for part in ("down", "up"):
        blocks = {i: len(b.attentions) for i, b in enumerate(getattr(unet, f"{part}_blocks"))
                  if getattr(b, "attentions", None)}
        value = scale.get(part, default)
        named = value if isinstance(value, dict) else {f"block_{i}": value for i in blocks}
        wrong = sorted(k for k in named if k not in {f"block_{i}" for i in blocks})
        if wrong:
            raise ValueError(f"{part} has no attention block {', '.join(wrong)}: its attention blocks are "
                             f"{', '.join(f'block_{i}' for i in blocks)}")
        for i, count in blocks.items():
            values = named.get(f"block_{i}", default)
            values = values if isinstance(values, list) else [values]
            if len(values) == 1:
                values = values * count
            if len(values) != count:
                raise ValueError(f"expected {count} scales for {part}.block_{i}, got {len(values)}")
            for j, v in enumerate(values):
                out[f"{part}_blocks.{i}.attentions.{j}"] = _one(v, f"{part}.block_{i}")
    return out


def layer_scale(expanded: dict[str, float], layer: str, default: float = 0.0) -> float:
    """The scale of the attention layer named ``layer`` (a module or processor name) in an expanded dict."""
    for prefix, value in expanded.items():
        if layer.startswith(prefix + "."):
            return value
    return default
