"""The style studio in a real browser: Debian's headless Chromium driven by Playwright for Python.

No browser download: Playwright's driver ships in its wheel, and the browser is ``/usr/bin/chromium``
(``apt-get install chromium``). The studio runs as a user starts it: the embedded demo model with its
shipped styles. The screenshot of the finished page goes to ``samples/app-screenshot.png``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
SCREENSHOT = Path(__file__).resolve().parent.parent / "samples" / "app-screenshot.png"
# Every <img> under the element is loaded and has pixels.
IMAGES_LOADED = """([selector, count]) => {
    const images = [...document.querySelectorAll(selector + ' img')];
    return images.length >= count && images.every(image => image.complete && image.naturalWidth > 0);
}"""

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="no /usr/bin/chromium (apt-get install chromium)")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
pytest.importorskip("gradio", reason="the app extra (gradio) is not installed")


@pytest.fixture(scope="module")
def studio_url(tmp_path_factory):
    from share_diffusers.studio.testing import running_studio

    home = tmp_path_factory.mktemp("studio-browser")
    with running_studio(log_path=home / "studio.log", home=home) as url:
        yield url


@pytest.fixture(scope="module")
def page(studio_url):
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1440, "height": 1100})
        page.set_default_timeout(60_000)
        # expect()'s own default is 5 s: a merge plus its 16-step preview took longer on a busy CI machine
        sync_api.expect.set_options(timeout=60_000)
        page.goto(studio_url)
        yield page
        browser.close()


def test_pick_a_style_and_generate(page):
    from share_diffusers.runtime import DEFAULT_PROMPTS

    expect = sync_api.expect
    page.wait_for_function(IMAGES_LOADED, arg=["#styles", 4])  # the style gallery: one preview per style
    expect(page.locator("#prompts textarea")).to_have_value("\n".join(DEFAULT_PROMPTS))  # classes the model draws
    page.get_by_label("Style 1", exact=True).click()
    page.get_by_role("option", name="stripes", exact=True).click()
    expect(page.locator("#style-lines textarea")).to_have_value("stripes")  # the blend builder wrote the line
    page.get_by_role("button", name="Generate", exact=True).click()
    page.wait_for_function(IMAGES_LOADED, arg=["#generated", 2])
    for prompt in DEFAULT_PROMPTS:
        expect(page.locator("#generated")).to_contain_text(f"{prompt} · stripes")
    assert page.locator("#generated img").first.evaluate("image => image.naturalWidth") > 0
    SCREENSHOT.parent.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOT), full_page=True)


def test_a_bad_style_is_one_line_in_the_page(page):
    page.locator("#style-lines textarea").fill("nope")
    page.get_by_role("button", name="Generate", exact=True).click()
    toast = page.get_by_text("unknown style 'nope'; styles held: 'inverted', 'tint', 'stripes', 'outlines'")
    sync_api.expect(toast).to_be_visible()
    assert "Traceback" not in page.content()


def test_merge_an_uploaded_lora(page, tmp_path):
    expect = sync_api.expect
    from share_diffusers.demo_styles import write_demo_lora
    from share_diffusers.runtime import load_pipeline

    lora = write_demo_lora(load_pipeline(None, "cpu").transformer, tmp_path / "pencil", seed=11, rank=4, alpha=4.0)
    page.get_by_role("tab", name="Merge, delete, save").click()
    page.locator("#lora-upload input[type=file]").set_input_files(str(lora))
    page.get_by_label("Style name", exact=True).fill("pencil")
    page.get_by_role("button", name="Merge", exact=True).click()
    expect(page.locator("#merge-report textarea")).to_have_value(re.compile(r"^merged 'pencil': 28 layers"))
    expect(page.locator("#styles")).to_contain_text(re.compile(r"pencil · error \d\.\de-\d\d"))  # gallery refreshed
    page.wait_for_function(IMAGES_LOADED, arg=["#styles", 5])


def test_a_failed_merge_leaves_its_message_in_the_report_box(page):
    """The toast fades; the report box keeps ``error: <message>`` (not Gradio's bare "Error")."""
    page.get_by_role("tab", name="Merge, delete, save").click()
    page.get_by_label("Style name", exact=True).fill("pencil")  # the upload of the test before is still there
    page.get_by_role("button", name="Merge", exact=True).click()
    message = "error: a style named 'pencil' already exists; pick another name or delete it first"
    sync_api.expect(page.locator("#merge-report textarea")).to_have_value(message)
