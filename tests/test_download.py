"""download.py against local HTTP servers started by the test: one for release files (with Range support),
one standing in for the Hugging Face Hub (HF_ENDPOINT)."""

import hashlib
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest

import download
from conftest import ROOT
from pipeline import models
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
    assert download.main(["--only", "nonsense", "--dir", str(tmp_path)]) == 2
    assert "unknown item 'nonsense'; known: hunyuanvideo," in capsys.readouterr().err


def test_list_is_a_table_of_size_presence_and_checksum(tmp_path, capsys):
    (tmp_path / "RealESRGAN_x4plus.pth").write_bytes(PAYLOAD)
    (tmp_path / "Wan2.2-TI2V-5B-Diffusers").mkdir()
    (tmp_path / "Wan2.2-TI2V-5B-Diffusers" / "model_index.json").write_text("{}")
    assert download.main(["--list", "--dir", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:4] == ["name", "size", "here", "checksum"]
    rows = {line.split()[0]: line.split() for line in lines[1:] if line.strip() and not line[0].isspace()}
    assert set(models.MODELS) | set(download.RELEASES) <= set(rows)
    assert rows["hunyuanvideo"][1:4] == ["41.9", "GB", "missing"]  # the figure recorded in the registry
    assert rows["RealESRGAN_x4plus"][1:5] == ["1.0", "MB", "present", "sha256"]  # measured on disk
    assert rows["RealESRGAN_x2plus"][1:5] == ["?", "missing", "none", "known"]
    assert rows["wan2.2-ti2v-5b"][1:4] == ["0.0", "MB", "present"] and str(tmp_path / "Wan2.2-TI2V-5B-Diffusers") in lines[7]
    legend = " ".join(lines)
    for column in ("size:", "checksum:", "sha256 =", "none known =", "sizes only ="):
        assert column in legend, column


def test_every_model_goes_to_its_hub_folder_name_and_the_default_to_t2v_models_default(tmp_path):
    from config import Settings

    assert models.local_dir(models.MODELS["hunyuanvideo"], tmp_path) == tmp_path / "HunyuanVideo"
    assert models.local_dir(models.get("hunyuanvideo"), Settings.models_dir) == Path(Settings.model)
    assert models.local_dir(models.MODELS["wan2.2-ti2v-5b"], tmp_path) == tmp_path / "Wan2.2-TI2V-5B-Diffusers"
    assert len({models.local_dir(e, tmp_path) for e in models.ENTRIES}) == len(models.ENTRIES)


def test_http_errors_are_reported_not_raised(tmp_path, release, capsys, monkeypatch):
    release("gone", "/missing.pth")
    assert download.main(["--only", "gone", "--dir", str(tmp_path)]) == 1
    assert "HTTP 404" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------- the Hub

HUB_SHA = "0123456789abcdef0123456789abcdef01234567"
# Files a Hub folder holds that no pipeline loads: they must not be fetched.
NOT_LOADED = {"README.md": b"# card", "assets/sample.mp4": b"\0" * 4096, "transformer/diffusion_pytorch_model.bin": b"x",
              "text_encoder/pytorch_model.bin": b"x", "examples/i2v_input.JPG": b"x"}


class _Hub(BaseHTTPRequestHandler):
    """The three Hub calls `snapshot_download` makes: the repo's revision, its file tree, and each file."""

    repo, files, fetched = "", {}, []

    def do_HEAD(self):
        self._answer(body=False)

    def do_GET(self):
        self._answer(body=True)

    def _answer(self, body: bool):
        path = urlsplit(self.path).path
        api, resolve = f"/api/models/{self.repo}", f"/{self.repo}/resolve/{HUB_SHA}/"
        if path == f"{api}/revision/main":
            data = json.dumps({"id": self.repo, "sha": HUB_SHA, "siblings": [{"rfilename": f} for f in self.files]})
        elif path == f"{api}/tree/{HUB_SHA}":
            data = json.dumps([{"type": "file", "path": f, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                               for f, b in self.files.items()])
        elif path.startswith(resolve) and path[len(resolve):] in self.files:
            name = path[len(resolve):]
            if body:
                self.fetched.append(name)
            return self._send(self.files[name], body, {"X-Repo-Commit": HUB_SHA,
                                                       "ETag": f'"{hashlib.sha1(self.files[name]).hexdigest()}"'})
        else:
            return self.send_error(404)
        self._send(data.encode(), body, {"Content-Type": "application/json"})

    def _send(self, data: bytes, body: bool, headers: dict):
        self.send_response(200)
        for key, value in {**headers, "Content-Length": str(len(data))}.items():
            self.send_header(key, value)
        self.end_headers()
        if body:
            self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def hub(tmp_path):
    """hub(model_id) serves that id's tiny build (the real save_pretrained layout) plus files no pipeline loads,
    under the id's Hub name; returns the endpoint and the files a pipeline loads."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Hub)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()

    def serve(model_id: str):
        from pipeline import tiny

        folder = models.tiny_model_dir(tmp_path / "built", model_id)
        loaded = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*")
                  if p.is_file() and p.name != tiny.FOLDER_CONFIG}
        _Hub.repo, _Hub.files, _Hub.fetched = models.MODELS[model_id].hub_repo, {**loaded, **NOT_LOADED}, []
        return loaded

    yield f"http://127.0.0.1:{httpd.server_address[1]}", serve
    httpd.shutdown()


@pytest.fixture
def hub_here(hub, monkeypatch, tmp_path):
    """The same Hub for download.py run in this process: huggingface_hub read HF_ENDPOINT when it was imported."""
    from huggingface_hub import constants

    endpoint, serve = hub
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    return serve


def downloaded(target: Path) -> dict[str, bytes]:
    return {p.relative_to(target).as_posix(): p.read_bytes() for p in target.rglob("*")
            if p.is_file() and ".cache" not in p.parts}


def test_only_a_registry_id_fetches_the_files_its_pipelines_load(tmp_path, hub):
    endpoint, serve = hub
    loaded = serve("wan2.2-ti2v-5b")  # text and image modes in one folder
    env = {**os.environ, "HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_DISABLE_XET": "1",
           "T2V_MODELS_DIR": str(tmp_path / "models")}
    done = subprocess.run([sys.executable, str(ROOT / "download.py"), "--only", "wan2.2-ti2v-5b"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    target = tmp_path / "models" / "Wan2.2-TI2V-5B-Diffusers"
    assert done.stdout.strip() == f"wan2.2-ti2v-5b: {target}"
    assert sorted(_Hub.fetched) == sorted(loaded), "every file the pipeline loads, and nothing else"
    assert downloaded(target) == loaded

    import diffusers

    assert type(diffusers.DiffusionPipeline.from_pretrained(target)).__name__ == "WanPipeline"


def test_an_image_model_gets_its_image_encoder_processor_and_guider(tmp_path, hub_here):
    loaded = hub_here("hunyuanvideo-1.5-480p-i2v-distilled")
    assert {"guider/guider_config.json", "image_encoder/model.safetensors",
            "feature_extractor/preprocessor_config.json"} <= set(loaded)
    assert download.main(["--only", "hunyuanvideo-1.5-480p-i2v-distilled", "--dir", str(tmp_path / "models")]) == 0
    target = tmp_path / "models" / "HunyuanVideo-1.5-Diffusers-480p_i2v_step_distilled"
    assert sorted(_Hub.fetched) == sorted(loaded) and downloaded(target) == loaded

    import diffusers

    pipe = diffusers.DiffusionPipeline.from_pretrained(target)
    assert type(pipe).__name__ == "HunyuanVideo15ImageToVideoPipeline" and pipe.image_encoder is not None


def test_a_hub_error_is_one_line_not_a_traceback(tmp_path, hub_here, capsys):
    _Hub.repo, _Hub.files = "someone/else", {}  # the Hub answers 404 for the id's folder
    assert download.main(["--only", "wan2.2-ti2v-5b", "--dir", str(tmp_path / "models")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("download.py: error: wan2.2-ti2v-5b: Wan-AI/Wan2.2-TI2V-5B-Diffusers:")
    assert err.count("\n") == 1


def test_known_checksums_are_the_published_ones():
    assert download.RELEASES["RealESRGAN_x4plus"].sha256.startswith("4fa0d389")
    assert download.RELEASES["realesr-animevideov3"].sha256.startswith("b8a83768")
    assert download.RELEASES["realesr-general-x4v3"].sha256.startswith("8dc7edb9")
