"""download.py against a local HTTP server (with Range support) started by the test."""

import hashlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import download
from pipeline.upscale import Release

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB
GOOD_SHA = hashlib.sha256(PAYLOAD).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    files = {"/weights.pth": PAYLOAD, "/tampered.pth": PAYLOAD[:-1] + b"X"}
    requests = []

    def do_GET(self):
        body = self.files.get(self.path)
        self.requests.append((self.path, self.headers.get("Range")))
        if body is None:
            self.send_error(404)
            return
        start = 0
        if rng := self.headers.get("Range"):
            start = int(rng.removeprefix("bytes=").split("-")[0])
            if start >= len(body):
                self.send_error(416)
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        self.wfile.write(body[start:])

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    _Handler.requests = []
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.fixture
def release(monkeypatch, server):
    def add(name, path, sha=GOOD_SHA):
        monkeypatch.setitem(download.RELEASES, name, Release(f"{name}.pth", f"{server}{path}", sha))
    return add


def test_verified_download_gets_its_final_name(tmp_path, release):
    release("good", "/weights.pth")
    path = download.fetch_release("good", tmp_path, progress=False)
    assert path == tmp_path / "good.pth" and path.read_bytes() == PAYLOAD
    assert not list(tmp_path.glob("*.part"))


def test_checksum_mismatch_leaves_no_file_under_the_final_name(tmp_path, release):
    release("bad", "/tampered.pth")
    with pytest.raises(download.DownloadError, match="sha256 mismatch"):
        download.fetch_release("bad", tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_interrupted_download_resumes_from_the_part_file(tmp_path, release):
    release("good", "/weights.pth")
    (tmp_path / "good.pth.part").write_bytes(PAYLOAD[:300_000])
    path = download.fetch_release("good", tmp_path, progress=False)
    assert path.read_bytes() == PAYLOAD
    assert _Handler.requests == [("/weights.pth", "bytes=300000-")]


def test_an_already_verified_file_is_not_fetched_again(tmp_path, release):
    release("good", "/weights.pth")
    (tmp_path / "good.pth").write_bytes(PAYLOAD)
    download.fetch_release("good", tmp_path, progress=False)
    assert _Handler.requests == []


def test_cli_only_dir_and_mirror(tmp_path, server, monkeypatch, capsys):
    monkeypatch.setitem(download.RELEASES, "weights", Release("weights.pth", "https://example.invalid/x", GOOD_SHA))
    assert download.main(["--only", "weights", "--dir", str(tmp_path), "--mirror", server]) == 0
    assert (tmp_path / "weights.pth").read_bytes() == PAYLOAD
    assert download.main(["--list", "--dir", str(tmp_path)]) == 0
    listing = capsys.readouterr().out
    assert "weights" in listing and "here" in listing and "HunyuanVideo" in listing
    assert download.main(["--only", "nonsense", "--dir", str(tmp_path)]) == 2


def test_http_errors_are_reported_not_raised(tmp_path, release, capsys, monkeypatch):
    release("gone", "/missing.pth")
    assert download.main(["--only", "gone", "--dir", str(tmp_path)]) == 1
    assert "HTTP 404" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_hunyuan_is_fetched_with_only_the_files_the_pipeline_loads(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr("huggingface_hub.snapshot_download", lambda repo, **kw: calls.append((repo, kw)))
    download.fetch_hunyuan(tmp_path)
    repo, kw = calls[0]
    assert repo == "hunyuanvideo-community/HunyuanVideo" and kw["local_dir"] == tmp_path / "HunyuanVideo"
    assert "*/*.safetensors" in kw["allow_patterns"] and not any(p.endswith(".bin") for p in kw["allow_patterns"])


def test_known_checksums_are_the_published_ones():
    assert download.RELEASES["RealESRGAN_x4plus"].sha256.startswith("4fa0d389")
    assert download.RELEASES["realesr-animevideov3"].sha256.startswith("b8a83768")
    assert download.RELEASES["realesr-general-x4v3"].sha256.startswith("8dc7edb9")
