"""LTX-2 through the service's own path on its tiny build: video with its own sound (an AAC track at the vocoder's
rate, as long as the clip), `audio: false` for a silent MP4, the sound kept through a 4x upscale, image-to-video
starting from the image, the family's frame and size rules, and its registry entries."""

import numpy as np
import pytest
import torch
from PIL import Image

from config import Settings
from pipeline import models as registry
from pipeline import tiny
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
    tiny.tiny_model_dir(data_dir, LTX)
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


def test_the_sound_survives_a_4x_upscale_unchanged_in_length(settings, models, tmp_path):
    result = run_job(params(upscale=True, outscale=4), settings, models=models, output=tmp_path / "c.mp4", model=LTX)
    assert (probe(result.path)["width"], probe(result.path)["height"]) == (256, 256)
    assert streams(result.path) == [("audio", "aac"), ("video", "h264")]
    assert probe_audio(result.path)["duration_s"] == pytest.approx(9 / FPS, abs=1e-6)
