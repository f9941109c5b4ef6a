"""Signed webhooks from a durable outbox, the SSRF guard on their URLs, and idempotent submits.

The receiver is a tiny http.server on 127.0.0.1, so these tests turn on T2V_WEBHOOK_ALLOW_PRIVATE; the guard's
own tests leave it off and fake DNS answers through socket.getaddrinfo."""

import base64
import io
import ipaddress
import json
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from prometheus_client.parser import text_string_to_metric_families
import requests
import waitress
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

import webhooks
from conftest import ROOT, TINY_JOB, make_clip, wait_for
from test_crash import environment, wait_api
from test_serving import free_port

SECRET = "whsec_" + base64.b64encode(b"t2v-test-webhook-secret-24b").decode()


class Receiver:
    """A webhook receiver on loopback: records every request (with its arrival time) and answers with the
    statuses in `script`, in order, then 200."""

    def __init__(self, script=()):
        self.script = list(script)
        self.requests = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with receiver.lock:
                    status = receiver.script.pop(0) if receiver.script else 200
                    receiver.requests.append({"at": time.monotonic(), "path": self.path, "headers": dict(self.headers),
                                              "body": body, "status": status})
                self.send_response(status)
                if 300 <= status < 400:
                    self.send_header("Location", receiver.redirect_to)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.redirect_to = "http://127.0.0.1:9/elsewhere"
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def accepted(self):
        return [r for r in self.requests if 200 <= r["status"] < 300]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    made = []

    def make(script=()):
        made.append(Receiver(script))
        return made[-1]

    yield make
    for r in made:
        r.close()


@pytest.fixture
def hooked_app(make_app, monkeypatch):
    """make_app with webhooks on (a loopback receiver allowed, quick retries); stops the dispatchers after."""
    monkeypatch.setattr(webhooks, "POLL_S", 0.05)
    apps = []

    def make(**overrides):
        app, svc = make_app(**{"webhook_secret": SECRET, "webhook_allow_private": True, "webhook_retry_s": 0.3,
                               **overrides})
        apps.append(app)
        return app, svc

    yield make
    for app in apps:
        if "t2v_webhooks" in app.extensions:
            app.extensions["t2v_webhooks"].stop(timeout=30)


def verified(request):
    """The payload of a delivery, after checking its signature as a receiver would."""
    return Webhook(SECRET).verify(request["body"], request["headers"])


def submit(client, headers=None, **fields):
    r = client.post("/generate_video", json={**TINY_JOB, **fields}, headers=headers or {})
    assert r.status_code == 200, r.json
    return r.json


# ---------------------------------------------------------------------------------------- deliveries

def test_a_job_sends_signed_started_and_completed_events_carrying_its_view(hooked_app, receiver):
    hook = receiver()
    app, svc = hooked_app(worker=True)
    client = app.test_client()
    sub = submit(client, webhook_url=hook.url + "?token=abc", webhook_events=["started", "completed"])
    wait_for(lambda: len(hook.requests) == 2, timeout=120)
    started, completed = (verified(r) for r in hook.requests)
    ref = sub["reference_id"]
    assert [r["headers"]["webhook-id"] for r in hook.requests] == [f"msg_{ref}.started.1", f"msg_{ref}.completed.1"]
    assert hook.requests[0]["path"] == "/hook?token=abc"
    assert (started["type"], started["data"]["status"]) == ("job.started", "processing")
    assert completed["type"] == "job.completed" and completed["timestamp"].endswith("Z")
    data = completed["data"]
    assert data["reference_id"] == ref and data["status"] == "completed" and data["result"]["frames"] == 9
    assert data["video_url"] == f"/jobs/{ref}/video" and "video_key" not in data["result"]
    view = client.get(f"/jobs/{ref}").json
    assert list(data) == list(view), "the same view as GET /jobs/<id>"
    assert {k: v for k, v in data.items() if not k.endswith("_url")} == {
        k: v for k, v in view.items() if not k.endswith("_url")}
    with pytest.raises(WebhookVerificationError):  # the check above can fail: another secret does
        Webhook("whsec_" + base64.b64encode(b"some-other-secret-of-24b").decode()).verify(
            hook.requests[1]["body"], hook.requests[1]["headers"])
    wait_for(lambda: svc.jobs.webhook_counts()["delivered"] == 2)
    assert svc.jobs.webhook_counts() == {"delivered": 2, "given_up": 0, "pending": 0, "failed_attempts": 0}


def test_500_twice_then_200_is_one_accepted_delivery_with_retries_spaced_as_configured(hooked_app, receiver):
    hook = receiver(script=[500, 500])
    app, svc = hooked_app(worker=False, webhook_retry_s=0.4)
    client = app.test_client()
    ref = submit(client, webhook_url=hook.url, webhook_events="canceled")["reference_id"]
    client.post(f"/jobs/{ref}/cancel")
    wait_for(lambda: hook.accepted(), timeout=60)
    time.sleep(1.0)  # a further attempt would come within this
    assert [r["status"] for r in hook.requests] == [500, 500, 200] and len(hook.accepted()) == 1
    assert {r["headers"]["webhook-id"] for r in hook.requests} == {f"msg_{ref}.canceled.0"}, "one message, retried"
    assert all(verified(r)["data"]["status"] == "canceled" for r in hook.requests)
    gaps = [b["at"] - a["at"] for a, b in zip(hook.requests, hook.requests[1:])]
    assert gaps[0] >= 0.4 and gaps[1] >= 0.8, gaps  # the wait doubles
    [row] = svc.jobs.deliveries(ref)
    assert (row["state"], row["attempts"], row["last_status"], row["last_error"]) == ("delivered", 3, 200, None)
    assert svc.jobs.webhook_counts() == {"delivered": 1, "given_up": 0, "pending": 0, "failed_attempts": 2}
    families = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}
    assert {s.labels["state"]: s.value for s in families["t2v_webhook_deliveries"].samples} == {
        "delivered": 1, "pending": 0, "given_up": 0}
    assert families["t2v_webhook_failed_attempts"].samples[0].value == 2


def test_the_default_schedule_tries_nine_times_over_two_hours():
    from config import Settings

    settings, tries, delivery = Settings(), [0.0], {"created_at": 0.0, "attempts": 0}
    while (at := webhooks.next_try(delivery, tries[-1], settings)) is not None:
        tries.append(at)
        delivery["attempts"] += 1
    assert tries == [0, 30, 90, 210, 450, 930, 1890, 3810, 7200]


def test_a_delivery_still_failing_after_its_window_is_given_up_and_logged_without_its_url(hooked_app, receiver,
                                                                                         caplog):
    hook = receiver(script=[503] * 100)
    app, svc = hooked_app(worker=False, webhook_retry_s=0.2, webhook_retry_window_s=1.0)
    client = app.test_client()
    ref = submit(client, webhook_url=hook.url + "?token=s3cr3t-receiver-token", webhook_events=["canceled"])[
        "reference_id"]
    client.post(f"/jobs/{ref}/cancel")
    wait_for(lambda: svc.jobs.deliveries(ref)[0]["state"] == "given_up", timeout=60)
    [row] = svc.jobs.deliveries(ref)
    assert row["attempts"] >= 3 and row["last_status"] == 503 and row["last_error"] == "HTTP 503"
    assert row["last_attempt_at"] - row["created_at"] >= 1.0, "the last try is at the end of the window"
    count = len(hook.requests)
    time.sleep(0.5)
    assert len(hook.requests) == count == row["attempts"], "nothing is sent after giving up"
    assert svc.jobs.webhook_counts()["given_up"] == 1
    assert f"msg_{ref}.canceled.0 to 127.0.0.1: given up" in caplog.text
    assert "s3cr3t-receiver-token" not in caplog.text and SECRET not in caplog.text


def test_a_redirect_is_an_answer_never_followed(hooked_app, receiver):
    target = receiver()
    hook = receiver(script=[302] * 100)
    hook.redirect_to = target.url
    app, svc = hooked_app(worker=False, webhook_retry_s=0.2, webhook_retry_window_s=0.5)
    client = app.test_client()
    ref = submit(client, webhook_url=hook.url, webhook_events=["canceled"])["reference_id"]
    client.post(f"/jobs/{ref}/cancel")
    wait_for(lambda: svc.jobs.deliveries(ref)[0]["state"] == "given_up", timeout=60)
    assert hook.requests and not target.requests
    assert svc.jobs.deliveries(ref)[0]["last_status"] == 302


def test_a_receiver_that_trickles_its_answer_is_cut_off_at_the_timeout(hooked_app):
    """Each byte comes well within the per-read timeout; the attempt as a whole still ends."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def trickle():
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\n")
            while not stop.wait(0.2):
                try:
                    conn.sendall(b"X")
                except OSError:
                    return

    threading.Thread(target=trickle, daemon=True).start()
    app, svc = hooked_app(worker=False, webhook_timeout_s=1.0, webhook_retry_s=600)
    client = app.test_client()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/hook"
    ref = submit(client, webhook_url=url, webhook_events=["canceled"])["reference_id"]
    client.post(f"/jobs/{ref}/cancel")
    try:
        row = wait_for(lambda: next((d for d in svc.jobs.deliveries(ref) if d["attempts"]), None), timeout=60)
    finally:
        stop.set()
        listener.close()
    assert row["state"] == "pending" and row["last_status"] is None and row["last_error"], row


def test_an_upload_takes_its_webhook_as_form_fields(hooked_app, receiver, tmp_path):
    hook = receiver()
    app, svc = hooked_app(worker=False)
    client = app.test_client()
    clip = make_clip(tmp_path / "in.mp4", frames=8, audio=None).read_bytes()
    r = client.post("/upscale_video", data={"video": (io.BytesIO(clip), "in.mp4"), "webhook_url": hook.url,
                                            "webhook_events": "failed, canceled"},
                    content_type="multipart/form-data")
    assert r.status_code == 200, r.json
    ref = r.json["reference_id"]
    assert svc.jobs.get(ref)["webhook"] == {"url": hook.url, "events": ["failed", "canceled"]}
    client.post(f"/jobs/{ref}/cancel")
    wait_for(lambda: hook.accepted(), timeout=60)
    payload = verified(hook.requests[0])
    assert payload["type"] == "job.canceled" and payload["data"]["kind"] == "upscale"


def test_webhook_fields_are_checked(hooked_app, make_app):
    app, svc = hooked_app(worker=False)
    client = app.test_client()
    for fields, code in (({"webhook_url": "http://127.0.0.1:1/h", "webhook_events": ["done"]}, "invalid_parameter"),
                         ({"webhook_url": "http://127.0.0.1:1/h", "webhook_events": []}, "invalid_parameter"),
                         ({"webhook_url": "http://127.0.0.1:1/h", "webhook_events": [1]}, "invalid_parameter"),
                         ({"webhook_events": ["completed"]}, "invalid_parameter"),
                         ({"webhook_url": 7}, "invalid_webhook_url"),
                         ({"webhook_url": "http://127.0.0.1:1/" + "a" * 2100}, "invalid_webhook_url"),
                         ({"webhook_url": "http://exa mple.com/"}, "invalid_webhook_url")):
        r = client.post("/generate_video", json={**TINY_JOB, **fields})
        assert (r.status_code, r.json["error"]["code"]) == (400, code), fields
    plain, _ = make_app(worker=False)  # no T2V_WEBHOOK_SECRET
    r = plain.test_client().post("/generate_video", json={**TINY_JOB, "webhook_url": "https://example.com/h"})
    assert (r.status_code, r.json["error"]["code"]) == (400, "webhooks_not_configured")
    assert "not configured" in r.json["error"]["message"]
    assert svc.jobs.count_queued() == 0


# ---------------------------------------------------------------------------------------- the SSRF guard

def fake_dns(monkeypatch, answers: dict):
    """socket.getaddrinfo answering `answers` (name -> addresses); other names do not resolve, and literal
    addresses are left to the real resolver."""
    real = socket.getaddrinfo

    def getaddrinfo(host, port, *args, **kwargs):
        try:
            ipaddress.ip_address(host)
            return real(host, port, *args, **kwargs)
        except ValueError:
            pass
        if host not in answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port))
                for a in answers[host].split(",")]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


@pytest.mark.parametrize("url, reason", [
    ("http://127.0.0.1/hook", "loopback"),
    ("http://169.254.169.254/latest/meta-data/", "cloud metadata"),
    ("file:///etc/passwd", "http or https"),
    ("http://user:pw@hooks.example/hook", "credentials"),
    ("http://internal.example/hook", "private"),  # resolves to 10.0.0.1
    ("http://[::1]:8080/hook", "loopback"),
    ("http://[::ffff:127.0.0.1]/hook", "loopback"),
    ("http://[fd00:ec2::254]/", "cloud metadata"),
    ("http://0.0.0.0/", "unspecified"),
    ("http://224.0.0.1/", "multicast"),
    ("http://100.64.0.1/", "non-public"),
    ("https://rebind.example/", "private"),  # one of its addresses is private
    ("gopher://hooks.example/", "http or https"),
    ("http:///nohost", "no host"),
    ("http://nowhere.invalid/", "does not resolve"),
])
def test_hostile_webhook_urls_are_refused_with_400(hooked_app, monkeypatch, url, reason):
    fake_dns(monkeypatch, {"internal.example": "10.0.0.1", "hooks.example": "93.184.215.14",
                           "rebind.example": "93.184.215.14,192.168.1.20"})
    app, svc = hooked_app(worker=False, webhook_allow_private=False)
    r = app.test_client().post("/generate_video", json={**TINY_JOB, "webhook_url": url})
    assert r.status_code == 400 and r.json["error"]["code"] == "invalid_webhook_url", r.json
    assert reason in r.json["error"]["message"]
    assert svc.jobs.count_queued() == 0


def test_public_addresses_pass_and_the_private_switch_still_refuses_metadata(hooked_app, monkeypatch):
    fake_dns(monkeypatch, {"hooks.example": "93.184.215.14", "v6.example": "2606:2800:21f:cb07:6820:80da:af6b:8b2c"})
    app, svc = hooked_app(worker=False, webhook_allow_private=False)
    client = app.test_client()
    for url in ("https://hooks.example/t2v", "http://v6.example:8443/h", "http://93.184.215.14/h"):
        assert client.post("/generate_video", json={**TINY_JOB, "webhook_url": url}).status_code == 200, url
    lan, _ = hooked_app(worker=False)
    lan_client = lan.test_client()
    assert lan_client.post("/generate_video", json={**TINY_JOB, "webhook_url": "http://10.0.0.5/h"}).status_code == 200
    r = lan_client.post("/generate_video", json={**TINY_JOB, "webhook_url": "http://169.254.169.254/"})
    assert r.status_code == 400 and "metadata" in r.json["error"]["message"]


def test_a_name_that_rebinds_to_loopback_after_submission_is_refused_at_delivery(hooked_app, receiver, monkeypatch):
    hook = receiver()
    fake_dns(monkeypatch, {"hooks.example": "93.184.215.14"})
    app, svc = hooked_app(worker=False, webhook_allow_private=False, webhook_retry_s=0.2, webhook_retry_window_s=0.6)
    client = app.test_client()
    url = f"http://hooks.example:{hook.server.server_port}/hook"
    ref = submit(client, webhook_url=url, webhook_events=["canceled"])["reference_id"]
    fake_dns(monkeypatch, {"hooks.example": "127.0.0.1"})  # the name now points at this machine
    client.post(f"/jobs/{ref}/cancel")
    wait_for(lambda: svc.jobs.deliveries(ref)[0]["state"] == "given_up", timeout=60)
    row = svc.jobs.deliveries(ref)[0]
    assert "loopback" in row["last_error"] and row["last_status"] is None
    assert hook.requests == [], "nothing reached the receiver on loopback"


# ---------------------------------------------------------------------------------------- crashes

def _rows(path):
    with sqlite3.connect(path) as db:
        db.row_factory = sqlite3.Row
        return [dict(r) for r in db.execute("SELECT * FROM webhook_deliveries")]


def test_a_delivery_pending_when_the_server_is_killed_is_sent_after_restart(tmp_path, receiver):
    hook = receiver(script=[500] * 1000)
    port = free_port()
    env = {**environment(tmp_path, port), "T2V_WEBHOOK_SECRET": SECRET, "T2V_WEBHOOK_ALLOW_PRIVATE": "1",
           "T2V_WEBHOOK_RETRY_S": "0.2", "T2V_WEBHOOK_RETRY_WINDOW_S": "600", "T2V_WEBHOOK_TIMEOUT_S": "2"}
    base = f"http://127.0.0.1:{port}"

    def start(log):
        return subprocess.Popen([sys.executable, str(ROOT / "app.py")], cwd=tmp_path, env=env, stdout=log,
                                stderr=subprocess.STDOUT)

    with open(tmp_path / "server.log", "ab") as log:
        api = start(log)
        try:
            wait_api(api, base)
            sub = requests.post(f"{base}/generate_video", json={**TINY_JOB, "webhook_url": hook.url,
                                                                 "webhook_events": ["canceled"]}, timeout=30).json()
            ref = sub["reference_id"]
            assert requests.post(f"{base}/jobs/{ref}/cancel", timeout=30).json()["status"] == "canceled"
            wait_for(lambda: len(hook.requests) >= 2, timeout=120)  # failing, and being retried
            api.send_signal(signal.SIGKILL)
            api.wait(30)
            time.sleep(1.0)  # an attempt the killed server had on the wire lands (and fails) now
            [row] = _rows(tmp_path / "jobs.sqlite3")
            assert row["state"] == "pending" and row["attempts"] >= 1
            sent_before = len(hook.requests)
            hook.script.clear()  # the receiver is fixed while the server is down
            api = start(log)
            wait_for(lambda: _rows(tmp_path / "jobs.sqlite3")[0]["state"] == "delivered", timeout=120)
        finally:
            api.terminate()
            api.wait(30)
    assert len(hook.requests) > sent_before and len(hook.accepted()) == 1
    assert hook.requests.index(hook.accepted()[0]) >= sent_before, "sent by the restarted server"
    assert {r["headers"]["webhook-id"] for r in hook.requests} == {f"msg_{ref}.canceled.0"}
    assert verified(hook.accepted()[0])["data"]["reference_id"] == ref


def test_python_worker_py_sends_deliveries_too(tmp_path, receiver):
    """A worker process (T2V_WORKER=off on the API nodes) runs a dispatcher as well, and stops it on SIGTERM.
    Its model is missing: it takes no job, and stops at once."""
    from storage.jobs import new_job
    from storage.sqlite import SqliteJobStore

    hook = receiver()
    store = SqliteJobStore(tmp_path / "jobs.sqlite3")
    store.create(new_job("queued-then-canceled", "s", "local", "generate", {"prompt": "p"},
                         webhook={"url": hook.url, "events": ["canceled"]}))
    store.request_cancel("queued-then-canceled")
    env = {**environment(tmp_path, free_port()), "T2V_MODEL": str(tmp_path / "no-model"), "T2V_UPSCALER": "none",
           "T2V_WEBHOOK_SECRET": SECRET, "T2V_WEBHOOK_ALLOW_PRIVATE": "1"}
    with open(tmp_path / "worker.log", "ab") as log:
        worker = subprocess.Popen([sys.executable, str(ROOT / "worker.py")], cwd=tmp_path, env=env, stdout=log,
                                  stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: hook.accepted(), timeout=120)
        finally:
            worker.terminate()
            worker.wait(60)
    assert worker.returncode == 0
    assert verified(hook.accepted()[0])["data"]["reference_id"] == "queued-then-canceled"


def test_finished_deliveries_are_pruned_after_t2v_webhook_keep_s(hooked_app, receiver, monkeypatch):
    monkeypatch.setattr(webhooks, "PRUNE_EVERY_S", 0.05)
    hook = receiver()
    app, svc = hooked_app(worker=False, webhook_keep_s=0.5)
    client = app.test_client()
    ref = submit(client, webhook_url=hook.url, webhook_events=["canceled"])["reference_id"]
    assert client.post(f"/jobs/{ref}/cancel").status_code == 200
    wait_for(lambda: len(hook.accepted()) == 1, timeout=60)
    wait_for(lambda: svc.jobs.deliveries(ref) == [], timeout=60)
    assert svc.jobs.webhook_counts() == {"delivered": 0, "given_up": 0, "pending": 0, "failed_attempts": 0}


# ---------------------------------------------------------------------------------------- idempotent submits

def test_a_repeated_key_answers_the_first_job_and_another_body_is_a_409(make_app):
    app, svc = make_app(worker=False, api_keys=("key-a", "key-b"))
    client = app.test_client()
    a = {"Authorization": "Bearer key-a", "Idempotency-Key": "order-42"}
    first = client.post("/generate_video", json={**TINY_JOB, "session_id": "s1"}, headers=a)
    again = client.post("/generate_video", json={**TINY_JOB, "session_id": "s1"}, headers=a)
    assert first.status_code == again.status_code == 200
    assert again.json == first.json and again.headers["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in first.headers
    other = client.post("/generate_video", json={**TINY_JOB, "session_id": "s1", "seed": 7}, headers=a)
    assert (other.status_code, other.json["error"]["code"]) == (409, "idempotency_key_reused")
    mine = client.post("/generate_video", json={**TINY_JOB, "session_id": "s1"},
                       headers={"Authorization": "Bearer key-b", "Idempotency-Key": "order-42"})
    assert mine.status_code == 200 and mine.json["reference_id"] != first.json["reference_id"], "keys are per caller"
    assert "Idempotent-Replayed" not in mine.headers
    assert svc.jobs.count_queued() == 2
    for bad in ("", "has space", "é", "x" * 256):
        r = client.post("/generate_video", json=TINY_JOB, headers={**a, "Idempotency-Key": bad})
        assert (r.status_code, r.json["error"]["code"]) == (400, "invalid_idempotency_key"), bad


def test_a_refused_create_frees_its_key(make_app):
    app, svc = make_app(worker=False, max_queue=1)
    client = app.test_client()
    key = {"Idempotency-Key": "k-1"}
    assert client.post("/generate_video", json={**TINY_JOB, "num_frames": 10}, headers=key).status_code == 400
    blocker = submit(client)
    full = client.post("/generate_video", json=TINY_JOB, headers=key)
    assert (full.status_code, full.json["error"]["code"]) == (429, "queue_full")
    client.post(f"/jobs/{blocker['reference_id']}/cancel")
    ok = client.post("/generate_video", json=TINY_JOB, headers=key)
    assert ok.status_code == 200 and "Idempotent-Replayed" not in ok.headers
    assert client.post("/generate_video", json=TINY_JOB, headers=key).json["reference_id"] == ok.json["reference_id"]


def test_a_deleted_jobs_key_makes_a_new_job_at_once(make_app, monkeypatch):
    """DELETE frees the job's key: a retry with it is a new job, and no request waits on a job that is gone."""
    import api.service

    app, svc = make_app(worker=False)
    client = app.test_client()
    waits = []
    monkeypatch.setattr(api.service.time, "sleep", lambda s: waits.append(s))
    key = {"Idempotency-Key": "k-gone"}
    first = client.post("/generate_video", json=TINY_JOB, headers=key).json
    assert client.delete(f"/jobs/{first['reference_id']}").status_code == 200
    for _ in range(3):
        again = client.post("/generate_video", json=TINY_JOB, headers=key)
        assert again.status_code == 200 and again.json["reference_id"] != first["reference_id"]
    assert "Idempotent-Replayed" in again.headers, "the retries after the first are replays of the new job"
    assert waits == [], "no wait loop ran"
    assert svc.jobs.count_queued() == 1


def test_an_upload_retried_with_its_key_is_one_job(make_app, tmp_path):
    """Each send of a multipart body has its own boundary; the same fields and file are the same request."""
    app, svc = make_app(worker=False)
    client = app.test_client()
    clip = make_clip(tmp_path / "in.mp4", frames=8, audio=None).read_bytes()

    def upload(data=clip, outscale="2"):
        return client.post("/upscale_video", data={"video": (io.BytesIO(data), "in.mp4"), "outscale": outscale},
                           content_type="multipart/form-data", headers={"Idempotency-Key": "upload-1"})

    first, again = upload(), upload()
    assert first.status_code == again.status_code == 200 and again.headers["Idempotent-Replayed"] == "true"
    assert again.json["reference_id"] == first.json["reference_id"]
    assert upload(outscale="4").status_code == 409
    assert upload(data=clip[:-10] + b"0123456789").status_code == 409, "another file"
    assert len(svc.jobs.history("local", first.json["session_id"])) == 1
    assert len(list((tmp_path / "data" / "blobs" / "inputs").iterdir())) == 1, "a replay stores no second clip"


def test_a_key_whose_job_never_appeared_passes_to_the_next_request(make_app, monkeypatch):
    """The process that took a key died before storing its job: after a short wait the key is taken over."""
    from api import service

    monkeypatch.setattr(service, "IDEMPOTENCY_WAIT_S", 0.3)
    app, svc = make_app(worker=False)
    client = app.test_client()
    body = json.dumps(TINY_JOB).encode()
    with app.test_request_context("/generate_video", method="POST", data=body, content_type="application/json"):
        digest = service.request_digest()
    assert svc.jobs.reserve_idempotency_key("local", "lost-1", digest, "never-stored", ttl_s=60) is None
    r = client.post("/generate_video", data=body, content_type="application/json",
                    headers={"Idempotency-Key": "lost-1"})
    assert r.status_code == 200 and r.json["reference_id"] != "never-stored"
    assert svc.jobs.idempotency_key("local", "lost-1", 60)["reference_id"] == r.json["reference_id"]


def test_20_concurrent_submits_with_one_key_make_one_job(make_app):
    app, svc = make_app(worker=False)
    port = free_port()
    server = waitress.create_server(app, host="127.0.0.1", port=port, threads=20)
    loop = threading.Thread(target=server.run, daemon=True)
    loop.start()
    try:
        gate, answers, lock = threading.Barrier(20), [], threading.Lock()

        def send():
            gate.wait(60)
            r = requests.post(f"http://127.0.0.1:{port}/generate_video", json={**TINY_JOB, "session_id": "race"},
                              headers={"Idempotency-Key": "same-key"}, timeout=120)
            with lock:
                answers.append((r.status_code, r.json()["reference_id"], r.headers.get("Idempotent-Replayed")))

        threads = [threading.Thread(target=send) for _ in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
    finally:
        server.trigger.pull_trigger(server.close)  # closed from its own loop, which then ends
        loop.join(30)
        assert not loop.is_alive()
        server.task_dispatcher.shutdown()
    assert len(answers) == 20 and {status for status, _, _ in answers} == {200}
    assert len({ref for _, ref, _ in answers}) == 1
    assert sorted(replayed is None for _, _, replayed in answers) == [False] * 19 + [True], "one made it"
    assert [j["reference_id"] for j in svc.jobs.history("local", "race")] == [answers[0][1]]


@pytest.mark.parametrize("env, name", [
    ({"T2V_WEBHOOK_SECRET": "whsec_dG9vLXNob3J0"}, "T2V_WEBHOOK_SECRET"),  # 9 bytes
    ({"T2V_WEBHOOK_SECRET": "not base64!"}, "T2V_WEBHOOK_SECRET"),
    ({"T2V_WEBHOOK_RETRY_S": "0"}, "T2V_WEBHOOK_RETRY_S"),
    ({"T2V_WEBHOOK_TIMEOUT_S": "-1"}, "T2V_WEBHOOK_TIMEOUT_S"),
    ({"T2V_IDEMPOTENCY_TTL_S": "0"}, "T2V_IDEMPOTENCY_TTL_S"),
])
def test_bad_webhook_settings_name_the_variable_and_never_echo_the_secret(env, name):
    from config import ConfigError, Settings

    with pytest.raises(ConfigError, match=name) as err:
        Settings.from_env(env=env)
    assert "dG9vLXNob3J0" not in str(err.value) and "not base64!" not in str(err.value)
    settings = Settings.from_env(env={"T2V_WEBHOOK_SECRET": SECRET, "T2V_WEBHOOK_ALLOW_PRIVATE": "1"})
    assert settings.webhook_allow_private is True and SECRET not in repr(settings)


def test_v1_videos_takes_webhooks_and_idempotency_keys_like_every_create(hooked_app):
    """/v1/videos goes through the same create path: its webhook fields are checked and kept, and an
    Idempotency-Key replays the first video instead of making a second."""
    app, svc = hooked_app(worker=False, webhook_allow_private=False)
    client = app.test_client()
    video = {"prompt": "a red fox", "size": "64x64", "seconds": "0.375"}
    refused = client.post("/v1/videos", json={**video, "webhook_url": "http://127.0.0.1:9/hook"})
    assert refused.status_code == 400 and refused.json["error"]["code"] == "invalid_webhook_url"
    first = client.post("/v1/videos", json=video, headers={"Idempotency-Key": "v1-once"})
    again = client.post("/v1/videos", json=video, headers={"Idempotency-Key": "v1-once"})
    assert first.status_code == again.status_code == 200 and again.headers["Idempotent-Replayed"] == "true"
    assert again.json["id"] == first.json["id"] and again.json["object"] == "video"
    other = client.post("/v1/videos", json={**video, "prompt": "a grey wolf"}, headers={"Idempotency-Key": "v1-once"})
    assert other.status_code == 409 and svc.jobs.count_queued() == 1
