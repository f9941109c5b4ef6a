"""Stalled, slow and malformed clients against each WSGI server t2v could run, over raw sockets.

Each server serves `app:create_app()` on loopback with the tiny models, T2V_WORKER=off and a fresh
data folder. Against each, all at once on their own connections:

- idle:         connect and send nothing
- half headers: "GET /health HTTP/1.1" and one header line, then nothing
- half body:    a POST whose Content-Length is 1000 with 10 bytes of body sent, then nothing
- trickle:      a header line that never ends, one byte per second
- long URL:     a 75 kB query string
- GARBAGE and "GET /health extra HTTP/1.1": malformed request lines

For each it records the answer's status (if any) and when the server closed the connection (or
"open" if it had not after --max-wait seconds). Then it holds --stalled half-header connections open
(more than the server's threads) and times GET /health meanwhile. Last, the server's log is searched
for "Traceback" and for a query string that a request carried (`sig=`).

    python bench/stalled_clients.py                              # every server, markdown tables
    python bench/stalled_clients.py --servers app --max-wait 60  # only what `python app.py` runs

`app` is whatever `python app.py` runs (waitress with t2v's settings since issue 9); `gunicorn` is
`gunicorn -c gunicorn.conf.py` (gthread); `waitress` is `python -m waitress` with its own defaults.
"""

from __future__ import annotations

import argparse
import os
import select
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
HEAD = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n"
CASES = {
    "idle": b"",
    "half headers": HEAD,
    "half body": (b"POST /generate_video HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 1000\r\n\r\n{\"prompt\":"),
    "long URL (75 kB)": b"GET /health?q=" + b"a" * 75_000 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    "GARBAGE": b"GARBAGE\r\n\r\n",
    "GET /health extra HTTP/1.1": b"GET /health extra HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_commands(port: int, threads: int) -> dict[str, list[str]]:
    python, bindir = sys.executable, Path(sys.executable).parent
    return {
        "app": [python, str(ROOT / "app.py")],
        "gunicorn": [str(bindir / "gunicorn"), "-c", str(ROOT / "gunicorn.conf.py"), "app:create_app()"],
        # waitress with its own defaults (and t2v's thread count), for comparison with `app`.
        "waitress": [python, "-m", "waitress", f"--listen=127.0.0.1:{port}", f"--threads={threads}",
                     "--call", "app:create_app"],
    }


def start(argv: list[str], port: int, threads: int, workdir: Path, log_path: Path) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "T2V_MODEL": "tiny", "T2V_UPSCALER": "tiny", "T2V_WORKER": "off", "T2V_DATA_DIR": str(workdir / "data"),
           "T2V_HOST": "127.0.0.1", "T2V_PORT": str(port), "T2V_THREADS": str(threads)}
    proc = subprocess.Popen(argv, cwd=workdir, env=env, stdout=open(log_path, "wb"), stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{argv[0]} exited; see {log_path}")
        try:
            if requests.get(f"{base}/health", timeout=5).status_code == 200:
                return proc, base
        except requests.RequestException:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"{argv} did not answer /health within 120 s; see {log_path}")


def connect(port: int, payload: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    if payload:
        sock.sendall(payload)
    return sock


def watch(sock: socket.socket, max_wait: float, trickle: bytes = b"") -> tuple[str, float | None]:
    """Read until the server closes; send one byte of `trickle` per second meanwhile.
    Returns (the answer's status or "-", seconds until closed or None if still open)."""
    start, got, sent = time.monotonic(), b"", 0
    while (elapsed := time.monotonic() - start) < max_wait:
        readable, _, _ = select.select([sock], [], [], 1.0)
        try:
            if readable:
                chunk = sock.recv(65536)
                if not chunk:
                    return status_of(got), time.monotonic() - start
                got += chunk
            elif sent < len(trickle) and elapsed >= sent:
                sock.send(trickle[sent:sent + 1])
                sent += 1
        except OSError:  # reset or broken pipe: the server dropped us
            return status_of(got), time.monotonic() - start
    return status_of(got), None


def status_of(answer: bytes) -> str:
    line = answer.split(b"\r\n", 1)[0].decode("latin-1")
    return line.split(" ", 2)[1] if line.startswith("HTTP/") else "-"


def stall_cases(port: int, max_wait: float) -> dict[str, tuple[str, float | None]]:
    results: dict[str, tuple[str, float | None]] = {}
    trickle = HEAD + b"X-Slow: " + b"a" * 10_000

    def run(name: str, payload: bytes, drip: bytes = b""):
        with connect(port, payload) as sock:
            results[name] = watch(sock, max_wait, drip)

    threads = [threading.Thread(target=run, args=(name, payload)) for name, payload in CASES.items()]
    threads.append(threading.Thread(target=run, args=("trickle (1 byte/s)", b"", trickle)))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def health_while_stalled(port: int, base: str, stalled: int, tries: int = 3) -> list[str]:
    """Hold `stalled` half-header connections open and time GET /health meanwhile."""
    socks = [connect(port, HEAD) for _ in range(stalled)]
    try:
        time.sleep(6)  # past any grace a server gives a connection before it takes a thread
        times = []
        for _ in range(tries):
            t0 = time.monotonic()
            try:
                r = requests.get(f"{base}/health", timeout=15)
                times.append(f"{r.status_code} in {time.monotonic() - t0:.2f} s")
            except requests.RequestException as exc:
                times.append(f"no answer ({type(exc).__name__}) after {time.monotonic() - t0:.1f} s")
        return times
    finally:
        for s in socks:
            s.close()


def bench(name: str, argv: list[str], port: int, args, workdir: Path) -> dict:
    log_path = workdir / f"{name}.log"
    proc, base = start(argv, port, args.threads, workdir, log_path)
    try:
        requests.get(f"{base}/jobs/abcdefgh/video?expires=1&sig=deadbeef", timeout=10)
        cases = stall_cases(port, args.max_wait)
        health = health_while_stalled(port, base, args.stalled)
        after = requests.get(f"{base}/health", timeout=30).status_code
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    log = log_path.read_text(errors="replace")
    return {"cases": cases, "health": health, "after": after, "tracebacks": log.count("Traceback"),
            "query_logged": "sig=" in log, "log": str(log_path)}


def report(name: str, result: dict, args) -> None:
    print(f"\n### {name}\n")
    print("| client | answer | closed by the server after |")
    print("|---|---|---|")
    for case, (status, closed) in result["cases"].items():
        when = f"{closed:.1f} s" if closed is not None else f"still open at {args.max_wait:.0f} s"
        print(f"| {case} | {status} | {when} |")
    print(f"\nGET /health while {args.stalled} half-header clients are held ({args.threads} threads): "
          + "; ".join(result["health"]) + f". After they leave: {result['after']}.")
    print(f"Tracebacks in the server log: {result['tracebacks']}. "
          f"Query string (sig=) in the log: {'yes' if result['query_logged'] else 'no'}. Log: {result['log']}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--servers", default="app,gunicorn,waitress", help="comma-separated")
    parser.add_argument("--threads", type=int, default=4, help="T2V_THREADS for every server")
    parser.add_argument("--stalled", type=int, default=12, help="half-header clients held at once")
    parser.add_argument("--max-wait", type=float, default=150.0, help="seconds to wait for a close")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="t2v-stalled-"))
    for name in args.servers.split(","):
        port = free_port()
        argv = server_commands(port, args.threads)[name]
        report(name, bench(name, argv, port, args, workdir), args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
