"""/v1/videos, OpenAI's Videos API shape over the same jobs: create (JSON or multipart), retrieve, content
variants, list with a cursor, delete; seconds and size mapped onto each model's rules. The `openai` SDK itself
drives a served app in test_openai_client.py."""

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import TINY_JOB, make_clip, wait_for
from pipeline.video import probe, read_frames
from storage.jobs import new_job
from test_models_api import data_uri, picture

WAIT_S = 300  # a loaded machine can be slow; nothing here is timed
TINY_VIDEO = {"prompt": "a red fox", "size": "64x64", "seconds": "0.375"}  # 9 frames at 24 fps


def create(client, body=None, **headers):
    r = client.post("/v1/videos", json={**TINY_VIDEO, **(body or {})}, headers=headers)
    assert r.status_code == 200, r.json
    return r.json


def finished(client, video_id, **headers):
    return wait_for(lambda: (v := client.get(f"/v1/videos/{video_id}", headers=headers).json)["status"]
                    in ("completed", "failed") and v, timeout=WAIT_S)


def stored_files(svc) -> list[str]:
    root = Path(svc.settings.data_dir) / "blobs"
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_a_video_is_created_made_served_in_three_variants_and_deleted(make_app, tmp_path, monkeypatch):
    app, svc = make_app()
    client = app.test_client()
    video = create(client)
    assert video["object"] == "video" and video["status"] in ("queued", "in_progress")
    assert (video["model"], video["size"], video["seconds"], video["prompt"]) == ("hunyuanvideo", "64x64", "0.375",
                                                                                  "a red fox")
    assert isinstance(video["created_at"], int) and video["completed_at"] is None and video["error"] is None
    job = svc.jobs.get(video["id"])  # a job like any other: the same record, queue and owner
    assert job["kind"] == "generate" and job["params"]["num_frames"] == 9 and job["params"]["upscale"] is False

    done = finished(client, video["id"])
    assert done["status"] == "completed" and done["progress"] == 100, done
    assert done["completed_at"] >= done["created_at"] and done["size"] == "64x64" and done["seconds"] == "0.375"

    mp4 = client.get(f"/v1/videos/{video['id']}/content")
    assert mp4.status_code == 200 and mp4.mimetype == "video/mp4"
    (tmp_path / "got.mp4").write_bytes(mp4.data)
    got = probe(tmp_path / "got.mp4")
    assert (got["width"], got["height"], got["frames"]) == (64, 64, 9)
    assert mp4.data == client.get(f"/v1/videos/{video['id']}/content?variant=video").data

    thumb = client.get(f"/v1/videos/{video['id']}/content?variant=thumbnail")
    assert thumb.status_code == 200 and thumb.mimetype == "image/jpeg"
    assert Image.open(io.BytesIO(thumb.data)).size == (64, 64)

    sheet = client.get(f"/v1/videos/{video['id']}/content?variant=spritesheet")
    assert sheet.status_code == 200 and sheet.mimetype == "image/jpeg"
    grid = np.asarray(Image.open(io.BytesIO(sheet.data)).convert("RGB"), dtype=np.float64)
    assert grid.shape == (192, 192, 3)  # 9 frames of 64x64, three to a row
    frames = list(read_frames(tmp_path / "got.mp4"))
    for i, frame in enumerate(frames):  # each tile is its frame, in reading order
        tile = grid[(i // 3) * 64:(i // 3 + 1) * 64, (i % 3) * 64:(i % 3 + 1) * 64]
        assert np.abs(tile - frame).mean() < 12, i
    assert f"spritesheets/{video['id']}.jpg" in stored_files(svc)

    monkeypatch.setattr("api.service.write_spritesheet", lambda *a, **k: pytest.fail("made twice"))
    again = client.get(f"/v1/videos/{video['id']}/content?variant=spritesheet")
    assert again.status_code == 200 and again.data == sheet.data  # the stored one

    gone = client.delete(f"/v1/videos/{video['id']}")
    assert gone.status_code == 200 and gone.json == {"id": video["id"], "object": "video.deleted", "deleted": True}
    assert stored_files(svc) == [] and svc.jobs.get(video["id"]) is None
    for url in (f"/v1/videos/{video['id']}", f"/v1/videos/{video['id']}/content", f"/jobs/{video['id']}"):
        r = client.get(url)
        assert r.status_code == 404 and r.json["error"]["code"] == "not_found"


def test_content_before_completion_is_409_and_a_bad_variant_400(make_app):
    app, _ = make_app(worker=False)
    client = app.test_client()
    video = create(client)
    r = client.get(f"/v1/videos/{video['id']}/content?variant=spritesheet")
    assert r.status_code == 409 and r.json["error"]["code"] == "not_ready"
    r = client.get(f"/v1/videos/{video['id']}/content?variant=gif")
    assert r.status_code == 400 and "video, thumbnail, spritesheet" in r.json["error"]["message"]


@pytest.mark.parametrize("model, seconds, frames, shown", [
    ("hunyuanvideo", "0.375", 9, "0.375"),  # 24 fps: 9 frames exactly
    ("hunyuanvideo", "0.3", 9, "0.375"),  # 7.2 frames: 9 is the nearest 4k+1
    ("hunyuanvideo", 1, 25, "1.042"),  # a JSON number: 24 frames, and 25 is the nearest 4k+1
    ("hunyuanvideo", "0.01", 1, "0.042"),  # under a frame: one frame
    ("wan2.1-t2v-1.3b", "1", 17, "1.062"),  # 16 fps: 16 frames, 17 is nearest
    ("wan2.1-t2v-1.3b", "2.0", 33, "2.062"),
])
def test_seconds_become_the_nearest_frame_count_the_model_allows(make_app, model, seconds, frames, shown):
    app, svc = make_app(worker=False)
    video = create(app.test_client(), {"model": model, "seconds": seconds, "size": "64x64"})
    assert svc.jobs.get(video["id"])["params"]["num_frames"] == frames
    assert video["seconds"] == shown and video["model"] == model


def test_absent_seconds_size_and_model_are_the_servers_defaults(make_app):
    app, svc = make_app(worker=False)  # T2V_MODEL=tiny: the tiny HunyuanVideo, 64x64 and 9 frames by default
    r = app.test_client().post("/v1/videos", json={"prompt": "a red fox"})
    assert r.status_code == 200, r.json
    params = svc.jobs.get(r.json["id"])["params"]
    assert (params["model"], params["width"], params["height"], params["num_frames"]) == ("hunyuanvideo", 64, 64, 9)
    assert r.json["size"] == "64x64" and r.json["seconds"] == "0.375"


@pytest.mark.parametrize("body, code, message", [
    ({"seconds": "2"}, "invalid_parameter",
     "hunyuanvideo: seconds 2 is 49 frames at 24 fps; it takes at most 33 frames (1.38 s) here"),
    ({"seconds": "abc"}, "invalid_parameter", "seconds: must be a positive number of seconds"),
    ({"seconds": "0"}, "invalid_parameter", "seconds: must be a positive number of seconds"),
    ({"seconds": True}, "invalid_parameter", "seconds: must be a positive number of seconds"),
    ({"seconds": -1}, "invalid_parameter", "seconds: must be a positive number of seconds"),
    ({"size": "64by64"}, "invalid_parameter", "size: must be WIDTHxHEIGHT"),
    ({"size": "65x64"}, "invalid_parameter", "size (width): must be a multiple of 16, got 65"),
    ({"size": "64x4096", "model": "hunyuanvideo"}, "invalid_parameter", "hunyuanvideo: size (height) must be between"),
    ({"model": "sora-2"}, "invalid_parameter", "model: unknown model 'sora-2'; known: hunyuanvideo"),
    ({"model": "sora-2", "seconds": "4"}, "invalid_parameter", "model: unknown model 'sora-2'"),
    ({"prompt": " "}, "invalid_parameter", "prompt: must not be blank"),
    ({"prompt": None}, "invalid_parameter", "prompt: must be a string"),
    ({"upscale": True}, "invalid_parameter", "upscale: is not a known parameter"),
    ({"model": "hunyuanvideo-i2v"}, "invalid_parameter",
     "hunyuanvideo-i2v: input_reference is required: this model makes video from an image"),
    ({"input_reference": data_uri(picture())}, "invalid_parameter",
     "hunyuanvideo: input_reference is not taken: this model makes video from text only"),
    ({"input_reference": "https://example.com/a.png", "model": "wan2.2-ti2v-5b"}, "invalid_image",
     "input_reference: must be a data: URI"),
    ({"input_reference": {"image_url": "https://example.com/a.png"}, "model": "wan2.2-ti2v-5b"}, "invalid_image",
     "this server fetches no URL"),
    ({"input_reference": {"file_id": "file-123"}, "model": "wan2.2-ti2v-5b"}, "invalid_image",
     "input_reference: file_id is not supported"),
    ({"input_reference": None, "model": "wan2.2-ti2v-5b"}, "invalid_image", "input_reference: must be a data: URI"),
    ({"input_reference": data_uri(b"not an image"), "model": "wan2.2-ti2v-5b"}, "invalid_image",
     "input_reference: is not a decodable PNG, JPEG or WebP image"),
])
def test_a_bad_create_is_a_400_that_names_the_field(make_app, body, code, message):
    app, svc = make_app(worker=False)
    r = app.test_client().post("/v1/videos", json={**TINY_VIDEO, **body})
    assert r.status_code == 400 and r.json["error"]["code"] == code, r.json
    assert message in r.json["error"]["message"], r.json
    inputs = Path(svc.settings.data_dir) / "blobs" / "inputs"
    assert svc.jobs.count_queued() == 0 and (not inputs.exists() or not list(inputs.iterdir()))


def test_multipart_create_as_the_sdk_sends_it_with_an_image_file(make_app):
    app, svc = make_app(worker=False)
    client = app.test_client()
    form = {"prompt": "a red fox", "model": "hunyuanvideo-i2v", "size": "64x64", "seconds": "0.375",
            "input_reference": (io.BytesIO(picture(size=(64, 64))), "first.png", "image/png")}
    r = client.post("/v1/videos", data=form, content_type="multipart/form-data")
    assert r.status_code == 200, r.json
    job = svc.jobs.get(r.json["id"])
    assert job["params"]["model"] == "hunyuanvideo-i2v" and job["params"]["image_key"] == f"inputs/{r.json['id']}"
    assert (Path(svc.settings.data_dir) / "blobs" / job["params"]["image_key"]).read_bytes() == picture(size=(64, 64))

    # A form may carry the image as a data: URI in a text field; JSON also as {"image_url": <data: URI>}.
    form = {"prompt": "a red fox", "model": "hunyuanvideo-i2v", "size": "64x64", "seconds": "0.375",
            "input_reference": data_uri(picture(size=(64, 64)))}
    r = client.post("/v1/videos", data=form, content_type="multipart/form-data")
    assert r.status_code == 200 and svc.jobs.get(r.json["id"])["params"]["image_key"], r.json
    r = client.post("/v1/videos", json={**form, "input_reference": {"image_url": form["input_reference"]}})
    assert r.status_code == 200 and svc.jobs.get(r.json["id"])["params"]["image_key"], r.json

    form["input_reference"] = [form["input_reference"], (io.BytesIO(picture()), "twice.png")]  # text and file
    r = client.post("/v1/videos", data=form, content_type="multipart/form-data")
    assert r.status_code == 400 and "input_reference: is given more than once" in r.json["error"]["message"]
    r = client.post("/v1/videos", data={**TINY_VIDEO, "video": (io.BytesIO(b"x"), "a.mp4")},
                    content_type="multipart/form-data")
    assert r.status_code == 400 and "video: is not a known file field" in r.json["error"]["message"]
    r = client.post("/v1/videos", data="prompt=a", content_type="text/plain")
    assert r.status_code == 415


def test_a_canceled_job_is_failed_with_code_canceled(make_app):
    app, _ = make_app(worker=False)
    client = app.test_client()
    video = create(client)
    assert client.post(f"/jobs/{video['id']}/cancel").json["status"] == "canceled"
    got = client.get(f"/v1/videos/{video['id']}").json
    assert got["status"] == "failed" and got["error"]["code"] == "canceled" and isinstance(got["completed_at"], int)


def test_list_pages_the_callers_videos_newest_first(make_app, tmp_path):
    app, svc = make_app(worker=False, api_keys=("key-a", "key-b"))
    client = app.test_client()
    a, b = {"Authorization": "Bearer key-a"}, {"Authorization": "Bearer key-b"}
    mine = [create(client, **a)["id"] for _ in range(5)]
    theirs = create(client, **b)["id"]
    clip = make_clip(tmp_path / "in.mp4", frames=8, audio=None).read_bytes()
    upscale = client.post("/upscale_video", data={"video": (io.BytesIO(clip), "in.mp4")}, headers=a,
                          content_type="multipart/form-data").json["reference_id"]

    page = client.get("/v1/videos?limit=2", headers=a).json
    assert page["object"] == "list" and [v["id"] for v in page["data"]] == mine[::-1][:2]
    assert (page["first_id"], page["last_id"], page["has_more"]) == (mine[4], mine[3], True)
    page = client.get(f"/v1/videos?limit=2&after={page['last_id']}", headers=a).json
    assert [v["id"] for v in page["data"]] == [mine[2], mine[1]] and page["has_more"] is True
    page = client.get(f"/v1/videos?limit=2&after={page['last_id']}", headers=a).json
    assert [v["id"] for v in page["data"]] == [mine[0]] and page["has_more"] is False
    assert [v["id"] for v in client.get("/v1/videos", headers=a).json["data"]] == mine[::-1]  # an upload is no video
    assert [v["id"] for v in client.get("/v1/videos?order=asc&limit=3", headers=a).json["data"]] == mine[:3]
    empty = client.get(f"/v1/videos?after={mine[0]}", headers=a).json
    assert empty == {"object": "list", "data": [], "first_id": None, "last_id": None, "has_more": False}
    assert [v["id"] for v in client.get("/v1/videos", headers=b).json["data"]] == [theirs]

    for query in ("limit=0", "limit=101", "limit=x", "order=up", "after=a/b"):
        r = client.get(f"/v1/videos?{query}", headers=a)
        assert r.status_code == 400 and r.json["error"]["code"] in ("invalid_parameter", "invalid_id"), query
    r = client.get(f"/v1/videos?after={theirs}", headers=a)  # another caller's video is no cursor
    assert r.status_code == 404 and r.json["error"]["message"] == f"after: there is no video {theirs} for this caller"
    for url in (f"/v1/videos/{theirs}", f"/v1/videos/{upscale}", f"/v1/videos/{theirs}/content"):
        assert client.get(url, headers=a).status_code == 404, url
    assert client.delete(f"/v1/videos/{theirs}", headers=a).status_code == 404
    assert client.get("/v1/videos").status_code == 401 and svc.jobs.get(theirs) is not None


def test_delete_cancels_a_queued_video_and_frees_its_place(make_app):
    app, svc = make_app(worker=False)
    client = app.test_client()
    first, second = create(client)["id"], create(client)["id"]
    assert client.delete(f"/v1/videos/{first}").json["deleted"] is True
    assert svc.jobs.get(first) is None and svc.jobs.queue_position(svc.jobs.get(second)) == 1


def test_the_original_routes_see_a_v1_video_and_v1_sees_a_generate_job(make_app):
    app, svc = make_app(worker=False)
    client = app.test_client()
    ref = client.post("/generate_video", json=TINY_JOB).json["reference_id"]
    video = client.get(f"/v1/videos/{ref}").json
    assert (video["id"], video["status"], video["size"], video["seconds"]) == (ref, "queued", "64x64", "0.375")
    svc.jobs.create(new_job("upscale-job-1", "s", "local", "upscale", {}))
    assert [v["id"] for v in client.get("/v1/videos").json["data"]] == [ref]


def test_a_record_from_before_the_model_registry_shows_as_hunyuanvideo(make_app):
    app, svc = make_app(worker=False)
    svc.jobs.create(new_job("oldjob01", "s", "local", "generate",
                            {"prompt": "p", "width": 64, "height": 64, "num_frames": 9}))  # no model, no fps
    video = app.test_client().get("/v1/videos/oldjob01").json
    assert (video["model"], video["seconds"], video["size"]) == ("hunyuanvideo", "0.375", "64x64")


def test_an_upscale_job_is_no_video_on_any_v1_route(make_app, tmp_path):
    """One rule on every /v1 route: retrieve, content, delete, the list's `after` and the event stream."""
    app, svc = make_app(worker=False)
    client = app.test_client()
    video = create(client)["id"]
    clip = make_clip(tmp_path / "in.mp4", frames=8, audio=None).read_bytes()
    upscale = client.post("/upscale_video", data={"video": (io.BytesIO(clip), "in.mp4")},
                          content_type="multipart/form-data").json["reference_id"]
    for method, url in (("get", f"/v1/videos/{upscale}"), ("get", f"/v1/videos/{upscale}/content"),
                        ("get", f"/v1/videos?after={upscale}"), ("get", f"/v1/videos/{upscale}/events"),
                        ("delete", f"/v1/videos/{upscale}")):
        r = getattr(client, method)(url)
        assert r.status_code == 404 and r.json["error"]["code"] == "not_found", url
    assert svc.jobs.get(upscale) is not None and client.get(f"/jobs/{upscale}/events", buffered=False).status_code == 200
    assert client.get(f"/v1/videos?after={video}").json["data"] == []


def test_the_sdks_headers_poll_after_while_unfinished_and_no_retry_on_a_final_4xx(make_app):
    app, svc = make_app(worker=False)
    client = app.test_client()
    r = client.post("/v1/videos", json=TINY_VIDEO)
    assert r.headers["openai-poll-after-ms"] == "1000"  # no estimate yet: the SDK's own default, at least
    video = r.json
    assert video["events_url"] == f"/v1/videos/{video['id']}/events"
    svc.jobs.claim("w1", 30)
    svc.jobs.update_progress(video["id"], "w1", progress=0.5, eta_s=30.0)
    assert client.get(f"/v1/videos/{video['id']}").headers["openai-poll-after-ms"] == "6000"  # a fifth of the ETA
    svc.jobs.update_progress(video["id"], "w1", eta_s=3600.0)
    assert client.get(f"/v1/videos/{video['id']}").headers["openai-poll-after-ms"] == "10000"
    svc.jobs.fail(video["id"], "w1", "generation_error", "no luck")
    assert "openai-poll-after-ms" not in client.get(f"/v1/videos/{video['id']}").headers

    queued = create(client)["id"]
    for r in (client.get(f"/v1/videos/{queued}/content"), client.post("/v1/videos", json={"prompt": 3}),
              client.get("/v1/videos/nope1234"), client.get("/v1/nowhere")):
        assert 400 <= r.status_code < 500 and r.headers["x-should-retry"] == "false", r.status_code
    assert "x-should-retry" not in client.get(f"/v1/videos/{queued}").headers


def test_the_openai_sdk_can_delete_while_it_pages(make_app):
    """`for v in client.videos.list(limit=2): client.videos.delete(v.id)`: the SDK asks for the page after an id
    it has just deleted, and the listing goes on from where that video was."""
    import httpx2
    import openai

    app, svc = make_app(worker=False, api_keys=("key-a",))
    web = app.test_client()
    made = [create(web, Authorization="Bearer key-a")["id"] for _ in range(5)]
    client = openai.OpenAI(base_url="http://localhost/v1", api_key="key-a", max_retries=0,
                           http_client=httpx2.Client(transport=httpx2.WSGITransport(app=app)))
    deleted = []
    for video in client.videos.list(limit=2):
        client.videos.delete(video.id)
        deleted.append(video.id)
    assert deleted == made[::-1], "every video, newest first, each once"
    assert web.get("/v1/videos", headers={"Authorization": "Bearer key-a"}).json["data"] == []
