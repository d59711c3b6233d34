"""Per-token cross-attention maps of a run: recorded (:class:`AttentionMapRecorder`), and rendered as
labelled heat maps (PIL only).

The maps are cross-attention probabilities of the conditional rows at one layer
resolution, averaged over steps, layers and heads, shape ``(prompts, h, w, tokens)``:
what :meth:`imageprompt.p2p.PromptToPromptController.attention_maps` returns of an
edit, and what an :class:`AttentionMapRecorder` attached to any pipeline records. As in
Hertz et al.'s ``show_cross_attention``, each token's map is normalised to its own
maximum and shown over the image.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from imageprompt.attention import AttentionEditor, Layer

# Anchor colours of a perceptually ordered dark-blue -> yellow ramp (viridis-like).
_RAMP = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float64)


class AttentionMapRecorder(AttentionEditor):
    """An attention editor that records the last ``rows`` rows' cross-attention maps (the conditional prompts) at
    ``map_res`` latent rows, for latents of ``latent_size``; it changes nothing. Editors attached before it see the
    probabilities first: attached after an edit, it records the edited maps."""

    def __init__(self, rows: int, latent_size: tuple[int, int], map_res: int):
        self.rows, self.latent_size, self.map_res = rows, tuple(latent_size), map_res
        self.maps_sum, self.count = None, 0

    def probs_rows(self, layer: Layer, rows: int) -> int:
        wanted = layer.is_cross and layer.size(self.latent_size)[0] == self.map_res
        return min(self.rows, rows) if wanted else 0

    def edit_probs(self, layer: Layer, probs: torch.Tensor) -> torch.Tensor:
        if self.probs_rows(layer, probs.shape[0]):
            height, width = layer.size(self.latent_size)
            maps = probs[-self.rows:].float().mean(1).reshape(self.rows, height, width, -1)
            self.maps_sum = maps.detach() if self.maps_sum is None else self.maps_sum + maps.detach()
            self.count += 1
        return probs

    def attention_maps(self) -> torch.Tensor | None:
        """``(rows, h, w, tokens)``: the maps averaged over the calls recorded (None: none)."""
        return None if self.maps_sum is None else self.maps_sum / self.count


def token_labels(tokenizer, prompt: str) -> list[str]:
    """The prompt's word tokens as text, positions 1..n (BOS, EOS and padding left out)."""
    ids = tokenizer.encode(prompt)[1:-1][: tokenizer.model_max_length - 2]
    return [tokenizer.decode([i]).strip() or "?" for i in ids]


def colorize(values: np.ndarray) -> np.ndarray:
    """``(h, w)`` values in [0, 1] -> ``(h, w, 3)`` uint8 colours of the ramp."""
    scaled = np.clip(values, 0.0, 1.0) * (len(_RAMP) - 1)
    low = np.floor(scaled).astype(int).clip(0, len(_RAMP) - 2)
    frac = (scaled - low)[..., None]
    return (_RAMP[low] * (1 - frac) + _RAMP[low + 1] * frac).round().astype(np.uint8)


def heat_map(token_map: torch.Tensor | np.ndarray, size: int, image: Image.Image | None = None,
             opacity: float = 0.6) -> Image.Image:
    """One token's ``(h, w)`` map, normalised to its maximum, coloured and laid over ``image``."""
    values = np.asarray(token_map, dtype=np.float64)
    values = values / max(values.max(), 1e-12)
    small = Image.fromarray(colorize(values))
    coloured = small.resize((size, size), Image.Resampling.BILINEAR)
    if image is None:
        return coloured
    return Image.blend(image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC), coloured, opacity)


def render_attention_maps(maps: torch.Tensor, labels: list[list[str]], images: list[Image.Image] | None = None,
                          size: int = 128) -> Image.Image:
    """A grid: one row per prompt, one labelled heat map per word token.

    Args:
        maps: ``(prompts, h, w, tokens)`` averaged maps; token ``i + 1`` is ``labels[row][i]``.
        labels: the word tokens of each prompt (:func:`token_labels`).
        images: optional image of each row to lay the maps over.
        size: side of each heat map in pixels.
    """
    maps = maps.detach().float().cpu()
    if len(labels) != maps.shape[0]:
        raise ValueError(f"{len(labels)} label rows for {maps.shape[0]} prompts")
    font = ImageFont.load_default()
    caption = 18
    columns = max((len(row) for row in labels), default=0) or 1
    grid = Image.new("RGB", (columns * size, len(labels) * (size + caption)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for r, row in enumerate(labels):
        image = images[r] if images is not None else None
        for c, label in enumerate(row[: maps.shape[-1] - 1]):
            x, y = c * size, r * (size + caption)
            grid.paste(heat_map(maps[r, :, :, c + 1].numpy(), size, image), (x, y))
            text = label if len(label) <= size // 7 else label[: size // 7 - 1] + "…"
            width = draw.textlength(text, font=font)
            draw.text((x + (size - width) / 2, y + size + 3), text, fill=(0, 0, 0), font=font)
    return grid
