"""Jobs for other registry models through the API and the worker (tiny builds): the worker runs the job's own
model, fetches its input image from the blob store and deletes it afterwards, and fails a job whose LoRA file is
damaged, naming it (LoRAs that apply: test_lora.py)."""

from pathlib import Path

from conftest import wait_for
from pipeline.video import probe
from test_models_api import data_uri, picture


def run(client, body):
    r = client.post("/generate_video", json=body)
    assert r.status_code == 200, r.json
    ref = r.json["reference_id"]
    return wait_for(lambda: (j := client.get(f"/jobs/{ref}").json)["status"] in ("completed", "failed") and j,
                    timeout=600)


def test_an_image_to_video_job_runs_on_its_own_model_and_its_image_is_deleted(make_app, tmp_path):
    app, svc = make_app()
    client = app.test_client()
    job = run(client, {"prompt": "a red fox", "model": "wan2.2-ti2v-5b", "image": data_uri(picture(size=(64, 64))),
                       "width": 64, "height": 64, "num_frames": 5, "num_inference_steps": 2, "upscale": False})
    assert job["status"] == "completed", job["error"]
    assert job["params"]["model"] == "wan2.2-ti2v-5b" and job["params"]["image_key"]
    path = tmp_path / "got.mp4"
    path.write_bytes(client.get(f"/jobs/{job['reference_id']}/video").data)
    got = probe(path)
    assert (got["width"], got["height"], got["frames"]) == (64, 64, 5)
    assert svc.worker.models.resident.endswith("wan2.2-ti2v-5b")
    # The worker deletes the image just after it records the outcome.
    wait_for(lambda: not list((Path(svc.settings.data_dir) / "blobs" / "inputs").glob("*")))


def test_a_job_whose_lora_cannot_be_loaded_fails_with_a_clear_message_instead_of_running_without_it(make_app,
                                                                                                   tmp_path):
    loras = tmp_path / "models" / "loras"
    loras.mkdir(parents=True)
    (loras / "style.safetensors").write_bytes(b"\0" * 8)
    app, _ = make_app(models_dir=tmp_path / "models")
    job = run(app.test_client(), {"prompt": "a red fox", "width": 64, "height": 64, "num_frames": 5,
                                  "num_inference_steps": 2, "upscale": False, "loras": [{"name": "style"}]})
    assert job["status"] == "failed" and job["error"]["code"] == "model_error"
    assert job["error"]["message"].startswith("LoRA 'style' cannot be loaded into hunyuanvideo: ")
