"""Measurements of meaning for prompt-to-prompt and a world-trained IP-Adapter (issue 3, item 4).

Two rows of the shapes-world table, listed in :data:`imageprompt.world.evaluate.MEASUREMENTS`:

- ``p2p replace``: prompt-to-prompt word swap of the colour ("a red circle on
  the left" -> "a blue circle on the left", Hertz et al. 2022, Sec. 3.2): does
  the object take the target colour, and does its mask stay (IoU with the
  source's mask, read from pixels with :func:`imageprompt.world.detect_objects`)?
- ``IP-Adapter (world)``: an IP-Adapter (Ye et al. 2023) trained on the world
  with ``imageprompt train-adapter``, conditioned on the reference image alone
  (empty text): does the variation keep the reference's colour, shape and
  position, as the SD-IPC variation row asks?

The training data come from :func:`write_adapter_data`
(``python -m imageprompt.world.evaluate_edits DIR``); the command, seed and time of
the shipped adapter are in ``docs/ip-adapter.md``.
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import numpy as np

from imageprompt import world
from imageprompt.checkpoints import BUNDLED_IP_ADAPTER
from imageprompt.images import generators
from imageprompt.world.measures import (
    EvalSettings,
    Row,
    frac,
    kept_rows,
    largest,
    reference_scenes,
    single_object_specs,
)

IOU_KEPT = 0.7  # the bar: the edited object's mask keeps IoU >= 0.7 with the source's
ADAPTER_FILE = BUNDLED_IP_ADAPTER  # trained on the world by `imageprompt train-adapter` (docs/ip-adapter.md)

# ----------------------------------------------------------------------------- prompt-to-prompt replace


def p2p_replace_cases(count: int) -> list[tuple[str, str, str, str]]:
    """``(source caption, target caption, source colour, target colour)``: every (shape, colour) at a
    cycled position, the target colour stepping through the other four colours."""
    colors = list(world.COLORS)
    specs = [world.ObjectSpec(s.shape, s.color, s.position) for s in single_object_specs()]
    cases = []
    for i, spec in enumerate(itertools.islice(itertools.cycle(specs), count)):
        k = colors.index(spec.color)
        new = colors[(k + 1 + (i + i // len(specs)) % (len(colors) - 1)) % len(colors)]
        target = world.ObjectSpec(spec.shape, new, spec.position)
        cases.append((world.caption_for([spec]), world.caption_for([target]), spec.color, new))
    return cases


def p2p_pipeline(pipe):
    """The prompt-to-prompt pipeline on ``pipe``'s components (no weights copied)."""
    from imageprompt.pipelines import StableDiffusionPromptToPromptPipeline

    p2p = StableDiffusionPromptToPromptPipeline.from_pipe(pipe)
    p2p.set_progress_bar_config(disable=True)
    return p2p


def p2p_replace(pipe, settings: EvalSettings) -> list[Row]:
    """Colour word swap: target colour reached, and the object's mask kept (IoU with the source's).

    ``settings.extra`` may hold ``p2p_cross_steps`` (0.8), ``p2p_self_steps`` (0.4),
    ``p2p_self_res`` (the pipeline's default) and ``p2p_blend`` (False: no local blend).
    """
    p2p = p2p_pipeline(pipe)
    extra = settings.extra
    per = settings.images_per_sample
    changed, kept, ious, source_ok = [], [], [], []
    for i, (source, target, old, new) in enumerate(p2p_replace_cases(settings.samples)):
        for generator in generators(settings.seed + 30_000 + i * per, per):
            out = p2p(source, target, mode="replace", cross_steps=extra.get("p2p_cross_steps", 0.8),
                      self_steps=extra.get("p2p_self_steps", 0.4), self_res=extra.get("p2p_self_res"),
                      blend_words=[old, new] if extra.get("p2p_blend") else None,
                      num_inference_steps=settings.steps, guidance_scale=settings.guidance_scale,
                      generator=generator)
            src, edit = (largest(image) for image in out.images)
            iou = world.mask_iou(src.mask, edit.mask) if src is not None and edit is not None else 0.0
            source_ok.append(src is not None and src.color == old)
            changed.append(edit is not None and edit.color == new)
            ious.append(iou)
            kept.append(iou >= IOU_KEPT)
    name, n = "p2p replace", len(changed)
    return [
        Row(name, "source has the named colour", frac(source_ok), n),
        Row(name, "colour changed to the target", frac(changed), n),
        Row(name, f"object mask kept (IoU >= {IOU_KEPT})", frac(kept), n, aim=0.85),
        Row(name, "mean mask IoU", frac(ious), n),
        Row(name, "changed and mask kept", frac(a and b for a, b in zip(changed, kept)), n),
    ]


def background_psnr(a, b, mask) -> float:
    """PSNR (dB) of image ``b`` against ``a`` where ``mask`` is False (scikit-image's PSNR of those pixels)."""
    from skimage.metrics import peak_signal_noise_ratio

    outside = ~np.asarray(mask, bool)
    x, y = np.asarray(a)[outside], np.asarray(b)[outside]
    if np.array_equal(x, y):
        return float("inf")
    return float(peak_signal_noise_ratio(x, y, data_range=255))


def p2p_blend_background(pipe, settings: EvalSettings) -> list[Row]:
    """Prompt-to-prompt colour swap with and without local blend (the old and new colour words):
    PSNR of the edit against its source outside the union of the two objects' masks (dilated
    by two pixels), and whether the colour changed. Identical backgrounds count as 60 dB."""
    p2p = p2p_pipeline(pipe)
    per = settings.images_per_sample
    psnr = {False: [], True: []}
    changed = {False: [], True: []}
    for i, (source, target, old, new) in enumerate(p2p_replace_cases(settings.samples)):
        for blend in (False, True):
            for generator in generators(settings.seed + 30_000 + i * per, per):
                out = p2p(source, target, mode="replace", blend_words=[old, new] if blend else None,
                          num_inference_steps=settings.steps, guidance_scale=settings.guidance_scale,
                          generator=generator)
                src_image, edit_image = out.images
                mask = np.zeros(np.asarray(src_image).shape[:2], bool)
                for image in (src_image, edit_image):
                    for det in world.detect_objects(image):
                        mask |= det.mask
                for _ in range(2):
                    mask = world.reader._dilate(mask)
                psnr[blend].append(min(60.0, background_psnr(src_image, edit_image, mask)))
                edit_obj = largest(edit_image)
                changed[blend].append(edit_obj is not None and edit_obj.color == new)
    name, n = "p2p local blend", len(psnr[True])
    return [
        Row(name, "background PSNR outside the objects, no blend", float(np.mean(psnr[False])), n, unit="dB"),
        Row(name, "background PSNR outside the objects, local blend", float(np.mean(psnr[True])), n, unit="dB"),
        Row(name, "colour changed, no blend", frac(changed[False]), n),
        Row(name, "colour changed, local blend", frac(changed[True]), n),
    ]


def real_image_edits(pipe, settings: EvalSettings) -> list[Row]:
    """Real-photo editing as PIE-Bench measures it (:mod:`imageprompt.world.pie_bench`), on world
    scenes as the photos: for each inversion method, invert the scene under its caption, then swap
    its colour word with prompt-to-prompt. The edited region is the ground-truth object and the
    edited object, dilated by two pixels; the edit took if the object has the target colour."""
    from diffusers import DDIMScheduler

    from imageprompt.inversion import METHODS
    from imageprompt.world.pie_bench import EditCase, inversion_rows

    p2p = p2p_pipeline(pipe)
    p2p.scheduler = DDIMScheduler.from_config(p2p.scheduler.config)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor  # the photos at the model's own size
    cases, truth = [], {}
    for i, (source, target, _old, new) in enumerate(p2p_replace_cases(settings.samples)):
        (spec,), _ = world.parse_caption(source)
        scene = world.render([world.ObjectSpec(spec.shape, spec.color, spec.position, "large")],
                             list(world.BACKGROUNDS)[i % len(world.BACKGROUNDS)], np.random.default_rng([7, i]),
                             size=size)
        cases.append(EditCase(scene.image, source, target))
        truth[id(cases[-1])] = (scene.objects[0].mask, new)

    def judge(case, edit_image):
        mask, new = truth[id(case)]
        edited = largest(edit_image)
        mask = mask | edited.mask if edited is not None else mask.copy()
        for _ in range(2):
            mask = world.reader._dilate(mask)
        return mask, edited is not None and edited.color == new

    return inversion_rows(p2p, cases, settings, "real-image edit", METHODS, judge)


# ----------------------------------------------------------------------------- IP-Adapter trained on the world


def write_adapter_data(folder: str | Path, count: int, seed: int = 1, empty_caption_every: int = 2) -> Path:
    """World scenes as ``NNNNN.png`` + ``NNNNN.txt`` (the folder format of ``imageprompt train-adapter``).

    Every ``empty_caption_every``-th caption is left empty, so that the image
    branch learns to carry the whole scene (variation reads no text); the other
    captions are the world's. Seed 1 keeps them apart from the bundled model's
    own training scenes (seed 0).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        scene = world.sample_scene(seed, i)
        caption = "" if empty_caption_every and i % empty_caption_every == 0 else scene.caption
        scene.image.save(folder / f"{i:05d}.png")
        (folder / f"{i:05d}.txt").write_text(caption + "\n", encoding="utf-8")
    return folder


def load_world_adapter(pipe, path: str | Path | None = None) -> None:
    """Load the world-trained adapter into ``pipe``; its image encoder is the pipeline's CLIP vision tower."""
    path = Path(path or ADAPTER_FILE)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no world-trained IP-Adapter (see docs/ip-adapter.md to train one)")
    pipe.load_ip_adapter(str(path), image_encoder=pipe.sdipc_image_encoder)


def ip_adapter_world(pipe, settings: EvalSettings) -> list[Row]:
    """Variation from the image prompt alone (empty text, scale ``ip_adapter_scale``, 1.0):
    does it keep the reference's colour, shape and position? ``settings.extra["ip_adapter"]``
    names another adapter file; with no file (or no image encoder) the row is absent."""
    path = Path(settings.extra.get("ip_adapter") or ADAPTER_FILE)
    if getattr(pipe, "sdipc_image_encoder", None) is None or not path.is_file():
        return []
    load_world_adapter(pipe, path)
    try:
        pipe.set_ip_adapter_scale(float(settings.extra.get("ip_adapter_scale", 1.0)))
        refs = reference_scenes(settings.samples, settings.seed)
        per = settings.images_per_sample
        images = []
        for i, ref in enumerate(refs):
            images += pipe(prompt="", ip_adapter_image=ref.image, num_inference_steps=settings.steps,
                           guidance_scale=settings.guidance_scale, num_images_per_prompt=per,
                           generator=generators(settings.seed + 40_000 + i * per, per)).images
    finally:
        pipe.unload_ip_adapter()
    rows = kept_rows("IP-Adapter (world)", refs, images, per, aims=(0.9, 0.8, None))
    flags = [(det is not None and det.color == r.objects[0].color and det.shape == r.objects[0].shape
              and det.position == r.objects[0].position)
             for r, det in ((refs[k // per], largest(im)) for k, im in enumerate(images))]
    return [*rows, Row("IP-Adapter (world)", "keeps all three", frac(flags), len(flags))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write world scenes + captions for `imageprompt train-adapter`.")
    parser.add_argument("folder")
    parser.add_argument("--count", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--empty-caption-every", type=int, default=2, help="every N-th caption empty (0: none)")
    args = parser.parse_args(argv)
    print(write_adapter_data(args.folder, args.count, args.seed, args.empty_caption_every))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["p2p_replace_cases", "p2p_replace", "p2p_blend_background", "background_psnr", "real_image_edits",
           "write_adapter_data",
           "load_world_adapter", "ip_adapter_world"]


def cross_attention_peak(pipe, settings: EvalSettings) -> list[Row]:
    """Does the named object's word attend to the object? One-object captions (every shape and
    colour, positions cycled) are sampled with prompt-to-prompt's recorder on (an edit that
    changes nothing); the shape word's 16x16 cross-attention map (averaged over steps, the
    16x16 layers and heads) must peak at a latent cell that the generated object covers at least
    half of (the largest object read from the image). Also reported: the peak anywhere on the
    object's 4x4-pixel cells, and with the colour word's map."""
    from imageprompt.p2p import word_positions

    p2p = p2p_pipeline(pipe)
    per = settings.images_per_sample
    specs = [world.ObjectSpec(s.shape, s.color, s.position) for s in single_object_specs()]
    inside, touching, colour_inside = [], [], []
    for i, spec in enumerate(itertools.islice(itertools.cycle(specs), settings.samples)):
        caption = world.caption_for([spec])
        for generator in generators(settings.seed + 60_000 + i * per, per):
            out = p2p(caption, caption, mode="replace", map_res=16, num_inference_steps=settings.steps,
                      guidance_scale=settings.guidance_scale, generator=generator)
            maps = out.attention_maps[0]  # (h, w, tokens): the source row
            obj = largest(out.images[0])
            for word, lists in ((spec.shape, (inside, touching)), (spec.color, (colour_inside,))):
                pos = word_positions(p2p.tokenizer, caption, word, maps.shape[-1])
                m = maps[:, :, pos].float().mean(-1)
                r, c = divmod(int(m.flatten().argmax()), m.shape[1])
                if obj is None:
                    covered = 0.0
                else:
                    fy, fx = obj.mask.shape[0] // m.shape[0], obj.mask.shape[1] // m.shape[1]
                    covered = float(obj.mask[r * fy:(r + 1) * fy, c * fx:(c + 1) * fx].mean())
                lists[0].append(covered >= 0.5)
                if len(lists) > 1:
                    lists[1].append(covered > 0)
    name, n = "cross-attention", len(inside)
    return [
        Row(name, "shape word's 16x16 map peaks inside the object", frac(inside), n, aim=0.9),
        Row(name, "shape word's 16x16 map peaks on the object (any overlap)", frac(touching), n),
        Row(name, "colour word's 16x16 map peaks inside the object", frac(colour_inside), n),
    ]
