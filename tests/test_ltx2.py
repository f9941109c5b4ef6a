"""LTX-2 through the service's own path on its tiny build: video with its own sound (an AAC track at the vocoder's
rate, as long as the clip), `audio: false` for a silent MP4, the sound kept through a 4x upscale, image-to-video
starting from the image, the family's frame and size rules, and its registry entries."""

import re

import numpy as np
import pytest
import torch
from PIL import Image

from config import Settings
from pipeline import models as registry
from pipeline.generate import VideoGenerator
from pipeline.run import Models, run_job
from pipeline.spec import JobParams, ParamError
from pipeline.video import probe, probe_audio, read_frames

LTX = "ltx-2.3"
FPS = 24


def params(**kw):
    return JobParams.from_dict({"model": LTX, "prompt": "a red fox barks in the snow", "width": 64, "height": 64,
                                "num_frames": 9, "num_inference_steps": 2, "seed": 7, "upscale": False, **kw})


@pytest.fixture(scope="module")
def settings(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("ltx2")
    registry.tiny_model_dir(data_dir, LTX)
    return Settings.from_env(env={}, model="tiny", upscaler="tiny", data_dir=data_dir, output_dir=data_dir / "out",
                             models_dir=data_dir / "models")


@pytest.fixture(scope="module")
def models(settings):
    return Models(settings)


def streams(path):
    import av

    with av.open(str(path)) as container:
        return sorted((s.type, s.codec_context.name) for s in container.streams)


def test_a_job_writes_h264_with_an_aac_track_as_long_as_the_clip(settings, models, tmp_path):
    result = run_job(params(), settings, models=models, output=tmp_path / "a.mp4", model=LTX)
    assert streams(result.path) == [("audio", "aac"), ("video", "h264")]
    rate = models.generator_for(LTX).pipe.vocoder.config.output_sampling_rate
    sound = probe_audio(result.path)
    assert (sound["sample_rate"], sound["channels"]) == (rate, 2) == (16000, 2)
    assert abs(sound["duration_s"] - 9 / FPS) < 1 / FPS, sound
    assert result.audio == {"sample_rate": rate, "channels": 2, "duration_s": 9 / FPS}
    assert probe(result.path)["frames"] == 9
    assert np.stack(list(read_frames(result.path))).std() > 1


def test_audio_false_writes_a_silent_mp4_and_never_decodes_the_sound(settings, models, tmp_path, monkeypatch):
    pipe = models.generator_for(LTX).pipe
    calls = []
    monkeypatch.setattr(pipe.vocoder, "forward", lambda *a, **k: calls.append(1))
    result = run_job(params(audio=False), settings, models=models, output=tmp_path / "b.mp4", model=LTX)
    assert streams(result.path) == [("video", "h264")]
    assert result.audio is None and calls == []


def test_kept_latents_hold_the_sound_too_and_decode_to_the_jobs_soundtrack(settings, models, tmp_path):
    from dataclasses import replace

    from pipeline import families

    kept = replace(settings, keep_latents=True)
    run_job(params(), kept, models=models, output=tmp_path / "k.mp4", model=LTX)
    generator = models.generator_for(LTX)
    saved = torch.load(tmp_path / "k.latents.pt")
    assert saved["latents"].ndim == 5 and saved["audio_latents"].ndim >= 3
    with torch.inference_mode():
        again = families.decode_ltx2_audio(generator.pipe, saved["audio_latents"]).fitted(9, FPS)
    assert again.samples.shape == generator.last_audio.samples.shape
    assert np.allclose(again.samples, generator.last_audio.samples, atol=1e-5)


def test_the_sound_survives_a_4x_upscale_unchanged_in_length(settings, models, tmp_path):
    result = run_job(params(upscale=True, outscale=4), settings, models=models, output=tmp_path / "c.mp4", model=LTX)
    assert (probe(result.path)["width"], probe(result.path)["height"]) == (256, 256)
    assert streams(result.path) == [("audio", "aac"), ("video", "h264")]
    assert probe_audio(result.path)["duration_s"] == pytest.approx(9 / FPS, abs=1e-6)


def gradient(kind: str, width: int, height: int) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width] / np.array([height - 1, width - 1])[:, None, None]
    rgb = np.stack([x, y, 1 - x], -1) if kind == "a" else np.stack([1 - y, 1 - x, y * x], -1)
    return Image.fromarray((rgb * 255).round().astype(np.uint8))


def image_latents(pipe, image: Image.Image, width: int, height: int) -> torch.Tensor:
    """The image's latent as LTX2ImageToVideoPipeline makes it: re-compressed at the training CRF, encoded
    (argmax), normalized: (C, H, W)."""
    from diffusers.pipelines.ltx2.utils import apply_image_conditioning_crf, resolve_default_image_crf

    crf = resolve_default_image_crf(pipe.text_encoder)
    image = Image.fromarray(apply_image_conditioning_crf(np.array(image), crf))
    x = pipe.video_processor.preprocess(image, height=height, width=width).unsqueeze(2)
    with torch.inference_mode():
        latent = pipe.vae.encode(x).latent_dist.mode()
    return pipe._normalize_latents(latent, pipe.vae.latents_mean, pipe.vae.latents_std)[0, :, 0]


def test_image_to_video_keeps_the_images_latent_as_the_first_frame_through_every_step(settings, models, tmp_path):
    generator = models.generator_for(LTX)
    image, other = gradient("a", 64, 64), gradient("b", 64, 64)
    seen = []
    frames = generator.generate(params(), image=image, on_latents=lambda step, total, latents: seen.append(latents))
    assert frames.shape == (9, 64, 64, 3) and generator.last_audio is not None
    assert len(seen) == 2 and seen[0].shape == (1, 4, 2, 2, 2)  # unpacked for previews: (B, C, F, H, W)
    own, another = image_latents(generator.pipe, image, 64, 64), image_latents(generator.pipe, other, 64, 64)
    assert not torch.allclose(own, another, atol=1e-3)
    for latents in seen:
        torch.testing.assert_close(latents[0, :, 0].float(), own, atol=1e-5, rtol=1e-5)
    # The video's later latent frame is denoised, not the image's.
    assert not torch.allclose(seen[-1][0, :, 1].float(), own, atol=1e-3)


@pytest.mark.parametrize("field,value,rule", [
    ("num_frames", 17 - 4, "num_frames must be of the form 8k+1"),
    ("width", 48, "width must be a multiple of 32"),
    ("height", 80, "height must be a multiple of 32"),
])
def test_the_frame_rule_and_size_multiple_are_refused_naming_the_model(field, value, rule):
    for model_id in ("ltx-2", "ltx-2.3", "ltx-2.3-distilled", "ltx-2.5"):
        with pytest.raises(ParamError, match=f"^{re.escape(model_id)}: {re.escape(rule)}") as raised:
            JobParams.from_dict({"model": model_id, "prompt": "a fox", field: value})
        assert raised.value.field == field


def test_asking_a_silent_model_for_sound_is_refused_naming_it():
    with pytest.raises(ParamError, match="^wan2.2-ti2v-5b: audio is not made by this model") as raised:
        JobParams.from_dict({"model": "wan2.2-ti2v-5b", "prompt": "a fox", "audio": True})
    assert raised.value.field == "audio"
    assert JobParams.from_dict({"model": "wan2.2-ti2v-5b", "prompt": "a fox"}).audio is False
    assert JobParams.from_dict({"model": "wan2.2-ti2v-5b", "prompt": "a fox", "audio": False}).audio is False
    assert JobParams.from_dict({"model": LTX, "prompt": "a fox"}).audio is True


def test_the_registry_takes_its_rules_from_the_pipelines():
    from diffusers import LTX2Pipeline
    from diffusers.pipelines.ltx2.utils import DISTILLED_SIGMA_VALUES

    defaults = {k: p.default for k, p in __import__("inspect").signature(LTX2Pipeline.__call__).parameters.items()}
    for model_id in ("ltx-2", "ltx-2.3", "ltx-2.5"):
        entry = registry.MODELS[model_id]
        assert (entry.default_steps, entry.default_guidance) == (defaults["num_inference_steps"],
                                                                 defaults["guidance_scale"])
        assert (entry.default_preset.width, entry.default_preset.height) == (defaults["width"], defaults["height"])
        assert entry.fps == defaults["frame_rate"] and entry.call_args == ()
    distilled = registry.MODELS["ltx-2.3-distilled"]
    assert dict(distilled.call_args)["sigmas"] == tuple(DISTILLED_SIGMA_VALUES)
    assert all(e.audio and e.modes == ("t2v", "i2v") and e.lora for e in registry.ENTRIES if e.family == "ltx2")


def test_the_distilled_schedule_applies_at_its_own_step_count():
    entry = registry.MODELS["ltx-2.3-distilled"]
    call = dict(prompt="a fox", num_frames=9, generator=None, width=64, height=64, fps=24)
    at_eight = registry.prepare_call(None, entry, steps=8, **call)
    assert at_eight["sigmas"] == list(entry.call_args[0][1]) and at_eight["stg_scale"] == 0.0
    assert at_eight["frame_rate"] == 24.0 and at_eight["guidance_scale"] == 1.0
    assert "sigmas" not in registry.prepare_call(None, entry, steps=4, **call)


def test_a_lora_goes_through_ltx2s_own_loader_for_one_job_and_is_unloaded_after(settings, tmp_path):
    """A rank-4 LoRA on the tiny transformer's attention, saved by LTX2Pipeline.save_lora_weights (diffusers'
    format) and applied per job by LTX2LoraLoaderMixin: it changes the frames and the sound; the next job without
    it is bit-identical to one before it."""
    import diffusers
    from peft import LoraConfig, get_peft_model_state_dict

    from pipeline.run import lora_files

    folder = registry.tiny_model_dir(settings.data_dir, LTX)
    transformer = diffusers.LTX2VideoTransformer3DModel.from_pretrained(folder / "transformer")
    torch.manual_seed(0)
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=16, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                       init_lora_weights=False))
    loras = tmp_path / "models" / registry.LORA_DIR
    diffusers.LTX2Pipeline.save_lora_weights(loras, transformer_lora_layers=get_peft_model_state_dict(transformer),
                                             weight_name="ltx.style.safetensors")
    generator = VideoGenerator(f"tiny:{LTX}", settings.data_dir)
    loader = getattr(diffusers.loaders, registry.FAMILIES["ltx2"].lora_loader)
    assert loader.__name__ == "LTX2LoraLoaderMixin"
    assert type(generator.pipe).load_lora_weights is loader.load_lora_weights
    job = params()
    fresh, fresh_audio = generator.generate(job), generator.last_audio.samples
    styled_job = JobParams(**{**job.to_dict(), "loras": [{"name": "ltx.style"}]})
    with generator.loras_applied(lora_files(styled_job, tmp_path / "models")):
        assert any("lora" in name for name, _ in generator.pipe.transformer.named_modules())
        styled, styled_audio = generator.generate(job), generator.last_audio.samples
    assert np.abs(styled.astype(int) - fresh.astype(int)).mean() > 1.0
    assert np.abs(styled_audio - fresh_audio).mean() > 1e-5  # measured 6.6e-5: the tiny vocoder damps it
    assert not any("lora" in name for name, _ in generator.pipe.transformer.named_modules())
    assert np.array_equal(generator.generate(job), fresh)
    assert np.array_equal(generator.last_audio.samples, fresh_audio)


def test_an_ltx2_job_through_the_api_records_its_sound_and_serves_it_from_both_faces(make_app, tmp_path):
    from test_models_jobs import run

    app, _ = make_app()
    client = app.test_client()
    job = run(client, {"prompt": "a red fox barks", "model": LTX, "width": 64, "height": 64, "num_frames": 9,
                       "num_inference_steps": 2, "upscale": False})
    assert job["status"] == "completed", job["error"]
    assert job["params"]["audio"] is True
    assert job["result"]["audio"] == {"sample_rate": 16000, "channels": 2, "duration_s": 9 / FPS}
    ref = job["reference_id"]
    classic, v1 = client.get(f"/jobs/{ref}/video"), client.get(f"/v1/videos/{ref}/content")
    assert classic.status_code == v1.status_code == 200 and classic.data == v1.data
    path = tmp_path / "got.mp4"
    path.write_bytes(v1.data)
    assert streams(path) == [("audio", "aac"), ("video", "h264")]

    silent = run(client, {"prompt": "a red fox", "model": LTX, "width": 64, "height": 64, "num_frames": 9,
                          "num_inference_steps": 2, "upscale": False, "audio": False})
    assert silent["status"] == "completed" and silent["result"]["audio"] is None

    r = client.post("/generate_video", json={"prompt": "a fox", "model": "wan2.2-ti2v-5b", "audio": True})
    assert r.status_code == 400
    assert r.json["error"]["message"].startswith("wan2.2-ti2v-5b: audio is not made by this model")


@pytest.mark.parametrize("flag,tracks", [((), [("audio", "aac"), ("video", "h264")]),
                                         (("--no-audio",), [("video", "h264")])])
def test_the_command_line_writes_the_sound_unless_told_not_to(tmp_path, data_dir, flag, tracks):
    from test_cli_models import run_script

    registry.tiny_model_dir(data_dir, LTX)
    proc = run_script("test.py", "--model", f"tiny:{LTX}", "--prompt", "a red fox barks", "--steps", "2",
                      "--output", "clip.mp4", *flag, cwd=tmp_path, T2V_DATA_DIR=str(data_dir))
    assert proc.returncode == 0, proc.stderr
    assert streams(tmp_path / "clip.mp4") == tracks
    assert ("sound at 16000 Hz" in proc.stdout) == bool(len(tracks) == 2)


def test_the_command_line_refuses_sound_from_a_silent_model(tmp_path, data_dir):
    from test_cli_models import run_script

    proc = run_script("test.py", "--model", "tiny:wan2.2-ti2v-5b", "--prompt", "a fox", "--audio", cwd=tmp_path,
                      T2V_DATA_DIR=str(data_dir))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "test.py: error: wan2.2-ti2v-5b: --audio is not made by this model: it makes silent video "
        "(LTX-2 models make sound)")


def test_an_ltx2_clip_uploaded_for_upscaling_keeps_its_sound_as_it_was(settings, models, tmp_path):
    """upscale.py's path copies the AAC packets as they are, the priming packet before zero included, so the
    upscaled clip plays exactly as much sound as the clip it was made from."""
    from pipeline.run import upscale_file

    made = run_job(params(), settings, models=models, output=tmp_path / "made.mp4", model=LTX)
    result = upscale_file(made.path, tmp_path / "up.mp4", models.upscaler, 4, crf=18)
    assert (result.width, result.height) == (256, 256)
    assert streams(result.path) == [("audio", "aac"), ("video", "h264")]
    assert probe_audio(result.path) == probe_audio(made.path)
    assert result.timings_s.get("audio_copy") is not None
    assert result.audio == made.audio  # the upscale job's record says the same of its sound


def test_the_model_listing_says_which_models_make_sound():
    from pipeline.spec import Rules, describe

    assert describe(Rules(), LTX)["audio"] is True
    assert describe(Rules(), "wan2.2-ti2v-5b")["audio"] is False
    limits = describe(Rules(), LTX)["limits"]
    assert (limits["size_multiple"], limits["frame_multiple"]) == (32, 8)
