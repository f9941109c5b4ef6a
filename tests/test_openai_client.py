"""The real `openai` SDK (its `client.videos` resource) against `python app.py` serving the tiny models with
keys on: create, retrieve until completed, download the video and the thumbnail, list, delete; and an
image-to-video create with `input_reference`."""

import io
import json
import shlex
import subprocess
import sys

import openai
import pytest
from PIL import Image

from conftest import ROOT, wait_for
from pipeline.video import probe
from test_models_api import data_uri, picture
from test_serving import _logs, serve, stop, wait_healthy

WAIT_S = 300  # a loaded machine can be slow; nothing here is timed


@pytest.fixture(scope="module")
def server(tmp_path_factory, data_dir, tiny_model, tiny_upscalers):
    tmp_path = tmp_path_factory.mktemp("openai")
    proc, base = serve([sys.executable, str(ROOT / "app.py")], tmp_path, data_dir, T2V_API_KEYS="k-one,k-two")
    try:
        wait_healthy(proc, base, tmp_path)
        yield base, tmp_path
    finally:
        stop(proc)
    assert "k-one" not in _logs(tmp_path) and "Traceback" not in _logs(tmp_path)


def sdk(base: str, key: str = "k-one") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=120)


def completed(client: openai.OpenAI, video_id: str):
    video = wait_for(lambda: (v := client.videos.retrieve(video_id)).status in ("completed", "failed") and v,
                     timeout=WAIT_S, every=0.3)
    assert video.status == "completed", video.error
    return video


def test_the_openai_sdk_creates_retrieves_downloads_lists_and_deletes(server, tmp_path):
    base, _ = server
    client = sdk(base)
    video = client.videos.create(prompt="a red fox in the snow", size="64x64", seconds="0.375")
    assert video.object == "video" and video.status in ("queued", "in_progress")
    assert (video.model, video.size, video.seconds) == ("hunyuanvideo", "64x64", "0.375")

    done = completed(client, video.id)
    assert done.progress == 100 and done.completed_at >= done.created_at and done.error is None

    client.videos.download_content(video.id).write_to_file(tmp_path / "fox.mp4")
    got = probe(tmp_path / "fox.mp4")
    assert (got["width"], got["height"], got["frames"]) == (64, 64, 9)  # the size and 0.375 s at 24 fps
    thumbnail = client.videos.download_content(video.id, variant="thumbnail")
    assert Image.open(io.BytesIO(thumbnail.content)).size == (64, 64)
    sheet = client.videos.download_content(video.id, variant="spritesheet")
    assert Image.open(io.BytesIO(sheet.content)).size == (192, 192)

    second = client.videos.create(prompt="a second fox", size="64x64", seconds="0.375")
    page = client.videos.list(limit=1)
    assert [v.id for v in page.data] == [second.id] and page.has_more is True
    assert [v.id for v in client.videos.list(limit=1)] == [second.id, video.id]  # the SDK follows `after`
    assert [v.id for v in client.videos.list(order="asc")] == [video.id, second.id]
    assert list(sdk(base, "k-two").videos.list()) == []  # another key's videos are not its own
    with pytest.raises(openai.NotFoundError) as other:
        sdk(base, "k-two").videos.retrieve(video.id)
    assert other.value.code == "not_found"

    deleted = client.videos.delete(video.id)
    assert (deleted.id, deleted.object, deleted.deleted) == (video.id, "video.deleted", True)
    with pytest.raises(openai.NotFoundError):
        client.videos.retrieve(video.id)
    assert [v.id for v in client.videos.list()] == [second.id]
    client.videos.delete(second.id)  # queued or running: canceled first, then gone
    assert list(client.videos.list()) == []


def test_the_sdk_raises_the_servers_reason_for_a_refused_video(server):
    base, _ = server
    with pytest.raises(openai.BadRequestError) as refused:
        sdk(base).videos.create(prompt="a red fox", size="64x64", seconds="4")
    assert refused.value.code == "invalid_parameter"
    assert "hunyuanvideo: seconds 4 is 97 frames at 24 fps; it takes at most 33 frames" in refused.value.message
    with pytest.raises(openai.AuthenticationError):
        sdk(base, "wrong-key").videos.list()


def test_the_sdk_makes_an_image_to_video_with_input_reference(server, tmp_path):
    base, _ = server
    client = sdk(base)
    first = picture(size=(64, 64))
    video = client.videos.create(prompt="the fox runs", model="hunyuanvideo-i2v", size="64x64", seconds="0.375",
                                 input_reference=("first.png", first, "image/png"))
    assert video.model == "hunyuanvideo-i2v"
    completed(client, video.id)
    client.videos.download_content(video.id).write_to_file(tmp_path / "i2v.mp4")
    got = probe(tmp_path / "i2v.mp4")
    assert (got["width"], got["height"], got["frames"]) == (64, 64, 9)

    # openai 3.54.0 types `input_reference` as a file or {"image_url": ...}, but its create() refuses the dict
    # before sending anything (it sends multipart, which carries files only); test_v1.py sends it as JSON.
    with pytest.raises(RuntimeError, match="input_reference"):
        client.videos.create(prompt="the fox runs", model="hunyuanvideo-i2v", input_reference={"image_url": data_uri(first)})
    with pytest.raises(openai.BadRequestError) as text_only:
        client.videos.create(prompt="p", size="64x64", seconds="0.375", input_reference=("a.png", first, "image/png"))
    assert "hunyuanvideo: input_reference is not taken" in text_only.value.message
    client.videos.delete(video.id)


def readme_blocks(heading: str, language: str) -> list[str]:
    """The fenced `language` blocks of README.md's section under `heading`, as written there."""
    text = (ROOT / "README.md").read_text()
    section = text.split(f"\n{heading}\n", 1)[1].split("\n### ", 1)[0]
    return [block.split("\n```", 1)[0] for block in section.split(f"```{language}\n")[1:]]


def test_the_readmes_v1_snippets_run_as_written_on_the_tiny_server(server, tmp_path, monkeypatch):
    """The SDK snippet and the curl of "OpenAI-compatible /v1/videos", with only the address and key swapped."""
    base, _ = server
    (python,), (curl,) = readme_blocks("### OpenAI-compatible /v1/videos", "python"), \
        readme_blocks("### OpenAI-compatible /v1/videos", "bash")
    monkeypatch.chdir(tmp_path)
    swap = {"http://127.0.0.1:7866": base, "key1": "k-one"}
    for old, new in swap.items():
        python, curl = python.replace(old, new), curl.replace(old, new)
    exec(compile(python, "README.md", "exec"), {})  # creates, polls, downloads, lists and deletes
    assert probe(tmp_path / "fox.mp4")["frames"] == 25  # "1" s at 24 fps: 25 frames, 4k+1
    assert Image.open(tmp_path / "fox.jpg").size == (64, 64)

    Image.new("RGB", (64, 64), (200, 90, 30)).save(tmp_path / "fox.png")
    done = subprocess.run(shlex.split(curl.replace("\\\n", " ")), capture_output=True, text=True, timeout=120)
    video = json.loads(done.stdout)
    assert done.returncode == 0 and video["object"] == "video", done.stdout
    assert (video["model"], video["seconds"]) == ("wan2.2-ti2v-5b", "1.042")
    completed(sdk(base), video["id"])


def test_the_sdk_does_not_resend_a_409_that_a_retry_cannot_change(server):
    """openai's client resends a 409 by default; `x-should-retry: false` stops it: one request, one error."""
    base, log_dir = server
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="k-one", max_retries=2, timeout=120)
    video = client.videos.create(prompt="a red fox", size="64x64", seconds="1.3")
    with pytest.raises(openai.ConflictError) as refused:
        client.videos.download_content(video.id)  # queued or running: not ready
    assert refused.value.code == "not_ready"
    assert _logs(log_dir).count(f'"GET /v1/videos/{video.id}/content" 409') == 1
    client.videos.delete(video.id)
