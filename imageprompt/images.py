"""Reading input images safely and writing outputs atomically with their parameters."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError

MAX_SIDE = 2048  # larger inputs are downscaled (CLIP sees 224 px anyway)
MAX_PROMPT_CHARS = 2000  # longer prompts are truncated before tokenizing (CLIP reads 77 tokens anyway)
# Files taken as images when a folder is read (training data, tuning sets, batch inputs).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class ImageInputError(ValueError):
    """An input image that cannot be used; the message is meant for the user."""


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB: alpha is composited on white, 16-bit is scaled to 8-bit."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        array = np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(array, mode="L").convert("RGB")
    if image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        span = max(array.max() - array.min(), 1e-12)
        return Image.fromarray(((array - array.min()) / span * 255).astype(np.uint8), mode="L").convert("RGB")
    if image.mode in ("P", "PA") or "A" in image.getbands():
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def fit_size(image: Image.Image, max_side: int = MAX_SIDE) -> Image.Image:
    """Downscale so the longer side is at most ``max_side``, with a notice."""
    if max(image.size) <= max_side:
        return image
    old = image.size
    image = image.copy()
    image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    warnings.warn(f"input image {old[0]}x{old[1]} resized to {image.size[0]}x{image.size[1]}", stacklevel=2)
    return image


def _shape(width: int, height: int) -> str:
    divisor = math.gcd(width, height)
    return f"{width // divisor}:{height // divisor}"


def resize_notice(name: str, size: tuple[int, int], target: tuple[int, int],
                  keep: str = "give --width and --height in its proportions to keep its shape") -> str | None:
    """How an input of ``size`` becomes an image of ``target`` (both ``(width, height)``) when it is resized
    to the output size (a photo to invert and edit), or None when it is used as it is."""
    (width, height), (to_width, to_height) = size, target
    if (width, height) == (to_width, to_height):
        return None
    how = f"{name} ({width}x{height}) is resized to {to_width}x{to_height}"
    if width * to_height == height * to_width:
        return how
    return f"{how}, stretched from {_shape(width, height)} to {_shape(to_width, to_height)} (not cropped); {keep}"


def _setting(settings, key: str):
    """``settings[key]`` of an image processor's size dict (a dict or transformers' ``SizeDict``), or None."""
    value = getattr(settings, key, None)
    if value is None and isinstance(settings, dict):
        value = settings.get(key)
    return value


def crop_notice(name: str, size: tuple[int, int], processor) -> str | None:
    """What CLIP's image ``processor`` (the short side scaled, the centre cropped) keeps of an input of ``size``
    ``(width, height)``, or None when nothing is cropped."""
    if processor is None or not getattr(processor, "do_center_crop", False):
        return None
    short = _setting(getattr(processor, "size", None), "shortest_edge")
    crop = getattr(processor, "crop_size", None)
    crop_width, crop_height = _setting(crop, "width"), _setting(crop, "height")
    if not (short and crop_width and crop_height):
        return None
    width, height = size
    scale = short / min(width, height)
    kept = (min(width, round(crop_width / scale)), min(height, round(crop_height / scale)))
    if kept == (width, height):
        return None
    edges = "left and right edges" if kept[0] < width else "top and bottom edges"
    if kept[0] < width and kept[1] < height:
        edges = "edges"
    return (f"{name} ({width}x{height}): the image encoder sees its centre {kept[0]}x{kept[1]}, scaled to "
            f"{crop_width}x{crop_height}; the {edges} are cropped")


@contextlib.contextmanager
def _image_errors(path: Path):
    """Pillow's failures on ``path`` as one :class:`ImageInputError` each, the file named."""
    try:
        yield
    except UnidentifiedImageError:
        raise ImageInputError(f"{path}: not an image file (or a format Pillow cannot read)") from None
    except Image.DecompressionBombError as err:
        raise ImageInputError(f"{path}: image too large to open safely ({err})") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageInputError(f"{path}: cannot read image ({err})") from None


def _existing_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.exists():
        raise ImageInputError(f"{path}: no such file")
    if path.is_dir():
        raise ImageInputError(f"{path}: is a directory, not an image")
    return path


def check_image(path: str | os.PathLike) -> None:
    """Raise :class:`ImageInputError` unless ``path`` opens as an image: the header only, so a huge
    file that is not an image is refused at once (before anything reads all its bytes)."""
    path = _existing_file(path)
    with _image_errors(path), Image.open(path):
        pass


def load_image(path: str | os.PathLike, max_side: int = MAX_SIDE) -> Image.Image:
    """Open, fully decode and normalise an input image, or raise :class:`ImageInputError`."""
    path = _existing_file(path)
    with _image_errors(path), Image.open(path) as image:
        image.draft("RGB", (max_side, max_side))  # JPEG: decode big files at reduced size
        image.load()
        image = to_rgb(ImageOps.exif_transpose(image))  # camera photos: apply the EXIF rotation
    return fit_size(image, max_side)


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write(path: str | os.PathLike, write, mode: str = "wb", replace: bool = True) -> Path:
    """Call ``write(handle)`` on a temporary file beside ``path``, then rename it into place.

    Readers never see a partial file, and a failure leaves nothing behind. With ``replace=False`` an
    existing ``path`` is never replaced: ``FileExistsError``, and the temporary file is removed. The file gets the mode
    a plain ``open(path, "w")`` would give it (``0o666`` less the umask), not ``mkstemp``'s ``0o600``:
    the temporary file is given that mode before anything is written, and the rename keeps it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual permissions
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            _rename_no_replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _rename_no_replace(tmp: str, path: Path) -> None:
    """Move ``tmp`` to ``path`` unless ``path`` exists (``FileExistsError``): a hard link, which never replaces,
    where the file system has them; else a check, then the rename."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise FileExistsError(errno.EEXIST, "file exists", str(path)) from None
    except OSError:  # no hard links here (some network and FAT file systems)
        if path.exists():
            raise FileExistsError(errno.EEXIST, "file exists", str(path)) from None
        os.replace(tmp, path)
        return
    os.unlink(tmp)


def save_png(image: Image.Image, path: str | os.PathLike, parameters: dict, replace: bool = True) -> Path:
    """Write ``image`` to ``path`` atomically, with ``parameters`` as JSON in the ``parameters`` text chunk
    (``replace=False``: never over an existing file, see :func:`atomic_write`)."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", json.dumps(parameters, sort_keys=True))
    return atomic_write(path, lambda handle: image.save(handle, format="PNG", pnginfo=info), replace=replace)


def loaded_extras(pipe) -> dict:
    """The SDXL second CLIP (``clip_2``) and a replacement ``vae`` the pipeline was loaded with, where there are."""
    names = {"clip_2": getattr(pipe, "clip_2_name", None), "vae": getattr(pipe, "vae_name", None)}
    return {k: v for k, v in names.items() if v is not None}


def generation_parameters(pipe, method: str, *, model, clip, scheduler, steps, guidance, negative_prompt) -> dict:
    """What any output records so it can be reproduced (the command line's and the demo's PNGs alike).

    ``model``/``clip`` are used when the pipeline does not carry its own ``model_name``/``clip_name``.
    """
    import imageprompt
    from imageprompt.families import denoiser

    return {
        "method": method,
        "model": getattr(pipe, "model_name", model),
        "clip": getattr(pipe, "clip_name", clip),
        **loaded_extras(pipe),
        "scheduler": getattr(pipe, "scheduler_name", scheduler),
        "steps": steps,
        "guidance": guidance,
        "negative_prompt": negative_prompt,
        "dtype": str(denoiser(pipe).dtype).replace("torch.", ""),
        "imageprompt": imageprompt.__version__,
    }


def read_jsonl(path: str | os.PathLike):
    """``(line number, value)`` for each non-blank line of a JSON Lines file; ``ValueError``
    naming ``path:line`` for a line that is not JSON."""
    path = Path(path)
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: not JSON ({err.msg})") from None


def generators(seed: int, count: int):
    """One CPU ``torch.Generator`` per image, seeded ``seed + i``: image i is reproducible alone
    from its own seed, on any device and in any batch."""
    import torch

    return [torch.Generator("cpu").manual_seed(seed + i) for i in range(count)]


def _umask() -> int:
    """The process umask, read without changing it where the system allows (Linux: ``/proc/self/status``).

    ``os.umask`` can only be read by setting it, which for a moment would apply to files other threads create
    (the demo serves requests in threads); elsewhere it is set back at once.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o077)  # the strictest value in between, should another thread create a file now
    os.umask(mask)
    return mask


def read_parameters(path: str | os.PathLike) -> dict:
    """The ``parameters`` JSON stored in a PNG written by :func:`save_png`."""
    with Image.open(path) as image:
        return json.loads(image.text["parameters"])
