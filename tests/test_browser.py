"""The web demo in a real browser: headless Debian Chromium driven by Playwright (opt-in: ``-m browser``).

Needs ``apt-get install chromium`` and ``pip install playwright`` (the package only: Playwright never downloads a
browser here, it is pointed at /usr/bin/chromium). Set ``IMAGEPROMPT_SCREENSHOT_DIR`` to keep the screenshots.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

CHROMIUM = os.environ.get("IMAGEPROMPT_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]
EXAMPLE = Path(__file__).resolve().parents[1] / "demo" / "examples" / "red-circle.png"


@pytest.fixture(scope="module")
def browser():
    playwright_api = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} not found: apt-get install chromium")
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def app(tiny_pipe, tmp_path_factory):
    pytest.importorskip("gradio")
    from imageprompt.demo.app import build_demo, serve

    demo = build_demo(tiny_pipe, output_dir=tmp_path_factory.mktemp("demo-out"), max_steps=20, default_steps=2)
    serve(demo, port=None, block=False, quiet=True)
    yield demo
    demo.close()


def keep(screenshot: Path) -> None:
    folder = os.environ.get("IMAGEPROMPT_SCREENSHOT_DIR")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        shutil.copy(screenshot, Path(folder) / screenshot.name)


def test_variation_from_the_browser(browser, app, tmp_path):
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.goto(app.local_url, wait_until="networkidle")
    page.get_by_text(str(app.imageprompt_context.model_name)).first.wait_for(timeout=30_000)

    # Bad input first: running with no image shows a readable error in the page.
    page.locator("#variation-run").click()
    page.get_by_text("Upload an image first").first.wait_for(timeout=30_000)

    # The app keeps serving: upload, run, wait for the gallery.
    page.locator("#variation-image input[type=file]").set_input_files(str(EXAMPLE))
    page.locator("#variation-image img").first.wait_for(timeout=30_000)
    page.locator("#variation-run").click()
    result = page.locator("#variation-gallery img").first
    result.wait_for(timeout=120_000)
    page.locator("#variation-files a").first.wait_for(timeout=30_000)
    assert page.locator("#variation-gallery img").count() >= 1
    assert ".png" in page.locator("#variation-files").inner_text()

    # The seed's randomise button (in the closed "Advanced options" accordion) picks a new seed.
    page.get_by_text("Advanced options").first.click()
    seed = page.get_by_label("Seed (image i uses seed + i)")
    assert seed.input_value() == "0"
    page.get_by_role("button", name="Random seed").first.click()
    page.wait_for_function("el => el.value !== '0'", arg=seed.element_handle(), timeout=10_000)

    screenshot = tmp_path / "demo-variation.png"
    page.screenshot(path=str(screenshot), full_page=True)
    assert screenshot.stat().st_size > 10_000
    keep(screenshot)
    page.close()


def test_p2p_shows_attention_maps_beside_the_result(browser, app, tmp_path):
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.goto(app.local_url, wait_until="networkidle")
    page.get_by_role("tab", name="Prompt-to-prompt").click()
    page.locator("#p2p-source textarea").fill("a red cat on the beach")
    page.get_by_label("Target prompt").fill("a red dog on the beach")
    page.locator("#p2p-run").click()
    page.locator("#p2p-gallery img").first.wait_for(timeout=120_000)
    page.locator("#p2p-maps img").first.wait_for(timeout=30_000)
    assert page.locator("#p2p-gallery img").count() == 2

    screenshot = tmp_path / "demo-p2p.png"
    page.screenshot(path=str(screenshot), full_page=True)
    keep(screenshot)
    page.close()
