"""The VAE decode is a stage of its own: `decoding` done/total per decoder call (a tile or frame batch) where the
VAE's count is known (HunyuanVideo's), start and end for the others, and in the worker's progress spans."""

import pytest

from config import Settings
from pipeline.models import tiny_model_dir
from pipeline.decoding import decoder_calls
from pipeline.generate import VideoGenerator
from pipeline.run import Models, run_job
from pipeline.spec import JobParams
from worker.progress import STAGE_SPANS


def params(width=64, height=64, **kw):
    return JobParams.from_dict({"prompt": "a red fox", "width": width, "height": height, "num_frames": 9,
                                "num_inference_steps": 1, "seed": 1, "upscale": False, **kw})


@pytest.mark.parametrize("tiles, expected", [
    ({}, 1),  # 64x64 and 3 latent frames: one call
    (dict(tile_sample_min_height=32, tile_sample_min_width=32, tile_sample_stride_height=24,
          tile_sample_stride_width=24), 9),  # 3 x 3 tiles
    (dict(tile_sample_min_height=32, tile_sample_min_width=32, tile_sample_stride_height=24,
          tile_sample_stride_width=24, tile_sample_min_num_frames=4, tile_sample_stride_num_frames=4), 27),
])
def test_hunyuan_video_reports_each_decoder_call_of_its_decode(data_dir, tiny_model, tiles, expected):
    generator = VideoGenerator("tiny", data_dir)
    generator.pipe.vae.enable_tiling(**tiles)
    calls, seen = [], []
    handle = generator.pipe.vae.decoder.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        frames = generator.generate(params(), on_decode=lambda i, n: seen.append((i, n)))
    finally:
        handle.remove()
    assert frames.shape == (9, 64, 64, 3)
    assert len(calls) == expected == decoder_calls(generator.pipe.vae, (1, 4, 3, 8, 8))  # the count is the real one
    assert seen == [(i, expected) for i in range(expected + 1)]
    assert "decode" not in vars(generator.pipe.vae)  # the wrapper is gone after the job


def test_a_vae_decoding_inside_its_pipeline_reports_its_start_and_end(tmp_path):
    tiny_model_dir(tmp_path, "wan2.2-ti2v-5b")
    generator = VideoGenerator("tiny:wan2.2-ti2v-5b", tmp_path)
    seen = []
    generator.generate(params(64, 32, num_frames=5), on_decode=lambda i, n: seen.append((i, n)))
    assert seen == [(0, 1), (1, 1)]


def test_run_job_reports_decoding_between_denoising_and_encoding(data_dir, tiny_model, tmp_path):
    settings = Settings.from_env(env={}, model="tiny", upscaler="none", data_dir=data_dir, output_dir=tmp_path)
    stages = []
    run_job(params(), settings, lambda s, i, n: stages.append(s), models=Models(settings), output=tmp_path / "a.mp4")
    order = list(dict.fromkeys(stages))
    assert order == ["denoising", "decoding", "encoding"]
    for spans in (STAGE_SPANS["generate"], STAGE_SPANS["generate+upscale"]):
        assert spans["denoising"][1] == spans["decoding"][0] < spans["decoding"][1]  # a share of its own
