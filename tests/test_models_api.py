"""The API's side of the model registry (issue 11): `model`, `loras` and images on /generate_video, GET /models,
and /limits for tiny builds (issue 13). Jobs are queued, not run: the worker's side is tested with it."""

import base64
import io
import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from PIL import Image

from app import create_app
from config import Settings
from conftest import TINY_JOB
from pipeline.models import MODELS
from storage.blobs import LocalBlobStore
from storage.sqlite import SqliteJobStore
from test_spec import png
from worker.loop import Worker


def picture(fmt="PNG", size=(48, 32)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 120, 200)).save(buf, fmt)
    return buf.getvalue()


def data_uri(data: bytes, mime="image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def post(client, body):
    return client.post("/generate_video", json=body)


def post_form(client, fields, image=None, name="image.png"):
    data = dict(fields)
    if image is not None:
        data["image"] = (io.BytesIO(image), name)
    return client.post("/generate_video", data=data, content_type="multipart/form-data")


def refused(r, code="invalid_parameter", status=400) -> str:
    assert r.status_code == status and r.is_json, (r.status_code, r.data[:300])
    assert r.json["error"]["code"] == code, r.json
    return r.json["error"]["message"]


@pytest.fixture
def tiny_api(make_app, tmp_path):
    """A tiny server (every registry id as its tiny build) with two LoRAs installed; no jobs run."""
    loras = tmp_path / "models" / "loras"
    loras.mkdir(parents=True)
    for name in ("lightning-4step", "style"):
        (loras / f"{name}.safetensors").write_bytes(b"\0" * 8)
    (loras / "not a name.safetensors").write_bytes(b"")  # not a LoRA name: never offered
    (loras / "notes.txt").write_text("")
    app, svc = make_app(worker=False, models_dir=tmp_path / "models")
    return app.test_client(), svc


def test_a_request_without_model_is_queued_as_before(tiny_api):
    client, svc = tiny_api
    r = post(client, {**TINY_JOB, "seed": 3})
    assert r.status_code == 200 and set(r.json) == {"session_id", "reference_id", "status", "queue_position"}
    params = svc.jobs.get(r.json["reference_id"])["params"]
    assert params == {**TINY_JOB, "negative_prompt": None, "original_prompt": None, "model": "hunyuanvideo",
                      "fps": 24, "guidance_scale": 6.0, "seed": 3, "upscale": True, "outscale": 4, "loras": [],
                      "audio": False, "image_key": None}


def test_tiny_defaults_are_small(tiny_api):
    client, svc = tiny_api
    for model in (None, "wan2.2-ti2v-5b", "wan2.1-t2v-1.3b"):
        r = post(client, {"prompt": "a red fox", **({"model": model} if model else {})})
        params = svc.jobs.get(r.json["reference_id"])["params"]
        assert (params["model"], params["width"], params["height"], params["num_frames"],
                params["num_inference_steps"]) == (model or "hunyuanvideo", 64, 64, 9, 4)
    limits = client.get("/limits").json
    assert limits["sizes"] == [{"label": "tiny 1:1", "width": 64, "height": 64},
                               {"label": "tiny 2:1", "width": 128, "height": 64},
                               {"label": "tiny 1:2", "width": 64, "height": 128}]
    assert (limits["max_side"], limits["max_frames"], limits["default_steps"], limits["model"]) == \
        (256, 33, 4, "hunyuanvideo")
    assert limits["defaults"]["num_frames"] == 9 and limits["max_image_mb"] == 20


def test_models_lists_each_model_with_its_rules_and_the_loras(tiny_api):
    client, _ = tiny_api
    listing = client.get("/models").json
    assert listing["default"] == "hunyuanvideo" and listing["loras"] == ["lightning-4step", "style"]
    by_id = {m["id"]: m for m in listing["models"]}
    assert list(by_id) == list(MODELS)
    wan = by_id["wan2.2-ti2v-5b"]
    assert (wan["inputs"], wan["installed"], wan["tiny"], wan["lora"]) == ("both", True, True, True)
    assert wan["limits"]["size_multiple"] == 32 and wan["defaults"]["width"] == 64
    assert by_id["wan2.2-i2v-a14b"]["inputs"] == "image" and by_id["hunyuanvideo-1.5-480p"]["lora"] is False
    # Which models split across a worker group's ranks (pipeline/parallel.py), and why one does not.
    assert wan["parallel"] is True and by_id["hunyuanvideo"]["parallel"] is True and wan["parallel_note"] is None
    hv_i2v = by_id["hunyuanvideo-i2v"]
    assert hv_i2v["parallel"] is False and "first-frame" in hv_i2v["parallel_note"]


def test_a_real_deployment_lists_what_is_installed(make_app, tmp_path):
    models_dir = tmp_path / "models"
    wan = models_dir / "Wan2.1-T2V-1.3B-Diffusers"
    wan.mkdir(parents=True)
    (wan / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    app, _ = make_app(worker=False, model=str(models_dir / "HunyuanVideo"), models_dir=models_dir)
    listing = app.test_client().get("/models").json
    installed = {m["id"]: m["installed"] for m in listing["models"]}
    assert installed["wan2.1-t2v-1.3b"] is True and installed["hunyuanvideo"] is False
    assert len(installed) == len(MODELS)  # T2V_WORKER=off: any id may be served by a remote worker
    wan_view = next(m for m in listing["models"] if m["id"] == "wan2.1-t2v-1.3b")
    assert wan_view["tiny"] is False and wan_view["defaults"]["num_frames"] == 81
    assert wan_view["presets"][0] == {"label": "480p 16:9", "width": 832, "height": 480}


def test_a_model_no_worker_here_serves_is_refused_at_submission(tmp_path, tiny_models):
    """With the worker in this process, only its models are accepted; with the worker elsewhere, any."""
    models_dir = tmp_path / "models"
    wan = models_dir / "Wan2.1-T2V-1.3B-Diffusers"
    wan.mkdir(parents=True)
    (wan / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    settings = Settings.from_env(env={}, model=str(models_dir / "HunyuanVideo"), models_dir=models_dir,
                                 data_dir=tmp_path / "data", upscaler="tiny", worker="off")
    jobs, blobs = SqliteJobStore(tmp_path / "data" / "jobs.sqlite3"), LocalBlobStore(tmp_path / "data" / "blobs")
    worker = Worker(settings, jobs, blobs, models=tiny_models)  # this process's worker (not started: nothing runs)
    client = create_app(settings, jobs=jobs, blobs=blobs, worker=worker).test_client()
    message = refused(post(client, TINY_JOB))
    assert message.startswith("model: hunyuanvideo is not installed on this server (it serves: wan2.1-t2v-1.3b)")
    assert "python download.py --only hunyuanvideo" in message
    r = post(client, {**TINY_JOB, "model": "wan2.1-t2v-1.3b"})
    assert r.status_code == 200 and jobs.count_queued() == 1
    remote = create_app(settings, jobs=jobs, blobs=blobs, worker=None).test_client()  # T2V_WORKER=off
    assert post(remote, TINY_JOB).status_code == 200


@pytest.mark.parametrize("body, message", [
    ({"model": "sora"}, "model: unknown model 'sora'"),
    ({"model": "wan2.2-ti2v-5b", "num_frames": 10}, "wan2.2-ti2v-5b: num_frames must be of the form 4k+1"),
    ({"model": "wan2.2-ti2v-5b", "width": 80}, "wan2.2-ti2v-5b: width must be a multiple of 32, got 80"),
    ({"model": "hunyuanvideo", "image": data_uri(picture())}, "hunyuanvideo: image is not taken"),
    ({"model": "wan2.2-i2v-a14b"}, "wan2.2-i2v-a14b: image is required"),
    ({"model": "hunyuanvideo-1.5-480p-i2v-distilled", "loras": [{"name": "style"}], "image": data_uri(picture())},
     "hunyuanvideo-1.5-480p-i2v-distilled: loras are not supported: diffusers 0.42.1 has no LoRA loader for "
     "HunyuanVideo15ImageToVideoPipeline"),
    ({"loras": [{"name": "missing"}]}, "loras[0].name: is not an installed LoRA: 'missing'; installed: "
                                       "lightning-4step, style"),
    ({"loras": [{"name": "../../etc/passwd"}]}, "loras[0].name: is not an installed LoRA"),
    ({"loras": [{"name": "not a name"}]}, "loras[0].name: is not an installed LoRA"),
    ({"image_key": "inputs/abcdefghij"}, "image_key: is set by the server"),
])
def test_bad_input_gets_a_400_that_names_it(tiny_api, body, message):
    client, svc = tiny_api
    assert message in refused(post(client, {"prompt": "a red fox", **body}))
    assert svc.jobs.count_queued() == 0 and not list(Path(svc.settings.data_dir, "blobs").rglob("inputs/*"))


@pytest.mark.parametrize("image, message", [
    ("https://example.com/cat.png", "must be a data: URI (data:image/png;base64,...); this server fetches no URL"),
    ("data:image/png;base64,****", "must be a data: URI"),
    ("data:image/png;base64,abc", "not valid base64"),
    (None, "must be a data: URI"),
    (data_uri(b"GIF89a not really"), "not a decodable PNG, JPEG or WebP image"),
    (data_uri(picture("GIF"), "image/gif"), "not a decodable PNG, JPEG or WebP image"),
    (data_uri(picture()[:60]), "not a decodable PNG, JPEG or WebP image"),  # cut before its pixels
    (data_uri(picture(size=(80, 64))), "is 80x64, 5120 pixels; the cap is 4096 (T2V_MAX_IMAGE_PIXELS)"),
    (data_uri(png(20000, 20000)), "too many pixels"),  # a decompression bomb: 400 million pixels in 60 KB
    (data_uri(b"\0" * (1024 * 1024 + 3)), "image: is over 1 MB (T2V_MAX_IMAGE_MB)"),
])
def test_bad_or_huge_images_are_refused_before_queueing(make_app, image, message):
    app, svc = make_app(worker=False, max_image_pixels=4096, max_image_mb=1)
    r = post(app.test_client(), {"prompt": "a red fox", "model": "wan2.2-ti2v-5b", "image": image})
    assert message in refused(r, "invalid_image")
    assert svc.jobs.count_queued() == 0 and not list(Path(svc.settings.data_dir, "blobs").rglob("inputs/*"))


@pytest.mark.parametrize("fmt, mime", [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("WEBP", "image/webp")])
def test_a_data_uri_image_is_stored_under_the_jobs_id(tiny_api, fmt, mime):
    client, svc = tiny_api
    image = picture(fmt)
    r = post(client, {"prompt": "a red fox", "model": "wan2.2-ti2v-5b", "image": data_uri(image, mime)})
    assert r.status_code == 200, r.json
    ref = r.json["reference_id"]
    params = svc.jobs.get(ref)["params"]
    assert params["image_key"] == f"inputs/{ref}" and params["model"] == "wan2.2-ti2v-5b"
    assert svc.blobs.local_path(f"inputs/{ref}").read_bytes() == image


def test_a_multipart_image_job_keeps_the_json_names_with_text_values(tiny_api):
    client, svc = tiny_api
    image = picture("JPEG")
    fields = {"prompt": "a red fox", "model": "wan2.2-i2v-a14b", "width": "128", "height": "64", "num_frames": "17",
              "upscale": "false", "guidance_scale": "4.5", "seed": "7", "negative_prompt": "",
              "loras": json.dumps([{"name": "lightning-4step", "scale": 0.8}]), "session_id": "12345"}
    r = post_form(client, fields, image, name="../../etc/cat.jpg")
    assert r.status_code == 200, r.json
    assert r.json["session_id"] == "12345"
    ref = r.json["reference_id"]
    params = svc.jobs.get(ref)["params"]
    assert {k: params[k] for k in ("width", "height", "num_frames", "upscale", "guidance_scale", "seed", "loras")} == \
        {"width": 128, "height": 64, "num_frames": 17, "upscale": False, "guidance_scale": 4.5, "seed": 7,
         "loras": [{"name": "lightning-4step", "scale": 0.8}]}
    assert params["negative_prompt"] is None and params["image_key"] == f"inputs/{ref}"
    assert svc.blobs.local_path(f"inputs/{ref}").read_bytes() == image  # the server's name, not the client's
    assert not list(Path(svc.settings.data_dir).rglob("*cat*"))


@pytest.mark.parametrize("fields, image, code, message", [
    ({"prompt": "a", "model": "wan2.2-ti2v-5b"}, None, "missing_field", "file field 'image'"),
    ({"prompt": "a", "model": "wan2.2-ti2v-5b", "num_frames": "ten"}, picture(), "invalid_parameter",
     "num_frames: must be an integer"),
    ({"prompt": "a", "model": "wan2.2-ti2v-5b", "upscale": "yes"}, picture(), "invalid_parameter",
     "upscale: must be true or false"),
    ({"prompt": "a", "model": "hunyuanvideo"}, picture(), "invalid_parameter", "hunyuanvideo: image is not taken"),
    ({"prompt": "a", "model": "wan2.2-ti2v-5b"}, b"not an image", "invalid_image", "not a decodable"),
    ({"prompt": "a", "model": "wan2.2-ti2v-5b"}, png(20000, 20000), "invalid_image", "too many pixels"),
])
def test_multipart_refusals(tiny_api, fields, image, code, message):
    client, svc = tiny_api
    assert message in refused(post_form(client, fields, image), code)
    assert svc.jobs.count_queued() == 0


def test_multipart_repeats_and_other_files_are_refused(tiny_api):
    client, _ = tiny_api
    twice = client.post("/generate_video", content_type="multipart/form-data", data={
        "prompt": ["a", "b"], "model": "wan2.2-ti2v-5b", "image": (io.BytesIO(picture()), "a.png")})
    assert "prompt: is given more than once" in refused(twice)
    other = client.post("/generate_video", content_type="multipart/form-data", data={
        "prompt": "a", "model": "wan2.2-ti2v-5b", "image": (io.BytesIO(picture()), "a.png"),
        "video": (io.BytesIO(b"x"), "v.mp4")})
    assert "video: is not a known file field" in refused(other)


def test_an_image_over_the_body_limit_is_413(make_app):
    app, _ = make_app(worker=False, max_image_mb=1)
    r = post_form(app.test_client(), {"prompt": "a", "model": "wan2.2-ti2v-5b"}, b"\0" * (3 * 1024 * 1024))
    assert "over 64 KB with an image of 1 MB" in refused(r, "too_large", 413)


def test_a_refused_job_leaves_no_image_behind(make_app):
    app, svc = make_app(worker=False, max_queue=1)
    client = app.test_client()
    assert post(client, TINY_JOB).status_code == 200
    r = post(client, {"prompt": "a", "model": "wan2.2-ti2v-5b", "image": data_uri(picture())})
    refused(r, "queue_full", 429)
    assert not list(Path(svc.settings.data_dir, "blobs").rglob("inputs/*"))


def test_the_openapi_body_is_generated_per_model(tiny_api):
    client, _ = tiny_api
    spec = client.get("/openapi.json").json
    content = spec["paths"]["/generate_video"]["post"]["requestBody"]["content"]
    variants = [ref["$ref"].rsplit("/", 1)[1] for ref in content["application/json"]["schema"]["anyOf"]]
    assert len(variants) == len(MODELS)
    schemas = spec["components"]["schemas"]
    i2v, ti2v, t2v = (schemas[name] for name in ("Job_wan2_2-i2v-a14b", "Job_wan2_2-ti2v-5b", "Job_hunyuanvideo"))
    assert "image" in i2v["required"] and "image" in ti2v["properties"] and "image" not in ti2v["required"]
    assert "image" not in t2v["properties"] and "session_id" in t2v["properties"]
    assert t2v["properties"]["width"]["default"] == 64 and t2v["properties"]["num_frames"]["maximum"] == 33
    lora = schemas["InstalledLora"]["properties"]["name"]
    assert lora["enum"] == ["lightning-4step", "style"]
    form = content["multipart/form-data"]["schema"]
    assert form["required"] == ["image", "prompt"] and "loras" in form["properties"]


# --- which models a node serves ----------------------------------------------------------------------------------

def diffusers_folder(folder: Path, class_name: str) -> Path:
    folder.mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": class_name}))
    return folder


def test_served_models_tiny_and_real(tmp_path, caplog):
    from pipeline import models

    tiny = models.served_models(Settings.from_env(env={}, model="tiny:wan2.2-ti2v-5b", models_dir=tmp_path))
    assert list(tiny) == list(MODELS) and all(m.tiny and m.folder is None for m in tiny.values())
    assert models.default_model(Settings.from_env(env={}, model="tiny:wan2.2-ti2v-5b")) == "wan2.2-ti2v-5b"
    assert models.default_model(Settings.from_env(env={}, model="tiny")) == "hunyuanvideo"

    models_dir = tmp_path / "models"
    diffusers_folder(models_dir / "Wan2.2-TI2V-5B-Diffusers", "WanPipeline")
    diffusers_folder(models_dir / "HunyuanVideo-1.5-Diffusers-720p_t2v", "HunyuanVideo15Pipeline")
    (models_dir / "Wan2.1-T2V-1.3B-Diffusers").mkdir()  # an empty folder: no weights
    default = Settings.from_env(env={}, model=str(models_dir / "HunyuanVideo"), models_dir=models_dir)
    served = models.served_models(default)
    assert sorted(served) == ["hunyuanvideo-1.5-720p", "wan2.2-ti2v-5b"]
    assert served["wan2.2-ti2v-5b"].folder == models_dir / "Wan2.2-TI2V-5B-Diffusers" and not served["wan2.2-ti2v-5b"].tiny
    assert models.default_model(default) == "hunyuanvideo"  # T2V_MODEL's default, even before it is downloaded

    elsewhere = diffusers_folder(tmp_path / "weights" / "my-hunyuan", "HunyuanVideoPipeline")  # one id per class
    settings = Settings.from_env(env={}, model=str(elsewhere), models_dir=models_dir)
    assert models.served_models(settings)["hunyuanvideo"].folder == elsewhere
    assert models.default_model(settings) == "hunyuanvideo"
    i2v = diffusers_folder(tmp_path / "weights" / "Wan2.2-I2V-A14B-Diffusers", "WanImageToVideoPipeline")
    assert models.default_model(Settings.from_env(env={}, model=str(i2v), models_dir=models_dir)) == "wan2.2-i2v-a14b"
    ambiguous = diffusers_folder(tmp_path / "weights" / "my-wan", "WanPipeline")  # which Wan? the name must say
    settings = Settings.from_env(env={}, model=str(ambiguous), models_dir=models_dir)
    assert sorted(models.served_models(settings)) == ["hunyuanvideo-1.5-720p", "wan2.2-ti2v-5b"]
    assert "is one of wan2.2-ti2v-5b, wan2.2-t2v-a14b, wan2.1-t2v-1.3b" in caplog.text
    assert "Wan2.1-T2V-1.3B-Diffusers" in caplog.text


def test_loras_are_files_the_operator_placed(tmp_path):
    from pipeline import models

    assert models.installed_loras(tmp_path) == []
    folder = tmp_path / "loras"
    folder.mkdir()
    for name in ("b-style.safetensors", "a_fast.v2.safetensors", ".hidden.safetensors", "x y.safetensors", "c.bin"):
        (folder / name).write_bytes(b"")
    (folder / "dir.safetensors").mkdir()
    assert models.installed_loras(tmp_path) == ["a_fast.v2", "b-style"]
    assert models.lora_file(tmp_path, "b-style") == folder / "b-style.safetensors"
    with pytest.raises(KeyError):
        models.lora_file(tmp_path, "../loras/b-style")


def test_every_model_has_its_own_folder_name():
    names = [entry.folder_name for entry in MODELS.values()]
    assert len(set(names)) == len(names) and MODELS["hunyuanvideo"].folder_name == "HunyuanVideo"


# --- the README's first try --------------------------------------------------------------------------------------

def readme_walk_through() -> list[list[str]]:
    """The curl commands of the README's walk-through, as argument lists (continuation lines joined)."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = text.split("### The curl walk-through", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = [c.strip() for c in block.replace("\\\n", " ").splitlines() if c.strip().startswith("curl ")]
    return [shlex.split(c) for c in commands]


def test_the_readmes_curl_walk_through_runs_as_written_on_the_tiny_server(tmp_path, data_dir, tiny_model,
                                                                           tiny_upscalers):
    """Issue 13: a new user's first try (T2V_MODEL=tiny, a prompt and nothing else) finishes, in seconds of work."""
    from conftest import wait_for
    from pipeline.video import probe
    from test_serving import serve, stop, wait_healthy

    commands = readme_walk_through()
    assert [c[0] for c in commands] == ["curl"] * 5
    proc, base = serve([sys.executable, str(Path(__file__).resolve().parents[1] / "app.py")], tmp_path, data_dir)
    try:
        wait_healthy(proc, base, tmp_path)
        ref = None

        def run(argv):
            argv = [a.replace("http://127.0.0.1:7866", base).replace("Xc1...", ref or "Xc1...") for a in argv]
            out = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=60, check=True).stdout
            return json.loads(out) if out.strip() else None

        submit, status, download, fetch, history = commands
        answer = run(submit)
        ref = answer["reference_id"]
        assert answer["session_id"] == "my-session" and answer["status"] == "queued"
        final = wait_for(lambda: (s := run(status))["status"] in ("completed", "failed") and s, timeout=120, every=0.5)
        assert final["status"] == "completed", final
        assert run(download)["s3_url"] == f"{base}/jobs/{ref}/video"
        run(fetch)
        info = probe(tmp_path / "fox.mp4")
        assert (info["width"], info["height"], info["frames"]) == (256, 256, 9)  # 64x64, 9 frames, upscaled 4x
        assert [job["reference_id"] for job in run(history)["history"]] == [ref]
        params = requests.get(f"{base}/jobs/{ref}", timeout=10).json()["params"]
        assert (params["num_inference_steps"], params["model"]) == (4, "hunyuanvideo")
    finally:
        stop(proc)


def test_models_says_which_attention_backend_each_model_gets(make_app):
    # Before: T2V_ATTENTION_BACKEND=_native_flash with T2V_MASK_FREE=0 stopped start-up, for Wan too.
    app, _ = make_app(worker=False, attention_backend="_native_flash", mask_free=False)
    backends = {m["id"]: m["speed"]["attention_backend"] for m in app.test_client().get("/models").json["models"]}
    assert backends["wan2.2-ti2v-5b"] == "_native_flash"  # Wan never passes a mask
    assert backends["hunyuanvideo"] == backends["hunyuanvideo-1.5-480p"] == "native"
