"""The service on S3, with S3 failing, and served for real: `python app.py` and gunicorn as subprocesses."""

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from conftest import ROOT, TINY_JOB, wait_for
from pipeline.video import probe
from storage.blobs import LocalBlobStore, S3BlobStore


def s3_store(endpoint, bucket, **kw):
    return S3BlobStore(bucket, "us-east-1", "test", "test", endpoint, url_ttl_s=600, **kw)


def run_to_end(client, body=None):
    sub = client.post("/generate_video", json={**TINY_JOB, **(body or {})}).json
    wait_for(lambda: client.get(f"/jobs/{sub['reference_id']}").json["status"] in ("completed", "failed"))
    return sub, client.get(f"/jobs/{sub['reference_id']}").json


def test_s3_path_download_video_gives_a_presigned_url_to_the_mp4(make_app, s3_bucket, tmp_path):
    endpoint, bucket = s3_bucket
    app, svc = make_app(blobs=s3_store(endpoint, bucket))
    client = app.test_client()
    sub, job = run_to_end(client)
    assert job["status"] == "completed", job

    url = client.post(f"/download_video/{sub['reference_id']}", json={"session_id": sub["session_id"]}).json["s3_url"]
    assert url.startswith(endpoint) and "X-Amz-Signature=" in url and "X-Amz-Expires=600" in url
    got = requests.get(url, timeout=10)
    assert got.status_code == 200 and got.headers["Content-Type"] == "video/mp4"
    (tmp_path / "got.mp4").write_bytes(got.content)
    assert (probe(tmp_path / "got.mp4")["frames"], probe(tmp_path / "got.mp4")["width"]) == (9, 256)
    record = svc.jobs.get(sub["reference_id"])
    assert record["result"]["size_bytes"] == len(got.content)

    redirect = client.get(f"/jobs/{sub['reference_id']}/video")
    assert redirect.status_code == 302 and redirect.headers["Location"].startswith(endpoint)
    poster = requests.get(client.get(f"/jobs/{sub['reference_id']}/poster").headers["Location"], timeout=10)
    assert poster.status_code == 200 and poster.content[:2] == b"\xff\xd8"
    assert not list((tmp_path / "data" / "work").iterdir()), "uploaded files stay on the worker's disk"


def test_upload_failure_fails_the_job_with_storage_error_and_keeps_the_file(make_app, tmp_path):
    with socket.socket() as s:  # a port with nothing listening: every upload is refused
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    app, svc = make_app(blobs=s3_store(dead, "nobucket", attempts=2, backoff_s=0.05))
    client = app.test_client()
    sub, job = run_to_end(client)
    assert job["status"] == "failed" and job["error"]["code"] == "storage_error"
    assert "kept" in job["error"]["message"]
    kept = tmp_path / "data" / "work" / f"{sub['reference_id']}.mp4"
    assert probe(kept)["frames"] == 9

    # The worker goes on: once the store works again, the next job completes.
    svc.worker.blobs = svc.blobs = LocalBlobStore(tmp_path / "data" / "blobs")
    _, nxt = run_to_end(client)
    assert nxt["status"] == "completed"


# ---------------------------------------------------------------------------------------- real servers

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(argv, tmp_path, data_dir, **env):
    """Start a server subprocess on a free port with the tiny models; return (process, base_url)."""
    port = free_port()
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "T2V_MODEL": "tiny", "T2V_UPSCALER": "tiny",
                "T2V_DATA_DIR": str(data_dir), "T2V_PORT": str(port), "T2V_HOST": "127.0.0.1", **env}
    log = open(tmp_path / f"server-{port}.log", "wb")
    proc = subprocess.Popen(argv, cwd=tmp_path, env=full_env, stdout=log, stderr=subprocess.STDOUT)
    return proc, f"http://127.0.0.1:{port}"


def answer(call):
    """call()'s value, or None when the server did not answer in time. On a loaded machine a request
    may time out (ReadTimeout included) or meet a server still starting: the caller's wait retries."""
    try:
        return call()
    except (requests.RequestException, ValueError):
        return None


def wait_healthy(proc, base, tmp_path):
    def up():
        assert proc.poll() is None, _logs(tmp_path)
        health = answer(lambda: requests.get(f"{base}/health", timeout=10).json())
        return health if health and health.get("model_loaded") else None

    return wait_for(up, timeout=240, every=0.2)


def _logs(tmp_path):
    """Every server log in full: a slow start adds many /health lines, which must not push out what a test looks for."""
    return "\n".join(p.read_text(errors="replace") for p in tmp_path.glob("server-*.log"))


def stop(proc):
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def curl_flow(base, tmp_path, headers=None):
    """The README's curl walk-through, over real HTTP."""
    headers = headers or {}
    sub = requests.post(f"{base}/generate_video", json=TINY_JOB, headers=headers, timeout=60).json()
    body = {"session_id": sub["session_id"], "reference_id": sub["reference_id"]}
    wait_for(lambda: answer(lambda: requests.post(f"{base}/get_status", json=body, headers=headers, timeout=10)
                            .json()["status"]) == "completed", timeout=240, every=0.2)
    url = requests.post(f"{base}/download_video/{sub['reference_id']}", json={"session_id": sub["session_id"]},
                        headers=headers, timeout=60).json()["s3_url"]
    assert url.startswith(base)
    video = requests.get(url, headers=headers, timeout=60)
    (tmp_path / "served.mp4").write_bytes(video.content)
    assert probe(tmp_path / "served.mp4")["frames"] == 9
    history = requests.post(f"{base}/history", json={"session_id": sub["session_id"]}, headers=headers, timeout=60)
    assert [h["reference_id"] for h in history.json()["history"]] == [sub["reference_id"]]


def test_python_app_py_serves_the_tiny_models(tmp_path, data_dir, tiny_model, tiny_upscalers):
    proc, base = serve([sys.executable, str(ROOT / "app.py")], tmp_path, data_dir,
                       T2V_API_KEYS="k-one,k-two")
    try:
        health = wait_healthy(proc, base, tmp_path)
        assert health["worker"] == "alive" and health["store"] == "ok"
        assert requests.post(f"{base}/history", json={"session_id": "s1"}, timeout=30).status_code == 401
        curl_flow(base, tmp_path, {"Authorization": "Bearer k-two"})
        # Werkzeug's debugger is never on: an unknown route is a JSON 404, not an HTML console.
        r = requests.get(f"{base}/console", headers={"X-API-Key": "k-one"}, timeout=30)
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
        requests.get(f"{base}/jobs/abcdefgh/video?expires=1&sig=deadbeef", timeout=30)
    finally:
        stop(proc)
    assert proc.returncode == 0, _logs(tmp_path)  # SIGTERM stops the server cleanly
    logs = _logs(tmp_path)
    assert "k-two" not in logs and "Authorization" not in logs
    assert '"GET /jobs/abcdefgh/video" 401' in logs and "sig=" not in logs and "Traceback" not in logs


# Raw-socket clients that a real server meets: nothing here may cost a thread, a traceback or a hang.
HEAD = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n"
CLIENT_TIMEOUT_S = 2
DROP_SLACK_S = 30  # a bound for correctness on a loaded machine, not a speed goal


def read_until_closed(sock, within: float) -> tuple[bytes, bool]:
    """Everything the server sends, and whether it closed the connection within `within` seconds."""
    got, deadline = b"", time.monotonic() + within
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            break
        except ConnectionResetError:
            return got, True
        if not chunk:
            return got, True
        got += chunk
    return got, False


def raw(base: str, payload: bytes) -> socket.socket:
    host, port = base.removeprefix("http://").rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=30)
    if payload:
        sock.sendall(payload)
    return sock


@pytest.fixture(scope="module")
def hardened_server(tmp_path_factory, data_dir):
    """`python app.py` with two request threads and a short client timeout; the worker off (no model).
    One server for the tests below, each of which checks that its clients left no traceback in its log."""
    tmp_path = tmp_path_factory.mktemp("hardened")
    proc, base = serve([sys.executable, str(ROOT / "app.py")], tmp_path, data_dir, T2V_WORKER="off",
                       T2V_THREADS="2", T2V_CLIENT_TIMEOUT_S=str(CLIENT_TIMEOUT_S), T2V_MAX_UPLOAD_MB="1")
    try:
        wait_for(lambda: _get_json(f"{base}/health"), timeout=240, every=0.2)
        yield base, tmp_path
    finally:
        stop(proc)


def still_serving_without_tracebacks(base, log_dir):
    assert requests.get(f"{base}/health", timeout=30).status_code == 200
    assert "Traceback" not in _logs(log_dir), _logs(log_dir)


@pytest.mark.parametrize("payload", [
    b"GET /health?q=" + b"a" * 75_000 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    b"GARBAGE\r\n\r\n",
    b"GET /health extra HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
], ids=["75kB-url", "garbage", "extra-word"])
def test_python_app_py_refuses_oversized_and_malformed_requests(hardened_server, payload):
    base, log_dir = hardened_server
    with raw(base, payload) as sock:
        got, closed = read_until_closed(sock, within=CLIENT_TIMEOUT_S + DROP_SLACK_S)
    status = got.split(b"\r\n", 1)[0]
    assert status.split(b" ")[1:2] in ([b"400"], [b"414"], [b"431"]) or (got == b"" and closed), got[:200]
    assert closed
    still_serving_without_tracebacks(base, log_dir)


@pytest.mark.parametrize("payload, code", [
    ("GET /jobs/été✓ HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode(), "bad_request"),  # raw UTF-8: a bad URI
    (b"get /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", "bad_request"),
    (b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-A: a\x00b\r\n\r\n", "bad_request"),
    (b"POST /generate_video HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
     b"Content-Length: 1000000000000\r\n\r\n", "too_large"),
    (b"POST /generate_video HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: gzip\r\n\r\n", "bad_request"),
    (b"GARBAGE\r\n\r\n", "bad_request"),
], ids=["utf8-path", "lowercase-method", "nul-in-header", "content-length-1e12", "unknown-encoding", "garbage"])
def test_requests_waitress_answers_itself_get_a_json_4xx_and_are_closed(hardened_server, payload, code):
    """They never reach the app; waitress answers them, in the API's error shape, then closes the connection."""
    base, log_dir = hardened_server
    with raw(base, payload) as sock:
        got, closed = read_until_closed(sock, within=CLIENT_TIMEOUT_S + DROP_SLACK_S)
    head, _, body = got.partition(b"\r\n\r\n")
    status = int(head.split(b" ")[1])
    assert 400 <= status < 500 and closed, got[:300]
    assert b"Content-Type: application/json" in head and b"X-Should-Retry: false" in head
    assert set(json.loads(body)) == {"error"} and json.loads(body)["error"]["code"] == code
    assert json.loads(body)["error"]["message"]
    still_serving_without_tracebacks(base, log_dir)


def test_an_image_within_t2v_max_image_mb_passes_the_servers_cap_under_a_small_upload_cap(hardened_server):
    """T2V_MAX_UPLOAD_MB=1 here; a 3 MB PNG (under T2V_MAX_IMAGE_MB, 20) as a data: URI reaches the app."""
    base, log_dir = hardened_server
    noise = np.random.default_rng(0).integers(0, 256, (1000, 1000, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, "PNG")
    assert buf.tell() > 2_900_000
    uri = f"data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}"
    r = requests.post(f"{base}/generate_video", json={"prompt": "the fox turns", "model": "hunyuanvideo-i2v",
                                                      "image": uri}, timeout=120)
    assert r.status_code == 200 and r.json()["status"] == "queued", r.text[:300]
    over = requests.post(f"{base}/upscale_video", files={"video": ("big.mp4", b"\0" * (2 * 2**20))}, timeout=120)
    assert over.status_code == 413 and over.json()["error"]["code"] == "too_large"  # the route's own cap, as JSON
    still_serving_without_tracebacks(base, log_dir)


def test_python_app_py_drops_stalled_clients(hardened_server):
    base, log_dir = hardened_server
    stalled = {
        "idle": b"",
        "half headers": HEAD,
        "half body": b"POST /generate_video HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{\"prompt\":",
    }
    socks = {name: raw(base, payload) for name, payload in stalled.items()}
    try:
        for name, sock in socks.items():
            got, closed = read_until_closed(sock, within=CLIENT_TIMEOUT_S + DROP_SLACK_S)
            assert closed and got == b"", f"{name}: {got[:200]!r}, closed={closed}"
    finally:
        for sock in socks.values():
            sock.close()
    still_serving_without_tracebacks(base, log_dir)


def test_python_app_py_answers_while_slow_clients_outnumber_its_threads(hardened_server):
    """Six clients that keep sending a header that never ends, against two threads: they hold
    connections, never threads, so /health is answered meanwhile."""
    base, log_dir = hardened_server
    done = threading.Event()

    def trickle(sock):
        while not done.is_set():
            try:
                sock.send(b"a")
            except OSError:
                return
            done.wait(0.3)

    socks = [raw(base, HEAD + b"X-Slow: ") for _ in range(6)]
    senders = [threading.Thread(target=trickle, args=(s,)) for s in socks]
    for t in senders:
        t.start()
    try:
        assert requests.get(f"{base}/health", timeout=120).status_code == 200
    finally:
        done.set()
        for t in senders:
            t.join()
        for s in socks:
            s.close()
    still_serving_without_tracebacks(base, log_dir)


def test_python_app_py_help_starts_nothing(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "T2V_DATA_DIR": str(tmp_path / "data"), "COLUMNS": "200"}
    done = subprocess.run([sys.executable, str(ROOT / "app.py"), "--help"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for flag, variable, default in (("--host", "T2V_HOST", "127.0.0.1"), ("--port", "T2V_PORT", "7866"),
                                    ("--threads", "T2V_THREADS", "default: 16")):
        assert flag in done.stdout and variable in done.stdout and done.stdout.count(default) == 1
    assert "None" not in done.stdout
    assert list(tmp_path.iterdir()) == [], "no data folder, database or log is made"

    bad = subprocess.run([sys.executable, str(ROOT / "app.py"), "--port", "http"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.strip() == "app.py: error: argument --port: expected a whole number from 1 to 65535, " \
                                 "got 'http' (see --help)"


def test_gunicorn_serves_one_process_with_threads(tmp_path, data_dir, tiny_model, tiny_upscalers):
    gunicorn = Path(sys.executable).with_name("gunicorn")
    proc, base = serve([str(gunicorn), "-c", str(ROOT / "gunicorn.conf.py"), "app:create_app()"],
                       tmp_path, data_dir)
    try:
        wait_healthy(proc, base, tmp_path)
        curl_flow(base, tmp_path)
        requests.get(f"{base}/jobs/abcdefgh/video?expires=1&sig=deadbeef", timeout=30)
    finally:
        stop(proc)
    assert proc.returncode == 0, _logs(tmp_path)
    assert "gthread" in _logs(tmp_path)
    assert '"GET /jobs/abcdefgh/video" 404' in _logs(tmp_path) and "sig=" not in _logs(tmp_path)


def test_gunicorn_refuses_two_processes_with_the_thread_worker(tmp_path, data_dir):
    gunicorn = Path(sys.executable).with_name("gunicorn")
    argv = [str(gunicorn), "-c", str(ROOT / "gunicorn.conf.py"), "-w", "2", "app:create_app()"]
    proc, _ = serve(argv, tmp_path, data_dir)
    assert proc.wait(30) != 0
    assert "T2V_WORKER=off" in _logs(tmp_path)

    # With the worker off (API-only nodes), several processes are fine.
    proc, base = serve(argv, tmp_path, data_dir, T2V_WORKER="off")
    try:
        health = wait_for(lambda: _get_json(f"{base}/health"), timeout=240, every=0.2)
        assert health["worker"] == "off"
    finally:
        stop(proc)


def _get_json(url):
    return answer(lambda: requests.get(url, timeout=10).json())


@pytest.mark.parametrize("script", ["app.py", "worker.py"])
def test_bad_setting_exits_2_with_a_one_line_reason(tmp_path, script):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "T2V_WORKER": "bogus"}
    done = subprocess.run([sys.executable, str(ROOT / script)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().startswith(f"{script}: error: T2V_WORKER must be one of thread, off, got 'bogus'")
    assert done.stderr.strip().count("\n") == 0 and "Traceback" not in done.stderr


def test_api_node_with_a_standalone_worker_process(tmp_path, data_dir, tiny_model, tiny_upscalers):
    """T2V_WORKER=off on the API, `python worker.py` beside it, sharing the job store and the videos."""
    os.symlink(data_dir / "tiny", tmp_path / "tiny")  # both processes find the tiny models here
    api, base = serve([sys.executable, str(ROOT / "app.py")], tmp_path, tmp_path, T2V_WORKER="off")
    worker_log = open(tmp_path / "server-worker.log", "wb")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "T2V_MODEL": "tiny", "T2V_UPSCALER": "tiny",
           "T2V_DATA_DIR": str(tmp_path)}
    worker = None
    try:
        health = wait_for(lambda: _get_json(f"{base}/health"), timeout=240, every=0.2)
        assert health["worker"] == "off" and health["model_loaded"] is False
        worker = subprocess.Popen([sys.executable, str(ROOT / "worker.py")], cwd=tmp_path, env=env,
                                  stdout=worker_log, stderr=subprocess.STDOUT)
        curl_flow(base, tmp_path)
        worker.send_signal(signal.SIGTERM)  # stops after the current job, cleanly
        assert worker.wait(30) == 0
    finally:
        if worker and worker.poll() is None:
            worker.kill()
        stop(api)
    assert ": completed in " in (tmp_path / "server-worker.log").read_text()


def test_a_server_without_weights_says_degraded_and_refuses_the_jobs_it_cannot_run(tmp_path):
    """What `python app.py` gives a newcomer before download.py: no model, no upscaler. It says why on /health,
    offers no upscale on /limits, and refuses both kinds of job (an upscale job would wait forever)."""
    from conftest import make_clip

    proc, base = serve([sys.executable, str(ROOT / "app.py")], tmp_path, tmp_path / "data",
                       T2V_MODEL="models/HunyuanVideo", T2V_UPSCALER="models/RealESRGAN_x4plus.pth",
                       T2V_MODELS_DIR="models")
    try:
        health = wait_for(lambda: (h := _get_json(f"{base}/health")) and h["model_error"] and h, timeout=240,
                          every=0.2)
        assert health["status"] == "degraded" and health["model_loaded"] is False
        assert "python download.py" in health["reason"] and "upscaler weights" in health["reason"]
        assert requests.get(f"{base}/limits", timeout=30).json()["upscale"] is False
        assert requests.get(f"{base}/models", timeout=30).json()["models"] == []
        clip = make_clip(tmp_path / "in.mp4", frames=8, audio=None)
        r = requests.post(f"{base}/upscale_video", files={"video": ("in.mp4", clip.read_bytes())}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["code"] == "upscaler_not_installed", r.text
        assert "python download.py --only RealESRGAN_x4plus" in r.json()["error"]["message"]
        r = requests.post(f"{base}/generate_video", json=TINY_JOB, timeout=60)
        assert r.status_code == 400 and "python download.py --only hunyuanvideo" in r.json()["error"]["message"]
        assert requests.get(f"{base}/health", timeout=30).json()["queue_length"] == 0  # nothing waits forever
    finally:
        stop(proc)
    assert "Traceback" not in _logs(tmp_path)
