"""Reading the shapes world back from pixels: the colour of a region, the shape class
of a mask, the position class of a mask, mask IoU, and a segmentation of any image
(generated or not) into background and objects. These are what the measurements of
meaning (:mod:`imageprompt.world.evaluate`) use. Only numpy and Pillow are needed.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from imageprompt.world.scenes import BACKGROUNDS, COLORS, POSITIONS, ObjectSpec, mask_bbox


def _as_array(image) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB")).astype(np.float64)
    arr = np.asarray(image, dtype=np.float64)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError("expected an HxWx3 image")
    return arr


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


__all__ = [
    "mask_iou", "classify_rgb", "region_rgb", "dominant_color", "shape_features",
    "classify_shape", "classify_position", "connected_components", "background_rgb", "foreground_mask",
    "DetectedObject", "detect_objects", "background_name", "match_objects", "score_image",
]
