"""The web page, end to end in real headless Chromium (Debian's `chromium`, driven by Playwright).

Skipped when no Chromium is installed, unless T2V_REQUIRE_BROWSER=1 (set by .ci/run, which installs it).
Jobs are tiny and every wait is generous: the machine may be loaded, and nothing here is timed.
"""

import base64
import io
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import requests
from PIL import Image

from conftest import ROOT, make_clip, wait_for
from pipeline.models import MODELS
from pipeline.video import read_frames
from test_serving import free_port

KEY = "web-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
WAIT_MS = 300_000  # for a job to finish or a page to change, on a loaded machine
PHONE = {"width": 390, "height": 844}
# The generation form at 390 px measures about 850 px once every field is as tall as its label and control.
# With a gap under each field (a flex basis in a column) it measured 1,155 px here, with fewer fields.
PHONE_FORM_MAX_PX = 1000
PHONE_LORA_ROWS_MAX_PX = 70  # the LoRA picker with one LoRA measured 62 px at 390 px: a legend and one row

if not CHROMIUM and os.environ.get("T2V_REQUIRE_BROWSER") != "1":
    pytest.skip("no chromium here (apt-get install chromium); .ci/run installs it", allow_module_level=True)


def start_server(folder, data_dir, ready=None, **env):
    """python app.py with the tiny models, keys on, and limits small enough for a CPU; returns (process, base).
    It is up once ready(health) is true: by default, once its worker has loaded the model (if it has a worker)."""
    os.symlink(data_dir / "tiny", folder / "tiny")
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "T2V_MODEL": "tiny", "T2V_UPSCALER": "tiny",
           "T2V_DATA_DIR": str(folder), "T2V_PORT": str(port), "T2V_API_KEYS": KEY, "T2V_MAX_SIDE": "64", **env}
    log = open(folder / "server.log", "wb")
    proc = subprocess.Popen([sys.executable, str(ROOT / "app.py")], cwd=folder, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    want_model = env.get("T2V_WORKER", "thread") == "thread"

    def healthy():
        assert proc.poll() is None, (folder / "server.log").read_text()[-3000:]
        try:
            health = requests.get(f"{base}/health", headers={"X-API-Key": KEY}, timeout=10).json()  # keyed: model_error
        except requests.RequestException:
            return False
        if ready is not None:
            return ready(health)
        return health["model_loaded"] if want_model else health["status"] == "ok"

    wait_for(healthy, timeout=300, every=0.2)
    return proc, base, env


def stop(proc):
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(30)


@pytest.fixture(scope="module")
def served(tmp_path_factory, data_dir, tiny_model, tiny_upscalers):
    """One server with its worker thread for the tests that run jobs, and one LoRA installed (`style`, for the
    tiny HunyuanVideo); each test has its own browser session."""
    from test_lora import make_lora

    folder = tmp_path_factory.mktemp("web")
    (folder / "models" / "loras").mkdir(parents=True)
    make_lora("hunyuanvideo", data_dir, folder / "models" / "loras", "style")
    proc, base, _ = start_server(folder, data_dir, T2V_MODELS_DIR=str(folder / "models"))
    yield base, folder
    stop(proc)


@pytest.fixture
def server(served):
    return served[0]


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture
def open_page(browser):
    """open_page(viewport=None) -> a page in a fresh browser context (its own localStorage, so its own session)."""
    contexts = []

    def open_(viewport=None):
        context = browser.new_context(viewport=viewport or {"width": 1100, "height": 900})
        contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(WAIT_MS)
        page.on("dialog", lambda dialog: dialog.accept())  # the delete confirmation
        return page

    yield open_
    for context in contexts:
        context.close()


@pytest.fixture
def page(open_page):
    return open_page()


def sign_in(page, base):
    page.goto(base)
    page.wait_for_selector("#key-panel:not([hidden])")
    page.keyboard.type(KEY)  # the key field has focus
    page.keyboard.press("Enter")
    page.wait_for_selector("#key-panel[hidden]", state="attached")


def fill_tiny_job(page, prompt, steps=2, frames=9, seed=None, upscale=False):
    """The smallest job the form offers: 64x64, a few frames and steps."""
    page.fill("#prompt", prompt)
    page.select_option("#size", "0")  # tiny 1:1 (64x64)
    page.fill("#frames", str(frames))
    page.fill("#steps", str(steps))
    page.fill("#seed", "" if seed is None else str(seed))
    page.set_checked("#upscale", upscale)


def current_status_is(page, *statuses):
    page.wait_for_function("wanted => wanted.includes(document.querySelector('#current').dataset.status)",
                           arg=list(statuses))


def api_job(base, ref):
    r = requests.get(f"{base}/jobs/{ref}", headers=AUTH, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def record_progress(page):
    """Collect every value the progress bar shows, from the page's own DOM."""
    page.evaluate("""() => {
        window.progressSeen = [];
        new MutationObserver(() => window.progressSeen.push(
            Number(document.querySelector('#progress').getAttribute('aria-valuenow'))))
          .observe(document.querySelector('#progress'), {attributes: true, attributeFilter: ['aria-valuenow']});
    }""")


def test_prompt_to_video_in_the_browser(page, served, tmp_path):
    server, folder = served
    sign_in(page, server)  # keys are on: the page asks for one, once, and keeps it (keyboard only)
    assert page.evaluate("localStorage.getItem('t2v.apiKey')") == KEY

    # The form offers only what the server accepts: a tiny build's sizes within T2V_MAX_SIDE=64, 33 frames.
    sizes = page.eval_on_selector_all("#size option", "els => els.map(e => e.textContent)")
    assert sizes == ["tiny 1:1 (64x64)"]
    assert page.get_attribute("#frames", "max") == "33" and page.get_attribute("#steps", "max") == "100"
    assert page.input_value("#fps") == "24" and page.input_value("#guidance") == "6"
    unlabeled = page.evaluate("""[...document.querySelectorAll('input, select, textarea')]
        .filter(e => e.labels.length === 0).map(e => e.id)""")
    assert unlabeled == []

    page.focus("#prompt")
    page.keyboard.type("a red fox runs through fresh snow")
    assert page.text_content("#prompt-count") == "33 / 2000 characters"
    fill_tiny_job(page, "a red fox runs through fresh snow", steps=40, upscale=True)  # 40: the bar has time to move
    page.fill("#fps", "12")
    record_progress(page)
    page.focus("#submit")
    page.keyboard.press("Enter")

    current_status_is(page, "completed")
    page.wait_for_function("(() => { const v = document.querySelector('#player');"
                           " return v.readyState >= 2 && v.duration > 0; })()")
    seen = page.evaluate("window.progressSeen")
    assert any(0 < v < 100 for v in seen), seen  # the bar moved through the job, not just 0 -> 100
    assert seen == sorted(seen) and seen[-1] == 100
    width, duration = page.evaluate("[document.querySelector('#player').videoWidth,"
                                    " document.querySelector('#player').duration]")
    assert width == 256 and duration == pytest.approx(9 / 12, abs=0.1)  # 64 px upscaled 4x; 9 frames at 12 fps
    assert page.text_content("#seed-used").startswith("Seed ")
    # The download link is signed, so it works without the key header.
    link = page.get_attribute("#download", "href")
    assert requests.get(server + link, timeout=30).headers["Content-Type"] == "video/mp4"
    assert requests.get(server + link.split("?")[0], timeout=30).status_code == 401

    # History lists the job with its thumbnail and its parameters.
    page.wait_for_function("(() => { const img = document.querySelector('#history li img');"
                           " return img && img.complete && img.naturalWidth > 0; })()")
    item = page.text_content("#history li")
    assert "completed" in item
    assert "64x64, 9 frames at 12 fps, 40 steps, guidance 6, seed " in item and "upscaled 4x" in item

    # Usable on a phone-width screen: nothing runs off the side.
    page.set_viewport_size({"width": 375, "height": 800})
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")

    # The signed links and the key were used all along, and neither reached the server's log.
    log = (folder / "server.log").read_text()
    assert "/jobs/" in log and "sig=" not in log and KEY not in log


def test_phone_layout_has_no_gaps(open_page, server):
    page = open_page(PHONE)
    sign_in(page, server)
    fill_tiny_job(page, "a red fox runs through fresh snow")
    page.screenshot(path="/tmp/t2v-phone.png", full_page=True)  # for a person to look at; not kept in the repo
    form_height, lora_height = page.evaluate("['#job-form', '#lora-field'].map(s =>"
                                             " document.querySelector(s).getBoundingClientRect().height)")
    assert lora_height <= PHONE_LORA_ROWS_MAX_PX, lora_height  # the server has one LoRA: one compact row
    assert form_height - lora_height <= PHONE_FORM_MAX_PX, form_height
    # No field is taller than what it holds: its children and the gaps between them.
    gaps = page.evaluate("""[...document.querySelectorAll('.field')].map(f => {
        const kids = [...f.children].filter(c => c.getBoundingClientRect().height > 0);
        const inner = kids.reduce((sum, c) => sum + c.getBoundingClientRect().height, 0)
                    + parseFloat(getComputedStyle(f).rowGap || 0) * Math.max(kids.length - 1, 0);
        return [f.querySelector('input, select, textarea').id, f.getBoundingClientRect().height - inner];
    }).filter(([id, gap]) => gap > 4)""")
    assert gaps == []
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")


def test_cancel_shows_canceling_at_once_then_canceled(page, server):
    sign_in(page, server)
    # Long enough to still be running when Cancel is pressed: a tiny build's most frames (33) and 100 steps.
    fill_tiny_job(page, "a long job to cancel", steps=100, frames=33)
    page.click("#submit")
    page.wait_for_function("document.querySelector('#stage').textContent.startsWith('Denoising')")
    ref = page.evaluate("localStorage.getItem('t2v.current')")
    page.evaluate("""() => {
        window.cancelSeen = [];
        const note = () => window.cancelSeen.push([document.querySelector('#stage').textContent,
            document.querySelector('#cancel').disabled, document.querySelector('#cancel').hidden]);
        const watch = new MutationObserver(note);
        for (const id of ['#stage', '#cancel'])
            watch.observe(document.querySelector(id), {attributes: true, childList: true, subtree: true});
        document.querySelector('#cancel').click();  // in the same task, so the first change seen is the click's
    }""")
    # At once, before the server has answered: the button is disabled and says so.
    assert page.evaluate("window.cancelSeen[0]") == ["Canceling...", True, False]
    current_status_is(page, "canceled")
    assert page.text_content("#stage") == "Canceled" and page.is_hidden("#cancel")
    seen = page.evaluate("window.cancelSeen")
    pending = seen[:next(i for i, s in enumerate(seen) if s[0] == "Canceled")]
    assert all(s == ["Canceling...", True, False] for s in pending), seen  # never re-enabled while pending
    page.wait_for_selector(f"#history li[data-id='{ref}'][data-status='canceled']")
    assert "canceled" in page.text_content(f"#history li[data-id='{ref}'] .status")
    assert api_job(server, ref)["status"] == "canceled"


def test_upload_a_clip_to_upscale(page, server, tmp_path):
    clip = make_clip(tmp_path / "clip.mp4", frames=6, width=32, height=32)
    sign_in(page, server)
    page.set_input_files("#clip", str(clip))
    page.select_option("#clip-outscale", "2")
    page.click("#upload")
    current_status_is(page, "completed")
    page.wait_for_function("document.querySelector('#player').videoWidth > 0")
    assert page.evaluate("[document.querySelector('#player').videoWidth,"
                         " document.querySelector('#player').videoHeight]") == [64, 64]
    assert page.text_content("#current-prompt") == "clip.mp4"
    item = "#history li[data-status='completed']"
    page.wait_for_selector(item)
    assert "clip 32x32, 6 frames at 24 fps, upscaled 2x" in page.text_content(item)
    assert page.query_selector(f"{item} .rerun") is None  # the clip is not kept, so there is nothing to re-run


def test_rerun_with_the_same_seed_gives_the_same_video_and_delete_removes_it(page, server):
    sign_in(page, server)
    fill_tiny_job(page, "a paper boat on a rainy street")  # seed blank: the server picks one
    page.click("#submit")
    current_status_is(page, "completed")
    first = page.evaluate("localStorage.getItem('t2v.current')")
    page.click(f"#history li[data-id='{first}'] .rerun")
    page.wait_for_function("id => localStorage.getItem('t2v.current') !== id", arg=first)
    second = page.evaluate("localStorage.getItem('t2v.current')")
    current_status_is(page, "completed")

    a, b = api_job(server, first), api_job(server, second)
    assert a["params"] == b["params"]  # the seed the server picked the first time included
    posters = [np.asarray(Image.open(io.BytesIO(requests.get(server + j["poster_url"], timeout=30).content)))
               for j in (a, b)]
    assert posters[0].shape == (64, 64, 3) and posters[0].std() > 1  # a real picture, not a blank
    assert np.array_equal(posters[0], posters[1])  # the same first frame
    assert a["result"]["sha256"] == b["result"]["sha256"]

    # Delete the first: gone from the page, the API and the server's disk; the second stays.
    page.click(f"#history li[data-id='{first}'] .delete")
    page.wait_for_selector(f"#history li[data-id='{first}']", state="detached")
    assert requests.get(f"{server}/jobs/{first}", headers=AUTH, timeout=30).status_code == 404
    assert requests.get(server + a["poster_url"], timeout=30).status_code == 404
    assert page.query_selector(f"#history li[data-id='{second}']") is not None
    # Deleting the job being watched closes its view, and a reload does not bring it back.
    page.click(f"#history li[data-id='{second}'] .delete")
    page.wait_for_selector("#current", state="hidden")
    page.reload()
    page.wait_for_selector("#history-section")
    assert page.evaluate("localStorage.getItem('t2v.current')") is None and page.is_hidden("#current")


def drop_file(page, selector, name, data: bytes, mime):
    """Drop a file on an element, as one dragged from the desktop arrives: dragenter, dragover, then drop."""
    page.evaluate("""([selector, name, b64, mime]) => {
        const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
        const data = new DataTransfer();
        data.items.add(new File([bytes], name, {type: mime}));
        const zone = document.querySelector(selector);
        for (const type of ['dragenter', 'dragover', 'drop'])
            zone.dispatchEvent(new DragEvent(type, {dataTransfer: data, bubbles: true, cancelable: true}));
    }""", [selector, name, base64.b64encode(data).decode(), mime])


def test_pick_an_image_model_and_drop_an_image(page, served, tmp_path):
    server, _ = served
    sign_in(page, server)
    catalog = requests.get(f"{server}/models", headers=AUTH, timeout=30).json()
    by_id = {m["id"]: m for m in catalog["models"]}
    # The picker offers the installed models (a tiny server: every registry id), the default model chosen.
    offered = page.eval_on_selector_all("#model option", "els => els.map(e => e.value)")
    assert offered == [m["id"] for m in catalog["models"] if m["installed"]] and len(offered) == len(MODELS)
    assert page.input_value("#model") == catalog["default"] == "hunyuanvideo"
    assert page.is_hidden("#image-field")  # a text-only model takes no image

    # An image-only model: the image field appears, and the form sends nothing without an image.
    page.select_option("#model", "hunyuanvideo-1.5-480p-i2v-distilled")
    assert page.is_visible("#image-field") and page.text_content("#image-hint") == "(required)"
    assert page.is_disabled("#size")  # its image's shape sets the size
    page.fill("#prompt", "a red fox")
    page.click("#submit")
    assert page.text_content("#form-error") == ("hunyuanvideo-1.5-480p-i2v-distilled makes video from an image: "
                                                "choose or drop one first.")
    assert page.evaluate("localStorage.getItem('t2v.current')") is None  # no job was sent

    # Wan TI2V (text or image): the form takes that model's own limits and defaults from /models.
    wan = by_id["wan2.2-ti2v-5b"]
    page.select_option("#model", wan["id"])
    assert page.text_content("#image-hint").startswith("(optional")
    assert page.eval_on_selector_all("#size option", "els => els.map(e => e.textContent)") == ["tiny 1:1 (64x64)"]
    values = page.evaluate("['#frames', '#steps', '#fps', '#guidance'].map(s => document.querySelector(s).value)")
    defaults = wan["defaults"]
    assert values == [str(defaults[k]) for k in ("num_frames", "num_inference_steps", "fps")] + ["5"]
    assert values == ["9", "4", "24", "5"]  # a tiny build's frames and steps; Wan TI2V's fps and guidance
    assert page.get_attribute("#frames", "max") == str(wan["limits"]["max_frames"])

    # A file that is not an image is named at once; a dropped PNG is taken and shown.
    page.set_input_files("#image", files=[{"name": "notes.txt", "mimeType": "text/plain", "buffer": b"hello"}])
    assert page.text_content("#form-error") == "notes.txt is not a PNG, JPEG or WebP image."
    buf = io.BytesIO()
    Image.new("RGB", (96, 64), (200, 60, 20)).save(buf, "PNG")
    drop_file(page, "#image-drop", "fox.png", buf.getvalue(), "image/png")
    page.wait_for_selector("#image-preview:not([hidden])")
    assert page.evaluate("document.querySelector('#image').files[0].name") == "fox.png"
    assert page.text_content("#form-error") == ""
    page.fill("#seed", "7")
    page.set_checked("#upscale", False)
    page.click("#submit")
    current_status_is(page, "completed")

    ref = page.evaluate("localStorage.getItem('t2v.current')")
    job = api_job(server, ref)
    assert job["params"]["model"] == "wan2.2-ti2v-5b" and job["params"]["image_key"] == f"inputs/{ref}"
    assert (job["params"]["seed"], job["params"]["guidance_scale"]) == (7, 5.0)
    path = tmp_path / "i2v.mp4"
    path.write_bytes(requests.get(server + job["video_url"], timeout=30).content)
    frames = np.stack(list(read_frames(path)))
    assert frames.shape == (9, 64, 64, 3) and frames.std() > 1  # the tiny defaults: 9 frames of 64x64

    # History names the model and the image; an image job has no Re-run (its image is not kept).
    item = f"#history li[data-id='{ref}']"
    page.wait_for_selector(f"{item}[data-status='completed']")
    assert "wan2.2-ti2v-5b from an image, 64x64, 9 frames at 24 fps, 4 steps, guidance 5, seed 7" in \
        page.text_content(item)
    assert page.query_selector(f"{item} .rerun") is None

    # A reload keeps the chosen model; a text-only model hides the image field again.
    page.reload()
    page.wait_for_function("document.querySelector('#model').value === 'wan2.2-ti2v-5b'")
    assert page.is_visible("#image-field")
    page.select_option("#model", "hunyuanvideo-1.5-480p")
    assert page.is_hidden("#image-field")


def test_reload_keeps_the_form_and_follows_the_job_and_the_queue(open_page, tmp_path, data_dir, tiny_model,
                                                                 tiny_upscalers):
    # No worker at first, so the jobs wait in the queue for as long as the test needs.
    proc, base, env = start_server(tmp_path, data_dir, T2V_WORKER="off")
    worker = None
    try:
        page = open_page()
        sign_in(page, base)
        page.click(".examples .chip >> nth=1")  # an example prompt fills the prompt
        example = page.input_value("#prompt")
        assert example.startswith("Waves")
        fill_tiny_job(page, example, seed=7)
        page.fill("#fps", "12")
        page.fill("#guidance", "4.5")
        page.click("#submit")
        current_status_is(page, "queued")
        first = page.evaluate("localStorage.getItem('t2v.current')")
        page.click("#submit")
        page.wait_for_function("id => localStorage.getItem('t2v.current') !== id", arg=first)
        second = page.evaluate("localStorage.getItem('t2v.current')")
        # No worker has reported yet, and the page passes on what the server says about that.
        page.wait_for_function("document.querySelector('#stage').textContent === 'Queued, position 2: 1 ahead "
                               "(1 of them yours). Waiting for a worker: none has reported in the last 30 s'")
        page.wait_for_function("document.querySelector('#queue-summary').textContent"
                               " === '2 jobs are waiting on this server. Yours: 0 running, 2 waiting.'")

        page.reload()
        page.wait_for_function("document.querySelector('#current').dataset.status === 'queued'")
        values = page.evaluate("""['#prompt', '#size', '#frames', '#steps', '#fps', '#guidance', '#seed']
            .map(s => document.querySelector(s).value)""")
        assert values == [example, "0", "9", "2", "12", "4.5", "7"]
        assert page.is_checked("#upscale") is False
        assert page.evaluate("localStorage.getItem('t2v.current')") == second
        page.wait_for_function("document.querySelector('#stage').textContent.startsWith("
                               "'Queued, position 2: 1 ahead (1 of them yours). Waiting for a worker')")
        assert [li.get_attribute("data-id") for li in page.query_selector_all("#queue li")] == [first, second]

        # A worker comes up (a standalone `python worker.py` on the same data folder); the page follows along.
        worker = subprocess.Popen([sys.executable, str(ROOT / "worker.py")], cwd=tmp_path, env=env,
                                  stdout=open(tmp_path / "worker.log", "wb"), stderr=subprocess.STDOUT)
        current_status_is(page, "completed")
        page.wait_for_function("document.querySelector('#player').videoWidth === 64")
        page.wait_for_function("document.querySelector('#queue-summary').textContent"
                               " === 'No job is waiting on this server. None of yours is waiting or running.'")
        assert api_job(base, second)["params"]["guidance_scale"] == 4.5
    finally:
        if worker is not None:
            stop(worker)
        stop(proc)


# ------------------------------------------------------------------ live progress and previews (issue 12)

STEP_S = 0.4  # each denoising step of the tiny model takes at least this long, so previews come one by one


@pytest.fixture
def slow_server(tmp_path, tiny_models):
    """The app under waitress in this process (keys on, sizes within 64 px, a preview after every step), its
    worker's tiny model slowed to STEP_S a step by a hook on the transformer, as test_cancel slows blocks."""
    import threading
    import time

    import waitress

    from app import create_app
    from config import Settings
    from storage.blobs import LocalBlobStore
    from storage.sqlite import SqliteJobStore
    from worker.loop import Worker

    settings = Settings.from_env(env={}, model="tiny", upscaler="tiny", data_dir=tmp_path, worker="off",
                                 api_keys=(KEY,), max_side=128, preview_every=1)
    jobs, blobs = SqliteJobStore(tmp_path / "jobs.sqlite3"), LocalBlobStore(tmp_path / "blobs")
    hook = tiny_models.generator.pipe.transformer.register_forward_hook(lambda *_: time.sleep(STEP_S))
    worker = Worker(settings, jobs, blobs, models=tiny_models, poll_s=0.05).start()
    server = waitress.create_server(create_app(settings, jobs=jobs, blobs=blobs, worker=worker), host="127.0.0.1",
                                    port=0, threads=8)
    threading.Thread(target=server.run, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.effective_port}"
    finally:
        server.close()
        server.task_dispatcher.shutdown()
        worker.stop(timeout=120)
        hook.remove()


def test_the_page_follows_a_job_on_its_event_stream_and_shows_each_preview(page, slow_server):
    sent = []
    page.on("request", lambda r: sent.append((r.method, r.url.removeprefix(slow_server).split("?")[0])))
    sign_in(page, slow_server)
    # Every preview the page shows: its pixels (drawn to a canvas) and the job's status at that moment.
    page.evaluate("""() => {
        window.previewsSeen = [];
        const img = document.querySelector('#live-preview');
        img.addEventListener('load', () => {
            const canvas = document.createElement('canvas');
            [canvas.width, canvas.height] = [img.naturalWidth, img.naturalHeight];
            const context = canvas.getContext('2d');
            context.drawImage(img, 0, 0);
            window.previewsSeen.push({status: document.querySelector('#current').dataset.status,
                                      size: [img.naturalWidth, img.naturalHeight], shown: !img.hidden,
                                      pixels: context.getImageData(0, 0, canvas.width, canvas.height).data.join()});
        });
    }""")
    record_progress(page)
    fill_tiny_job(page, "a red fox runs through fresh snow", steps=12)
    page.click("#submit")
    current_status_is(page, "completed")
    ref = page.evaluate("localStorage.getItem('t2v.current')")

    seen = page.evaluate("window.previewsSeen")
    assert all(p["status"] == "processing" and p["shown"] and p["size"] == [8, 8] for p in seen), seen
    assert len({p["pixels"] for p in seen}) >= 3, "the preview changes as the job denoises"
    # "completed" is shown as the player is given the video; its size is known once its metadata has loaded
    page.wait_for_function("document.querySelector('#player').readyState >= 1")
    assert page.is_hidden("#live-preview") and page.evaluate("document.querySelector('#player').videoWidth") == 64
    progress = page.evaluate("window.progressSeen")
    assert any(0 < v < 100 for v in progress) and progress == sorted(progress) and progress[-1] == 100

    # Progress came from the event stream: one GET of the job, one stream, and no polling.
    assert sent.count(("GET", f"/jobs/{ref}/events")) == 1
    assert sent.count(("GET", f"/jobs/{ref}")) == 1
    assert not any(url == "/get_status" for _, url in sent)


def test_a_portrait_preview_keeps_progress_and_cancel_in_view_and_generate_scrolls_to_the_job(open_page, slow_server):
    page = open_page({"width": 1280, "height": 900})
    sign_in(page, slow_server)
    fill_tiny_job(page, "a tall lighthouse in the fog", steps=30)
    page.select_option("#size", label="tiny 1:2 (64x128)")
    page.click("#submit")
    page.wait_for_function("(() => { const img = document.querySelector('#live-preview');"
                           " return !img.hidden && img.complete && img.naturalWidth > 0; })()")
    assert page.evaluate("[document.querySelector('#live-preview').naturalWidth,"
                         " document.querySelector('#live-preview').naturalHeight]") == [8, 16]  # portrait
    preview, cancel = page.locator("#live-preview").bounding_box(), page.locator("#cancel").bounding_box()
    assert preview["height"] <= 0.45 * 900 + 1, preview
    assert 0 <= cancel["y"] and cancel["y"] + cancel["height"] <= 900, cancel  # scrolled to, and not pushed off
    assert 0 <= page.locator("#progress").bounding_box()["y"] <= 900
    page.click("#cancel")
    current_status_is(page, "canceled")


def test_a_server_without_weights_shows_what_health_says_instead_of_breaking(page, tmp_path, data_dir):
    """`python app.py` before download.py: no Model or Size to offer. The page says what /health says (how to
    download, or T2V_MODEL=tiny to try it), Generate is off, and nothing raw is thrown."""
    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    proc, base, _ = start_server(tmp_path, data_dir, ready=lambda h: "MissingWeightsError" in (h["model_error"] or ""),
                                 T2V_MODEL="models/HunyuanVideo", T2V_UPSCALER="models/RealESRGAN_x4plus.pth",
                                 T2V_MODELS_DIR="models")
    try:
        sign_in(page, base)
        page.wait_for_selector("#server-notice:not([hidden])")
        notice = page.text_content("#server-notice")
        assert notice.startswith("This server cannot make videos yet: MissingWeightsError: model folder")
        assert "python download.py" in notice and "T2V_MODEL=tiny" in notice
        assert page.is_disabled("#submit") and page.is_disabled("#upload") and page.is_disabled("#upscale")
        assert page.eval_on_selector_all("#model option", "els => els.length") == 0
        page.fill("#prompt", "a red fox")
        page.evaluate("document.querySelector('#job-form').requestSubmit()")  # Enter in a field submits too
        assert page.text_content("#form-error") == notice
        assert errors == [] and "destructure" not in page.content()
    finally:
        stop(proc)


def test_pick_a_lora_with_a_scale_see_it_in_history_and_keep_it_on_rerun(page, server):
    sign_in(page, server)
    page.wait_for_selector("#lora-field:not([hidden])")
    assert page.eval_on_selector_all("#loras .lora", "rows => rows.map(r => r.dataset.name)") == ["style"]
    page.check("#lora-0")
    page.fill("#lora-scale-0", "0.5")
    fill_tiny_job(page, "a fox in the style", seed=11)
    page.click("#submit")
    current_status_is(page, "completed")
    first = page.evaluate("localStorage.getItem('t2v.current')")
    assert api_job(server, first)["params"]["loras"] == [{"name": "style", "scale": 0.5}]
    item = page.locator(f"#history li[data-id='{first}']")
    item.wait_for()
    assert "LoRA style at 0.5" in item.text_content()

    item.locator("button.rerun").click()
    page.wait_for_function("first => localStorage.getItem('t2v.current') !== first", arg=first)
    again = page.evaluate("localStorage.getItem('t2v.current')")
    assert api_job(server, again)["params"]["loras"] == [{"name": "style", "scale": 0.5}]
    current_status_is(page, "completed")

    page.select_option("#model", "hunyuanvideo-1.5-480p")  # no LoRA loader in diffusers for it: none offered
    assert page.is_hidden("#lora-field")
