"""The shapes world: procedurally generated images with captions and ground truth.

Every scene is one or two simple shapes on a plain background, with an English
caption ("a red circle on the left and a blue square on the right") and, per
object, the ground truth (shape, colour, size, position, bounding box, boolean
mask). Scenes are deterministic functions of ``(seed, index)``.

Reading pixels back (what the measurements of meaning use) is
:mod:`imageprompt.world.reader`.

Only numpy and Pillow are needed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image

IMAGE_SIZE = 64
SUPERSAMPLE = 4

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (50, 80, 225),
    "yellow": (235, 210, 40),
    "purple": (150, 60, 200),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (240, 240, 240),
    "gray": (128, 128, 128),
    "black": (20, 20, 20),
}
SIZES: dict[str, tuple[float, float]] = {  # half-size as a fraction of the image side
    "small": (0.10, 0.125),
    "large": (0.165, 0.195),
}
POSITIONS: dict[str, tuple[float, float]] = {  # object centre as fractions (x, y)
    "left": (0.27, 0.5),
    "right": (0.73, 0.5),
    "center": (0.5, 0.5),
    "top": (0.5, 0.27),
    "bottom": (0.5, 0.73),
}
POSITION_PHRASES: dict[str, str] = {
    "left": "on the left",
    "right": "on the right",
    "center": "in the center",
    "top": "at the top",
    "bottom": "at the bottom",
}
PAIR_LAYOUTS: tuple[tuple[str, str], ...] = (("left", "right"), ("top", "bottom"))
JITTER = 0.035  # centre jitter, fraction of the image side
COLOR_JITTER = 12  # per-channel jitter of an object's colour

# Words a caption can use, plus common English words so other prompts tokenize well.
COMMON_WORDS: tuple[str, ...] = (
    "a", "an", "the", "of", "and", "on", "in", "at", "with", "to", "is", "are",
    "photo", "picture", "image", "drawing", "shape", "shapes", "object", "objects",
    "one", "two", "background", "plain", "simple", "big", "tiny", "middle", "side",
    "above", "below", "next", "near", "its", "this", "that", "there", "it",
)


def vocabulary() -> list[str]:
    """Every word the world's captions use, then common words (for the tokenizer)."""
    words: list[str] = []
    for group in (SHAPES, COLORS, BACKGROUNDS, SIZES, POSITIONS):
        words.extend(group)
    for phrase in POSITION_PHRASES.values():
        words.extend(phrase.split())
    words.extend(COMMON_WORDS)
    seen: dict[str, None] = {}
    for w in words:
        seen.setdefault(w, None)
    return list(seen)


# ----------------------------------------------------------------------------- scenes


@dataclass
class ObjectSpec:
    """What to draw: the attributes a caption can name. ``size`` may be None (any)."""

    shape: str
    color: str
    position: str
    size: str | None = None

    def phrase(self, with_size: bool = True) -> str:
        words = ["a"]
        if with_size and self.size:
            words.append(self.size)
        words += [self.color, self.shape, POSITION_PHRASES[self.position]]
        return " ".join(words)


@dataclass
class WorldObject:
    """One drawn object with its ground truth (pixel units, ``mask`` is HxW bool)."""

    shape: str
    color: str
    size: str
    position: str
    center: tuple[float, float]
    half_size: float
    rgb: tuple[int, int, int]
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive)
    mask: np.ndarray = field(repr=False)


@dataclass
class Scene:
    image: Image.Image
    caption: str
    background: str
    objects: list[WorldObject]
    seed: int | None = None
    index: int | None = None

    @property
    def array(self) -> np.ndarray:
        return np.asarray(self.image)


def caption_for(specs: list[ObjectSpec], background: str | None = None, with_size: bool = True) -> str:
    """The caption of a scene: object phrases joined by "and", then the background."""
    text = " and ".join(s.phrase(with_size) for s in specs)
    if background:
        text += f" on a {background} background"
    return text


def parse_caption(caption: str) -> tuple[list[ObjectSpec], str | None]:
    """Inverse of :func:`caption_for` for the world's grammar: (objects, background)."""
    text = caption.strip().lower()
    background = None
    for name in BACKGROUNDS:
        suffix = f" on a {name} background"
        if text.endswith(suffix):
            background, text = name, text[: -len(suffix)]
            break
    specs = []
    for part in text.split(" and "):
        words = part.split()
        shape = next((w for w in words if w in SHAPES), None)
        color = next((w for w in words if w in COLORS), None)
        size = next((w for w in words if w in SIZES), None)
        position = next((p for p, ph in POSITION_PHRASES.items() if part.endswith(ph)), None)
        if shape is None or color is None or position is None:
            raise ValueError(f"not a caption of the shapes world: {caption!r}")
        specs.append(ObjectSpec(shape, color, position, size))
    return specs, background


def _coverage(shape: str, cx: float, cy: float, s: float, size: int) -> np.ndarray:
    """Fraction of each pixel covered by the shape (supersampled), HxW float."""
    cover = np.zeros((size, size))
    x0, x1 = max(0, int(np.floor(cx - s)) - 1), min(size, int(np.ceil(cx + s)) + 1)
    y0, y1 = max(0, int(np.floor(cy - s)) - 1), min(size, int(np.ceil(cy + s)) + 1)
    if x1 <= x0 or y1 <= y0:
        return cover
    xs = x0 + (np.arange((x1 - x0) * SUPERSAMPLE) + 0.5) / SUPERSAMPLE
    ys = y0 + (np.arange((y1 - y0) * SUPERSAMPLE) + 0.5) / SUPERSAMPLE
    x, y = np.meshgrid(xs, ys)
    if shape == "circle":
        inside = (x - cx) ** 2 + (y - cy) ** 2 <= s * s
    elif shape == "square":
        inside = (np.abs(x - cx) <= s) & (np.abs(y - cy) <= s)
    elif shape == "triangle":  # upright isosceles: apex (cx, cy-s), base at cy+s, width 2s
        t = (y - (cy - s)) / (2 * s)  # 0 at apex, 1 at base
        inside = (t >= 0) & (t <= 1) & (np.abs(x - cx) <= s * t)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    cover[y0:y1, x0:x1] = inside.reshape(y1 - y0, SUPERSAMPLE, x1 - x0, SUPERSAMPLE).mean(axis=(1, 3))
    return cover


def mask_bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1), exclusive ends; (0, 0, 0, 0) for an empty mask."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return (0, 0, 0, 0)
    return (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)


def render(
    specs: list[ObjectSpec],
    background: str,
    rng: np.random.Generator | int | None = None,
    size: int = IMAGE_SIZE,
    caption: str | None = None,
) -> Scene:
    """Draw the given objects (unspecified sizes and the jitter come from ``rng``)."""
    rng = np.random.default_rng(rng)
    canvas = np.empty((size, size, 3), dtype=np.float64)
    canvas[:] = BACKGROUNDS[background]
    objects = []
    for spec in specs:
        size_name = spec.size or str(rng.choice(list(SIZES)))
        lo, hi = SIZES[size_name]
        s = rng.uniform(lo, hi) * size
        fx, fy = POSITIONS[spec.position]
        cx = (fx + rng.uniform(-JITTER, JITTER)) * size
        cy = (fy + rng.uniform(-JITTER, JITTER)) * size
        base = np.array(COLORS[spec.color], dtype=np.int64)
        rgb = tuple(int(v) for v in np.clip(base + rng.integers(-COLOR_JITTER, COLOR_JITTER + 1, 3), 0, 255))
        cover = _coverage(spec.shape, cx, cy, s, size)
        canvas = canvas * (1 - cover[..., None]) + np.array(rgb, dtype=np.float64) * cover[..., None]
        mask = cover >= 0.5
        objects.append(
            WorldObject(spec.shape, spec.color, size_name, spec.position, (cx, cy), s, rgb, mask_bbox(mask), mask)
        )
    image = Image.fromarray(np.clip(np.rint(canvas), 0, 255).astype(np.uint8))
    if caption is None:
        caption = caption_for(specs, background)
    return Scene(image, caption, background, objects)


def sample_specs(rng: np.random.Generator) -> tuple[list[ObjectSpec], str]:
    """Random object specs (one or two objects, half and half) and a background."""
    background = str(rng.choice(list(BACKGROUNDS)))
    if rng.random() < 0.5:
        positions: tuple[str, ...] = (str(rng.choice(list(POSITIONS))),)
    else:
        positions = PAIR_LAYOUTS[int(rng.integers(len(PAIR_LAYOUTS)))]
    specs = [
        ObjectSpec(str(rng.choice(SHAPES)), str(rng.choice(list(COLORS))), p, str(rng.choice(list(SIZES))))
        for p in positions
    ]
    return specs, background


def sample_scene(seed: int, index: int = 0, size: int = IMAGE_SIZE) -> Scene:
    """Scene number ``index`` of the world drawn from ``seed`` (deterministic)."""
    rng = np.random.default_rng([seed, index])
    specs, background = sample_specs(rng)
    scene = render(specs, background, rng, size=size, caption="")
    # The caption names the size and the background half of the time each.
    with_size = bool(rng.random() < 0.5)
    with_bg = bool(rng.random() < 0.5)
    scene.caption = caption_for(specs, background if with_bg else None, with_size=with_size)
    scene.seed, scene.index = seed, index
    return scene


def sample_scenes(seed: int, start: int, count: int, size: int = IMAGE_SIZE) -> list[Scene]:
    return [sample_scene(seed, i, size) for i in range(start, start + count)]


def scene_from_caption(caption: str, seed: int = 0, size: int = IMAGE_SIZE) -> Scene:
    """Draw a scene matching a world caption (background random if not named)."""
    specs, background = parse_caption(caption)
    rng = np.random.default_rng([seed, 7919])
    background = background or str(rng.choice(list(BACKGROUNDS)))
    scene = render(specs, background, rng, size=size, caption=caption)
    scene.seed = seed
    return scene


def grid(images: list[Image.Image], cols: int = 8, pad: int = 2) -> Image.Image:
    """Tile images into one picture (for looking at samples)."""
    if not images:
        raise ValueError("no images")
    w, h = images[0].size
    rows = (len(images) + cols - 1) // cols
    out = Image.new("RGB", (cols * (w + pad) + pad, rows * (h + pad) + pad), (255, 255, 255))
    for i, im in enumerate(images):
        out.paste(im.convert("RGB").resize((w, h)), (pad + (i % cols) * (w + pad), pad + (i // cols) * (h + pad)))
    return out


def specs_of(scene: Scene) -> list[ObjectSpec]:
    return [ObjectSpec(o.shape, o.color, o.position, o.size) for o in scene.objects]


__all__ = [
    "IMAGE_SIZE", "SUPERSAMPLE", "SHAPES", "COLORS", "BACKGROUNDS", "SIZES", "POSITIONS", "POSITION_PHRASES",
    "PAIR_LAYOUTS", "JITTER", "COLOR_JITTER", "COMMON_WORDS",
    "ObjectSpec", "WorldObject", "Scene", "vocabulary", "caption_for", "parse_caption",
    "mask_bbox", "render", "sample_specs", "sample_scene", "sample_scenes", "scene_from_caption", "grid", "specs_of",
]
