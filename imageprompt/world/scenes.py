"""The shapes world: procedurally generated images with captions and ground truth.

Every scene is one or two simple shapes on a plain background, with an English
caption ("a red circle on the left and a blue square on the right") and, per
object, the ground truth (shape, colour, size, position, bounding box, boolean
mask). Scenes are deterministic functions of ``(seed, index)``.

The second half of the module reads pixels back: the dominant colour of a
region, the shape class of a mask, the position class of a mask, mask IoU, and
a segmentation of any image (generated or not) into background and objects.
These are what the measurements of meaning (:mod:`imageprompt.world.evaluate`) use.

Only numpy and Pillow are needed.
"""

from __future__ import annotations

from collections import deque
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


# ----------------------------------------------------------------------------- measuring


def _as_array(image) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB")).astype(np.float64)
    arr = np.asarray(image, dtype=np.float64)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError("expected an HxWx3 image")
    return arr


def mask_bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1), exclusive ends; (0, 0, 0, 0) for an empty mask."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return (0, 0, 0, 0)
    return (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    union = np.logical_or(a, b).sum()
    if union == 0:
        return 1.0
    return float(np.logical_and(a, b).sum() / union)


def classify_rgb(rgb, palette: dict[str, tuple[int, int, int]] = COLORS) -> str:
    """Nearest palette colour (Euclidean in RGB)."""
    rgb = np.asarray(rgb, dtype=np.float64)
    names = list(palette)
    refs = np.array([palette[n] for n in names], dtype=np.float64)
    return names[int(np.argmin(((refs - rgb) ** 2).sum(axis=1)))]


def region_rgb(image, mask: np.ndarray | None = None) -> tuple[float, float, float]:
    """Median colour of the region (the interior, when the region is big enough)."""
    arr = _as_array(image)
    if mask is None:
        mask = np.ones(arr.shape[:2], bool)
    mask = np.asarray(mask, bool)
    inner = _erode(mask)
    if inner.sum() >= 4:
        mask = inner
    if mask.sum() == 0:
        raise ValueError("empty region")
    return tuple(float(v) for v in np.median(arr[mask], axis=0))


def dominant_color(image, mask: np.ndarray | None = None) -> str:
    """The palette colour of a region of an image."""
    return classify_rgb(region_rgb(image, mask))


def shape_features(mask: np.ndarray) -> dict[str, float]:
    """Fill ratio of the bounding box, share of area in its bottom half, mean fill of
    its four corners (squares of a fifth of its side), aspect, area."""
    mask = np.asarray(mask, bool)
    x0, y0, x1, y1 = mask_bbox(mask)
    area = float(mask.sum())
    if area == 0:
        return {"fill": 0.0, "bottom": 0.0, "corner": 0.0, "aspect": 0.0, "area": 0.0}
    w, h = x1 - x0, y1 - y0
    ys, xs = np.nonzero(mask)
    mid = (y0 + y1 - 1) / 2.0
    bottom = float((ys > mid).sum() + 0.5 * (ys == mid).sum()) / area
    k = max(1, int(round(0.2 * min(w, h))))
    box = mask[y0:y1, x0:x1]
    corner = float(np.mean([box[:k, :k].mean(), box[:k, -k:].mean(), box[-k:, :k].mean(), box[-k:, -k:].mean()]))
    return {"fill": area / (w * h), "bottom": bottom, "corner": corner, "aspect": w / h, "area": area}


def classify_shape(mask: np.ndarray) -> str:
    """Circle, square or triangle from simple geometry of a boolean mask.

    Ideal values: a square fills its bounding box (1.0) and its corners, a circle
    pi/4 = 0.785 and hardly any corner; an upright triangle fills half of it, with
    three quarters of its area in the bottom half (0.5 for the others). Blurred
    or rounded triangles (as generated images have) keep the bottom-heaviness
    best, so it is tested first. Thresholds were set on ground-truth masks and on
    the bundled VAE's reconstructions.
    """
    f = shape_features(mask)
    if f["area"] == 0:
        raise ValueError("empty mask")
    if f["bottom"] >= 0.565 or f["fill"] < 0.62:
        return "triangle"
    if f["fill"] + 0.5 * f["corner"] >= 1.05:  # rounded squares keep some of their corners
        return "square"
    return "circle"


def classify_position(mask: np.ndarray) -> str:
    """left / right / top / bottom / center, from the centroid of a mask."""
    mask = np.asarray(mask, bool)
    h, w = mask.shape
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        raise ValueError("empty mask")
    dx = (xs.mean() + 0.5) / w - 0.5
    dy = (ys.mean() + 0.5) / h - 0.5
    if max(abs(dx), abs(dy)) < 0.115:
        return "center"
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "top" if dy < 0 else "bottom"


def _erode(mask: np.ndarray) -> np.ndarray:
    m = np.pad(mask, 1, constant_values=False)
    return m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]


def _dilate(mask: np.ndarray) -> np.ndarray:
    m = np.pad(mask, 1, constant_values=False)
    return m[1:-1, 1:-1] | m[:-2, 1:-1] | m[2:, 1:-1] | m[1:-1, :-2] | m[1:-1, 2:]


def connected_components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean mask, largest first."""
    mask = np.asarray(mask, bool)
    h, w = mask.shape
    labels = np.zeros((h, w), np.int32)
    comps = []
    for sy, sx in zip(*np.nonzero(mask)):
        if labels[sy, sx]:
            continue
        label = len(comps) + 1
        labels[sy, sx] = label
        queue, pixels = deque([(sy, sx)]), []
        while queue:
            y, x = queue.popleft()
            pixels.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = label
                    queue.append((ny, nx))
        comp = np.zeros((h, w), bool)
        ys, xs = zip(*pixels)
        comp[list(ys), list(xs)] = True
        comps.append(comp)
    comps.sort(key=lambda c: -int(c.sum()))
    return comps


def background_rgb(image) -> tuple[float, float, float]:
    """Median colour of the image border (the world's backgrounds are plain)."""
    arr = _as_array(image)
    border = np.concatenate([arr[0], arr[-1], arr[1:-1, 0], arr[1:-1, -1]])
    return tuple(float(v) for v in np.median(border, axis=0))


def foreground_mask(image, threshold: float = 70.0) -> np.ndarray:
    """Pixels whose colour differs from the background colour by more than ``threshold``."""
    arr = _as_array(image)
    bg = np.array(background_rgb(image))
    fg = np.sqrt(((arr - bg) ** 2).sum(axis=-1)) > threshold
    # open (remove specks), then close (fill pinholes)
    fg = _dilate(_erode(fg))
    fg = _erode(_dilate(fg))
    return fg


@dataclass
class DetectedObject:
    mask: np.ndarray = field(repr=False)
    color: str = ""
    shape: str = ""
    position: str = ""
    rgb: tuple[float, float, float] = (0.0, 0.0, 0.0)
    area: int = 0
    centroid: tuple[float, float] = (0.0, 0.0)


def detect_objects(image, min_area: int | None = None, threshold: float = 70.0) -> list[DetectedObject]:
    """Segment an image into objects against its plain background; largest first."""
    arr = _as_array(image)
    h, w = arr.shape[:2]
    if min_area is None:
        min_area = max(6, int(0.004 * h * w))
    out = []
    for comp in connected_components(foreground_mask(arr, threshold)):
        area = int(comp.sum())
        if area < min_area:
            break
        ys, xs = np.nonzero(comp)
        out.append(
            DetectedObject(
                mask=comp,
                color=dominant_color(arr, comp),
                shape=classify_shape(comp),
                position=classify_position(comp),
                rgb=region_rgb(arr, comp),
                area=area,
                centroid=(float(xs.mean() + 0.5), float(ys.mean() + 0.5)),
            )
        )
    return out


def background_name(image) -> str:
    return classify_rgb(background_rgb(image), BACKGROUNDS)


def match_objects(
    detected: list[DetectedObject], specs: list[ObjectSpec], size: int
) -> list[DetectedObject | None]:
    """For each expected object, the detected object nearest its expected place.

    With one expected object the largest detection is used (position is then
    checked separately); with several, each takes the nearest unused detection.
    """
    if not specs:
        return []
    if len(specs) == 1:
        return [detected[0] if detected else None]
    result: list[DetectedObject | None] = []
    used: set[int] = set()
    for spec in specs:
        fx, fy = POSITIONS[spec.position]
        best, best_d = None, float("inf")
        for i, d in enumerate(detected[: len(specs) + 2]):
            if i in used:
                continue
            dist = (d.centroid[0] - fx * size) ** 2 + (d.centroid[1] - fy * size) ** 2
            if dist < best_d:
                best, best_d = i, dist
        if best is not None:
            used.add(best)
            result.append(detected[best])
        else:
            result.append(None)
    return result


def score_image(image, specs: list[ObjectSpec]) -> list[dict[str, bool]]:
    """Per expected object: is its colour, shape, position right in ``image``?"""
    arr = _as_array(image)
    matches = match_objects(detect_objects(arr), specs, arr.shape[1])
    scores = []
    for spec, det in zip(specs, matches):
        if det is None:
            scores.append({"found": False, "color": False, "shape": False, "position": False})
        else:
            scores.append(
                {
                    "found": True,
                    "color": det.color == spec.color,
                    "shape": det.shape == spec.shape,
                    "position": det.position == spec.position,
                }
            )
    return scores


def specs_of(scene: Scene) -> list[ObjectSpec]:
    return [ObjectSpec(o.shape, o.color, o.position, o.size) for o in scene.objects]


__all__ = [
    "IMAGE_SIZE", "SUPERSAMPLE", "SHAPES", "COLORS", "BACKGROUNDS", "SIZES", "POSITIONS", "POSITION_PHRASES",
    "PAIR_LAYOUTS", "JITTER", "COLOR_JITTER", "COMMON_WORDS",
    "ObjectSpec", "WorldObject", "Scene", "DetectedObject", "vocabulary", "caption_for", "parse_caption",
    "render", "sample_specs", "sample_scene", "sample_scenes", "scene_from_caption", "grid",
    "mask_bbox", "mask_iou", "classify_rgb", "region_rgb", "dominant_color", "shape_features",
    "classify_shape", "classify_position", "connected_components", "background_rgb", "foreground_mask",
    "detect_objects", "background_name", "match_objects", "score_image", "specs_of",
]
