"""DELETE /jobs/<id>: the record and every file of the job go; ownership as on the other job routes."""

import io
from pathlib import Path

from conftest import TINY_JOB, make_clip, wait_for

WAIT_S = 300  # a loaded machine can be slow; nothing here is timed


def submit(client, body=None, **headers):
    r = client.post("/generate_video", json={**TINY_JOB, **(body or {})}, headers=headers)
    assert r.status_code == 200, r.json
    return r.json["reference_id"]


def job(client, ref, **headers):
    return client.get(f"/jobs/{ref}", headers=headers).json


def stored_files(svc) -> list[str]:
    root = Path(svc.settings.data_dir)
    return sorted(str(p.relative_to(root)) for folder in ("blobs", "uploads") for p in (root / folder).rglob("*")
                  if p.is_file())


def test_delete_a_completed_job_removes_its_record_video_and_poster(make_app):
    app, svc = make_app()
    client = app.test_client()
    ref, kept = submit(client, {"session_id": "sess-1"}), submit(client, {"session_id": "sess-1"})
    wait_for(lambda: all(job(client, r)["status"] == "completed" for r in (ref, kept)), timeout=WAIT_S)
    kinds = (("videos", "mp4"), ("posters", "jpg"), ("previews", "webp"))  # the last preview made while denoising
    assert stored_files(svc) == sorted(f"blobs/{kind}/{r}.{ext}" for r in (ref, kept) for kind, ext in kinds)

    r = client.delete(f"/jobs/{ref}")
    assert r.status_code == 200 and r.json == {"reference_id": ref, "deleted": True}
    assert stored_files(svc) == sorted(f"blobs/{kind}/{kept}.{ext}" for kind, ext in kinds)  # the other job's stay
    assert client.get(f"/jobs/{ref}").status_code == 404
    assert client.get(f"/jobs/{ref}/video").status_code == 404
    assert [h["reference_id"] for h in client.post("/history", json={"session_id": "sess-1"}).json["history"]] == [kept]
    again = client.delete(f"/jobs/{ref}")
    assert again.status_code == 404 and again.json["error"]["code"] == "not_found"


def test_delete_a_queued_job(make_app):
    app, svc = make_app(worker=False)
    client = app.test_client()
    first, second = submit(client), submit(client)
    assert client.delete(f"/jobs/{first}").status_code == 200
    assert svc.jobs.get(first) is None and svc.jobs.count_queued() == 1
    assert job(client, second)["queue_position"] == 1


def test_delete_a_running_job_stops_it_and_the_worker_carries_on(make_app):
    app, svc = make_app()
    client = app.test_client()
    ref = submit(client, {"num_inference_steps": 100, "width": 128, "height": 128, "num_frames": 17})
    wait_for(lambda: job(client, ref)["stage"].startswith("denoising"), timeout=WAIT_S)
    assert client.delete(f"/jobs/{ref}").status_code == 200
    assert svc.jobs.get(ref) is None
    nxt = submit(client)  # runs only once the deleted job's worker has let it go
    wait_for(lambda: job(client, nxt)["status"] == "completed", timeout=WAIT_S)
    assert svc.jobs.get(ref) is None  # the worker's last writes did not bring it back
    assert svc.worker.alive
    assert not any(ref in name for name in stored_files(svc))
    assert not list((Path(svc.settings.data_dir) / "work").glob(f"{ref}*"))


def test_delete_an_upscale_job_removes_its_uploaded_clip(make_app, tmp_path):
    app, svc = make_app(worker=False)
    client = app.test_client()
    clip = make_clip(tmp_path / "clip.mp4", frames=4, width=32, height=32)
    r = client.post("/upscale_video", data={"video": (io.BytesIO(clip.read_bytes()), "clip.mp4"), "outscale": "2"},
                    content_type="multipart/form-data")
    assert r.status_code == 200, r.json
    ref = r.json["reference_id"]
    assert stored_files(svc) == [f"blobs/inputs/{ref}"]  # the clip waits in the blob store
    assert client.delete(f"/jobs/{ref}").status_code == 200
    assert stored_files(svc) == [] and svc.jobs.get(ref) is None


def test_only_the_owner_may_delete(make_app):
    app, svc = make_app(worker=False, api_keys=("key-one", "key-two"))
    client = app.test_client()
    ref = submit(client, **{"X-API-Key": "key-one"})
    assert client.delete(f"/jobs/{ref}").status_code == 401
    r = client.delete(f"/jobs/{ref}", headers={"X-API-Key": "key-two"})
    assert r.status_code == 404 and r.json["error"]["code"] == "not_found"
    assert svc.jobs.get(ref)["status"] == "queued"  # untouched, not even canceled
    assert client.delete(f"/jobs/{ref}", headers={"X-API-Key": "key-one"}).status_code == 200


def test_another_site_cannot_delete_and_bad_ids_are_400(make_app):
    app, svc = make_app(worker=False)
    client = app.test_client()
    ref = submit(client)
    r = client.delete(f"/jobs/{ref}", headers={"Origin": "https://evil.example"})
    assert r.status_code == 403 and r.json["error"]["code"] == "cross_site"
    assert client.delete(f"/jobs/{ref}", data="x", content_type="text/plain").status_code == 415
    assert client.delete("/jobs/a;b").status_code == 400
    assert svc.jobs.get(ref)["status"] == "queued"


def test_a_storage_fault_is_503_and_keeps_the_record_for_a_retry(make_app, monkeypatch):
    app, svc = make_app()
    client = app.test_client()
    ref = submit(client)
    wait_for(lambda: job(client, ref)["status"] == "completed", timeout=WAIT_S)

    def broken(key):
        raise PermissionError(13, "Permission denied")

    with monkeypatch.context() as m:
        m.setattr(svc.blobs, "delete", broken)
        r = client.delete(f"/jobs/{ref}")
    assert r.status_code == 503 and r.json["error"]["code"] == "storage_unavailable"
    assert svc.jobs.get(ref)["status"] == "completed"
    assert client.delete(f"/jobs/{ref}").status_code == 200 and stored_files(svc) == []


def test_a_job_deleted_while_its_worker_uploads_leaves_no_video_or_poster(tmp_path, tiny_models):
    """DELETE lands between the worker's two uploads: complete() is refused, and the worker deletes what it wrote."""
    from config import Settings
    from pipeline.spec import JobParams
    from storage.blobs import LocalBlobStore
    from storage.jobs import new_job
    from storage.sqlite import SqliteJobStore
    from worker.loop import Worker

    jobs = SqliteJobStore(tmp_path / "jobs.sqlite3")

    class DeletedMidUpload(LocalBlobStore):
        def put(self, path, key):
            if key.startswith("videos/"):
                jobs.delete(key.split("/")[1].removesuffix(".mp4"))  # as remove_job does, poster already stored
            return super().put(path, key)

    blobs = DeletedMidUpload(tmp_path / "blobs")
    settings = Settings.from_env(env={}, model="tiny", upscaler="tiny", data_dir=tmp_path / "data", worker="off",
                                 preview_every=0)
    params = JobParams.from_dict({**TINY_JOB, "upscale": False, "seed": 1}).to_dict()
    jobs.create(new_job("gone0001", "s", "local", "generate", params))
    worker = Worker(settings, jobs, blobs, models=tiny_models, worker_id="w1")
    assert worker.run_once() is True
    assert jobs.get("gone0001") is None
    assert list(blobs.list_keys("videos/")) == [] and list(blobs.list_keys("posters/")) == []
