"""kill -9 the server at random moments while it works through 20 jobs: no job is lost or done twice."""

import hashlib
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter

import requests

from conftest import ROOT, TINY_JOB, wait_for
from pipeline.video import probe
from test_serving import free_port

JOBS = 20
KILLS = 5
CRASH_JOB = {**TINY_JOB, "width": 96, "height": 96, "num_frames": 17, "num_inference_steps": 6}  # ~1 s each


def start(data_dir, port, log):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "T2V_MODEL": "tiny", "T2V_UPSCALER": "tiny",
           "T2V_DATA_DIR": str(data_dir), "T2V_PORT": str(port), "T2V_LEASE_S": "2", "T2V_MAX_ATTEMPTS": "3"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "app.py")], cwd=data_dir, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"

    def healthy():
        assert proc.poll() is None, "the server exited on its own"
        try:
            return requests.get(f"{base}/health", timeout=2).json()["model_loaded"]
        except requests.RequestException:
            return False

    wait_for(healthy, timeout=90, every=0.1)
    return proc, base


def records(data_dir):
    db = sqlite3.connect(data_dir / "jobs.sqlite3")
    db.row_factory = sqlite3.Row
    rows = {r["reference_id"]: dict(r) for r in db.execute("SELECT * FROM jobs")}
    db.close()
    return rows


def test_kill_9_five_times_loses_no_job_and_completes_none_twice(tmp_path, data_dir, tiny_model, tiny_upscalers):
    import json

    # The tiny models are built once per test session; the server finds them under its data folder.
    os.symlink(data_dir / "tiny", tmp_path / "tiny")
    rng = random.Random(20261122)
    port = free_port()
    log_path = tmp_path / "server.log"
    with open(log_path, "ab") as log:
        proc, base = start(tmp_path, port, log)
        accepted = []
        for i in range(JOBS):
            r = requests.post(f"{base}/generate_video", json={**CRASH_JOB, "seed": i, "session_id": "crash"}, timeout=10)
            assert r.status_code == 200
            accepted.append(r.json()["reference_id"])
        for _ in range(KILLS):
            # Kill while a job runs, at a random moment inside it.
            wait_for(lambda: any(r["status"] == "processing" for r in records(tmp_path).values()), timeout=60,
                     every=0.02)
            time.sleep(rng.uniform(0.0, 0.8))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            proc, base = start(tmp_path, port, log)
        try:
            wait_for(lambda: all(r["status"] in ("completed", "failed", "canceled")
                                 for r in records(tmp_path).values()), timeout=180, every=0.5)
        finally:
            proc.terminate()
            proc.wait(30)

    rows = records(tmp_path)
    assert sorted(rows) == sorted(accepted), "every accepted job is on record, and nothing else"
    statuses = Counter(r["status"] for r in rows.values())
    assert set(statuses) <= {"completed", "failed"}, statuses
    for ref, row in rows.items():
        if row["status"] == "failed":
            error = json.loads(row["error"])
            assert error["code"] and error["message"], ref
            continue
        result = json.loads(row["result"])
        video = tmp_path / "blobs" / result["video_key"]
        assert hashlib.sha256(video.read_bytes()).hexdigest() == result["sha256"], ref
        assert probe(video)["frames"] == CRASH_JOB["num_frames"]

    # No partial file sits under a final name: every final name is a completed job's verified file.
    completed = {ref for ref, r in rows.items() if r["status"] == "completed"}
    finals = [p for p in (tmp_path / "blobs" / "videos").iterdir() if not p.name.startswith(".")]
    assert {p.stem for p in finals} <= completed
    # No job ran to completion twice (each worker logs a completion once, after the store accepted it).
    completions = Counter(line.split("job ", 1)[1].split(":")[0] for line in log_path.read_text().splitlines()
                          if ": completed in " in line)
    assert max(completions.values(), default=0) <= 1, completions
    assert statuses["completed"] >= JOBS // 2, f"most jobs should survive {KILLS} kills: {statuses}"
    retried = sum(r["attempts"] - 1 for r in rows.values())
    assert retried >= 1, "the kills interrupted running jobs, which then ran again"
    print(f"crash test: {dict(statuses)}; extra attempts after kills: {retried}")
