"""The shapes world, its measuring functions, the bundled model and the meaning measurements."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from imageprompt import world
from imageprompt.world import ObjectSpec

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
            inner = world._erode(obj.mask)
            # inside the mask: the object's own colour; bbox is the mask's
            assert np.abs(arr[inner] - np.array(obj.rgb)).max() <= 1
            assert obj.bbox == world.mask_bbox(obj.mask)
        if len(scene.objects) == 2:
            assert world.mask_iou(scene.objects[0].mask, scene.objects[1].mask) == 0.0
        outside = ~np.any([o.mask for o in scene.objects], axis=0)
        far = outside & ~world._dilate(world._dilate(~outside))
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
    from imageprompt.train_world import build_tokenizer

    tok = build_tokenizer(tmp_path)
    assert [w for w in world.vocabulary() if len(tok.tokenize(w)) != 1] == []
    for i in range(20):
        cap = world.sample_scene(0, i).caption
        assert len(tok(cap).input_ids) == len(cap.split()) + 2  # BOS + one token per word + EOS
    assert tok("a zebra").input_ids[-1] == tok.eos_token_id  # unknown words still tokenize


def test_measuring_functions_recover_ground_truth():
    scenes = world.sample_scenes(5, 0, 120)
    n = ok = 0
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
        best = max(world.mask_iou(d.mask, scene.objects[0].mask) for d in found)
        assert best > 0.85
    assert ok == n


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
