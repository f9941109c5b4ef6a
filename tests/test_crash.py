"""kill -9 the worker processes (and the API) at random moments while two workers run 20 jobs:
no job is lost or done twice."""

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


def environment(data_dir, port):
    return {**os.environ, "PYTHONPATH": str(ROOT), "T2V_MODEL": "tiny", "T2V_UPSCALER": "tiny", "T2V_WORKER": "off",
            "T2V_DATA_DIR": str(data_dir), "T2V_PORT": str(port), "T2V_LEASE_S": "2", "T2V_MAX_ATTEMPTS": "3"}


def start_api(data_dir, port, log):
    """The API alone (T2V_WORKER=off): it queues jobs; the workers run them."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "app.py")], cwd=data_dir, env=environment(data_dir, port),
                            stdout=log, stderr=subprocess.STDOUT)
    return proc, f"http://127.0.0.1:{port}"


def wait_api(proc, base):
    def healthy():
        assert proc.poll() is None, "the API exited on its own"
        try:
            return requests.get(f"{base}/health", timeout=5).status_code == 200
        except requests.RequestException:
            return False

    wait_for(healthy, timeout=120, every=0.1)


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def records(data_dir):
    db = sqlite3.connect(data_dir / "jobs.sqlite3")
    db.row_factory = sqlite3.Row
    rows = {r["reference_id"]: dict(r) for r in db.execute("SELECT * FROM jobs")}
    db.close()
    return rows


def stop_all(api, workers):
    """SIGTERM the API and the workers (each worker, or group, stops after its current job); kill the workers'
    process group if they have not ended within 2 minutes."""
    workers.terminate()
    api.terminate()
    api.wait(30)
    try:
        workers.wait(120)
    except subprocess.TimeoutExpired:
        os.killpg(workers.pid, signal.SIGKILL)  # the supervisor and its workers
        workers.wait()


def test_kill_9_five_times_loses_no_job_and_completes_none_twice(tmp_path, data_dir, tiny_model, tiny_upscalers):
    import json

    # The tiny models are built once per test session; the processes find them under their data folder.
    os.symlink(data_dir / "tiny", tmp_path / "tiny")
    rng = random.Random(20261122)
    port = free_port()
    log_path = tmp_path / "server.log"
    with open(log_path, "ab") as log:
        api, base = start_api(tmp_path, port, log)
        workers = subprocess.Popen([sys.executable, str(ROOT / "worker.py"), "--cpu-workers", "2"], cwd=tmp_path,
                                   env=environment(tmp_path, port), stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            wait_api(api, base)
            accepted = []
            for i in range(JOBS):
                r = requests.post(f"{base}/generate_video", json={**CRASH_JOB, "seed": i, "session_id": "crash"},
                                  timeout=10)
                assert r.status_code == 200
                accepted.append(r.json()["reference_id"])
            killed = set()

            def running_worker():
                """The pid of a live worker process that holds a job, or None."""
                pids = {int(r["worker_id"].rsplit("-", 2)[1]) for r in records(tmp_path).values()
                        if r["status"] == "processing"}
                return next((pid for pid in sorted(pids - killed) if pid_alive(pid)), None)

            for n in range(KILLS):
                # Kill a worker while it runs a job, at a random moment inside it; every other time, the API too.
                pid = wait_for(running_worker, timeout=180, every=0.02)
                time.sleep(rng.uniform(0.0, 0.8))
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
                if n % 2:
                    api.send_signal(signal.SIGKILL)
                    api.wait()
                    api, base = start_api(tmp_path, port, log)
            wait_for(lambda: all(r["status"] in ("completed", "failed", "canceled")
                                 for r in records(tmp_path).values()), timeout=600, every=0.5)
            wait_api(api, base)
            view = requests.get(f"{base}/jobs/{accepted[0]}", timeout=10)
            assert view.status_code == 200 and view.json()["status"] in ("completed", "failed")
        finally:
            stop_all(api, workers)

    assert workers.returncode == 0 and "supervisor: all workers stopped" in log_path.read_text()
    assert log_path.read_text().count("exited with code -9") == KILLS, "the supervisor saw every kill"
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
