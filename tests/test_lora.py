"""LoRAs applied per job (issue 11). A tiny LoRA, made with peft on the tiny transformer and saved in diffusers'
LoRA format by the pipeline class's own `save_lora_weights`, changes the frames of a job that names it; the next
job without it is bit-identical to a run without it, also after a LoRA job that failed or was canceled; and a
LoRA job runs end to end through the API and the worker."""

import logging
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer

from config import Settings
from conftest import TINY_JOB
from pipeline import models
from pipeline.generate import JobCanceled, MissingWeightsError, VideoGenerator
from pipeline.lora import LoraError
from pipeline.run import Models, lora_files, run_job
from pipeline.spec import JobParams
from pipeline.speed import SpeedOptions
from pipeline.video import read_frames
from test_models_jobs import run
from worker.errors import classify_error

TRANSFORMERS = {"hunyuanvideo": "HunyuanVideoTransformer3DModel", "wan2.2-ti2v-5b": "WanTransformer3DModel",
                "wan2.2-t2v-a14b": "WanTransformer3DModel"}


def make_lora(model_id: str, data_dir: Path, folder: Path, name: str) -> Path:
    """A rank-4 LoRA on the attention projections of the model's tiny transformer, with random (not zero) weights
    so that it acts, saved as `folder/<name>.safetensors` in diffusers' LoRA format with its peft config."""
    entry = models.get(model_id)
    transformer = getattr(diffusers, TRANSFORMERS[model_id]).from_pretrained(
        models.tiny_model_dir(data_dir, model_id) / "transformer")
    torch.manual_seed(0)
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=16, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                       init_lora_weights=False))
    pipeline_class = getattr(diffusers, entry.pipelines[entry.modes[0]])
    pipeline_class.save_lora_weights(folder, transformer_lora_layers=get_peft_model_state_dict(transformer),
                                     weight_name=f"{name}.safetensors",
                                     transformer_lora_adapter_metadata=transformer.peft_config["default"].to_dict())
    return folder / f"{name}.safetensors"


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory, data_dir, tiny_model) -> Path:
    """models/loras with a LoRA per family, and a damaged file."""
    folder = tmp_path_factory.mktemp("models")
    loras = folder / models.LORA_DIR
    loras.mkdir()
    make_lora("hunyuanvideo", data_dir, loras, "style")
    make_lora("wan2.2-ti2v-5b", data_dir, loras, "wan.style")  # a dot is fine in a name, not in an adapter's
    (loras / "broken.safetensors").write_bytes(b"\x08" + b"\0" * 15)
    return folder


def job(model_id="hunyuanvideo", **kw) -> JobParams:
    return JobParams(**{"prompt": "a red fox", "model": model_id, "width": 64, "height": 64, "num_frames": 5,
                        "num_inference_steps": 3, "seed": 7, "upscale": False, **kw})


def lora_layers(generator: VideoGenerator) -> list[str]:
    """The peft layers and configs left in the denoisers (none, once a job's LoRAs are removed)."""
    found = [name for t in generator.transformers for name, m in t.named_modules() if isinstance(m, BaseTunerLayer)]
    return found + [f"peft_config {list(t.peft_config)}" for t in generator.transformers if hasattr(t, "peft_config")]


def difference(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


@pytest.mark.parametrize("model_id, lora", [("hunyuanvideo", "style"), ("wan2.2-ti2v-5b", "wan.style")])
def test_a_lora_changes_the_frames_and_the_next_job_without_it_is_bit_identical(data_dir, models_dir, model_id, lora):
    generator = VideoGenerator(f"tiny:{model_id}", data_dir)  # fresh: no LoRA has been near it
    params = job(model_id)
    fresh = generator.generate(params)
    files = lora_files(job(model_id, loras=[{"name": lora}]), models_dir)

    with generator.loras_applied(files):
        assert lora_layers(generator)  # loaded into the denoiser
        styled = generator.generate(params)
    assert difference(styled, fresh) > 2.0, "the LoRA did not change the frames"
    assert lora_layers(generator) == []
    assert np.array_equal(generator.generate(params), fresh)

    # The job's scale is the adapter's weight: at 0 the LoRA adds nothing.
    with generator.loras_applied(lora_files(job(model_id, loras=[{"name": lora, "scale": 0.0}]), models_dir)):
        assert np.array_equal(generator.generate(params), fresh)


@pytest.fixture(scope="module")
def tiny_hunyuan(data_dir, models_dir, tiny_model):
    """Models for a tiny server whose models/loras is `models_dir`, and one run without a LoRA to compare with."""
    settings = Settings.from_env(env={}, model="tiny", upscaler="none", data_dir=data_dir, models_dir=models_dir)
    loaded = Models(settings)
    return settings, loaded, loaded.generator.generate(job())


def test_a_canceled_or_failed_lora_job_leaves_no_adapter_behind(tiny_hunyuan, tmp_path):
    settings, loaded, plain = tiny_hunyuan
    styled = job(loras=[{"name": "style", "scale": 1.5}])
    steps = []
    with pytest.raises(JobCanceled):
        run_job(styled, settings, lambda stage, i, n: steps.append(i), lambda: len(steps) >= 1, models=loaded,
                output=tmp_path / "canceled.mp4")
    assert steps == [1] and lora_layers(loaded.generator) == []
    assert np.array_equal(loaded.generator.generate(job()), plain)

    def fail(stage, done, total):
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        run_job(styled, settings, fail, models=loaded, output=tmp_path / "failed.mp4")
    assert lora_layers(loaded.generator) == []
    assert np.array_equal(loaded.generator.generate(job()), plain)


def test_a_damaged_lora_file_fails_the_job_by_name_and_unloads_the_ones_before_it(tiny_hunyuan, tmp_path):
    settings, loaded, plain = tiny_hunyuan
    with pytest.raises(LoraError) as failed:
        run_job(job(loras=[{"name": "style"}, {"name": "broken"}]), settings, models=loaded, output=tmp_path / "x.mp4")
    assert str(failed.value).startswith("LoRA 'broken' cannot be loaded into hunyuanvideo: ")
    assert str(settings.models_dir) not in str(failed.value)  # job records hold no operator's paths
    assert classify_error(failed.value)[0] == "model_error"
    assert lora_layers(loaded.generator) == []
    assert np.array_equal(loaded.generator.generate(job()), plain)


def offloaded(generator: VideoGenerator) -> VideoGenerator:
    """`generator` under the `model` preset: accelerate's CpuOffload hook on each component, as on a GPU (diffusers
    installs it on the CPU too when told the device; only its re-hook after a load asks for an accelerator)."""
    from pipeline.generate import apply_memory_preset

    apply_memory_preset(generator.pipe, "model", "cpu")
    generator.memory_preset = "model"
    return generator


def cpu_offload_hooks(generator: VideoGenerator) -> dict[str, str]:
    return {name: type(c._hf_hook).__name__ for name, c in generator.pipe.components.items() if hasattr(c, "_hf_hook")}


def test_a_lora_made_for_another_model_is_refused_by_name_before_the_offload_hooks_are_touched(data_dir, models_dir):
    # Before: peft raised NoMatchingPeftModuleError after diffusers had taken the hooks off, and nothing put them back.
    generator = offloaded(VideoGenerator("tiny", data_dir))
    hooks = cpu_offload_hooks(generator)
    assert hooks["transformer"] == "CpuOffload"
    with pytest.raises(LoraError, match=r"^LoRA 'wan.style' does not fit hunyuanvideo's transformer \(it has weights "
                                        r"for blocks\.0\.attn1\.to_k, which the model has not\); it was made for "
                                        r"another model$"):
        with generator.loras_applied(lora_files(job(loras=[{"name": "wan.style"}]), models_dir)):
            pytest.fail("ran with a LoRA for another model")
    assert cpu_offload_hooks(generator) == hooks and lora_layers(generator) == []


def test_a_lora_load_that_fails_inside_diffusers_gets_the_offload_hooks_back(data_dir, models_dir, monkeypatch):
    # A failure the key check cannot foresee, raised where diffusers' loader has already removed the hooks.
    import peft  # diffusers' load_lora_adapter imports it from here when it runs

    generator = offloaded(VideoGenerator("tiny", data_dir))
    hooks = cpu_offload_hooks(generator)

    def broken(*args, **kwargs):
        assert cpu_offload_hooks(generator) == {}  # diffusers took every hook off before loading
        raise RuntimeError("no room for the LoRA")

    monkeypatch.setattr(peft, "set_peft_model_state_dict", broken)
    with pytest.raises(LoraError, match="^LoRA 'style' cannot be loaded into hunyuanvideo: RuntimeError: no room"):
        with generator.loras_applied(lora_files(job(loras=[{"name": "style"}]), models_dir)):
            pytest.fail("ran with a LoRA that did not load")
    assert cpu_offload_hooks(generator) == hooks and lora_layers(generator) == []
    monkeypatch.undo()
    assert generator.generate(job(num_inference_steps=1)).shape == (5, 64, 64, 3)


def test_a_wan_a14b_lora_goes_into_both_experts(data_dir, tmp_path, caplog):
    # Before: diffusers loaded it into `transformer` only (load_into_transformer_2 defaults to False).
    make_lora("wan2.2-t2v-a14b", data_dir, tmp_path, "a14b")
    generator = VideoGenerator("tiny:wan2.2-t2v-a14b", data_dir)
    params = job("wan2.2-t2v-a14b", num_inference_steps=4)
    fresh = generator.generate(params)
    with caplog.at_level(logging.INFO, logger="pipeline.lora"):
        with generator.loras_applied([("a14b", tmp_path / "a14b.safetensors", 1.0)]):
            per_expert = [[n for n, m in t.named_modules() if isinstance(m, BaseTunerLayer)]
                          for t in generator.transformers]
            active = [t.active_adapters() for t in generator.transformers]
            styled = generator.generate(params)
    assert len(generator.transformers) == 2 and all(per_expert) and per_expert[0] == per_expert[1]
    assert active == [["lora0"], ["lora0"]]  # the job's scale is set on both
    assert "LoRA a14b loaded into transformer and transformer_2" in caplog.text
    assert difference(styled, fresh) > 0.1
    assert lora_layers(generator) == [] and np.array_equal(generator.generate(params), fresh)


def test_a_lora_missing_on_the_workers_node_fails_before_any_model_work(models_dir):
    with pytest.raises(MissingWeightsError) as missing:
        lora_files(job(loras=[{"name": "style"}, {"name": "gone"}]), models_dir)
    code, message = classify_error(missing.value)
    assert (code, message) == ("model_error", "LoRA 'gone' is not installed on this worker's node "
                                              "(no gone.safetensors in T2V_MODELS_DIR/loras)")
    assert lora_files(job(), models_dir) == []


@pytest.mark.parametrize("speed, knob", [(SpeedOptions(fp8=True), "T2V_FP8=0"),
                                         (SpeedOptions(compile=True), "T2V_COMPILE=0")])
def test_fp8_weights_and_compiled_blocks_refuse_loras_instead_of_failing_later(data_dir, models_dir, speed, knob):
    # fp8: the LoRA layers would be cast to fp8 themselves and the first step fails (diffusers adds its casting
    # to LoRA layers only when they are loaded first). Compiled: every new set of LoRAs recompiles, and Dynamo's
    # recompile limit then fails jobs.
    generator = VideoGenerator("tiny", data_dir, speed=speed)
    with pytest.raises(LoraError, match=f"^hunyuanvideo: .*{knob} to use them$"):
        with generator.loras_applied(lora_files(job(loras=[{"name": "style"}]), models_dir)):
            pytest.fail("ran with LoRAs it cannot apply")
    assert lora_layers(generator) == []


def test_a_worker_that_cannot_apply_its_loras_says_so_when_it_loads_the_model(data_dir, models_dir, caplog):
    settings = Settings.from_env(env={}, model="tiny", upscaler="none", data_dir=data_dir, models_dir=models_dir,
                                 fp8=True)
    with caplog.at_level(logging.WARNING, logger="pipeline.run"):
        Models(settings).generator_for(None)
    assert "jobs with LoRAs will fail on tiny:hunyuanvideo: LoRAs cannot be added to fp8-stored weights" in caplog.text


def test_a_lora_job_runs_through_the_api_and_the_worker(make_app, models_dir, tmp_path):
    app, svc = make_app(models_dir=models_dir)
    client = app.test_client()
    listing = client.get("/models").json
    assert listing["loras"] == ["broken", "style", "wan.style"]
    assert {m["id"]: m["lora"] for m in listing["models"]}["hunyuanvideo"] is True

    body = {**TINY_JOB, "num_frames": 5, "seed": 11, "upscale": False}
    jobs = [run(client, body), run(client, {**body, "loras": [{"name": "style", "scale": 1.0}]}), run(client, body)]
    frames = []
    for record in jobs:
        assert record["status"] == "completed", record["error"]
        path = tmp_path / f"{record['reference_id']}.mp4"
        path.write_bytes(client.get(f"/jobs/{record['reference_id']}/video").data)
        frames.append(np.stack(list(read_frames(path))))
    assert jobs[1]["params"]["loras"] == [{"name": "style", "scale": 1.0}]
    before, styled, after = frames
    assert difference(styled, before) > 2.0
    assert np.array_equal(after, before)
    assert lora_layers(svc.worker.models.generator) == []

    r = client.post("/generate_video", json={**body, "model": "hunyuanvideo-1.5-480p", "loras": [{"name": "style"}]})
    assert r.status_code == 400
    assert "diffusers 0.42.1 has no LoRA loader" in r.json["error"]["message"]
