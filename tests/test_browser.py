"""The studio in a real browser: `python app.py --base tiny` on a free port, driven by Playwright.

Upload three photos and train a concept for a few steps, see it in the library, draw a box on the
Generate canvas with the mouse and label it with the concept, generate, see the image; then the
error path (Generate with no prompt) and "reuse settings"; then a second box, Isolated mode, and
the per-box report (matched / split / added). A screenshot of every step is kept in
tests/artifacts/browser/ (git-ignored), with the server's log.

Needs Python Playwright and a Chromium (Debian's /usr/bin/chromium; Playwright's own download is
not used). Without them the test is skipped, unless MENAGERIE_REQUIRE_BROWSER=1 (CI), where it fails.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import procedural_photo

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = Path(__file__).resolve().parent / "artifacts" / "browser"
REQUIRED = os.environ.get("MENAGERIE_REQUIRE_BROWSER") == "1"


def chromium_path() -> str | None:
    for candidate in (os.environ.get("CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser")):
        if candidate and Path(candidate).exists():
            return candidate
    return None


def missing_browser() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "Python Playwright is not installed (pip install -r requirements-dev.txt)"
    if chromium_path() is None:
        return "no Chromium found (apt-get install chromium, or set $CHROMIUM)"
    return None


@pytest.fixture(scope="module")
def browser():
    reason = missing_browser()
    if reason:
        if REQUIRED:
            pytest.fail(f"MENAGERIE_REQUIRE_BROWSER=1 but {reason}")
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=chromium_path(), args=["--no-sandbox", "--disable-gpu"])
        yield chromium
        chromium.close()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def server(browser, tiny_dir, isolated_env, tmp_path_factory):
    """The studio as a subprocess on a free port, with a fresh library and outputs folder."""
    root = tmp_path_factory.mktemp("browser-studio")
    port = free_port()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    log = open(ARTIFACTS / "server.log", "w")
    env = {**os.environ, "MENAGERIE_CACHE": str(isolated_env["cache"]), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "GRADIO_ANALYTICS_ENABLED": "False"}
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "app.py"), "--base", "tiny", "--port", str(port),
         "--concepts-dir", str(root / "concepts"), "--outputs-dir", str(root / "outputs")],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                log.close()
                pytest.fail(f"the studio did not start; see {ARTIFACTS / 'server.log'}:\n{(ARTIFACTS / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
    yield {"url": url, "root": root}
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
    log.close()


def test_the_whole_studio_flow_by_mouse(server, browser, tmp_path):
    from playwright.sync_api import expect

    photos = []
    for i in range(3):
        path = tmp_path / f"pet{i}.png"
        procedural_photo(i, (96, 96)).save(path)
        photos.append(str(path))
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(30_000)
    step = 0

    def shot(name: str) -> None:
        nonlocal step
        step += 1
        page.screenshot(path=str(ARTIFACTS / f"{step:02d}-{name}.png"), full_page=True)

    # 1. The page: title, the three tabs, the test-model banner
    page.goto(server["url"])
    expect(page).to_have_title("Menagerie")
    for tab in ("Concepts", "Compose", "Generate"):
        expect(page.get_by_role("tab", name=tab)).to_be_visible()
    expect(page.locator("#test-model-banner")).to_contain_text("noise")
    shot("loaded")

    # 2. Concepts: three photos, a name, a class word, 4 steps; train; it appears in the library
    page.locator("#train-photos input[type=file]").set_input_files(photos)
    expect(page.locator("#train-photos")).to_contain_text("pet2")  # the name is split into stem and suffix elements
    page.locator("#train-name textarea").fill("mochi")
    page.locator("#train-class textarea").fill("dog")
    page.locator("#train-advanced").get_by_text("Advanced settings").click()
    page.locator("#train-steps input").fill("4")
    shot("training-form")
    page.locator("#train-button").click()
    expect(page.locator("#train-progress")).to_contain_text("training <mochi>")
    shot("training-started")
    expect(page.locator("#train-progress")).to_contain_text("done", timeout=240_000)
    expect(page.locator("#library-table")).to_contain_text("<mochi>", timeout=30_000)
    expect(page.locator("#library-gallery img[alt*='<mochi>']")).to_have_count(1)
    expect(page.locator("#train-previews img").first).to_be_visible()
    shot("trained")

    # 3. Generate: a prompt, 4 steps, a box drawn with the mouse and labelled <mochi>
    page.get_by_role("tab", name="Generate").click()
    page.locator("#generate-prompt textarea").fill("a photo of a dog in a garden")
    page.locator("#generate-steps input[type=number]").fill("4")
    page.locator("#generate-steps input[type=number]").press("Enter")
    canvas = page.locator("#canvas canvas")
    canvas.scroll_into_view_if_needed()
    box = canvas.bounding_box()
    x, y = box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.2
    page.mouse.move(x, y)
    page.mouse.down()
    page.mouse.move(x + 60, y + 80, steps=5)
    page.mouse.move(x + 150, y + 250, steps=5)
    page.mouse.up()
    modal = page.locator(".modal")
    expect(modal).to_be_visible()
    modal.locator("input[aria-label='Label']").click()
    page.get_by_role("option", name="<mochi>").click()
    shot("box-drawn")
    modal.get_by_role("button", name="OK").click()
    expect(page.locator("#box-table")).to_contain_text("a photo of <mochi> dog")
    shot("box-labelled")
    page.locator("#generate-button").click()
    expect(page.locator("#results img").first).to_be_visible(timeout=180_000)
    expect(page.locator("#generate-status")).to_contain_text("done")
    expect(page.locator("#history img").first).to_be_visible()
    shot("generated")
    saved = list((server["root"] / "outputs").glob("*.png"))
    assert len(saved) == 1

    # 4. The error path: no prompt gives a message in the page, and the page keeps working
    page.locator("#generate-prompt textarea").fill("")
    page.locator("#generate-button").click()
    expect(page.locator("#generate-status")).to_contain_text("the prompt is empty")
    shot("error-no-prompt")

    # 5. Reuse settings: click the image, reuse, the prompt comes back
    page.locator("#results img").first.click()
    page.locator("#reuse-button").click()
    expect(page.locator("#generate-prompt textarea")).to_have_value("a photo of a dog in a garden")
    expect(page.locator("#box-table")).to_contain_text("<mochi>")
    shot("settings-reused")

    # 6. Isolated with boxes: a second box by mouse, Isolated, one layout (no retries), generate;
    #    the boxes image and a line per box say what became of each
    canvas.scroll_into_view_if_needed()
    box = canvas.bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.68, box["y"] + box["height"] * 0.15)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.8, box["y"] + box["height"] * 0.4, steps=5)
    page.mouse.move(box["x"] + box["width"] * 0.95, box["y"] + box["height"] * 0.7, steps=5)
    page.mouse.up()
    expect(modal).to_be_visible()
    modal.locator("input[aria-label='Label']").click()
    page.get_by_role("option", name="<mochi>").click()
    modal.get_by_role("button", name="OK").click()
    expect(page.locator("#box-table [role=grid]")).to_have_attribute("aria-rowcount", "3")  # the header and two boxes
    page.locator("#generate-mode").get_by_text("Isolated (detector-guided)").click()
    page.locator("#layout-advanced").get_by_text("Advanced layout").click()
    expect(page.locator("#layout-regional")).to_be_hidden()
    expect(page.locator("#layout-self-attention")).to_be_hidden()
    retries = page.locator("#layout-retries input[type=number]")
    expect(retries).to_be_visible()
    retries.fill("0")
    retries.press("Enter")
    shot("isolated-two-boxes")
    page.locator("#generate-button").click()
    expect(page.locator("#box-report")).to_contain_text("Box 2 (dog-2):", timeout=180_000)
    expect(page.locator("#box-report")).to_contain_text("Box 1 (dog):")
    expect(page.locator("#stages img").first).to_be_visible()
    expect(page.locator("#stages")).to_contain_text("boxes: matched / split / added")
    expect(page.locator("#generate-status")).to_contain_text("done")
    shot("isolated-generated")
    assert len(list((server["root"] / "outputs").glob("*.png"))) == 2
    page.close()
