"""Load on the real API: gunicorn on loopback with the tiny models, N clients, two phases in one run.

1. idle: the worker has nothing to do; clients poll get_status (95%) and history (5%).
2. busy: the worker runs jobs the whole time (a backlog is queued first); clients poll get_status
   (90%), ask for history (5%) and submit jobs (5%).

Each phase runs for a fixed time with a fixed number of clients, then stops. It reports requests/s,
p50/p95/p99 latency per route and phase, and every error (any status but 200 is an error). The
goal: zero errors, and p99 get_status while busy within 2x of p99 while idle.

With --sse-watchers N, N more clients each hold an event stream (GET /jobs/<id>/events) open through both
phases, beside the pollers. Each watches a job that runs on another node (a "remote" worker in this process
writes its record into the server's job store, and a progress event for each such job every 0.5 s, as a
worker logs them), so the streams stay open and busy whether or not the server's own worker is. A stream
holds a request thread, so the server gets N more threads (T2V_THREADS = --threads + N, T2V_MAX_STREAMS =
N). The watchers report how many events they got and how long each took from the store to them.

    python bench/api_load.py                       # 50 clients, 20 s per phase
    python bench/api_load.py --clients 20 --seconds 10 --json result.json
    python bench/api_load.py --sse-watchers 50     # the same, with 50 open event streams beside the pollers
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
JOB = {"prompt": "a red fox", "width": 64, "height": 64, "num_frames": 9, "num_inference_steps": 4}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(data_dir: Path, log_path: Path, threads: int, streams: int = 0) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "T2V_MODEL": "tiny", "T2V_UPSCALER": "tiny",
           "T2V_DATA_DIR": str(data_dir), "T2V_PORT": str(port), "T2V_MAX_QUEUE": "100000",
           "T2V_THREADS": str(threads + streams), "T2V_MAX_STREAMS": str(streams)}
    proc = subprocess.Popen([str(Path(sys.executable).with_name("gunicorn")), "-c", str(ROOT / "gunicorn.conf.py"),
                             "--access-logfile", "/dev/null", "app:create_app()"],
                            cwd=data_dir, env=env, stdout=open(log_path, "wb"), stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited; see {log_path}")
        try:
            if requests.get(f"{base}/health", timeout=2).json().get("model_loaded"):
                return proc, base
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise SystemExit("server did not become healthy in 120 s")


class Recorder:
    def __init__(self):
        self.latencies = defaultdict(list)  # (phase, route) -> [seconds]
        self.errors = defaultdict(list)     # (phase, route) -> ["status or exception"]
        self.lock = threading.Lock()

    def add(self, phase, route, seconds, error=None):
        with self.lock:
            self.latencies[(phase, route)].append(seconds)
            if error:
                self.errors[(phase, route)].append(error)

    def fail(self, phase, route, error):
        """An error with no latency to count (a stream refused or dropped)."""
        with self.lock:
            self.errors[(phase, route)].append(error)


def client(base: str, session_id: str, reference_id: str, phase: dict, rec: Recorder, stop: threading.Event,
           seed: int):
    rng = random.Random(seed)
    http = requests.Session()
    while not stop.is_set():
        name, busy = phase["name"], phase["name"] == "busy"
        roll = rng.random()
        if busy and roll < 0.05:
            route, call = "generate_video", lambda: http.post(f"{base}/generate_video",
                                                              json={**JOB, "session_id": session_id}, timeout=30)
        elif roll < 0.10:
            route, call = "history", lambda: http.post(f"{base}/history", json={"session_id": session_id}, timeout=30)
        else:
            route, call = "get_status", lambda: http.post(
                f"{base}/get_status", json={"session_id": session_id, "reference_id": reference_id}, timeout=30)
        started = time.perf_counter()
        try:
            status = call().status_code
            error = None if status == 200 else f"HTTP {status}"
        except requests.RequestException as exc:
            error = type(exc).__name__
        rec.add(name, route, time.perf_counter() - started, error)


REMOTE_WORKER = "remote-bench"


def remote_jobs(data: Path, count: int) -> tuple[object, list[str]]:
    """`count` jobs running on another node: records in the server's own job store, held by a worker that is
    this process, with a lease far ahead."""
    sys.path.insert(0, str(ROOT))
    from storage.jobs import PROCESSING, new_job
    from storage.sqlite import SqliteJobStore

    store, refs = SqliteJobStore(data / "jobs.sqlite3"), []
    for i in range(count):
        job = new_job(f"remote-{i:04d}", "watch", "local", "generate", {**JOB, "prompt": f"remote {i}"})
        job.update(status=PROCESSING, stage="denoising", worker_id=REMOTE_WORKER, lease_until=time.time() + 86400,
                   started_at=time.time())
        refs.append(store.create(job)["reference_id"])
    return store, refs


def remote_worker(store, refs: list[str], stop: threading.Event):
    """Log a progress event for every remote job every 0.5 s, as a worker does; `sent` lets watchers time them."""
    step = 0
    while not stop.wait(0.5):
        step += 1
        for ref in refs:
            store.append_event(ref, REMOTE_WORKER, "progress",
                               {"stage": f"denoising {step}", "progress": 0.5, "eta_s": None, "sent": time.time()})


def watcher(base: str, ref: str, phase: dict, rec: Recorder, stop: threading.Event):
    """Hold an event stream open on one job, and resume it with Last-Event-ID whenever it ends."""
    last_id = 0
    while not stop.is_set():
        try:
            with requests.get(f"{base}/jobs/{ref}/events", headers={"Last-Event-ID": str(last_id)}, stream=True,
                              timeout=30) as response:
                if response.status_code != 200:
                    rec.fail(phase["name"], "sse_event", f"HTTP {response.status_code}")
                    stop.wait(1)
                    continue
                for line in response.iter_lines(decode_unicode=True):
                    if stop.is_set():
                        return
                    if line.startswith("id:"):
                        last_id = int(line[3:])
                    elif line.startswith("data:") and '"sent"' in line:
                        rec.add(phase["name"], "sse_event", time.time() - json.loads(line[5:])["sent"])
        except requests.RequestException as exc:
            rec.fail(phase["name"], "sse_event", type(exc).__name__)


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q / 100 * len(values)))] * 1000


def run(args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        proc, base = start_server(data, data / "server.log", args.threads, args.sse_watchers)
        stop = threading.Event()
        try:
            # Reference jobs: one per client session, so history has something to list.
            sessions = []
            for i in range(args.clients):
                r = requests.post(f"{base}/generate_video", json={**JOB, "session_id": f"load-{i}"}, timeout=30).json()
                sessions.append((f"load-{i}", r["reference_id"]))
            while requests.get(f"{base}/health", timeout=10).json()["queue_length"]:
                time.sleep(0.5)  # let the worker go idle

            rec, phase = Recorder(), {"name": "idle"}
            threads = [threading.Thread(target=client, args=(base, s, r, phase, rec, stop, i), daemon=True)
                       for i, (s, r) in enumerate(sessions)]
            if args.sse_watchers:
                store, refs = remote_jobs(data, args.sse_watchers)
                threads.append(threading.Thread(target=remote_worker, args=(store, refs, stop), daemon=True))
                threads += [threading.Thread(target=watcher, args=(base, ref, phase, rec, stop), daemon=True)
                            for ref in refs]
            for t in threads:
                t.start()
            time.sleep(args.seconds)
            for _ in range(args.backlog):  # keep the worker busy for the whole busy phase
                requests.post(f"{base}/generate_video", json={**JOB, "session_id": "backlog"}, timeout=30)
            phase["name"] = "busy"
            busy_started = time.time()
            time.sleep(args.seconds)
            stop.set()
            for t in threads:
                t.join(30)
            finished = requests.post(f"{base}/history", json={"session_id": "backlog"}, timeout=30).json()["history"]
            ran = sum(1 for j in finished if (j["finished_at"] or 0) >= busy_started or j["status"] == "processing")
        finally:
            stop.set()
            proc.terminate()
            proc.wait(30)

    report = {"clients": args.clients, "sse_watchers": args.sse_watchers, "seconds_per_phase": args.seconds,
              "jobs_run_while_busy": ran, "phases": {}}
    for (name, route), values in sorted(rec.latencies.items()):
        report["phases"].setdefault(name, {})[route] = {
            "requests": len(values), "rps": round(len(values) / args.seconds, 1),
            "p50_ms": round(pct(values, 50), 1), "p95_ms": round(pct(values, 95), 1),
            "p99_ms": round(pct(values, 99), 1), "errors": len(rec.errors[(name, route)]),
            "error_kinds": sorted(set(rec.errors[(name, route)])),
        }
    idle, busy = report["phases"]["idle"]["get_status"], report["phases"]["busy"]["get_status"]
    report["get_status_p99_busy_over_idle"] = round(busy["p99_ms"] / idle["p99_ms"], 2)
    report["total_errors"] = sum(len(v) for v in rec.errors.values())
    return report


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=20, help="length of each phase")
    parser.add_argument("--threads", type=int, default=16, help="gunicorn threads (T2V_THREADS)")
    parser.add_argument("--backlog", type=int, default=60, help="jobs queued when the busy phase starts")
    parser.add_argument("--sse-watchers", type=int, default=0, help="open event streams beside the pollers")
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args()
    report = run(args)
    print(f"{args.clients} pollers, {args.sse_watchers} event-stream watchers (sse_event: an event's time from the "
          "store to its watcher)")
    print("| phase | route | requests | req/s | p50 ms | p95 ms | p99 ms | errors |")
    print("|---|---|---|---|---|---|---|---|")
    for name, routes in report["phases"].items():
        for route, r in routes.items():
            print(f"| {name} | {route} | {r['requests']} | {r['rps']} | {r['p50_ms']} | {r['p95_ms']} | "
                  f"{r['p99_ms']} | {r['errors']} {' '.join(r['error_kinds'])} |")
    print(f"\nget_status p99 busy/idle: {report['get_status_p99_busy_over_idle']}x; "
          f"errors: {report['total_errors']}; jobs run during the busy phase: {report['jobs_run_while_busy']}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
