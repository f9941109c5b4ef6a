"""The web page, end to end in real headless Chromium (Debian's `chromium`, driven by Playwright).

Skipped when no Chromium is installed, unless T2V_REQUIRE_BROWSER=1 (set by .ci/run, which installs it).
"""

import os
import shutil
import subprocess
import sys

import pytest
import requests

from conftest import ROOT, wait_for
from test_serving import free_port

KEY = "web-test-key"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

if not CHROMIUM and os.environ.get("T2V_REQUIRE_BROWSER") != "1":
    pytest.skip("no chromium here (apt-get install chromium); .ci/run installs it", allow_module_level=True)


@pytest.fixture
def server(tmp_path, data_dir, tiny_model, tiny_upscalers):
    """python app.py with the tiny models, keys on, and limits small enough for a CPU."""
    os.symlink(data_dir / "tiny", tmp_path / "tiny")
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "T2V_MODEL": "tiny", "T2V_UPSCALER": "tiny",
           "T2V_DATA_DIR": str(tmp_path), "T2V_PORT": str(port), "T2V_API_KEYS": KEY, "T2V_MAX_SIDE": "64"}
    log = open(tmp_path / "server.log", "wb")
    proc = subprocess.Popen([sys.executable, str(ROOT / "app.py")], cwd=tmp_path, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"

    def healthy():
        assert proc.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
        try:
            return requests.get(f"{base}/health", timeout=2).json()["model_loaded"]
        except requests.RequestException:
            return False

    wait_for(healthy, timeout=90, every=0.2)
    yield base
    proc.terminate()
    proc.wait(20)


@pytest.fixture
def page(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        page.set_default_timeout(60_000)
        yield page
        browser.close()


def record_progress(page):
    """Collect every value the progress bar shows, from the page's own DOM."""
    page.evaluate("""() => {
        window.progressSeen = [];
        new MutationObserver(() => window.progressSeen.push(
            Number(document.querySelector('#progress').getAttribute('aria-valuenow'))))
          .observe(document.querySelector('#progress'), {attributes: true, attributeFilter: ['aria-valuenow']});
    }""")


def test_prompt_to_video_in_the_browser(page, server, tmp_path):
    page.goto(server)
    # Keys are on: the page asks for one, once, and keeps it (keyboard only).
    page.wait_for_selector("#key-panel:not([hidden])")
    page.keyboard.type(KEY)  # the key field has focus
    page.keyboard.press("Enter")
    page.wait_for_selector("#key-panel[hidden]", state="attached")
    assert page.evaluate("localStorage.getItem('t2v.apiKey')") == KEY

    # The form offers only what the server accepts (T2V_MAX_SIDE=64).
    sizes = page.eval_on_selector_all("#size option", "els => els.map(e => e.textContent)")
    assert sizes == ["16:9 (small) (64x32)", "9:16 (small) (32x64)", "1:1 (small) (64x64)"]
    assert page.get_attribute("#frames", "max") == "129" and page.get_attribute("#steps", "max") == "100"
    unlabeled = page.evaluate("""[...document.querySelectorAll('input, select, textarea')]
        .filter(e => e.labels.length === 0).map(e => e.id)""")
    assert unlabeled == []

    page.focus("#prompt")
    page.keyboard.type("a red fox runs through fresh snow")
    assert page.text_content("#prompt-count") == "33 / 2000 characters"
    page.select_option("#size", "2")
    page.fill("#steps", "100")  # long enough on the tiny model to watch the bar move
    record_progress(page)
    page.focus("#submit")
    page.keyboard.press("Enter")

    page.wait_for_function("document.querySelector('#current').dataset.status === 'completed'")
    page.wait_for_function("(() => { const v = document.querySelector('#player');"
                           " return v.readyState >= 2 && v.duration > 0; })()")
    seen = page.evaluate("window.progressSeen")
    assert any(0 < v < 100 for v in seen), seen  # the bar moved through the job, not just 0 -> 100
    assert seen == sorted(seen) and seen[-1] == 100
    width, duration = page.evaluate("[document.querySelector('#player').videoWidth,"
                                    " document.querySelector('#player').duration]")
    assert width == 256 and duration == pytest.approx(129 / 24, abs=0.1)
    assert page.text_content("#seed-used").startswith("Seed ")
    page.wait_for_timeout(400)  # let the bar's CSS transition reach 100% for the screenshot
    page.screenshot(path=str(tmp_path / "t2v-finished.png"), full_page=True)
    # The download link is signed, so it works without the key header.
    link = page.get_attribute("#download", "href")
    assert requests.get(server + link, timeout=10).headers["Content-Type"] == "video/mp4"
    assert requests.get(server + link.split("?")[0], timeout=10).status_code == 401

    # History lists the job with its thumbnail.
    page.wait_for_function("(() => { const img = document.querySelector('#history li img');"
                           " return img && img.complete && img.naturalWidth > 0; })()")
    assert "completed" in page.text_content("#history li")

    # A second job, canceled from the page.
    page.fill("#frames", "129")
    page.click("#submit")
    page.wait_for_function("['queued', 'processing'].includes(document.querySelector('#current').dataset.status)")
    page.click("#cancel")
    page.wait_for_function("document.querySelector('#current').dataset.status === 'canceled'")
    assert page.text_content("#stage") == "Canceled"
    page.wait_for_function("document.querySelectorAll('#history li').length === 2")
    assert "canceled" in page.text_content("#history li")  # newest first
    page.screenshot(path=str(tmp_path / "t2v-page.png"), full_page=True)
    assert (tmp_path / "t2v-page.png").stat().st_size > 10_000

    # Usable on a phone-width screen: nothing runs off the side.
    page.set_viewport_size({"width": 375, "height": 800})
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")

    # The signed links and the key were used all along, and neither reached the server's log.
    log = (tmp_path / "server.log").read_text()
    assert "/jobs/" in log and "sig=" not in log and KEY not in log
