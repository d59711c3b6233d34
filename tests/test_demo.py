"""The web demo, served in-process on the tiny model and called through every endpoint with gradio_client."""

from __future__ import annotations

import json
import time
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
    from imageprompt.demo.app import build_demo, load_adapters, serve

    adapters = load_adapters(tiny_pipe, ["sdipc"])  # the training-free branch: an adapter with no weights
    demo = build_demo(tiny_pipe, scheduler="ddim", output_dir=tmp_path_factory.mktemp("demo-out"), max_steps=20,
                      default_steps=2, adapters=adapters, adapter_names=["sdipc"])
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
    assert labels == {"Variation", "Image + text", "IP-Adapter", "Prompt-to-prompt", "Real-image edit", "MasaCtrl",
                      "StyleAligned"}
    assert "Advanced options" in text
    assert config["max_file_size"] == 200 * 1024


def test_one_job_at_a_time_and_a_bounded_queue(app):
    from imageprompt.demo.app import QUEUE_SIZE

    jobs = [fn for fn in app.fns.values() if fn.api_name in ("variation", "edit", "ip_adapter", "p2p", "real_edit")]
    assert len(jobs) == 5
    assert {(fn.concurrency_limit, fn.concurrency_id) for fn in jobs} == {(1, "gpu")}  # one group: one GPU
    assert app._queue.max_size == QUEUE_SIZE


def test_every_endpoint_is_listed(client):
    endpoints = set(client.view_api(print_info=False, return_format="dict")["named_endpoints"])
    assert {"/variation", "/edit", "/ip_adapter", "/p2p", "/real_edit"} <= endpoints


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
    assert not np.array_equal(np.asarray(Image.open(downloads[0])), np.asarray(Image.open(downloads[1])))
    params = read_parameters(downloads[0])
    assert params["method"] == "sdipc-variation" and params["steps"] == 2 and params["input"] == "red.png"
    assert len(params["input_sha256"]) == 64


def test_variation_is_reproducible_from_the_seed(client, files):
    first = result_paths(client.predict(handle_file(files / "red.png"), **FAST, api_name="/variation"))[1][0]
    again = result_paths(client.predict(handle_file(files / "red.png"), **FAST, api_name="/variation"))[1][0]
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(again)))


def test_progress_follows_the_sampling_steps(client, files, tiny_pipe):
    tiny_pipe.set_progress_bar_config(disable=False)  # the fixture silences it; the demo's progress reads it
    try:
        job = client.submit(handle_file(files / "red.png"), **dict(FAST, steps=20), api_name="/variation")
        seen = set()
        while not job.done():
            seen.update((p.length, p.unit) for p in job.status().progress_data or [])
            time.sleep(0.02)
        job.result()
    finally:
        tiny_pipe.set_progress_bar_config(disable=True)
    assert (20, "steps") in seen


def test_edit_records_prompt_and_alpha(client, files):
    result = client.predict(handle_file(files / "red.png"), "a blue circle", 0.6, **FAST, api_name="/edit")
    shown, downloads = result_paths(result)
    with Image.open(shown[0]) as image:
        assert image.size == (SIZE, SIZE)
    params = read_parameters(downloads[0])
    assert params["method"] == "sdipc-edit" and params["prompt"] == "a blue circle" and params["alpha"] == 0.6


def test_ip_adapter_with_and_without_text(client, files, tiny_pipe):
    for prompt, method in (("", "ip-adapter-variation"), ("a blue circle", "ip-adapter-edit")):
        shown, downloads = result_paths(client.predict(handle_file(files / "red.png"), prompt, 0.7, **FAST,
                                                       api_name="/ip_adapter"))
        with Image.open(shown[0]) as image:
            assert image.size == (SIZE, SIZE)
        params = read_parameters(downloads[0])
        assert params["method"] == method and params["adapters"] == ["sdipc"] and params["adapter_scales"] == [0.7]
    assert tiny_pipe.image_adapters == []  # installed for the job only: the SD-IPC tabs see a plain UNet


P2P = dict(source="a red cat on the beach", target="a red dog on the beach", mode="replace", blend="dog",
           weights="", cross_steps=0.8, self_steps=0.4, blend_threshold=0.3)
SAMPLE = dict(steps=2, guidance=2.0, width=SIZE, height=SIZE, negative_prompt="")


def test_p2p_returns_source_edit_and_attention_maps(client):
    gallery, maps, downloads = client.predict(**P2P, **SAMPLE, seed=3, api_name="/p2p")
    assert [item["caption"] for item in gallery] == ["source", "edit"]
    for item in gallery:
        with Image.open(item["image"]) as image:
            assert image.size == (SIZE, SIZE)
    with Image.open(maps) as picture:  # one row per prompt, one map per word
        assert picture.size[0] > picture.size[1] > SIZE
    roles = [read_parameters(p)["role"] for p in downloads]
    assert roles == ["source", "edit", "attention"]
    params = read_parameters(downloads[1])
    assert params["target_prompt"] == P2P["target"] and params["blend_words"] == ["dog"] and params["seed"] == 3


def test_real_image_edit_inverts_then_edits(client, files, method="null-text"):
    settings = dict(P2P, source="a red circle", target="a blue circle", blend="")
    gallery, maps, downloads = client.predict(handle_file(files / "red.png"), **settings, method=method,
                                              inner_steps=2, **SAMPLE, api_name="/real_edit")
    assert len(gallery) == 2 and maps is not None
    params = read_parameters(downloads[1])
    assert params["invert"] == method and params["input"] == "red.png" and params["scheduler"] == "ddim"


def test_real_image_edit_with_dpl_learns_the_named_nouns(client, files):
    settings = dict(P2P, source="a red circle", target="a blue circle", blend="")
    gallery, _, downloads = client.predict(handle_file(files / "red.png"), **settings, method="dpl", inner_steps=1,
                                           **SAMPLE, dpl_text="circle", api_name="/real_edit")
    assert len(gallery) == 2
    params = read_parameters(downloads[1])
    assert params["invert"] == "dpl" and params["dpl_words"] == ["circle"] and params["inner_steps"] == 1
    for nouns, message in (("", "needs the nouns"), ("square", "'square' is not in the source prompt")):
        with pytest.raises(AppError, match=message):
            client.predict(handle_file(files / "red.png"), **settings, method="dpl", inner_steps=1, **SAMPLE,
                           dpl_text=nouns, api_name="/real_edit")


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(target="a red dog on a beach today"), "source has 6 words and the target 7"),
        (dict(source="  "), "source prompt"),
        (dict(target=""), "target prompt"),
        (dict(weights="snow=2"), "weight word 'snow' is not in the target"),
        (dict(weights="dog"), "WORD=NUMBER"),
        (dict(blend="tree"), "blend word 'tree' is in neither"),
        (dict(blend="<b>tree</b>"), "blend word '&lt;b&gt;tree&lt;/b&gt;'"),  # shown as text, not HTML
        (dict(mode="reweight", weights=""), "reweight needs at least one word weight"),
    ],
)
def test_p2p_settings_that_do_not_fit_are_readable_errors(client, settings, message):
    with pytest.raises(AppError, match=message):
        client.predict(**dict(P2P, **settings), **SAMPLE, seed=0, api_name="/p2p")


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
def test_bad_input_is_a_readable_error(client, files, api_name, image, extra, message):
    kwargs = dict(FAST)
    if api_name == "/edit":
        kwargs.update(prompt="a red circle", alpha=0.5)
    kwargs.update(extra)
    with pytest.raises(AppError, match=message):
        client.predict(handle_file(files / image) if image else None, **kwargs, api_name=api_name)


def test_the_app_keeps_serving_after_errors(client, files):
    for _ in range(2):
        with pytest.raises(AppError):
            client.predict(handle_file(files / "notes.png"), **FAST, api_name="/variation")
        with pytest.raises(AppError):
            client.predict(**dict(P2P, blend="tree"), **SAMPLE, seed=0, api_name="/p2p")
    shown, _ = result_paths(client.predict(handle_file(files / "red.png"), **FAST, api_name="/variation"))
    gallery, _, _ = client.predict(**P2P, **SAMPLE, seed=0, api_name="/p2p")
    assert len(shown) == 1 and len(gallery) == 2


def test_upload_size_limit(client, files):
    ok = client.predict(handle_file(files / "big.png"), **FAST, api_name="/variation")
    assert len(result_paths(ok)[0]) == 1
    with pytest.raises(Exception, match="(?i)size|large|413"):
        client.predict(handle_file(files / "too-big.png"), **FAST, api_name="/variation")


def test_reads_no_file_that_was_not_uploaded(app, tmp_path):
    """A request naming a server path instead of uploading a file is refused, and the file's content never leaks."""
    secret = tmp_path / "secret.png"
    Image.new("RGB", (32, 32), (1, 2, 3)).save(secret)
    runs_before = sorted(app.imageprompt_context.output_dir.iterdir())
    payload = {"data": [{"path": str(secret), "meta": {"_type": "gradio.FileData"}}, 1, 2, 2.0, 5, SIZE, SIZE, ""]}
    request = urllib.request.Request(app.local_url + "gradio_api/call/variation", json.dumps(payload).encode(),
                                     {"Content-Type": "application/json"})
    event = json.loads(urllib.request.urlopen(request, timeout=30).read())["event_id"]
    stream = urllib.request.urlopen(f"{app.local_url}gradio_api/call/variation/{event}", timeout=60).read().decode()
    assert "event: error" in stream and "event: complete" not in stream
    assert sorted(app.imageprompt_context.output_dir.iterdir()) == runs_before  # the handler never ran


def test_cli_registers_demo_command():
    from imageprompt.cli.main import build_parser

    args = build_parser().parse_args(["demo", "--port", "7861", "--model", "m", "--max-queue", "3"])
    assert (args.port, args.model, args.max_queue, args.host, args.share) == (7861, "m", 3, "127.0.0.1", False)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo", "--port", "70000"])


@pytest.mark.parametrize("args, message", [
    (["--image-encoder", "enc"], "--image-encoder needs --adapter"),
    (["--adapter", "/nowhere/ip-adapter.safetensors"], "no such IP-Adapter file"),
])
def test_cli_demo_errors_before_loading(tmp_path, capsys, args, message):
    from imageprompt.cli.main import main

    code = main(["demo", *args, "--model", str(tmp_path / "missing")])
    err = capsys.readouterr().err.strip()
    assert code == 1 and message in err and err.startswith("imageprompt: error:") and len(err.splitlines()) == 1


def test_examples_are_small_shapes_world_pictures():
    from imageprompt.demo.app import EXAMPLES_DIR

    pictures = sorted(EXAMPLES_DIR.glob("*.png"))
    assert [p.name for p in pictures] == ["blue-square.png", "blue-triangle.png", "green-triangle-yellow-circle.png",
                                         "red-circle.png", "yellow-triangle.png"]
    for path in pictures:
        assert path.stat().st_size < 2048
        with Image.open(path) as image:
            assert image.size == (64, 64)  # the bundled model's size


def test_the_demo_uses_the_library_not_the_command_line():
    """Layers: no module of the demo imports a CLI helper or another module's private names; one concern each."""
    import ast
    from pathlib import Path

    import imageprompt.demo

    modules = sorted(Path(imageprompt.demo.__file__).parent.glob("*.py"))
    assert {p.stem for p in modules} >= {"app", "context", "validation", "tabs"}
    for path in modules:
        source = path.read_text()
        assert len(source.splitlines()) <= 350, path.name
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ImportFrom):
                assert not (node.module or "").startswith("imageprompt.cli"), f"{path.name}:{node.lineno}"
                assert not any(alias.name.startswith("_") for alias in node.names), f"{path.name}:{node.lineno}"
            elif isinstance(node, ast.Import):
                assert not any(a.name.startswith("imageprompt.cli") for a in node.names), f"{path.name}:{node.lineno}"
            elif isinstance(node, ast.Attribute):
                private = node.attr.startswith("_") and not node.attr.startswith("__")
                assert not private, f"{path.name}:{node.lineno} uses {node.attr}"


def test_user_errors_are_the_librarys_not_type_errors():
    from imageprompt.demo.running import user_errors

    from imageprompt.images import ImageInputError
    from imageprompt.loading import ModelLoadError

    assert set(user_errors()) == {ImageInputError, ModelLoadError, ValueError, FileNotFoundError}


def test_pngs_record_what_the_command_line_records(app, tiny_pipe, tiny_model):
    from types import SimpleNamespace

    from imageprompt.demo.context import parameters
    from imageprompt.demo.validation import Sampling

    from imageprompt.cli.common import base_parameters
    from imageprompt.images import generation_parameters

    sampling = Sampling(num_images=1, steps=2, guidance=2.0, seed=5, width=SIZE, height=SIZE, negative_prompt=None)
    params = parameters(app.imageprompt_context, "sdipc-edit", sampling, prompt="a blue circle")
    expected = generation_parameters(tiny_pipe, "sdipc-edit", model="m", clip="c", scheduler="ddim", steps=2,
                                     guidance=2.0, negative_prompt=None)
    assert params == dict(expected, prompt="a blue circle", source="imageprompt demo")
    assert set(expected) == {"method", "model", "clip", "scheduler", "steps", "guidance", "negative_prompt", "dtype",
                             "imageprompt"}
    assert expected["model"] == tiny_pipe.model_name and expected["dtype"] == "float32"
    args = SimpleNamespace(model="m", clip="c", scheduler="ddim", steps=2, guidance=2.0, negative_prompt=None)
    assert base_parameters(tiny_pipe, args, "sdipc-edit") == expected


def test_word_weights_error_names_no_command_line_option(client):
    with pytest.raises(AppError, match="WORD=NUMBER") as info:
        client.predict(**dict(P2P, weights="dog"), **SAMPLE, seed=0, api_name="/p2p")
    assert "--weight" not in str(info.value)


def test_startup_message_points_to_the_share_option():
    from imageprompt.demo.app import startup_message

    local = startup_message("http://127.0.0.1:7860/", None, share=False)
    assert "http://127.0.0.1:7860/" in local and "--share" in local and "share=True" not in local
    shared = startup_message("http://127.0.0.1:7860/", "https://x.gradio.live", share=True)
    assert "--share" not in shared and "temporary" in shared
    assert "--share" not in startup_message("http://127.0.0.1:7860/", None, share=True)  # gradio says why it failed


def test_cli_passes_its_options_to_the_demo(monkeypatch):
    import imageprompt.demo.app as app_module

    from imageprompt.cli.main import main

    calls = []
    monkeypatch.setattr(app_module, "launch", lambda **kwargs: calls.append(kwargs) or 0)
    assert main(["demo", "--share", "--port", "7861", "--model", "m", "--max-queue", "3", "--scheduler", "euler",
                 "--adapter", "sdipc"]) == 0
    (kwargs,) = calls
    assert kwargs["share"] is True and kwargs["port"] == 7861 and kwargs["max_queue"] == 3
    assert (kwargs["model"], kwargs["clip"], kwargs["scheduler"], kwargs["adapters"]) == ("m", None, "euler", ["sdipc"])


def test_launch_shows_the_model_notice_in_the_terminal(monkeypatch, tiny_model, capsys, caplog):
    import diffusers.utils.logging
    import imageprompt.demo.app as app_module
    import transformers.utils.logging

    import imageprompt.loading

    model_dir, clip_dir = tiny_model
    monkeypatch.setattr(imageprompt.loading, "resolve_model",
                        lambda model, clip: (str(model_dir), str(clip_dir), "using a test model"))
    served = []
    serve = app_module.serve
    monkeypatch.setattr(app_module, "serve",
                        lambda demo, **kwargs: served.append((demo, kwargs)) or serve(demo, **kwargs))
    monkeypatch.setattr(gr.Blocks, "block_thread", lambda self: self.close())  # "interrupted" at once
    try:
        assert app_module.launch(device="cpu", dtype="fp32", port=None, adapters=["sdipc"], max_queue=3) == 0
    finally:
        diffusers.utils.logging.enable_progress_bar()
        transformers.utils.logging.enable_progress_bar()
    assert "using a test model" in caplog.text  # the terminal, not only the page
    (demo, kwargs), = served
    assert kwargs["share"] is False and demo.imageprompt_context.notice == "using a test model"
    assert demo.imageprompt_context.adapter_names == ["sdipc"] and demo.imageprompt_context.scheduler == "ddim"
    out = capsys.readouterr().out
    assert demo.local_url in out and "--share" in out and "share=True" not in out


def test_blend_start_and_exclude_reach_the_edit_settings():
    from imageprompt.demo.validation import check_edit

    plain = check_edit("a red square and a blue circle", "a red square and a green circle", "replace", "",
                       "circle", 0.8, 0.4, 0.3)
    assert "blend_exclude" not in plain and "blend_start" not in plain  # earlier parameters unchanged
    settings = check_edit("a red square and a blue circle", "a red square and a green circle", "replace", "",
                          "circle", 0.8, 0.4, 0.3, "square", 0.25)
    assert settings["blend_exclude"] == ["square"] and settings["blend_start"] == 0.25
    with pytest.raises(Exception, match="Blend start"):
        check_edit("a red circle", "a blue circle", "replace", "", "circle", 0.8, 0.4, 0.3, "", 1.5)


def test_masactrl_and_style_aligned_tabs(client, files):
    gallery, _, downloads = client.predict("a red circle", "a red square", "circle square", 0, 2, 2, 2.0, 3, SIZE,
                                           SIZE, "", api_name="/masactrl")
    assert [item["caption"] for item in gallery] == ["source", "edit"]
    params = read_parameters(downloads[1])
    assert params["mode"] == "masactrl" and params["mask_words"] == ["circle", "square"] and params["start_layer"] == 2
    gallery, downloads = client.predict("a red circle\na blue square\na green triangle", None, 1.0, False, 2, 2.0, 4,
                                        SIZE, SIZE, "", api_name="/style_aligned")
    assert len(gallery) == 3 and [read_parameters(p)["seed"] for p in downloads] == [4, 5, 6]
    with pytest.raises(Exception, match="2 to 8 prompts"):
        client.predict("only one", None, 1.0, False, 2, 2.0, 4, SIZE, SIZE, "", api_name="/style_aligned")
    gallery, downloads = client.predict("a red circle\na blue square", handle_file(files / "red.png"), 1.0, False, 2,
                                        2.0, 4, SIZE, SIZE, "", api_name="/style_aligned")
    assert len(gallery) == 2 and read_parameters(downloads[0])["input"] == "red.png"
