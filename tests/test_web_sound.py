"""The web page with a model that makes sound (LTX-2, tiny build), in real headless Chromium: the Sound checkbox,
the player's video with its AAC track, the silent MP4 when Sound is unticked, and History saying which is which.

Skipped as tests/test_web.py is when no Chromium is installed (its fixtures and helpers are used here).
"""

import io

import av
import pytest

from pipeline import models as registry
from test_web import (PHONE, api_job, browser, current_status_is, fill_tiny_job, open_page, page, sign_in,
                      start_server, stop)

__all__ = ["browser", "open_page", "page"]  # fixtures, imported so that pytest finds them here

LTX = "ltx-2"
SILENT = "hunyuanvideo"


@pytest.fixture(scope="module")
def sound_server(tmp_path_factory, data_dir, tiny_model, tiny_upscalers):
    """`python app.py` serving every tiny build, the tiny LTX-2 built before it starts (its worker loads it)."""
    registry.tiny_model_dir(data_dir, LTX)
    proc, base, _ = start_server(tmp_path_factory.mktemp("web-sound"), data_dir)
    yield base
    stop(proc)


def player_streams(page):
    """The (type, codec) of each stream in the MP4 the page's player loads, fetched by the page itself."""
    data = page.evaluate("""async () => {
        const response = await fetch(document.querySelector('#player').currentSrc);
        return Array.from(new Uint8Array(await response.arrayBuffer()));
    }""")
    with av.open(io.BytesIO(bytes(data))) as container:
        return sorted((s.type, s.codec_context.name) for s in container.streams)


def decoded_audio_bytes(page):
    """Play the player's video through, muted (autoplay allows it), and return how many bytes of audio Chromium
    decoded from it (`webkitAudioDecodedByteCount`: 0 for a video with no audio track)."""
    return page.evaluate("""async () => {
        const video = document.querySelector('#player');
        video.muted = true;
        await video.play();
        await new Promise((done) => { if (video.ended) done(); else video.addEventListener('ended', done); });
        const bytes = video.webkitAudioDecodedByteCount;
        video.muted = false;
        return bytes;
    }""")


def wait_for_the_player(page, ref):
    """Until the player has loaded job `ref`'s video."""
    current_status_is(page, "completed")
    page.wait_for_function("ref => { const v = document.querySelector('#player');"
                           " return v.currentSrc.includes(`/jobs/${ref}/`) && v.readyState >= 2 && v.duration > 0; }",
                           arg=ref)


def test_ltx2_plays_with_sound_and_unticked_sound_makes_a_silent_mp4(page, sound_server):
    sign_in(page, sound_server)
    # A silent model offers no Sound; a model that makes sound offers it, ticked.
    assert page.input_value("#model") == SILENT and page.is_hidden("#audio-field")
    page.select_option("#model", LTX)
    assert page.is_visible("#audio-field") and page.is_checked("#audio")
    assert page.get_attribute("#frames", "step") == "8"  # LTX-2's frame rule, 8k+1

    fill_tiny_job(page, "a dog barks on a beach", frames=9, steps=2, seed=3)
    page.click("#submit")
    page.wait_for_function("localStorage.getItem('t2v.current') !== null")
    loud = page.evaluate("localStorage.getItem('t2v.current')")
    wait_for_the_player(page, loud)
    assert api_job(sound_server, loud)["params"]["audio"] is True
    assert player_streams(page) == [("audio", "aac"), ("video", "h264")]
    # The page's player is not muted (the test mutes it only to be let to autoplay).
    assert page.evaluate("(v => [v.muted, v.defaultMuted, v.volume])(document.querySelector('#player'))") \
        == [False, False, 1]
    assert decoded_audio_bytes(page) > 0  # Chromium found the AAC track and decoded it
    item = f"#history li[data-id='{loud}']"
    page.wait_for_selector(f"{item}[data-status='completed']")
    assert page.text_content(f"{item} .params").endswith(", seed 3, with sound (16 kHz stereo)")

    # Unticked, the job sends `audio: false` and its MP4 has no audio stream.
    page.set_checked("#audio", False)
    page.click("#submit")
    page.wait_for_function("id => localStorage.getItem('t2v.current') !== id", arg=loud)
    # The last job's video is stopped and dropped, not left playing (its sound too) in the hidden player.
    assert page.evaluate("(v => [v.paused, v.readyState])(document.querySelector('#player'))") == [True, 0]
    quiet = page.evaluate("localStorage.getItem('t2v.current')")
    wait_for_the_player(page, quiet)
    assert api_job(sound_server, quiet)["params"]["audio"] is False
    assert player_streams(page) == [("video", "h264")]
    assert decoded_audio_bytes(page) == 0
    item = f"#history li[data-id='{quiet}']"
    page.wait_for_selector(f"{item}[data-status='completed']")
    assert page.text_content(f"{item} .params").endswith(", seed 3, silent")

    # A re-run keeps Sound as the job had it.
    page.click(f"{item} .rerun")
    page.wait_for_function("id => localStorage.getItem('t2v.current') !== id", arg=quiet)
    again = page.evaluate("localStorage.getItem('t2v.current')")
    current_status_is(page, "completed")
    assert api_job(sound_server, again)["params"]["audio"] is False

    # A reload keeps Sound unticked; a silent model hides it and its jobs send no `audio`.
    page.reload()
    page.wait_for_function("document.querySelector('#model').value === 'ltx-2'")
    assert page.is_visible("#audio-field") and not page.is_checked("#audio")
    page.select_option("#model", SILENT)
    assert page.is_hidden("#audio-field")
    fill_tiny_job(page, "a quiet lake", seed=3)
    page.click("#submit")
    page.wait_for_function("id => localStorage.getItem('t2v.current') !== id", arg=again)
    current_status_is(page, "completed")
    assert api_job(sound_server, page.evaluate("localStorage.getItem('t2v.current')"))["params"]["audio"] is False


def test_sound_sits_beside_seed_on_a_phone(open_page, sound_server):
    page = open_page(PHONE)
    sign_in(page, sound_server)
    page.select_option("#model", LTX)
    seed, sound = page.locator("#seed").bounding_box(), page.locator("#audio-field").bounding_box()
    assert sound["x"] > seed["x"] + seed["width"] and sound["y"] < seed["y"] + seed["height"], (seed, sound)
    assert sound["x"] + sound["width"] <= PHONE["width"]
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")


def test_the_models_suggestion_is_shown_and_taken_with_one_click_then_rendered(page, sound_server):
    """LTX-2 offers a suggested prompt; one click makes it the prompt, and the job renders it and keeps the user's
    own. A model without an enhancer offers none, and a suggestion is no video in History."""
    sign_in(page, sound_server)
    assert page.is_hidden("#enhance-field")  # the default model has no enhancer
    page.select_option("#model", LTX)
    assert page.is_visible("#enhance-field") and page.is_hidden("#suggestion-box")
    fill_tiny_job(page, "a dog barks on a beach", frames=9, steps=1, seed=3)
    page.click("#enhance")
    page.wait_for_selector("#suggestion-box", state="visible", timeout=120_000)
    suggestion = page.input_value("#suggestion")
    assert suggestion.strip() and suggestion != "a dog barks on a beach"
    assert page.input_value("#prompt") == "a dog barks on a beach", "nothing changes until the user takes it"

    page.click("#use-suggestion")
    assert page.input_value("#prompt") == suggestion and page.is_hidden("#suggestion-box")
    page.click("#submit")
    page.wait_for_function("localStorage.getItem('t2v.current') !== null")
    ref = page.evaluate("localStorage.getItem('t2v.current')")
    current_status_is(page, "completed")
    params = api_job(sound_server, ref)["params"]
    assert (params["prompt"], params["original_prompt"]) == (suggestion, "a dog barks on a beach")
    page.wait_for_selector(f"#history li[data-id='{ref}']")
    assert page.locator("#history li").count() == 1, "the suggestion's job is not listed as a video"
