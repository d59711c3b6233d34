"""The web demo, served in-process on the tiny model and called through every endpoint with gradio_client."""

from __future__ import annotations

import json
import urllib.request

import numpy as np
import pytest
from PIL import Image

gr = pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")

from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

from imageprompt.images import read_parameters  # noqa: E402

SIZE = 32  # the tiny model's native size
FAST = dict(num_images=1, steps=2, guidance=2.0, seed=5, width=SIZE, height=SIZE, negative_prompt="")


@pytest.fixture(scope="module")
def app(tiny_pipe, tmp_path_factory):
    from imageprompt.demo.app import build_demo, serve

    demo = build_demo(tiny_pipe, scheduler="ddim", output_dir=tmp_path_factory.mktemp("demo-out"), max_steps=20,
                      default_steps=2)
    serve(demo, port=None, block=False, quiet=True, max_file_size="200kb")
    yield demo
    demo.close()


@pytest.fixture(scope="module")
def client(app):
    return Client(app.local_url, verbose=False)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("uploads")
    Image.new("RGB", (48, 40), (220, 30, 30)).save(folder / "red.png")
    (folder / "notes.png").write_text("this is not an image")
    Image.new("L", (5000, 4000), 128).save(folder / "huge.png")  # 20 MP, a small file
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (200, 200, 3), dtype=np.uint8)).save(folder / "big.png")  # ~120 kB
    Image.fromarray(rng.integers(0, 255, (300, 300, 3), dtype=np.uint8)).save(folder / "too-big.png")  # ~270 kB
    return folder


def result_paths(result):
    """``(gallery image paths, download paths)`` of an endpoint's result, as downloaded by the client."""
    gallery, downloads = result
    return [item["image"] for item in gallery], list(downloads)


def test_page_shows_model_and_tabs(app, tiny_model):
    html = urllib.request.urlopen(app.local_url + "config", timeout=30).read().decode()
    config = json.loads(html)
    text = json.dumps(config)
    assert str(tiny_model[0]) in text  # the loaded model's name is on the page
    labels = {c["props"].get("label") for c in config["components"] if c["type"] == "tabitem"}
    assert {"Variation", "Image + text"} <= labels
    assert "Advanced options" in text
    assert config["max_file_size"] == 200 * 1024


def test_every_endpoint_is_listed(client):
    endpoints = set(client.view_api(print_info=False, return_format="dict")["named_endpoints"])
    assert {"/variation", "/edit"} <= endpoints


def test_variation_returns_pngs_of_requested_size_with_parameters(client, files):
    result = client.predict(handle_file(files / "red.png"), **dict(FAST, num_images=2, width=40, height=24),
                            api_name="/variation")
    shown, downloads = result_paths(result)
    assert len(shown) == 2 and len(downloads) == 2
    for path in shown + downloads:
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size == (40, 24)
    seeds = sorted(read_parameters(p)["seed"] for p in downloads)
    assert seeds == [5, 6]  # image i uses seed + i
    params = read_parameters(downloads[0])
    assert params["method"] == "sdipc-variation" and params["steps"] == 2 and params["input"] == "red.png"
    assert len(params["input_sha256"]) == 64


def test_variation_is_reproducible_from_the_seed(client, files):
    first = result_paths(client.predict(handle_file(files / "red.png"), **FAST, api_name="/variation"))[1][0]
    again = result_paths(client.predict(handle_file(files / "red.png"), **FAST, api_name="/variation"))[1][0]
    other = result_paths(client.predict(handle_file(files / "red.png"), **dict(FAST, seed=6),
                                        api_name="/variation"))[1][0]
    pixels = [np.asarray(Image.open(p)) for p in (first, again, other)]
    assert np.array_equal(pixels[0], pixels[1])
    assert not np.array_equal(pixels[0], pixels[2])


def test_edit_records_prompt_and_alpha(client, files):
    result = client.predict(handle_file(files / "red.png"), "a blue circle", 0.6, **FAST, api_name="/edit")
    shown, downloads = result_paths(result)
    with Image.open(shown[0]) as image:
        assert image.size == (SIZE, SIZE)
    params = read_parameters(downloads[0])
    assert params["method"] == "sdipc-edit" and params["prompt"] == "a blue circle" and params["alpha"] == 0.6


@pytest.mark.parametrize(
    "api_name, image, extra, message",
    [
        ("/variation", None, {}, "Upload an image first"),
        ("/variation", "notes.png", {}, "not an image"),
        ("/variation", "huge.png", {}, "too large"),
        ("/edit", "red.png", {"prompt": "   "}, "edit text"),
        ("/variation", "red.png", {"steps": 1000}, "greater than maximum|Steps must be"),
        ("/variation", "red.png", {"width": 31}, "Width must be"),
        ("/variation", "red.png", {"num_images": 0}, "less than minimum|Number of images"),
    ],
)
def test_bad_input_is_a_readable_error_and_the_app_keeps_serving(client, files, api_name, image, extra, message):
    kwargs = dict(FAST)
    if api_name == "/edit":
        kwargs.update(prompt="a red circle", alpha=0.5)
    kwargs.update(extra)
    with pytest.raises(AppError, match=message):
        client.predict(handle_file(files / image) if image else None, **kwargs, api_name=api_name)
    shown, _ = result_paths(client.predict(handle_file(files / "red.png"), **FAST, api_name="/variation"))
    assert len(shown) == 1


def test_upload_size_limit(client, files):
    ok = client.predict(handle_file(files / "big.png"), **FAST, api_name="/variation")
    assert len(result_paths(ok)[0]) == 1
    with pytest.raises(Exception, match="(?i)size|large|413"):
        client.predict(handle_file(files / "too-big.png"), **FAST, api_name="/variation")


def test_reads_no_file_that_was_not_uploaded(app, tmp_path):
    """A request naming a server path instead of uploading a file is refused, and the file's content never leaks."""
    secret = tmp_path / "secret.png"
    Image.new("RGB", (32, 32), (1, 2, 3)).save(secret)
    payload = {"data": [{"path": str(secret), "meta": {"_type": "gradio.FileData"}}, 1, 2, 2.0, 5, SIZE, SIZE, ""]}
    request = urllib.request.Request(app.local_url + "gradio_api/call/variation", json.dumps(payload).encode(),
                                     {"Content-Type": "application/json"})
    event = json.loads(urllib.request.urlopen(request, timeout=30).read())["event_id"]
    stream = urllib.request.urlopen(f"{app.local_url}gradio_api/call/variation/{event}", timeout=60).read().decode()
    assert "event: error" in stream and "event: complete" not in stream
    assert not any(app.imageprompt_context.output_dir.rglob("*.png")) or all(
        read_parameters(p).get("input") != "secret.png" for p in app.imageprompt_context.output_dir.rglob("*.png"))


def test_cli_registers_demo_command():
    from imageprompt.cli import build_parser

    args = build_parser().parse_args(["demo", "--port", "7861", "--model", "m", "--max-queue", "3"])
    assert (args.port, args.model, args.max_queue, args.host, args.share) == (7861, "m", 3, "127.0.0.1", False)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo", "--port", "70000"])
