"""A job that fits no live worker's GPU is refused at submission (400, naming what would fit), by the memory
plan against the GPU memory each worker reports with `worker_seen`; both job stores keep that figure."""

import sqlite3

import mongomock
import pytest

from pipeline import memory
from storage.mongo import MongoJobStore
from storage.sqlite import SqliteJobStore

GB = 10**9
BIG = {"prompt": "a red fox", "model": "hunyuanvideo", "width": 1280, "height": 720, "num_frames": 129}


@pytest.fixture
def api(make_app):
    """No worker in this process (T2V_WORKER=off): GPU workers elsewhere report to the shared store."""
    app, svc = make_app(worker=False, model="hunyuanvideo")  # real sizes: a tiny deployment caps sides at 256
    return app.test_client(), svc.jobs


def test_a_job_no_gpu_fits_is_refused_and_told_what_would_fit(api):
    client, jobs = api
    jobs.worker_seen("gpu-24", ("generate", "upscale"), ["hunyuanvideo"], 24 * GB)
    r = client.post("/generate_video", json=BIG)
    assert r.status_code == 400 and r.json["error"]["code"] == "too_large_for_gpu"
    message = r.json["error"]["message"]
    assert "hunyuanvideo at 1280x720, 129 frames needs about 36 GB" in message and "has 24 GB" in message
    assert "73 frames at 1280x720 (group) or 960x544 at 129 frames (group)" in message
    assert jobs.job_counts() == []  # nothing was queued
    assert client.post("/generate_video", json={**BIG, "num_frames": 73}).status_code == 200  # what it named fits
    r = client.post("/v1/videos", json={"prompt": "a red fox", "model": "hunyuanvideo", "size": "1280x720",
                                        "seconds": "5"})
    assert r.status_code == 400 and r.json["error"]["code"] == "too_large_for_gpu"  # the same rule on /v1


def test_a_job_is_not_refused_for_memory_without_a_gpu_worker_that_serves_its_model(api):
    client, jobs = api
    assert client.post("/generate_video", json=BIG).status_code == 200  # no worker seen yet
    jobs.worker_seen("cpu-0", ("generate", "upscale"), ["hunyuanvideo"], None)  # a CPU worker: no GPU figure
    jobs.worker_seen("gpu-24-wan", ("generate",), ["wan2.2-ti2v-5b"], 24 * GB)  # serves another model
    assert client.post("/generate_video", json=BIG).status_code == 200
    jobs.worker_seen("gpu-24", ("generate",), ["hunyuanvideo"], 24 * GB)
    jobs.worker_seen("gpu-80", ("generate",), ["hunyuanvideo"], 80 * GB)  # one live GPU that fits is enough
    assert client.post("/generate_video", json=BIG).status_code == 200


@pytest.mark.parametrize("backend", ["sqlite", "mongomock"])
def test_both_stores_keep_each_workers_gpu_memory(tmp_path, backend):
    store = (SqliteJobStore(tmp_path / "jobs.sqlite3") if backend == "sqlite"
             else MongoJobStore(client=mongomock.MongoClient(), database="t2v_gpu"))
    store.worker_seen("gpu", ("generate",), ["hunyuanvideo"], 80 * GB)
    store.worker_seen("cpu", ("generate",), ["hunyuanvideo"])
    assert {w["worker_id"]: w["gpu_bytes"] for w in store.live_workers(30)} == {"gpu": 80 * GB, "cpu": None}


def test_an_older_sqlite_file_gains_the_gpu_column(tmp_path):
    path = tmp_path / "old.sqlite3"
    with sqlite3.connect(path) as db:  # the workers table as it was before gpu_bytes
        db.execute("CREATE TABLE workers (worker_id TEXT PRIMARY KEY, kinds TEXT NOT NULL, models TEXT NOT NULL, "
                   "last_seen REAL NOT NULL)")
    store = SqliteJobStore(path)
    store.worker_seen("gpu", ("generate",), ["hunyuanvideo"], 24 * GB)
    assert store.live_workers(30)[0]["gpu_bytes"] == 24 * GB


def test_workers_report_their_gpu_but_not_for_tiny_builds_or_the_cpu(monkeypatch):
    import torch
    from types import SimpleNamespace

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=80 * GB))
    assert memory.gpu_total_bytes(SimpleNamespace(device="cuda:0", model="models/HunyuanVideo")) == 80 * GB
    assert memory.gpu_total_bytes(SimpleNamespace(device="cuda:0", model="tiny:wan2.2-ti2v-5b")) is None
    assert memory.gpu_total_bytes(SimpleNamespace(device="cpu", model="models/HunyuanVideo")) is None
