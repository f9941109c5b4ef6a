"""Hostile requests get their 4xx JSON, never a 500 or a traceback; a web page cannot drive the API.

Issue 9, items 3 and 4: deep JSON, strict signed-link `expires`, lone surrogates in any string,
chunked bodies over the limit, foreign Host names, and cross-site or non-JSON state-changing requests.
"""

import io
import json
import logging
import os
import socket
import subprocess
import sys

import pytest
import requests

from config import LOOPBACK_NAMES, ConfigError, Settings
from conftest import ROOT, TINY_JOB, wait_for
from storage.jobs import new_job

KEY = "hostile-key"
EVIL = "https://evil.example"


def post_text(client, path, text, content_type="application/json", **kw):
    return client.post(path, data=text, content_type=content_type, **kw)


def error_code(r):
    assert r.is_json, (r.status_code, r.data[:200])
    return r.json["error"]["code"]


def no_traceback(caplog):
    bad = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not bad, [r.getMessage() for r in bad]


def nested(depth: int) -> str:
    return '{"a":' * depth + "1" + "}" * depth


# ---------------------------------------------------------------------------------------- deep JSON

@pytest.mark.parametrize("text", ["[" * 10_000, "[" * 10_000 + "]" * 10_000, nested(10_000)],
                         ids=["open-arrays", "closed-arrays", "objects"])
def test_json_nested_10000_deep_is_400_invalid_json(make_app, caplog, text):
    app, svc = make_app(worker=False)
    r = post_text(app.test_client(), "/generate_video", text)
    assert r.status_code == 400 and error_code(r) == "invalid_json"
    assert svc.jobs.count_queued() == 0
    no_traceback(caplog)


def test_json_nested_past_the_bound_is_refused_even_where_the_route_ignores_it(make_app):
    app, _ = make_app(worker=False)
    client = app.test_client()
    deep = json.dumps({"session_id": "s1", "extra": json.loads(nested(100))})
    r = post_text(client, "/history", deep)
    assert r.status_code == 400 and error_code(r) == "invalid_json" and "nested" in r.json["error"]["message"]
    shallow = json.dumps({"session_id": "s1", "extra": json.loads(nested(5))})
    assert post_text(client, "/history", shallow).status_code == 200


# ---------------------------------------------------------------------------------------- signed links

SIG = "0" * 64


@pytest.mark.parametrize("query", [
    f"expires=%C2%B2&sig={SIG}",                       # "²": str.isdigit() is True, int() fails
    f"expires={'9' * 5000}&sig={SIG}",                 # over Python's int digit limit
    f"expires=%D9%A1%D9%A2%D9%A3%D9%A4%D9%A5%D9%A6%D9%A7%D9%A8%D9%A9%D9%A0%D9%A1&sig={SIG}",  # Arabic-Indic
    f"expires={'9' * 13}&sig={SIG}",                   # ASCII digits, but longer than any issued link
    f"expires=-1&sig={SIG}", f"expires=%2B99999999999&sig={SIG}", f"expires=1e20&sig={SIG}",
    f"expires=%2099999999999&sig={SIG}", f"expires=99999999999%0A&sig={SIG}", f"expires=&sig={SIG}",
    "expires=99999999999&sig=%C3%A9",                  # a non-ASCII signature: hmac.compare_digest raises on str
    "expires=99999999999&sig=",
], ids=lambda q: q[:40])
def test_malformed_signed_links_are_401_invalid_signature(make_app, caplog, query):
    app, _ = make_app(worker=False, api_keys=(KEY,))
    for media in ("video", "poster"):
        r = app.test_client().get(f"/jobs/abcdefgh/{media}?{query}")
        assert r.status_code == 401 and error_code(r) == "invalid_signature"
    no_traceback(caplog)


# ---------------------------------------------------------------------------------------- text

@pytest.mark.parametrize("path, body, field", [
    ("/generate_video", {**TINY_JOB, "prompt": "a fox \ud800"}, "prompt"),
    ("/generate_video", {**TINY_JOB, "negative_prompt": "\udfff blur"}, "negative_prompt"),
    ("/generate_video", {**TINY_JOB, "session_id": "\udc80"}, "session_id"),
    ("/generate_video", {**TINY_JOB, "\ud800": 1}, "\\ud800"),
    ("/history", {"session_id": "s1", "meta": {"tags": ["ok", "\ud83d"]}}, "meta.tags[1]"),
    ("/get_status", {"session_id": "s1", "reference_id": "\ud800"}, "reference_id"),
], ids=["prompt", "negative_prompt", "session_id", "key", "nested", "reference_id"])
def test_lone_surrogates_in_any_string_are_400_naming_the_field(make_app, caplog, path, body, field):
    app, svc = make_app(worker=False)
    text = json.dumps(body)  # ensure_ascii writes each surrogate as a \\uXXXX escape
    assert "\\ud" in text
    r = post_text(app.test_client(), path, text)
    assert r.status_code == 400 and error_code(r) == "invalid_text"
    assert r.json["error"]["message"].startswith(f"{field} ")
    assert svc.jobs.count_queued() == 0
    no_traceback(caplog)


def test_a_prompt_with_a_proper_surrogate_pair_is_fine(make_app):
    app, svc = make_app(worker=False)
    r = post_text(app.test_client(), "/generate_video", json.dumps({**TINY_JOB, "prompt": "a fox \U0001F98A"}))
    assert r.status_code == 200 and svc.jobs.get(r.json["reference_id"])["params"]["prompt"] == "a fox \U0001F98A"


# ---------------------------------------------------------------------------------------- chunked bodies

def chunked(client, body: bytes, path="/generate_video", **kw):
    """A Transfer-Encoding: chunked request as a WSGI server hands it over: no length, a terminated stream."""
    return client.post(path, input_stream=io.BytesIO(body), content_type="application/json",
                       headers={"Transfer-Encoding": "chunked", **kw.pop("headers", {})},
                       environ_overrides={"wsgi.input_terminated": True}, **kw)


def test_chunked_body_over_the_limit_is_413_not_invalid_json(make_app, caplog):
    app, svc = make_app(worker=False, max_body_kb=64)
    client = app.test_client()
    big = json.dumps({**TINY_JOB, "prompt": "x" * 200_000}).encode()
    r = chunked(client, big, path="/history")  # /generate_video allows more: its JSON may carry an image
    assert r.status_code == 413 and error_code(r) == "too_large"
    r = chunked(client, json.dumps(TINY_JOB).encode())  # a small chunked body is read whole
    assert r.status_code == 200 and svc.jobs.count_queued() == 1
    no_traceback(caplog)


# ---------------------------------------------------------------------------------------- Host

@pytest.mark.parametrize("host", ["evil.example", "evil.example:7866", "127.0.0.1.nip.io:7866", "localhost.",
                                  "bad host", "[::2]:7866"])
def test_foreign_host_is_400_on_a_loopback_server(make_app, caplog, host):
    app, svc = make_app(worker=False)
    client = app.test_client()
    for r in (client.get("/health", headers={"Host": host}),
              client.post("/generate_video", json=TINY_JOB, headers={"Host": host})):
        assert r.status_code == 400 and error_code(r) == "host_not_allowed"
    assert svc.jobs.count_queued() == 0
    no_traceback(caplog)


@pytest.mark.parametrize("host", ["localhost", "LOCALHOST:7866", "127.0.0.1", "127.0.0.1:7866", "[::1]",
                                  "[::1]:7866", "localhost:8080"])
def test_loopback_names_are_served(make_app, host):
    app, _ = make_app(worker=False)
    assert app.test_client().get("/health", headers={"Host": host}).status_code == 200


def test_allowed_hosts_setting(make_app):
    app, _ = make_app(worker=False, host="0.0.0.0")  # listening everywhere: any Host unless set
    assert app.test_client().get("/health", headers={"Host": "evil.example"}).status_code == 200
    app, _ = make_app(worker=False, host="0.0.0.0", allowed_hosts=("api.example.com",))
    client = app.test_client()
    assert client.get("/health", headers={"Host": "api.example.com:443"}).status_code == 200
    assert client.get("/health", headers={"Host": "localhost"}).status_code == 400
    app, _ = make_app(worker=False, allowed_hosts=("*",))  # loopback, check lifted
    assert app.test_client().get("/health", headers={"Host": "evil.example"}).status_code == 200


@pytest.mark.parametrize("host, trusted", [
    ("127.0.0.1", LOOPBACK_NAMES), ("127.0.0.2", LOOPBACK_NAMES), ("::1", LOOPBACK_NAMES),
    ("localhost", LOOPBACK_NAMES), ("0.0.0.0", None), ("192.168.1.5", None), ("::", None),
])
def test_default_trusted_hosts_follow_the_listen_address(host, trusted):
    assert Settings.from_env(env={"T2V_HOST": host}).trusted_hosts == trusted


@pytest.mark.parametrize("env", [
    {"T2V_ALLOWED_HOSTS": "https://api.example.com"}, {"T2V_ALLOWED_HOSTS": "api.example.com:443"},
    {"T2V_CORS_ORIGINS": "app.example.com"}, {"T2V_CORS_ORIGINS": "https://app.example.com/"},
    {"T2V_CORS_ORIGINS": "*"}, {"T2V_CORS_ORIGINS": "null"},
])
def test_bad_host_and_origin_settings_name_the_variable(env):
    with pytest.raises(ConfigError, match=next(iter(env))):
        Settings.from_env(env=env)


# ---------------------------------------------------------------------------------------- cross-site

def test_cross_site_text_plain_post_queues_nothing(make_app, caplog):
    """The request a hostile page can send without a preflight: it used to queue a GPU job."""
    app, svc = make_app(worker=False)
    client = app.test_client()
    body = json.dumps(TINY_JOB)
    attacks = [
        post_text(client, "/generate_video", body, "text/plain;charset=UTF-8",
                  headers={"Origin": EVIL, "Sec-Fetch-Site": "cross-site"}),
        post_text(client, "/generate_video", body, "text/plain", headers={"Origin": EVIL}),
        post_text(client, "/generate_video", body, "text/plain", headers={"Sec-Fetch-Site": "cross-site"}),
        post_text(client, "/generate_video", body, "text/plain"),  # an old browser that sends no Origin
        post_text(client, "/generate_video", "prompt=fox", "application/x-www-form-urlencoded"),
        post_text(client, "/generate_video", body, "application/json", headers={"Origin": EVIL}),
        post_text(client, "/generate_video", body, "application/json", headers={"Sec-Fetch-Site": "cross-site"}),
        post_text(client, "/generate_video", body, "application/json", headers={"Origin": "null"}),
        post_text(client, "/generate_video", body, "application/json", headers={"Origin": "http://localhost:9999"}),
    ]
    assert [r.status_code for r in attacks] == [403, 403, 403, 415, 415, 403, 403, 403, 403]
    assert {error_code(r) for r in attacks} == {"cross_site", "unsupported_media_type"}
    assert svc.jobs.count_queued() == 0
    same_site = post_text(client, "/generate_video", body, headers={"Origin": "http://localhost",
                                                                    "Sec-Fetch-Site": "same-origin"})
    assert same_site.status_code == 200 and svc.jobs.count_queued() == 1
    no_traceback(caplog)


def test_cross_site_cancel_is_refused(make_app):
    app, svc = make_app(worker=False)
    job = svc.jobs.create(new_job("job-to-keep", "s1", "local", "generate", dict(TINY_JOB)))
    r = app.test_client().post(f"/jobs/{job['reference_id']}/cancel", headers={"Origin": EVIL})
    assert r.status_code == 403 and svc.jobs.get("job-to-keep")["status"] == "queued"


def test_cors_origins_may_call_with_a_preflight(make_app):
    app, svc = make_app(worker=False, api_keys=(KEY,), cors_origins=("https://app.example",))
    client = app.test_client()
    preflight = client.open("/generate_video", method="OPTIONS", headers={
        "Origin": "https://app.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})
    assert preflight.status_code == 200  # no key on a preflight: browsers never send one
    assert preflight.headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert "POST" in preflight.headers["Access-Control-Allow-Methods"]
    allowed = {h.strip().lower() for h in preflight.headers["Access-Control-Allow-Headers"].split(",")}
    assert {"authorization", "content-type", "x-api-key"} <= allowed
    assert "Origin" in preflight.headers["Vary"]

    r = client.post("/generate_video", json=TINY_JOB, headers={
        "Origin": "https://app.example", "Sec-Fetch-Site": "cross-site", "Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200 and r.headers["Access-Control-Allow-Origin"] == "https://app.example"
    r = client.post("/generate_video", json=TINY_JOB, headers={"Origin": "https://app.example"})
    assert r.status_code == 401 and r.headers["Access-Control-Allow-Origin"] == "https://app.example"

    other = client.open("/generate_video", method="OPTIONS", headers={
        "Origin": EVIL, "Access-Control-Request-Method": "POST"})
    assert "Access-Control-Allow-Origin" not in other.headers
    r = client.post("/generate_video", json=TINY_JOB, headers={"Origin": EVIL, "Authorization": f"Bearer {KEY}"})
    assert r.status_code == 403 and "Access-Control-Allow-Origin" not in r.headers
    assert svc.jobs.count_queued() == 1


# ---------------------------------------------------------------------------------------- body types

def test_state_changing_routes_need_their_body_type(make_app):
    app, svc = make_app(worker=False)
    client = app.test_client()
    job = svc.jobs.create(new_job("job-one", "s1", "local", "generate", dict(TINY_JOB)))
    body = json.dumps({"session_id": "s1"})
    for r in (post_text(client, "/history", body, "text/plain"),
              post_text(client, "/history", body, "application/vnd.t2v+json"),
              client.post("/history", data=body.encode(), headers={"Content-Type": ""}),
              post_text(client, "/upscale_video", body),                       # an upload is multipart
              post_text(client, "/history", "--x--\r\n", "multipart/form-data; boundary=x"),
              post_text(client, f"/jobs/{job['reference_id']}/cancel", "", "application/x-www-form-urlencoded")):
        assert r.status_code == 415 and error_code(r) == "unsupported_media_type", r.json
    assert svc.jobs.get("job-one")["status"] == "queued"
    assert post_text(client, "/history", body, "application/json; charset=utf-8").status_code == 200
    # A POST with no body and no Content-Type (curl -X POST) carries nothing to smuggle: cancel works.
    r = client.post(f"/jobs/{job['reference_id']}/cancel")
    assert r.status_code == 200 and r.json["status"] == "canceled"


# ---------------------------------------------------------------------------------------- catch-all

def _chunked_case():
    big = json.dumps({**TINY_JOB, "prompt": "x" * 100_000}).encode()
    return lambda: {"input_stream": io.BytesIO(big), "content_type": "application/json",
                    "headers": {"Transfer-Encoding": "chunked"}, "environ_overrides": {"wsgi.input_terminated": True}}


def _json(text):
    return lambda: {"data": text, "content_type": "application/json"}


HOSTILE = {
    "deep-array": _json("[" * 10_000),
    "deep-object": _json(nested(10_000)),
    "deep-parsable": _json(json.dumps({"session_id": "s1", "reference_id": "r1", "prompt": "fox",
                                       "x": json.loads(nested(200))})),
    "surrogate-value": _json(json.dumps({"session_id": "\ud800", "reference_id": "\udfff", "prompt": "\ud800"})),
    "surrogate-key": _json(json.dumps({"\ud800": "x", "session_id": "s1"})),
    "bad-utf8": lambda: {"data": b'{"prompt": "\xed\xa0\x80", "session_id": "\xff"}',
                         "content_type": "application/json"},
    "huge-integer": _json('{"prompt": "fox", "session_id": "s1", "seed": ' + "9" * 5000 + "}"),
    "nan-inf": _json('{"prompt": "fox", "width": NaN, "height": Infinity, "guidance_scale": -Infinity}'),
    "nul": _json('{"prompt": "fox\\u0000", "session_id": "a\\u0000", "reference_id": "\\u0000"}'),
    "wrong-types": _json('{"prompt": ["fox"], "session_id": {"a": 1}, "reference_id": [], "width": true}'),
    "not-object": _json('"just a string"'),
    "text-plain": lambda: {"data": json.dumps(TINY_JOB), "content_type": "text/plain"},
    "form": lambda: {"data": "prompt=fox&session_id=s1", "content_type": "application/x-www-form-urlencoded"},
    "broken-multipart": lambda: {"data": b"--x\r\nnonsense", "content_type": "multipart/form-data; boundary=x"},
    "multipart-no-boundary": lambda: {"data": b"--x--", "content_type": "multipart/form-data"},
    "chunked-over-limit": _chunked_case(),
    "expires-superscript": lambda: {"query_string": f"expires=%C2%B2&sig={SIG}"},
    "expires-5000-digits": lambda: {"query_string": f"expires={'9' * 5000}&sig={SIG}"},
    "sig-non-ascii": lambda: {"query_string": "expires=99999999999&sig=%C3%A9%00"},
    "foreign-host": lambda: {"headers": {"Host": "evil.example"}},
    "bad-host": lambda: {"headers": {"Host": "bad host\x7f"}},
    "cross-site-text-plain": lambda: {"data": json.dumps(TINY_JOB), "content_type": "text/plain",
                                      "headers": {"Origin": EVIL, "Sec-Fetch-Site": "cross-site"}},
    "broken-origin": lambda: {"data": json.dumps(TINY_JOB), "content_type": "application/json",
                              "headers": {"Origin": "http://[::1"}},
    "bad-content-length": lambda: {"environ_overrides": {"CONTENT_LENGTH": "9" * 5000}},
    "negative-content-length": lambda: {"environ_overrides": {"CONTENT_LENGTH": "-5"}},
    "bad-range": lambda: {"headers": {"Range": "bytes=99999999999999999999999-1"}},
    "bad-auth": lambda: {"headers": {"Authorization": "Bearer \udcff", "X-API-Key": "é" * 1000}},
}


def route_calls(app, ref: str):
    """(method, url) for every method of every route in the app's url_map; DELETE last, so that
    every other route still finds the target job."""
    calls = [(method, rule.rule.replace("<reference_id>", ref).replace("<path:filename>", "app.js"))
             for rule in app.url_map.iter_rules() for method in sorted(rule.methods)]
    return sorted(calls, key=lambda call: call[0] == "DELETE")


@pytest.mark.parametrize("keys", [(), (KEY,)], ids=["no-keys", "keys"])
@pytest.mark.parametrize("case", list(HOSTILE), ids=list(HOSTILE))
def test_no_route_answers_500_to_any_hostile_input(make_app, caplog, case, keys):
    app, svc = make_app(worker=False, api_keys=keys)
    svc.jobs.create(new_job("target-job", "s1", "local", "generate", dict(TINY_JOB)))
    client = app.test_client()
    seen = []
    for method, url in route_calls(app, "target-job"):
        kwargs = HOSTILE[case]()
        if keys and "headers" not in kwargs:
            kwargs["headers"] = {"X-API-Key": KEY}
        r = client.open(url, method=method, **kwargs)
        seen.append((method, url, r.status_code))
        if method != "HEAD" and r.status_code >= 400:
            assert r.is_json and r.json["error"]["code"], (method, url, r.status_code, r.data[:200])
    assert all(status < 500 for _, _, status in seen), [s for s in seen if s[2] >= 500]
    assert len({url for _, url, _ in seen}) >= 13  # every route was tried
    assert svc.jobs.count_queued() <= 1  # the target job, unless a cancel took it: nothing new
    no_traceback(caplog)


# ---------------------------------------------------------------------------------------- real server

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def raw_request(port: int, head: str, body: bytes = b"") -> tuple[int, dict]:
    """Send bytes as they are (a chunked body, a foreign Host) and read the answer: (status, JSON body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(head.encode("latin-1") + b"\r\n" + body)
        s.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head_bytes, _, payload = data.partition(b"\r\n\r\n")
    status = int(head_bytes.split(b" ", 2)[1])
    if b"transfer-encoding: chunked" in head_bytes.lower():
        payload = _dechunk(payload)
    return status, json.loads(payload)


def _dechunk(data: bytes) -> bytes:
    out = b""
    while data:
        size, _, rest = data.partition(b"\r\n")
        n = int(size.split(b";")[0], 16)
        if n == 0:
            break
        out, data = out + rest[:n], rest[n + 2:]
    return out


def chunk_body(payload: bytes, size: int = 8192) -> bytes:
    parts = [payload[i:i + size] for i in range(0, len(payload), size)]
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"


@pytest.fixture
def served(tmp_path):
    """`python app.py` (whatever server it runs), API only, on a free loopback port; yields (port, log path)."""
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "T2V_DATA_DIR": str(tmp_path / "data"), "T2V_WORKER": "off",
           "T2V_HOST": "127.0.0.1", "T2V_PORT": str(port), "T2V_MAX_BODY_KB": "64"}
    for name in ("T2V_API_KEYS", "T2V_ALLOWED_HOSTS", "T2V_CORS_ORIGINS"):
        env.pop(name, None)
    log_path = tmp_path / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, str(ROOT / "app.py")], cwd=tmp_path, env=env, stdout=log,
                                stderr=subprocess.STDOUT)

    def up():
        assert proc.poll() is None, log_path.read_text(errors="replace")[-3000:]
        try:
            return requests.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200
        except requests.RequestException:
            return False

    try:
        wait_for(up, timeout=90, every=0.2)
        yield port, log_path
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_real_server_answers_hostile_requests_with_4xx_json(served):
    port, log_path = served
    host = f"Host: 127.0.0.1:{port}\r\n"
    big = json.dumps({**TINY_JOB, "prompt": "x" * 100_000}).encode()
    status, body = raw_request(port, f"POST /history HTTP/1.1\r\n{host}Content-Type: application/json\r\n"
                                     "Transfer-Encoding: chunked\r\nConnection: close\r\n", chunk_body(big))
    assert (status, body["error"]["code"]) == (413, "too_large")

    status, body = raw_request(port, "GET /health HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n")
    assert (status, body["error"]["code"]) == (400, "host_not_allowed")

    job = json.dumps(TINY_JOB).encode()
    status, body = raw_request(port, f"POST /generate_video HTTP/1.1\r\n{host}Content-Type: text/plain\r\n"
                                     f"Origin: {EVIL}\r\nSec-Fetch-Site: cross-site\r\n"
                                     f"Content-Length: {len(job)}\r\nConnection: close\r\n", job)
    assert (status, body["error"]["code"]) == (403, "cross_site")

    base = f"http://127.0.0.1:{port}"
    deep = requests.post(f"{base}/generate_video", data="[" * 10_000, headers={"Content-Type": "application/json"},
                         timeout=30)
    assert deep.status_code == 400 and deep.json()["error"]["code"] == "invalid_json"
    lone = requests.post(f"{base}/generate_video", data=json.dumps({**TINY_JOB, "prompt": "\ud800"}),
                         headers={"Content-Type": "application/json"}, timeout=30)
    assert lone.status_code == 400 and lone.json()["error"]["code"] == "invalid_text"
    assert requests.get(f"{base}/health", timeout=10).json()["queue_length"] == 0  # nothing was queued
    assert "Traceback" not in log_path.read_text(errors="replace")


@pytest.mark.parametrize("url, hinted", [("http://127.0.0.1:9/hook", True), ("http://[::1]/hook", True),
                                         ("http://10.0.0.5/hook", True), ("http://169.254.169.254/", False)])
def test_a_refused_webhook_address_names_the_setting_that_allows_it_for_development(url, hinted):
    from webhooks import WebhookRefused, check_url

    with pytest.raises(WebhookRefused) as refused:
        check_url(url, allow_private=False)
    assert ("T2V_WEBHOOK_ALLOW_PRIVATE=1" in str(refused.value)) is hinted, refused.value  # metadata stays refused
