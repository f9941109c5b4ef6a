"""The REST API with the real worker and the tiny models: the original curl flow and everything around it."""

import io
import logging
import os
from pathlib import Path

import pytest

from conftest import TINY_JOB, wait_for
from pipeline.video import probe
from storage.jobs import StoreUnavailable, new_job
from storage.sqlite import SqliteJobStore


def submit(client, body=None, **headers):
    r = client.post("/generate_video", json={**TINY_JOB, **(body or {})}, headers=headers)
    assert r.status_code == 200, r.json
    return r.json


def status(client, sub, **headers):
    r = client.post("/get_status", json={"session_id": sub["session_id"], "reference_id": sub["reference_id"]},
                    headers=headers)
    assert r.status_code == 200, r.json
    return r.json


def wait_status(client, sub, wanted=("completed", "failed", "canceled"), **headers):
    return wait_for(lambda: (s := status(client, sub, **headers))["status"] in wanted and s)


def test_original_curl_flow_end_to_end(make_app, tmp_path):
    app, svc = make_app()
    client = app.test_client()
    sub = submit(client, {"seed": 11})
    assert set(sub) == {"session_id", "reference_id", "status", "queue_position"}
    assert sub["status"] == "queued" and sub["queue_position"] >= 0
    final = wait_status(client, sub)
    assert set(final) == {"reference_id", "status", "stage", "progress", "queue_position", "eta_s", "error"}
    assert final["status"] == "completed" and final["progress"] == 1.0 and final["error"] is None

    r = client.post(f"/download_video/{sub['reference_id']}", json={"session_id": sub["session_id"]})
    assert r.status_code == 200 and set(r.json) == {"s3_url"}
    url = r.json["s3_url"]
    assert url.startswith("http://localhost/jobs/")
    video = client.get(url.removeprefix("http://localhost"))
    assert video.status_code == 200 and video.mimetype == "video/mp4"
    (tmp_path / "got.mp4").write_bytes(video.data)
    info = probe(tmp_path / "got.mp4")
    assert (info["width"], info["height"], info["frames"]) == (256, 256, 9)
    record = svc.jobs.get(sub["reference_id"])
    assert record["result"]["size_bytes"] == len(video.data) and record["params"]["seed"] == 11

    hist = client.post("/history", json={"session_id": sub["session_id"]}).json
    assert hist["session_id"] == sub["session_id"]
    assert [h["reference_id"] for h in hist["history"]] == [sub["reference_id"]]
    assert hist["history"][0]["result"]["frames"] == 9 and "video_key" not in hist["history"][0]["result"]


def test_video_supports_range_requests_and_poster_is_served(make_app):
    app, _ = make_app()
    client = app.test_client()
    sub = submit(client)
    wait_status(client, sub)
    ref = sub["reference_id"]
    full = client.get(f"/jobs/{ref}/video").data
    part = client.get(f"/jobs/{ref}/video", headers={"Range": "bytes=100-299"})
    assert part.status_code == 206 and part.data == full[100:300]
    assert part.headers["Content-Range"] == f"bytes 100-299/{len(full)}"
    poster = client.get(f"/jobs/{ref}/poster")
    assert poster.status_code == 200 and poster.mimetype == "image/jpeg" and poster.data[:2] == b"\xff\xd8"
    job = client.get(f"/jobs/{ref}").json
    assert job["video_url"] == f"/jobs/{ref}/video" and job["result"]["width"] == 256


def test_cancel_a_queued_job(make_app):
    app, svc = make_app(worker=False)
    client = app.test_client()
    sub = submit(client)
    r = client.post(f"/jobs/{sub['reference_id']}/cancel")
    assert r.status_code == 200 and r.json["status"] == "canceled"
    assert status(client, sub)["status"] == "canceled"
    again = client.post(f"/jobs/{sub['reference_id']}/cancel")
    assert again.status_code == 409 and again.json["error"]["code"] == "already_finished"


def test_cancel_a_running_job(make_app):
    app, svc = make_app()
    client = app.test_client()
    sub = submit(client, {"num_inference_steps": 100, "width": 128, "height": 128, "num_frames": 17})
    wait_for(lambda: status(client, sub)["stage"].startswith("denoising"))
    assert client.post(f"/jobs/{sub['reference_id']}/cancel").json["cancel_requested"] is True
    final = wait_status(client, sub)
    assert final["status"] == "canceled"
    assert not list((Path(svc.settings.data_dir) / "work").glob("*.mp4"))
    nxt = submit(client)  # the worker carries on
    assert wait_status(client, nxt)["status"] == "completed"


def test_an_exception_fails_one_job_and_the_next_completes(make_app, tiny_models, monkeypatch):
    real = tiny_models.generator.generate
    calls = []

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected failure")
        return real(*a, **k)

    monkeypatch.setattr(tiny_models.generator, "generate", flaky)
    app, _ = make_app()
    client = app.test_client()
    first, second = submit(client), submit(client)
    failed = wait_status(client, first)
    assert failed["status"] == "failed"
    assert failed["error"] == {"code": "generation_error", "message": "RuntimeError: injected failure"}
    assert wait_status(client, second)["status"] == "completed"


def test_expired_lease_is_requeued_after_a_restart_and_finishes(make_app, tmp_path):
    jobs = SqliteJobStore(tmp_path / "data" / "jobs.sqlite3")
    jobs.create(new_job("orphaned-job-1", "sess", "local", "generate",
                        {**TINY_JOB, "negative_prompt": None, "fps": 24, "guidance_scale": 6.0, "seed": 1,
                         "upscale": False, "outscale": 4}))
    assert jobs.claim("worker-that-died", lease_s=-1)["status"] == "processing"
    app, _ = make_app(jobs=jobs)  # the restart
    client = app.test_client()
    final = wait_status(client, {"session_id": "sess", "reference_id": "orphaned-job-1"})
    assert final["status"] == "completed"
    assert jobs.get("orphaned-job-1")["attempts"] == 2


def test_keys_owner_isolation(make_app):
    app, _ = make_app(worker=False, api_keys=("key-one", "key-two"))
    client = app.test_client()
    assert client.post("/generate_video", json=TINY_JOB).status_code == 401
    assert client.post("/generate_video", json=TINY_JOB, headers={"X-API-Key": "wrong"}).status_code == 401
    sub = submit(client, Authorization="Bearer key-one")
    ref = sub["reference_id"]
    assert status(client, sub, **{"X-API-Key": "key-one"})["status"] == "queued"
    other = {"Authorization": "Bearer key-two"}
    for r in (client.get(f"/jobs/{ref}", headers=other),
              client.post("/get_status", json={"session_id": sub["session_id"], "reference_id": ref}, headers=other),
              client.post(f"/jobs/{ref}/cancel", headers=other),
              client.post(f"/download_video/{ref}", json={"session_id": sub["session_id"]}, headers=other)):
        assert r.status_code == 404 and r.json["error"]["code"] == "not_found"
    assert client.post("/history", json={"session_id": sub["session_id"]}, headers=other).json["history"] == []
    assert client.get(f"/jobs/{ref}").status_code == 401
    assert client.get("/health").status_code == 200
    assert client.get("/openapi.json").status_code == 401
    assert client.get("/openapi.json", headers=other).status_code == 200


HOSTILE_IDS = ["a;rm -rf /", "$(touch pwned)", "../../etc/passwd", "abc\x00def", "`id`", "a" * 129, ""]


@pytest.mark.parametrize("bad_id", HOSTILE_IDS)
def test_hostile_ids_get_4xx_json_and_touch_no_files(make_app, tmp_path, bad_id):
    app, _ = make_app(worker=False)
    client = app.test_client()
    before = set(os.listdir(tmp_path)), set(os.listdir("."))
    answers = [
        client.post("/generate_video", json={**TINY_JOB, "session_id": bad_id}),
        client.post("/get_status", json={"session_id": bad_id, "reference_id": bad_id}),
        client.post("/history", json={"session_id": bad_id}),
        client.post(f"/download_video/{bad_id}", json={"session_id": "s"}),
        client.get(f"/jobs/{bad_id}"),
        client.get(f"/jobs/{bad_id}/video"),
        client.post(f"/jobs/{bad_id}/cancel"),
    ]
    for r in answers:
        assert 400 <= r.status_code < 500, (r.status_code, r.data[:200])
        assert r.is_json and "code" in r.json["error"]
    assert (set(os.listdir(tmp_path)), set(os.listdir("."))) == before
    assert not Path("pwned").exists()


@pytest.mark.parametrize("kwargs, status_code, code", [
    ({"data": "not json", "content_type": "application/json"}, 400, "invalid_json"),
    ({"data": "prompt=fox", "content_type": "application/x-www-form-urlencoded"}, 415, "unsupported_media_type"),
    ({"json": ["a", "list"]}, 400, "invalid_json"),
    ({"json": {}}, 400, "invalid_parameter"),
    ({"json": {"prompt": 42}}, 400, "invalid_parameter"),
    ({"json": {"prompt": "fox", "width": "wide"}}, 400, "invalid_parameter"),
    ({"json": {"prompt": "fox", "num_frames": 10}}, 400, "invalid_parameter"),
    ({"json": {"prompt": "fox", "width": 4096}}, 400, "invalid_parameter"),
    ({"json": {"prompt": "fox", "session_id": 12}}, 400, "invalid_id"),
    ({"json": {"prompt": "x" * (10 * 1024 * 1024)}}, 413, "too_large"),
    ({"data": io.BytesIO(b"{" * (10 * 1024 * 1024)), "content_type": "application/json"}, 413, "too_large"),
])
def test_bad_bodies_get_4xx_json(make_app, kwargs, status_code, code):
    app, svc = make_app(worker=False, max_image_mb=1)  # a JSON body may carry an image: 64 KB + 1 MB as base64
    r = app.test_client().post("/generate_video", **kwargs)
    assert r.status_code == status_code and r.is_json and r.json["error"]["code"] == code
    assert svc.jobs.count_queued() == 0


def test_missing_fields_and_wrong_methods(make_app):
    app, _ = make_app(worker=False)
    client = app.test_client()
    assert client.post("/get_status", json={"session_id": "abc"}).status_code == 400
    assert client.post("/history", json={}).status_code == 400
    assert client.post("/download_video/abcdef", data=b"").status_code == 400
    r = client.get("/generate_video")
    assert r.status_code == 405 and r.json["error"]["code"] == "method_not_allowed"
    r = client.get("/nowhere")
    assert r.status_code == 404 and r.is_json


def test_not_ready_download_is_409(make_app):
    app, _ = make_app(worker=False)
    client = app.test_client()
    sub = submit(client)
    r = client.post(f"/download_video/{sub['reference_id']}", json={"session_id": sub["session_id"]})
    assert r.status_code == 409 and r.json["error"]["code"] == "not_ready"
    assert client.get(f"/jobs/{sub['reference_id']}/video").status_code == 409


def test_full_queue_answers_429_and_positions_count_up(make_app):
    app, _ = make_app(worker=False, max_queue=2)
    client = app.test_client()
    assert [submit(client)["queue_position"] for _ in range(2)] == [1, 2]
    r = client.post("/generate_video", json=TINY_JOB)
    assert r.status_code == 429 and r.json["error"]["code"] == "queue_full"


def test_settings_cap_the_job(make_app):
    app, _ = make_app(worker=False, max_side=256, max_frames=17, max_steps=10, max_prompt_chars=20)
    client = app.test_client()
    for body in ({"width": 272}, {"num_frames": 21}, {"num_inference_steps": 11}, {"prompt": "x" * 21}):
        r = client.post("/generate_video", json={**TINY_JOB, **body})
        assert r.status_code == 400, body


def test_store_outage_is_503_json_and_recovers(make_app, monkeypatch):
    app, svc = make_app(worker=False)
    client = app.test_client()
    sub = submit(client)

    def down(*a, **k):
        raise StoreUnavailable("job database unavailable: disk I/O error")

    with monkeypatch.context() as m:
        m.setattr(svc.jobs, "get", down)
        m.setattr(svc.jobs, "ping", down)
        r = client.post("/get_status", json={"session_id": sub["session_id"], "reference_id": sub["reference_id"]})
        assert r.status_code == 503 and r.json["error"]["code"] == "store_unavailable"
        assert client.get("/health").status_code == 503
    assert status(client, sub)["status"] == "queued"
    assert client.get("/health").status_code == 200


def test_health_reports_worker_model_and_queue(make_app):
    app, svc = make_app()
    client = app.test_client()
    wait_for(lambda: client.get("/health").json["model_loaded"] and client.get("/health").json["workers"])
    h = client.get("/health").json
    [record] = h.pop("workers")
    assert h == {"status": "ok", "store": "ok", "queue_length": 0, "worker": "alive", "model_loaded": True,
                 "model_error": None}
    assert record["worker_id"] == svc.worker.worker_id and record["group"] is None and "generate" in record["kinds"]
    app_off, _ = make_app(worker=False)
    assert app_off.test_client().get("/health").json["worker"] == "off"


def test_secrets_never_appear_in_answers_or_logs(make_app, caplog):
    caplog.set_level(logging.DEBUG)
    app, svc = make_app(api_keys=("super-secret-key",), aws_secret_key="aws-secret-value",
                        mongodb_uri=None)
    client = app.test_client()
    headers = {"Authorization": "Bearer super-secret-key"}
    sub = submit(client, **headers)
    wait_status(client, sub, **headers)
    bodies = b"".join(r.data for r in (client.get("/health"), client.get("/openapi.json", headers=headers),
                                      client.get(f"/jobs/{sub['reference_id']}", headers=headers)))
    for secret in ("super-secret-key", "aws-secret-value"):
        assert secret.encode() not in bodies and secret not in caplog.text and secret not in repr(svc.settings)


def test_openapi_spec_matches_the_routes(make_app):
    app, _ = make_app(worker=False)
    spec = app.test_client().get("/openapi.json").json
    assert spec["openapi"].startswith("3.1")
    documented = {(path, method.upper()) for path, ops in spec["paths"].items() for method in ops}
    served = set()
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        path = rule.rule.replace("<", "{").replace(">", "}")
        served |= {(path, m) for m in rule.methods - {"HEAD", "OPTIONS"}}
    assert documented == served


def test_signed_media_links_work_without_a_key_and_only_as_issued(make_app):
    app, _ = make_app(api_keys=("key-one",), url_ttl_s=600)
    client = app.test_client()
    key = {"X-API-Key": "key-one"}
    sub = submit(client, **key)
    wait_status(client, sub, **key)
    job = client.get(f"/jobs/{sub['reference_id']}", headers=key).json
    video, poster = job["video_url"], job["poster_url"]
    assert "sig=" in video and "expires=" in video
    assert client.get(video).status_code == 200 and client.get(video).mimetype == "video/mp4"
    assert client.get(poster).mimetype == "image/jpeg"
    assert client.get(video.split("?")[0]).status_code == 401
    tampered = video[:-1] + ("0" if video[-1] != "0" else "1")
    swapped = poster.replace("/poster?", "/video?")  # a poster's signature does not open the video
    import time

    from api.service import signature

    with app.test_request_context():  # a correctly signed link whose time is up
        past = int(time.time()) - 10
        expired = f"/jobs/{sub['reference_id']}/video?expires={past}&sig=" + signature(
            "jobs.job_video", sub["reference_id"], past)
    for link in (tampered, swapped, expired):
        r = client.get(link)
        assert r.status_code == 401 and r.json["error"]["code"] == "invalid_signature"
    # download_video hands out the same kind of link, usable in a plain browser.
    url = client.post(f"/download_video/{sub['reference_id']}", json={"session_id": sub["session_id"]},
                      headers=key).json["s3_url"]
    assert client.get(url.removeprefix("http://localhost")).status_code == 200


def test_limits_tell_the_page_what_the_server_accepts(make_app):
    app, _ = make_app(worker=False, model="./models/HunyuanVideo", max_side=960, max_frames=65, max_steps=40)
    limits = app.test_client().get("/limits").json
    assert [(s["width"], s["height"]) for s in limits["sizes"]] == [(960, 544), (544, 960), (720, 720), (960, 960)]
    assert (limits["max_frames"], limits["max_steps"], limits["default_steps"]) == (65, 40, 30)
    page = app.test_client().get("/")
    assert page.status_code == 200 and b'<form id="job-form"' in page.data
