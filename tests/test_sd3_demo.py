"""The web demo on the tiny SD3: the tabs whose techniques run on SD3, called through gradio_client."""

from __future__ import annotations

import json
import urllib.request

import pytest
from PIL import Image

gr = pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")

from gradio_client import Client, handle_file  # noqa: E402

from imageprompt.images import read_parameters  # noqa: E402

SAMPLE = dict(steps=2, guidance=2.0, width=32, height=32, negative_prompt="")


@pytest.fixture(scope="module")
def app(tiny_sd3, tmp_path_factory):
    from imageprompt.demo.app import build_demo, serve
    from imageprompt.pipelines.loading import load_pipeline

    model, clip_l, clip_g = tiny_sd3
    pipe = load_pipeline(str(model), str(clip_l), device="cpu", dtype="fp32", clip_2=str(clip_g))
    demo = build_demo(pipe, output_dir=tmp_path_factory.mktemp("sd3-demo"), max_steps=20, default_steps=2)
    serve(demo, port=None, block=False, quiet=True)
    yield demo
    demo.close()


def test_sd3_tabs_variation_and_p2p(app, tmp_path):
    config = json.loads(urllib.request.urlopen(app.local_url + "config", timeout=30).read().decode())
    labels = {c["props"].get("label") for c in config["components"] if c["type"] == "tabitem"}
    assert labels == {"Variation", "Image + text", "Prompt-to-prompt"}  # the UNet-only techniques are left out
    client = Client(app.local_url, verbose=False)
    Image.new("RGB", (40, 40), (220, 30, 30)).save(tmp_path / "red.png")
    gallery, downloads = client.predict(handle_file(tmp_path / "red.png"), num_images=1, seed=5, **SAMPLE,
                                        api_name="/variation")
    with Image.open(gallery[0]["image"]) as image:
        assert image.size == (32, 32)
    assert read_parameters(downloads[0])["method"] == "sdipc-variation"
    gallery, maps, downloads = client.predict(source="a red cat", target="a blue cat", mode="replace", blend="cat",
                                              weights="", cross_steps=0.8, self_steps=0.4, blend_threshold=0.3,
                                              seed=3, **SAMPLE, api_name="/p2p")
    assert [item["caption"] for item in gallery] == ["source", "edit"] and maps is not None
    assert read_parameters(downloads[1])["target_prompt"] == "a blue cat"
