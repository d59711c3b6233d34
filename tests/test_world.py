"""The shapes world, its measuring functions, the bundled model and the meaning measurements."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from imageprompt import world
from imageprompt.world import ObjectSpec, evaluate

# ----------------------------------------------------------------------------- the world


def test_scenes_are_deterministic_from_seed_and_index():
    a, b = world.sample_scene(3, 17), world.sample_scene(3, 17)
    assert a.caption == b.caption
    assert np.array_equal(a.array, b.array)
    for oa, ob in zip(a.objects, b.objects):
        assert np.array_equal(oa.mask, ob.mask)
    others = [world.sample_scene(4, 17), world.sample_scene(3, 18)]
    assert all(not np.array_equal(a.array, o.array) for o in others)


def test_scene_ground_truth_matches_caption_and_pixels():
    for i in range(40):
        scene = world.sample_scene(0, i)
        assert scene.image.size == (world.IMAGE_SIZE, world.IMAGE_SIZE)
        specs, background = world.parse_caption(scene.caption)
        assert [(s.shape, s.color, s.position) for s in specs] == [
            (o.shape, o.color, o.position) for o in scene.objects
        ]
        assert background in (None, scene.background)
        arr = scene.array.astype(int)
        for obj in scene.objects:
            assert obj.mask.sum() > 30
            inner = world.reader._erode(obj.mask)
            # inside the mask: the object's own colour; bbox is the mask's
            assert np.abs(arr[inner] - np.array(obj.rgb)).max() <= 1
            assert obj.bbox == world.mask_bbox(obj.mask)
        if len(scene.objects) == 2:
            assert world.mask_iou(scene.objects[0].mask, scene.objects[1].mask) == 0.0
        outside = ~np.any([o.mask for o in scene.objects], axis=0)
        far = outside & ~world.reader._dilate(world.reader._dilate(~outside))
        assert np.abs(arr[far] - np.array(world.BACKGROUNDS[scene.background])).max() == 0


def test_world_covers_all_attributes():
    scenes = world.sample_scenes(1, 0, 300)
    objs = [o for s in scenes for o in s.objects]
    assert {o.shape for o in objs} == set(world.SHAPES)
    assert {o.color for o in objs} == set(world.COLORS)
    assert {o.position for o in objs} == set(world.POSITIONS)
    assert {o.size for o in objs} == set(world.SIZES)
    assert {s.background for s in scenes} == set(world.BACKGROUNDS)
    assert {len(s.objects) for s in scenes} == {1, 2}


def test_caption_round_trip_and_rejects_foreign_text():
    specs = [ObjectSpec("circle", "red", "left", "small"), ObjectSpec("square", "blue", "right")]
    cap = world.caption_for(specs, "white")
    assert cap == "a small red circle on the left and a blue square on the right on a white background"
    assert world.parse_caption(cap) == (specs, "white")
    with pytest.raises(ValueError):
        world.parse_caption("a photo of a cat")


def test_world_tokenizer_makes_one_token_per_word(tmp_path):
    from imageprompt.world.models import build_tokenizer

    tok = build_tokenizer(tmp_path)
    assert [w for w in world.vocabulary() if len(tok.tokenize(w)) != 1] == []
    for i in range(20):
        cap = world.sample_scene(0, i).caption
        assert len(tok(cap).input_ids) == len(cap.split()) + 2  # BOS + one token per word + EOS
    assert tok("a zebra").input_ids[-1] == tok.eos_token_id  # unknown words still tokenize


def test_measuring_functions_recover_ground_truth():
    scenes = world.sample_scenes(5, 0, 120)
    n = ok = 0
    ious = []
    for scene in scenes:
        found = world.detect_objects(scene.image)
        assert len(found) == len(scene.objects)
        assert world.background_name(scene.image) == scene.background
        for obj, res in zip(scene.objects, world.score_image(scene.image, world.specs_of(scene))):
            n += 1
            ok += res["color"] and res["shape"] and res["position"]
            assert world.dominant_color(scene.image, obj.mask) == obj.color
            assert world.classify_shape(obj.mask) == obj.shape
            assert world.classify_position(obj.mask) == obj.position
        for obj in scene.objects:  # the segmentation finds each object's mask
            ious.append(max(world.mask_iou(d.mask, obj.mask) for d in found))
    assert ok == n
    assert min(ious) > 0.7 and np.mean(ious) > 0.93


def test_measuring_functions_notice_wrong_images():
    red = world.render([ObjectSpec("circle", "red", "left", "large")], "white", 0)
    blue_square = world.render([ObjectSpec("square", "blue", "right", "large")], "black", 0)
    res = world.score_image(blue_square.image, world.specs_of(red))[0]
    assert res == {"found": True, "color": False, "shape": False, "position": False}
    blank = Image.new("RGB", (64, 64), (240, 240, 240))
    assert world.detect_objects(blank) == []
    assert world.score_image(blank, world.specs_of(red))[0]["found"] is False
    assert world.mask_iou(red.objects[0].mask, blue_square.objects[0].mask) == 0.0
    assert world.mask_iou(red.objects[0].mask, red.objects[0].mask) == 1.0


def test_shape_classifier_on_plain_masks():
    yy, xx = np.mgrid[:64, :64]
    circle = (xx - 30) ** 2 + (yy - 34) ** 2 <= 12**2
    square = (abs(xx - 30) <= 10) & (abs(yy - 30) <= 10)
    t = (yy - 20) / 24
    triangle = (t >= 0) & (t <= 1) & (abs(xx - 32) <= 12 * t)
    assert [world.classify_shape(m) for m in (circle, square, triangle)] == ["circle", "square", "triangle"]
    assert world.classify_position(circle) == "center"
    assert world.classify_position(np.roll(circle, -16, axis=1)) == "left"
    assert world.classify_position(np.roll(circle, 16, axis=0)) == "bottom"


# ----------------------------------------------------------------------------- registry


def _fake_cache(root, repo_id, files):
    """A Hugging Face cache entry as huggingface_hub lays it out (refs/main -> snapshot)."""
    folder = root / ("models--" + repo_id.replace("/", "--"))
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("abc123")
    for name in files:
        path = folder / "snapshots" / "abc123" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("{}")


def test_default_model_is_bundled_without_sd15_in_cache(tmp_path):
    from imageprompt import checkpoints

    model, clip, notice = checkpoints.default_model(cache_dir=tmp_path)
    assert model == str(checkpoints.BUNDLED_MODEL) and clip == str(checkpoints.BUNDLED_CLIP)
    assert "bundled" in notice and "\n" not in notice
    # SD 1.5 config alone (no UNet weights) does not count as cached
    _fake_cache(tmp_path, "runwayml/stable-diffusion-v1-5", ["model_index.json"])
    assert checkpoints.default_model(cache_dir=tmp_path)[0] == str(checkpoints.BUNDLED_MODEL)


def test_default_model_prefers_cached_sd15(tmp_path):
    from imageprompt import checkpoints

    _fake_cache(tmp_path, "runwayml/stable-diffusion-v1-5",
                ["model_index.json", "unet/diffusion_pytorch_model.safetensors"])
    _fake_cache(tmp_path, checkpoints.DEFAULT_CLIP, ["config.json", "model.safetensors"])
    model, clip, notice = checkpoints.default_model(cache_dir=tmp_path)
    assert (model, clip) == ("runwayml/stable-diffusion-v1-5", checkpoints.DEFAULT_CLIP)
    assert "cache" in notice


def test_registry_is_import_light():
    import subprocess
    import sys

    code = "import sys, imageprompt.checkpoints; print('torch' in sys.modules, 'diffusers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


# ----------------------------------------------------------------------------- the measurements


SDIPC_ROWS = ["text-to-image", "SD-IPC variation", "SD-IPC edit"]  # the rows this file's oracle can draw


class _FakeOutput:
    def __init__(self, images):
        self.images = images


class _OraclePipe:
    """Draws exactly what it is asked for: every measurement must read 100% on it."""

    sdipc_image_encoder = converter = object()

    def __init__(self, broken: bool = False):
        self.broken = broken
        self.calls = 0

    def __call__(self, prompt=None, image=None, num_images_per_prompt=1, generator=None, **kwargs):
        self.calls += 1
        n = len(prompt if prompt is not None else image)
        out = []
        for i in range(n):
            if self.broken:
                img = Image.new("RGB", (64, 64), (240, 240, 240))
            elif image is None:
                img = world.scene_from_caption(prompt[i], seed=i).image
            elif prompt is None:
                img = image[i]
            else:  # edit: the prompt's colour and shape, the reference's position
                ref = world.detect_objects(image[i])[0]
                words = prompt[i].split()
                spec = ObjectSpec(next(w for w in words if w in world.SHAPES),
                                  next(w for w in words if w in world.COLORS), ref.position, "large")
                img = world.render([spec], "white", i).image
            out.extend([img] * num_images_per_prompt)
        assert len(generator) == len(out)
        return _FakeOutput(out)


def test_measurements_read_full_marks_on_an_oracle():
    from imageprompt.world import evaluate

    settings = evaluate.EvalSettings(samples=8, images_per_sample=2, batch=6)
    rows = evaluate.run_suite(_OraclePipe(), settings, names=SDIPC_ROWS)
    assert {r.measurement for r in rows} >= {"text-to-image", "SD-IPC variation", "SD-IPC edit"}
    assert all(r.value == 1.0 for r in rows), evaluate.format_table(rows)
    assert all(r.n >= 8 for r in rows)
    table = evaluate.format_table(rows)
    assert "keeps colour" in table and "100%" in table


def test_measurements_read_zero_on_blank_images():
    from imageprompt.world import evaluate

    rows = evaluate.run_suite(_OraclePipe(broken=True), evaluate.EvalSettings(samples=4, images_per_sample=1),
                              names=SDIPC_ROWS)
    assert rows and all(r.value == 0.0 for r in rows)
    assert "MISSED" in evaluate.format_table(rows)


def test_measurement_sets_are_fixed_and_cover_the_world():
    from imageprompt.world import evaluate

    captions = [world.caption_for(s) for s in evaluate.caption_set()]
    assert captions == [world.caption_for(s) for s in evaluate.caption_set()]
    assert len(set(captions)) == len(captions) == 25
    objs = [o for s in evaluate.caption_set() for o in s]
    assert {o.color for o in objs} == set(world.COLORS) and {o.shape for o in objs} == set(world.SHAPES)
    cases = evaluate.edit_cases(evaluate.reference_scenes(10))
    for ref, attr, new, prompt in cases:
        old = ref.objects[0].color if attr == "colour" else ref.objects[0].shape
        assert new != old and new in prompt.split()
    assert {c[1] for c in cases} == {"colour", "shape"}


def test_added_measurements_join_the_table(monkeypatch):
    def _row(pipe, settings):
        return [evaluate.Row("test-only row", "always", 0.5, 2, aim=0.4)]

    monkeypatch.setitem(evaluate.MEASUREMENTS, "test-only row", _row)
    rows = evaluate.run_suite(None, names=["test-only row"])
    assert "test-only row" in evaluate.format_table(rows) and rows[0].meets_aim


# ----------------------------------------------------------------------------- the bundled model


def _bundled():
    from imageprompt.checkpoints import BUNDLED_CLIP, BUNDLED_MODEL

    assert (BUNDLED_MODEL / "model_index.json").is_file(), "run python -m imageprompt.world.train --out checkpoints"
    return BUNDLED_MODEL, BUNDLED_CLIP


def test_bundled_folders_are_small_safetensors_in_sd_layout():
    model, clip = _bundled()
    files = [p for folder in (model, clip) for p in folder.rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".ckpt", ".pkl")]
    assert sum(p.stat().st_size for p in files) <= 50 * 2**20
    index = json.loads((model / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert index["vae"] == ["diffusers", "AutoencoderKL"]
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert index["safety_checker"] == [None, None]
    for part in ("unet", "vae"):
        assert (model / part / "diffusion_pytorch_model.safetensors").is_file()
    assert (model / "text_encoder" / "model.safetensors").is_file() and (clip / "model.safetensors").is_file()
    sched = json.loads((model / "scheduler" / "scheduler_config.json").read_text())
    assert (sched["beta_schedule"], sched["beta_start"], sched["beta_end"]) == ("scaled_linear", 0.00085, 0.012)


def test_bundled_model_generates_through_plain_diffusers():
    import torch
    from diffusers import StableDiffusionPipeline

    model, _ = _bundled()
    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    unet, te = pipe.unet.config, pipe.text_encoder.config
    assert unet.in_channels == pipe.vae.config.latent_channels == 4
    assert unet.cross_attention_dim == te.hidden_size and te.max_position_embeddings == 77
    assert pipe.tokenizer.model_max_length == 77
    out = pipe(["a red circle in the center", "a blue square on the left"], num_inference_steps=4,
               generator=torch.Generator().manual_seed(0), output_type="np").images
    assert out.shape == (2, 64, 64, 3)
    assert np.isfinite(out).all() and out.std() > 0.02
    assert np.abs(out[0] - out[1]).mean() > 0.01  # the prompt matters


def test_bundled_clip_is_the_text_encoder_and_aligns_images_with_captions():
    import torch
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTextModel, CLIPTokenizer

    model, clip_dir = _bundled()
    clip = CLIPModel.from_pretrained(clip_dir).eval()
    te = CLIPTextModel.from_pretrained(model / "text_encoder").eval()
    tok = CLIPTokenizer.from_pretrained(clip_dir)
    proc = CLIPImageProcessor.from_pretrained(clip_dir)
    tc, vc = clip.config.text_config, clip.config.vision_config
    assert tuple(clip.text_projection.weight.shape) == (tc.hidden_size, tc.hidden_size)  # square, as ViT-L/14
    assert vc.hidden_size != tc.hidden_size and clip.visual_projection.weight.shape[0] == tc.hidden_size
    ids = tok(["a red circle in the center"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(te(ids).last_hidden_state, clip.text_model(ids).last_hidden_state)
    scenes = [world.render([ObjectSpec(s, c, p, "large")], "white", i) for i, (s, c, p) in enumerate(
        [("circle", "red", "left"), ("square", "blue", "right"), ("triangle", "green", "center"),
         ("circle", "yellow", "top"), ("square", "purple", "bottom"), ("triangle", "red", "right")])]
    captions = [world.caption_for(world.specs_of(s)) for s in scenes]
    pixels = proc(images=[s.image for s in scenes], return_tensors="pt").pixel_values
    assert tuple(pixels.shape) == (6, 3, 64, 64)
    with torch.no_grad():
        logits = clip(input_ids=tok(captions, padding=True, return_tensors="pt").input_ids,
                      pixel_values=pixels).logits_per_image
    assert (logits.argmax(1) == torch.arange(6)).float().mean() >= 0.8


@pytest.fixture(scope="module")
def bundled_pipe():
    from imageprompt.world.evaluate import load_bundled

    _bundled()
    return load_bundled("cpu")


def test_bundled_model_meaning_quick(bundled_pipe):
    """The fast subset of the measurement table: each figure at least 10 points below what the
    same settings measured on the shipped model, and far above chance (colour 1/5, shape 1/3)."""
    from imageprompt.world import evaluate

    rows = evaluate.run_suite(bundled_pipe, QUICK, names=list(QUICK_NAMES))
    print(evaluate.format_table(rows))
    by = {(r.measurement, r.metric): r for r in rows}
    for key, threshold in THRESHOLDS.items():
        assert by[key].n >= 20, key
        assert by[key].value >= threshold, f"{key}: {by[key].value:.2f} < {threshold}"


QUICK = evaluate.EvalSettings(samples=20, images_per_sample=1, steps=12, batch=20)
QUICK_NAMES = ("text-to-image", "SD-IPC variation", "SD-IPC edit", "p2p replace", "IP-Adapter (world)")
# Measured with QUICK on the shipped model (CPU, seeded; 25 s); thresholds are those figures less 10 points.
# Left out: figures whose threshold would sit at chance (t2i shape 0.47, SD-IPC edit 0.30 / 0.70, p2p mask
# IoU >= 0.7 0.20, IP-Adapter shape 0.60 with chance 1/3): they are in the full table (-m slow) and the notes.
MEASURED_QUICK = {
    ("text-to-image", "colour"): 0.77,  # chance 1/5, n = 30
    ("text-to-image", "position"): 0.87,  # chance 1/5
    ("SD-IPC variation", "keeps colour"): 0.95,
    ("SD-IPC variation", "keeps shape"): 0.85,  # chance 1/3
    ("SD-IPC variation", "keeps background"): 0.95,  # chance 1/3
    ("p2p replace", "colour changed to the target"): 1.0,
    ("IP-Adapter (world)", "keeps colour"): 0.80,
}
THRESHOLDS = {key: round(value - 0.10, 2) for key, value in MEASURED_QUICK.items()}


@pytest.mark.slow
def test_bundled_model_full_table(bundled_pipe):
    from imageprompt.world import evaluate

    rows = evaluate.run_suite(bundled_pipe, evaluate.EvalSettings())
    print(evaluate.format_table(rows))
    by = {(r.measurement, r.metric): r.value for r in rows}
    # the shipped model's full table (docs/bundled-model.md), less 10 points
    assert by["text-to-image", "single object: colour"] >= 0.84
    assert by["text-to-image", "single object: named background"] >= 0.84
    assert by["SD-IPC variation", "keeps colour"] >= 0.85 and by["SD-IPC variation", "keeps background"] >= 0.85
    assert by["SD-IPC variation", "keeps shape"] >= 0.63
    assert by["p2p replace", "colour changed to the target"] >= 0.82
    assert by["text encoder probe", "padding states: cosine to the EOS state"] >= 0.95


# ----------------------------------------------------------------------------- the training script


def test_training_stages_are_reproducible_from_seed(tmp_path):
    """Each stage of train_world is a function of its seed (tiny runs of the real stages)."""
    import torch

    from imageprompt.world import train as T

    images, captions = T.make_dataset(0, 16)
    assert images.shape == (16, 3, world.IMAGE_SIZE, world.IMAGE_SIZE) and images.dtype == torch.uint8
    tok = T.build_tokenizer(tmp_path / "tok")

    def run(seed):
        clip = T.train_clip(tok, images, captions, seed=seed, steps=2, batch=4, lr=1e-3, device="cpu")
        vae = T.train_vae(images, seed=seed, steps=2, batch=2, lr=1e-3, device="cpu")
        unet, finished = T.train_unet(T.text_tower(clip), tok, vae, images[:4], captions[:4], seed=seed, steps=2,
                                      batch=2, lr=1e-3, device="cpu")
        assert finished
        return [m.state_dict() for m in (clip, vae, unet)], vae.config.scaling_factor

    (a, sa), (b, sb), (c, _) = run(0), run(0), run(1)
    assert sa == sb
    for sd_a, sd_b, sd_c in zip(a, b, c):
        assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
        assert any(not torch.equal(sd_a[k], sd_c[k]) for k in sd_a if sd_a[k].is_floating_point())
