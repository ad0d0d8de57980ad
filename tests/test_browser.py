"""The studio in a real browser: `python app.py --base tiny` on a free port, driven by Playwright.

Upload three photos and train a concept for a few steps, see it in the library, draw a box on the
Generate canvas with the mouse and label it with the concept, generate, see the image; then the
error path (Generate with no prompt) and "reuse settings"; then a second box, Isolated mode, and
the per-box report (matched / split / added). A screenshot of every step is kept in
tests/artifacts/browser/ (git-ignored), with the server's log.

Then `python app.py --demo` (the toy world, pipelines/demo.py): its banner and examples, two boxes
labelled <rex> and <mimi>, Regional then Isolated generation, and the oracle reading a dog and a
cat in each saved PNG. Its Isolated page is the README's picture: tests/artifacts/browser/demo.png,
copied to docs/demo.png when that is missing or MENAGERIE_UPDATE_DOCS=1.

Needs Python Playwright and a Chromium (Debian's /usr/bin/chromium; Playwright's own download is
not used). Without them the test is skipped, unless MENAGERIE_REQUIRE_BROWSER=1 (CI), where it fails.
"""

from __future__ import annotations

import os
import re
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


def start_studio(arguments: list[str], root: Path, cache: Path, log_name: str):
    """`python app.py ARGUMENTS` on a free port with a fresh library and outputs folder under `root`;
    yields {"url", "root"} once it answers, and stops it afterwards."""
    port = free_port()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    log_path = ARTIFACTS / log_name
    log = open(log_path, "w")
    env = {**os.environ, "MENAGERIE_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "GRADIO_ANALYTICS_ENABLED": "False"}
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "app.py"), *arguments, "--port", str(port),
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
                pytest.fail(f"the studio did not start; see {log_path}:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
    yield {"url": url, "root": root}
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
    log.close()


@pytest.fixture(scope="module")
def server(browser, tiny_dir, isolated_env, tmp_path_factory):
    """The studio on the tiny random model."""
    yield from start_studio(["--base", "tiny"], tmp_path_factory.mktemp("browser-studio"), isolated_env["cache"], "server.log")


@pytest.fixture(scope="module")
def demo_server(browser, isolated_env, tmp_path_factory):
    """The studio in demo mode: the toy world."""
    yield from start_studio(["--demo"], tmp_path_factory.mktemp("browser-demo"), isolated_env["cache"], "demo-server.log")


def test_the_whole_studio_flow_by_mouse(server, browser, tmp_path):
    from playwright.sync_api import expect

    photos = []
    for i in range(3):
        path = tmp_path / f"pet{i}.png"
        procedural_photo(i, (96, 96)).save(path)
        photos.append(str(path))
    page, shot = new_page(browser, "")

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
    expect(page.locator("#train-photo-thumbs img")).to_have_count(3)  # the photos shown, not only their names
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
    assert page.locator("#library-gallery").bounding_box()["height"] < 400  # one concept does not fill the page
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

    # 7. Resizing with boxes: a typed width redraws the canvas at the new aspect and scales the boxes
    #    (they used to be clamped, and a typed size left the canvas drawn at the old one)
    before = box_rows(page)
    ratio_before = canvas_ratio(canvas)
    width_input = page.locator("#generate-width input[type=number]")
    width_input.fill("128")
    width_input.press("Enter")
    after = settled_rows(page, before)
    for old, new in zip(before, after):
        assert new[0] == old[0]
        assert abs(int(new[1]) - 2 * int(old[1])) <= 1 and abs(int(new[3]) - 2 * int(old[3])) <= 1, (old, new)
        assert (new[2], new[4]) == (old[2], old[4])  # the height did not change
    page.wait_for_timeout(1000)
    assert canvas_ratio(canvas) == pytest.approx(2 * ratio_before, rel=0.1)
    shot("resized-with-boxes")

    # 8. Cancel a generation: a long one, cancelled while it samples; nothing is saved
    steps_input = page.locator("#generate-steps input[type=number]")
    steps_input.fill("100")
    steps_input.press("Enter")
    page.locator("#generate-mode").get_by_text("Regional (Mix-of-Show)").click()
    page.locator("#generate-button").click()
    expect(page.locator("#generate-status")).to_contain_text("step", timeout=60_000)
    page.locator("#cancel-generate-button").click()
    expect(page.locator("#generate-status")).to_contain_text("cancelled", timeout=60_000)
    shot("generation-cancelled")
    assert len(list((server["root"] / "outputs").glob("*.png"))) == 2

    # 9. A reload shows the history made since the server started (it used to be empty until the next image)
    page.reload()
    page.get_by_role("tab", name="Generate").click()
    expect(page.locator("#history img")).to_have_count(2, timeout=30_000)
    page.close()


def new_page(browser, prefix: str):
    """A page with a 30 s default timeout, and `shot(name)`: a numbered full-page screenshot in ARTIFACTS."""
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(30_000)
    count = [0]

    def shot(name: str) -> None:
        count[0] += 1
        page.screenshot(path=str(ARTIFACTS / f"{prefix}{count[0]:02d}-{name}.png"), full_page=True)

    return page, shot


def box_rows(page) -> list[list[str]]:
    """The box table's rows as cell texts: label, x0, y0, x1, y1, ..."""
    rows = []
    for row in page.locator("#box-table [role=row]").all():
        cells = [c.inner_text().strip() for c in row.locator("[role=gridcell]").all()]
        if cells and cells[1].isdigit():
            rows.append(cells)
    return rows


def settled_rows(page, before: list[list[str]], timeout: float = 30) -> list[list[str]]:
    """The box table once it differs from `before` and reads the same twice in a row (the grid
    redraws cell by cell, so one read can catch it half updated)."""
    deadline = time.monotonic() + timeout
    last = box_rows(page)
    while time.monotonic() < deadline:
        page.wait_for_timeout(500)
        now = box_rows(page)
        if now == last and now != before:
            return now
        last = now
    return last


def canvas_ratio(canvas) -> float:
    box = canvas.bounding_box()
    return box["width"] / box["height"]


def draw_box(page, canvas, corners: tuple[float, float, float, float], label: str) -> None:
    """Drag a box on the canvas (corners as fractions of its size) and label it from the dialog."""
    box = canvas.bounding_box()
    x0, y0, x1, y1 = (box["x"] + box["width"] * corners[0], box["y"] + box["height"] * corners[1],
                      box["x"] + box["width"] * corners[2], box["y"] + box["height"] * corners[3])
    page.mouse.move(x0, y0)
    page.mouse.down()
    page.mouse.move((x0 + x1) / 2, (y0 + y1) / 2, steps=5)
    page.mouse.move(x1, y1, steps=5)
    page.mouse.up()
    modal = page.locator(".modal")
    from playwright.sync_api import expect

    expect(modal).to_be_visible()
    modal.locator("input[aria-label='Label']").click()
    page.get_by_role("option", name=label).click()
    modal.get_by_role("button", name="OK").click()
    expect(modal).to_be_hidden()


DEMO_SEED = 2  # regional and isolated both draw the dog and the cat at this seed (tests/test_demo.py for the rates)
DEMO_SCREENSHOT = ROOT / "docs" / "demo.png"
UPDATE_DOCS = os.environ.get("MENAGERIE_UPDATE_DOCS") == "1"  # rewrite docs/demo.png from this run


def classes_seen(oracle, path: Path) -> set[str]:
    from PIL import Image

    return {found.look.cls for found in oracle.describe([Image.open(path).convert("RGB")])[0]}


def test_the_demo_draws_two_stock_pets_the_oracle_can_read(demo_server, browser):
    """`python app.py --demo`: the toy world's banner and examples; <rex> and <mimi> in two boxes,
    Regional then Isolated; the oracle reads a dog and a cat in each saved PNG. The Isolated result
    is kept as docs/demo.png for the README."""
    from playwright.sync_api import expect

    from bench.toyworld.evaluate import ORACLE_PATH, SHAPE_PATH
    from bench.toyworld.oracle import Oracle

    oracle = Oracle.load(ORACLE_PATH, SHAPE_PATH)
    outputs = demo_server["root"] / "outputs"
    page, shot = new_page(browser, "demo-")

    # 1. The banner says what the toy world is; the stock pets are in the library; an example fills the form
    page.goto(demo_server["url"])
    expect(page.locator("#demo-banner")).to_contain_text("toy world")
    expect(page.locator("#demo-banner")).to_contain_text("oracle")
    expect(page.locator("#demo-banner a")).to_have_attribute("href", re.compile(r"toyworld\.md$"))
    docs = page.locator("#demo-banner a").get_attribute("href")
    assert page.request.get(docs if docs.startswith("http") else demo_server["url"] + docs).ok  # the page serves the docs
    expect(page.locator("#test-model-banner")).to_have_count(0)
    expect(page.locator("#library-table")).to_contain_text("<mimi>")
    page.locator("#demo-examples").get_by_text("my-rex (dog)").click()
    expect(page.locator("#train-name textarea")).to_have_value("my-rex")
    expect(page.locator("#train-class textarea")).to_have_value("dog")
    expect(page.locator("#train-photos")).to_contain_text("rex-8")
    page.locator("#train-advanced").get_by_text("Advanced settings").click()
    expect(page.locator("#train-steps input")).to_have_value("400")
    shot("loaded")

    # 2. Generate: the toy world's defaults; <rex> and <mimi> in two boxes drawn by mouse; a fixed seed
    page.get_by_role("tab", name="Generate").click()
    expect(page.locator("#generate-prompt textarea")).to_have_value("a dog and a cat on the grass")
    expect(page.locator("#generate-steps input[type=number]")).to_have_value("20")
    page.get_by_label("Random seed").uncheck()
    page.locator("#generate-seed input").fill(str(DEMO_SEED))
    canvas = page.locator("#canvas canvas")
    canvas.scroll_into_view_if_needed()
    draw_box(page, canvas, (0.05, 0.3, 0.47, 0.95), "<rex>")
    draw_box(page, canvas, (0.53, 0.3, 0.95, 0.95), "<mimi>")
    expect(page.locator("#box-table")).to_contain_text("a photo of <rex> dog")
    expect(page.locator("#box-table")).to_contain_text("a photo of <mimi> cat")
    shot("boxes")

    # 3. Regional (fuses <rex> and <mimi> on the fly, the first time): the oracle sees a dog and a cat
    page.locator("#generate-button").click()
    expect(page.locator("#results img").first).to_be_visible(timeout=240_000)
    expect(page.locator("#generate-status")).to_contain_text("done")
    shot("regional")
    [regional] = outputs.glob("*.png")
    assert {"dog", "cat"} <= classes_seen(oracle, regional), (regional, classes_seen(oracle, regional))

    # 4. Isolated with the same boxes, the oracle as detector: each box's pet matched or added
    page.locator("#generate-mode").get_by_text("Isolated (detector-guided)").click()
    page.locator("#generate-button").click()
    expect(page.locator("#box-report")).to_contain_text("Box 2 (", timeout=240_000)  # the table lists the boxes newest first
    expect(page.locator("#box-report")).to_contain_text("(dog):")
    expect(page.locator("#box-report")).to_contain_text("(cat):")
    expect(page.locator("#generate-status")).to_contain_text("done")
    expect(page.locator("#stages img").first).to_be_visible()
    [isolated] = [p for p in outputs.glob("*.png") if p != regional]
    assert {"dog", "cat"} <= classes_seen(oracle, isolated), (isolated, classes_seen(oracle, isolated))
    shot("isolated")

    # 5. The README's picture: the page from the banner to the box report, a real toy-world result
    page.locator("#results img").first.scroll_into_view_if_needed()
    page.evaluate("window.scrollTo(0, 0)")
    top = page.locator("#demo-banner").bounding_box()["y"]
    bottom = max(page.locator(selector).bounding_box()["y"] + page.locator(selector).bounding_box()["height"]
                 for selector in ("#box-report", "#box-table"))
    full = ARTIFACTS / "demo-readme-full.png"
    page.screenshot(path=str(full), full_page=True)
    save_readme_picture(full, top - 8, bottom + 8, ARTIFACTS / DEMO_SCREENSHOT.name)
    if UPDATE_DOCS or not DEMO_SCREENSHOT.exists():  # a test run leaves the committed picture alone unless asked
        shutil.copyfile(ARTIFACTS / DEMO_SCREENSHOT.name, DEMO_SCREENSHOT)
    page.close()


def save_readme_picture(full: Path, top: float, bottom: float, target: Path) -> None:
    """Crop the page screenshot to [top, bottom], scale it to 1000 px wide and store it in 256
    colours, small enough to commit."""
    from PIL import Image

    page = Image.open(full).convert("RGB")
    crop = page.crop((0, max(int(top), 0), page.width, min(int(bottom), page.height)))
    scale = 1000 / crop.width
    small = crop.resize((1000, round(crop.height * scale)), Image.LANCZOS)
    small.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(target, optimize=True)
