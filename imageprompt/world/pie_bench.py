"""Real-photo editing measured as PIE-Bench measures it (Ju et al., ICLR 2024, "PnP Inversion").

For each inversion method: invert the photo under its source prompt, edit it with
prompt-to-prompt, and compare with the photo. The reconstruction (the edit call's source
image) gets PSNR against the whole photo; the edit gets PSNR, MSE and SSIM outside the
edited region (scikit-image's metrics). Seconds per edit include the inversion.

Two sources of cases share :func:`inversion_rows`:

- the shapes world (``imageprompt eval --suite world``, rows "real-image edit [...]"),
  where the world's reader also says whether the edit took;
- a folder in PIE-Bench's layout (``imageprompt eval --suite pie-bench --data DIR``, any
  model): ``DIR/mapping_file.json`` maps ids to ``image_path`` (under
  ``DIR/annotation_images``), ``original_prompt`` and ``editing_prompt`` (edited words in
  ``[...]``), ``blended_word`` ("source target") and ``mask``, the edited region run-length
  encoded over the 512x512 image as ``[start, length, start, length, ...]``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from imageprompt.world.measures import EvalSettings, Row, frac

PIE_SIZE = 512


@dataclass
class EditCase:
    photo: Image.Image
    source: str
    target: str
    blend_words: list[str] | None = None
    edit_mask: np.ndarray | None = None  # True where the edit may change the photo (None: ask `judge`)


def decode_mask(runs: list[int], size: int = PIE_SIZE) -> np.ndarray:
    """PIE-Bench's run-length mask as a boolean ``(size, size)`` array; like the benchmark, the
    one-pixel border counts as edited (annotation errors there are not held against a method)."""
    flat = np.zeros(size * size, bool)
    for start, length in zip(runs[0::2], runs[1::2]):
        flat[start : start + length] = True
    mask = flat.reshape(size, size)
    mask[0, :] = mask[-1, :] = mask[:, 0] = mask[:, -1] = True
    return mask


def read_pie_bench(folder: str | Path, limit: int | None = None, size: int = PIE_SIZE) -> list[EditCase]:
    """The cases of a PIE-Bench folder, photos and masks resized to ``size`` (the model's)."""
    folder = Path(folder)
    mapping = folder / "mapping_file.json"
    if not mapping.is_file():
        raise FileNotFoundError(f"{folder}: no mapping_file.json (not a folder in PIE-Bench's layout)")
    cases = []
    for item in list(json.loads(mapping.read_text(encoding="utf-8")).values())[:limit]:
        photo = Image.open(folder / "annotation_images" / item["image_path"]).convert("RGB")
        side = min(photo.size)  # centre square, as the benchmark's loader does
        left, top = (photo.width - side) // 2, (photo.height - side) // 2
        photo = photo.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BICUBIC)
        mask = Image.fromarray(decode_mask(item["mask"])).resize((size, size), Image.Resampling.NEAREST)
        words = item.get("blended_word", "").split()
        cases.append(EditCase(photo, item["original_prompt"].replace("[", "").replace("]", ""),
                              item["editing_prompt"].replace("[", "").replace("]", ""),
                              words if len(words) == 2 else None, np.asarray(mask, bool)))
    return cases


def edit_mode(source: str, target: str) -> str:
    """replace for a word swap, refine when words were added or removed."""
    return "replace" if len(source.split()) == len(target.split()) else "refine"


def inversion_rows(p2p, cases: list[EditCase], settings: EvalSettings, name: str, methods,
                   judge: Callable | None = None) -> list[Row]:
    """Rows ``name [method]`` for each inversion method over ``cases``. ``judge(case, edit_image)``
    returns ``(edited region mask, edit took)`` where a case has no ``edit_mask``."""
    from skimage.metrics import mean_squared_error, peak_signal_noise_ratio, structural_similarity

    def psnr(a, b):
        return 60.0 if np.array_equal(a, b) else min(60.0, float(peak_signal_noise_ratio(a, b, data_range=255)))

    rows = []
    for method in methods:
        rec, bg_psnr, bg_mse, bg_ssim, took, seconds = [], [], [], [], [], []
        for case in cases:
            start = time.perf_counter()
            inversion = p2p.invert(case.photo, case.source, method, num_inference_steps=settings.steps,
                                   guidance_scale=settings.guidance_scale)
            out = p2p(case.source, case.target, mode=edit_mode(case.source, case.target),
                      blend_words=case.blend_words, inversion=inversion, num_inference_steps=settings.steps,
                      guidance_scale=settings.guidance_scale)
            seconds.append(time.perf_counter() - start)
            photo, recon, edit = (np.asarray(im.convert("RGB")) for im in (case.photo, *out.images))
            rec.append(psnr(photo, recon))
            mask, success = (case.edit_mask, None) if case.edit_mask is not None else judge(case, out.images[1])
            outside = ~mask
            bg_psnr.append(psnr(photo[outside], edit[outside]))
            bg_mse.append(float(mean_squared_error(photo[outside], edit[outside])))
            ssim = structural_similarity(photo, edit, channel_axis=-1, data_range=255, full=True)[1]
            bg_ssim.append(float(ssim[outside].mean()))
            took.append(success)
        label, n = f"{name} [{method}]", len(cases)
        rows += [Row(label, "reconstruction PSNR", float(np.mean(rec)), n, unit="dB"),
                 Row(label, "background PSNR", float(np.mean(bg_psnr)), n, unit="dB"),
                 Row(label, "background MSE", float(np.mean(bg_mse)), n, unit=""),
                 Row(label, "background SSIM", float(np.mean(bg_ssim)), n, unit="")]
        if all(t is not None for t in took):
            rows.append(Row(label, "edit success", frac(took), n))
        rows.append(Row(label, "seconds per edit", float(np.mean(seconds)), n, unit="s"))
    return rows


def pie_bench(pipe, folder: str | Path, settings: EvalSettings, limit: int | None = None) -> list[Row]:
    """``imageprompt eval --suite pie-bench --data DIR``: every inversion method on the folder's cases."""
    from diffusers import DDIMScheduler

    from imageprompt.inversion import METHODS
    from imageprompt.pipelines import StableDiffusionPromptToPromptPipeline

    p2p = StableDiffusionPromptToPromptPipeline.from_pipe(
        pipe, scheduler=DDIMScheduler.from_config(pipe.scheduler.config))
    p2p.set_progress_bar_config(disable=True)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    return inversion_rows(p2p, read_pie_bench(folder, limit, size), settings, "PIE-Bench", METHODS)
