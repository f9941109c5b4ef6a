"""Load on the real API: gunicorn on loopback with the tiny models, N clients, two phases in one run.

1. idle: the worker has nothing to do; clients poll get_status (95%) and history (5%).
2. busy: the worker runs jobs the whole time (a backlog is queued first); clients poll get_status
   (90%), ask for history (5%) and submit jobs (5%).

Each phase runs for a fixed time with a fixed number of clients, then stops. It reports requests/s,
p50/p95/p99 latency per route and phase, and every error (any status but 200 is an error). The
goal: zero errors, and p99 get_status while busy within 2x of p99 while idle.

    python bench/api_load.py                       # 50 clients, 20 s per phase
    python bench/api_load.py --clients 20 --seconds 10 --json result.json
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


def start_server(data_dir: Path, log_path: Path, threads: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "T2V_MODEL": "tiny", "T2V_UPSCALER": "tiny",
           "T2V_DATA_DIR": str(data_dir), "T2V_PORT": str(port), "T2V_MAX_QUEUE": "100000",
           "T2V_THREADS": str(threads)}
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


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q / 100 * len(values)))] * 1000


def run(args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        proc, base = start_server(data, data / "server.log", args.threads)
        try:
            # Reference jobs: one per client session, so history has something to list.
            sessions = []
            for i in range(args.clients):
                r = requests.post(f"{base}/generate_video", json={**JOB, "session_id": f"load-{i}"}, timeout=30).json()
                sessions.append((f"load-{i}", r["reference_id"]))
            while requests.get(f"{base}/health", timeout=10).json()["queue_length"]:
                time.sleep(0.5)  # let the worker go idle

            rec, phase, stop = Recorder(), {"name": "idle"}, threading.Event()
            threads = [threading.Thread(target=client, args=(base, s, r, phase, rec, stop, i), daemon=True)
                       for i, (s, r) in enumerate(sessions)]
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
            proc.terminate()
            proc.wait(30)

    report = {"clients": args.clients, "seconds_per_phase": args.seconds, "jobs_run_while_busy": ran, "phases": {}}
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
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args()
    report = run(args)
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
