"""The demo's "ControlNet, img2img, inpainting" inputs, served in-process on the tiny model with a random ControlNet."""

from __future__ import annotations

import numpy as np
import pytest

gr = pytest.importorskip("gradio")
pytest.importorskip("gradio_client")

from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402
from PIL import Image  # noqa: E402

from imageprompt.images import read_parameters  # noqa: E402
from imageprompt.testing import random_controlnet, toolbox_images  # noqa: E402

FAST = dict(num_images=1, steps=2, guidance=2.0, seed=5, width=32, height=32, negative_prompt="")


@pytest.fixture(scope="module")
def client(tiny_pipe, tmp_path_factory):
    from imageprompt.demo.app import build_demo, serve

    demo = build_demo(tiny_pipe, scheduler="ddim", output_dir=tmp_path_factory.mktemp("demo-out"), max_steps=20,
                      default_steps=2, controlnet=random_controlnet(tiny_pipe.unet), tabs=None)
    serve(demo, port=None, block=False, quiet=True)
    yield Client(demo.local_url, verbose=False)
    demo.close()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("uploads")
    images = toolbox_images(48)
    for name, image in images.items():
        image.save(folder / f"{name}.png")
    images["mask"].resize((24, 48)).save(folder / "narrow-mask.png")
    Image.new("RGB", (48, 40), (220, 30, 30)).save(folder / "red.png")
    return folder


def image_of(result) -> np.ndarray:
    gallery, downloads = result
    return np.asarray(Image.open(downloads[0]), dtype=np.float32), read_parameters(downloads[0])


def test_variation_edit_and_p2p_take_init_image_mask_and_control(client, files):
    plain, _ = image_of(client.predict(handle_file(files / "red.png"), **FAST, api_name="/variation"))
    extras = dict(init_image=handle_file(files / "photo.png"), strength=0.7, mask=handle_file(files / "mask.png"),
                  control=handle_file(files / "control.png"), control_scale=0.8)
    got, params = image_of(client.predict(handle_file(files / "red.png"), **FAST, **extras, api_name="/variation"))
    assert got.shape == plain.shape and np.abs(got - plain).max() > 1
    assert params["strength"] == 0.7 and params["control_scale"] == 0.8 and len(params["mask_sha256"]) == 64
    got, params = image_of(client.predict(handle_file(files / "red.png"), prompt="a circle", alpha=0.5, **FAST,
                                          init_image=handle_file(files / "photo.png"), api_name="/edit"))
    assert params["strength"] == 0.8
    gallery, maps, downloads = client.predict(
        source="a red circle", target="a blue circle", mode="replace", blend="", weights="", cross_steps=0.8,
        self_steps=0.4, blend_threshold=0.3, steps=2, guidance=2.0, seed=1, width=32, height=32, negative_prompt="",
        control=handle_file(files / "control.png"), api_name="/p2p")
    assert len(gallery) == 2 and read_parameters(downloads[0])["control_scale"] == 1.0


@pytest.mark.parametrize("extra, message", [
    (dict(mask="mask.png"), "needs the init image"),
    (dict(init_image="photo.png", mask="narrow-mask.png"), "give a mask of its size"),
    (dict(init_image="photo.png", strength=0.0), r"less than minimum|Strength must be in \(0, 1\]"),
    (dict(init_image="photo.png", control="red.png"), "differ in size"),
])
def test_toolbox_inputs_that_do_not_fit_are_readable_errors(client, files, extra, message):
    extra = {k: handle_file(files / v) if isinstance(v, str) else v for k, v in extra.items()}
    with pytest.raises(AppError, match=message):
        client.predict(handle_file(files / "red.png"), **FAST, **extra, api_name="/variation")
