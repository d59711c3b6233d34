"""Every example the demo shows looks right on the bundled model (issue 24).

The demo is served in-process on the bundled model with its bundled IP-Adapter, as ``imageprompt demo`` serves
it, and every row of :data:`imageprompt.demo.showcase.EXAMPLES` is sent to its tab's endpoint at the tab's
defaults (seed 0, one image, 30 DDIM steps, guidance 7.5), as a click on the example and then on the button does.
Each picture is read back with the world's reader: the expected objects come from the example's own words (the
world's caption grammar) or from the example image, never from the code under test.
"""

from __future__ import annotations

import pytest
from PIL import Image

gr = pytest.importorskip("gradio")
pytest.importorskip("gradio_client")

from gradio_client import Client, handle_file  # noqa: E402
from imageprompt.checkpoints import BUNDLED_MODEL  # noqa: E402
from imageprompt.demo.limits import EXAMPLES_DIR  # noqa: E402
from imageprompt.demo.showcase import EXAMPLES  # noqa: E402

from imageprompt import world  # noqa: E402
from imageprompt.world.scenes import BACKGROUNDS, COLORS, SHAPES, parse_caption  # noqa: E402


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    from imageprompt.demo.app import build_demo, default_adapters, serve
    from imageprompt.demo.context import load_adapters
    from imageprompt.pipelines.loading import load_pipeline

    from imageprompt.loading import resolve_model

    model, clip, _ = resolve_model(str(BUNDLED_MODEL), None)
    pipe = load_pipeline(model=model, clip=clip, scheduler="ddim", device="cpu")
    specs = list(default_adapters(model))
    demo = build_demo(pipe, scheduler="ddim", output_dir=tmp_path_factory.mktemp("demo-out"),
                      adapters=load_adapters(pipe, specs), adapter_names=specs)
    serve(demo, port=None, block=False, quiet=True)
    yield Client(demo.local_url, verbose=False)
    demo.close()


def run_example(client: Client, tab: str, row: list[str]) -> list[str]:
    """The example's row in the tab's input order, every other input at its default; the gallery's files."""
    params = client.view_api(print_info=False, return_format="dict")["named_endpoints"][f"/{tab}"]["parameters"]
    # inputs the page leaves empty (a textbox with no text, no photo) have no default in the API
    kwargs = {p["parameter_name"]: ("" if p["component"] == "Textbox" else None)
              for p in params if not p["parameter_has_default"]}
    values = [handle_file(str(EXAMPLES_DIR / v)) if str(v).endswith(".png") else v for v in row]
    kwargs.update({p["parameter_name"]: v for p, v in zip(params, values)})
    gallery = client.predict(**kwargs, api_name=f"/{tab}")[0]
    return [item["image"] for item in gallery]


def read(path) -> tuple[list[tuple[str, str, str]], str]:
    """(colour, shape, position) of each object, largest first, and the background."""
    with Image.open(path) as image:
        image = image.convert("RGB")
        return [(o.color, o.shape, o.position) for o in world.detect_objects(image)], world.background_name(image)


def expected(caption: str) -> tuple[list[tuple[str, str, str]], str | None]:
    specs, background = parse_caption(caption)
    return sorted((s.color, s.shape, s.position) for s in specs), background


def assert_drawn(path, caption: str) -> None:
    objects, background = read(path)
    want, want_background = expected(caption)
    assert sorted(objects) == want, (caption, objects)
    assert want_background in (None, background), (caption, background)


def attributes(text: str, reference: tuple[str, str]) -> tuple[str, str]:
    """An edit text's colour and shape where it names them, the reference's otherwise."""
    words = text.split()
    return (next((w for w in words if w in COLORS), reference[0]),
            next((w for w in words if w in SHAPES), reference[1]))


def named_background(text: str, reference: str) -> str:
    return next((name for name in BACKGROUNDS if f"{name} background" in text), reference)


def check(tab: str, row: list[str], outputs: list[str]) -> None:
    if tab in ("variation", "edit", "ip_adapter"):
        (image, *text) = row
        reference, background = read(EXAMPLES_DIR / image)
        want = sorted(attributes(text[0] if text else "", r[:2]) for r in reference)
        (output,) = outputs
        objects, drawn_background = read(output)
        assert sorted(o[:2] for o in objects) == want, (row, objects)  # the IP-Adapter keeps no position
        if tab != "ip_adapter" or (text and text[0]):  # the adapter alone is not asked to keep the background
            assert drawn_background == named_background(text[0] if text else "", background), (row, drawn_background)
    elif tab in ("p2p", "masactrl", "real_edit"):
        source, target = row[1:3] if tab == "real_edit" else row[:2]
        (src, edit) = outputs
        assert_drawn(src, source)
        assert_drawn(edit, target or source)  # reweight: the source's words, reweighted
    elif tab == "style_aligned":
        prompts = row[0].splitlines()
        assert len(outputs) == len(prompts)
        for path, prompt in zip(outputs, prompts):
            objects, _ = read(path)
            (want,) = expected(prompt)[0]
            assert [o[:2] for o in objects] == [want[:2]], (prompt, objects)
    else:
        raise AssertionError(f"no check for the {tab} tab's examples")


CASES = [(tab, row) for tab, rows in EXAMPLES.items() for row in rows]


@pytest.mark.parametrize("tab, row", CASES, ids=[f"{tab}-{i}" for i, (tab, _) in enumerate(CASES)])
def test_demo_example_looks_right(client, tab, row):
    check(tab, row, run_example(client, tab, row))
