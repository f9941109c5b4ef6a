"""Store faults: S3 going away mid-upload, a locked SQLite file, an unreachable MongoDB."""

import logging
import socket
import sqlite3

import requests

from conftest import TINY_JOB, wait_for
from pipeline.video import probe
from storage.blobs import S3BlobStore
from storage.mongo import MongoJobStore
from storage.sqlite import SqliteJobStore


def dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def finish(client, **body):
    sub = client.post("/generate_video", json={**TINY_JOB, **body}).json
    return sub, wait_for(lambda: (j := client.get(f"/jobs/{sub['reference_id']}").json)["status"]
                         in ("completed", "failed") and j)


def test_s3_stopping_mid_upload_fails_the_job_and_the_next_one_succeeds(make_app, tmp_path, caplog):
    import boto3
    from moto.server import ThreadedMotoServer

    port = dead_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="test",
                 aws_secret_access_key="test").create_bucket(Bucket="faults")
    state = {"stop_on_next_video": True}

    class S3GoesAway(S3BlobStore):
        """Stops the S3 server just as the first video upload begins."""

        def put(self, local_path, key):
            if key.startswith("videos/") and state.pop("stop_on_next_video", False):
                server.stop()
            return super().put(local_path, key)

    blobs = S3GoesAway("faults", "us-east-1", "test", "test", endpoint, url_ttl_s=60, attempts=3, backoff_s=0.05)
    app, svc = make_app(blobs=blobs)
    client = app.test_client()
    try:
        with caplog.at_level(logging.WARNING, logger="storage.blobs"):
            sub, job = finish(client)
        assert job["status"] == "failed" and job["error"]["code"] == "storage_error"
        assert sum("retrying" in r.getMessage() for r in caplog.records) == 2  # 3 attempts, 2 retries
        assert probe(tmp_path / "data" / "work" / f"{sub['reference_id']}.mp4")["frames"] == 9  # kept

        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)  # S3 is back
        server.start()
        sub, job = finish(client)
        assert job["status"] == "completed"
        url = client.post(f"/download_video/{sub['reference_id']}", json={"session_id": sub["session_id"]}).json
        got = requests.get(url["s3_url"], timeout=10)
        assert got.status_code == 200 and len(got.content) == job["result"]["size_bytes"]
    finally:
        server.stop()


def test_locked_sqlite_gives_503_json_and_recovers(make_app, tmp_path):
    jobs = SqliteJobStore(tmp_path / "data" / "jobs.sqlite3", timeout_s=0.3)
    app, _ = make_app(jobs=jobs)
    client = app.test_client()
    assert finish(client)[1]["status"] == "completed"

    other = sqlite3.connect(tmp_path / "data" / "jobs.sqlite3", isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")  # another process holds the write lock
    try:
        for r in (client.post("/generate_video", json=TINY_JOB), client.get("/health")):
            assert r.status_code == 503 and r.json["error" if "error" in r.json else "store"]
        r = client.post("/generate_video", json=TINY_JOB)
        assert r.json == {"error": {"code": "store_unavailable",
                                    "message": "the job store is unavailable; try again shortly"}}
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert client.get("/health").status_code == 200
    assert finish(client)[1]["status"] == "completed"


def test_unreachable_mongodb_gives_503_json_everywhere(make_app):
    import pymongo

    client = pymongo.MongoClient(f"mongodb://127.0.0.1:{dead_port()}/", serverSelectionTimeoutMS=200,
                                 connectTimeoutMS=200)
    jobs = MongoJobStore(client=client)  # starts even though MongoDB does not answer
    app, _ = make_app(worker=False, jobs=jobs)
    http = app.test_client()
    for r in (http.post("/generate_video", json=TINY_JOB),
              http.post("/get_status", json={"session_id": "s", "reference_id": "r"}),
              http.post("/history", json={"session_id": "s"}),
              http.get("/jobs/abc"),
              http.get("/health")):
        assert r.status_code == 503 and r.is_json, r.data
    assert http.get("/health").json["store"] == "unavailable"
