"""Previews of the latents while denoising (pipeline/preview.py): the projection per family, the WebP, and
the latents each family hands over after every step: HunyuanVideo and Wan through their step callback,
HunyuanVideo-1.5 (no callback) through its scheduler's `step` output."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from config import Settings
from conftest import psnr, smooth_clip
from pipeline import models, preview
from pipeline.generate import VideoGenerator
from pipeline.run import Models, run_job
from pipeline.spec import JobParams

HV15, WAN22, WAN21 = "hunyuanvideo-1.5-480p", "wan2.2-ti2v-5b", "wan2.1-t2v-1.3b"
SIZES = {"hunyuanvideo": (64, 64), HV15: (48, 32), WAN22: (64, 32), WAN21: (32, 32)}


def job(model_id, **kw):
    width, height = SIZES[model_id]
    return JobParams.from_dict({"prompt": "a red fox", "width": width, "height": height, "num_frames": 9,
                                "num_inference_steps": 3, "seed": 3, "upscale": False, **kw})


@pytest.mark.parametrize("key", sorted(preview.PUBLISHED))
def test_each_published_table_maps_one_latent_channel_to_its_own_rgb_row(key):
    family, channels = key
    factors, bias = preview.PUBLISHED[key]
    assert len(factors) == channels and all(len(row) == 3 for row in factors) and len(bias) == 3
    assert preview.projection(family, channels).published
    # A latent that is 1 in channel c and 0 elsewhere shows row c of the table, plus the bias, mapped from [-1, 1].
    for c in (0, channels // 2, channels - 1):
        latents = torch.zeros(1, channels, 2, 3, 5)
        latents[0, c] = 1.0
        frames = preview.preview_frames(latents, family)
        want = np.round((np.array(factors[c]) + np.array(bias) + 1) / 2 * 255)
        assert frames.shape == (2, 3, 5, 3) and frames.dtype == np.uint8
        assert np.array_equal(frames[1, 2, 4], want)


def test_latent_widths_without_a_table_get_our_own_channel_rule():
    """The tiny HunyuanVideo has 4 latent channels: R averages channels 0 and 3, G is 1, B is 2."""
    proj = preview.projection("hunyuanvideo", 4)
    assert not proj.published and proj.bias.abs().sum() == 0
    latents = torch.tensor([0.5, -1.0, 1.0, -0.1]).view(1, 4, 1, 1, 1).expand(1, 4, 1, 2, 2)
    pixel = preview.preview_frames(latents, "hunyuanvideo")[0, 0, 0]
    assert pixel.tolist() == [round((0.2 + 1) / 2 * 255), 0, 255]


def test_a_large_latent_is_shrunk_to_256_on_its_long_side_and_a_small_one_kept():
    big = preview.preview_frames(torch.randn(1, 16, 2, 90, 400), "hunyuanvideo")
    assert big.shape == (2, 58, 256, 3)
    assert preview.preview_frames(torch.randn(1, 16, 33, 90, 160), "hunyuanvideo").shape == (33, 90, 160, 3)


def test_the_webp_decodes_with_every_frame_and_its_timing():
    frames = smooth_clip(5, 24, 40)
    image = Image.open(io.BytesIO(preview.encode_webp(frames, frame_ms=150)))
    assert image.format == "WEBP" and image.size == (40, 24) and image.n_frames == 5
    image.seek(3)
    image.load()
    assert image.info["duration"] == 150 and image.info["timestamp"] == 450 and image.info["loop"] == 0
    shown = np.asarray(image.convert("RGB"), np.float64)
    assert psnr(shown, frames[3]) > 25 and psnr(shown, frames[3]) > psnr(shown, frames[0]) + 3  # lossy, but that frame


@pytest.fixture(scope="module")
def family_settings(tmp_path_factory, data_dir, tiny_model):
    folder = tmp_path_factory.mktemp("preview-families")
    (folder / "tiny").symlink_to(data_dir / "tiny")  # the tiny builds other modules made are reused
    for model_id in (HV15, WAN22, WAN21):
        models.tiny_model_dir(folder, model_id)
    return Settings.from_env(env={}, model="tiny", upscaler="none", data_dir=folder, output_dir=folder / "out",
                             preview_every=2)


@pytest.mark.parametrize("model_id", ["hunyuanvideo", HV15, WAN22, WAN21])
def test_every_family_hands_over_the_latents_after_each_step(family_settings, model_id, monkeypatch):
    """The latents seen after the last step are exactly those the VAE then decodes."""
    generator = VideoGenerator(f"tiny:{model_id}", family_settings.data_dir)
    vae, seen, decoded = generator.pipe.vae, [], []
    real_decode = vae.decode
    monkeypatch.setattr(vae, "decode", lambda z, *a, **k: decoded.append(z.clone()) or real_decode(z, *a, **k))
    frames = generator.generate(job(model_id), on_latents=lambda i, n, z: seen.append((i, n, z.clone())))

    assert [(i, n) for i, n, _ in seen] == [(1, 3), (2, 3), (3, 3)]
    assert frames.shape[:3] == (9, SIZES[model_id][1], SIZES[model_id][0])
    last = seen[-1][2]
    assert last.shape[:3] == (1, vae.config.get("latent_channels") or vae.config.z_dim, 3)  # 9 frames -> 3
    assert not torch.equal(seen[0][2], last)  # each step's own latents
    if model_id.startswith("wan"):  # Wan un-normalizes with the VAE's per-channel mean and std first
        mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
        std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
        torch.testing.assert_close(decoded[-1], last * std + mean)
    else:
        torch.testing.assert_close(decoded[-1], last / vae.config.scaling_factor)
    channels = last.shape[1]
    assert preview.projection(generator.entry.family, channels).published == (channels in (16, 32, 48))


def test_run_job_hands_a_preview_every_n_steps(family_settings, tmp_path):
    seen = []
    params = job("hunyuanvideo", num_inference_steps=5)
    result = run_job(params, family_settings, models=Models(family_settings), output=tmp_path / "fox.mp4",
                     on_preview=lambda step, total, frames: seen.append((step, total, frames)))
    assert result.frames == 9
    assert [(step, total) for step, total, _ in seen] == [(2, 5), (4, 5)]  # T2V_PREVIEW_EVERY=2
    frames = seen[-1][2]
    assert frames.dtype == np.uint8 and frames.shape == (3, 8, 8, 3)  # 3 latent frames of 8x8 (64 px / 8)
    assert frames.std() > 0 and not np.array_equal(seen[0][2], frames)


def test_the_preview_benchmark_runs_and_its_previews_fit(tmp_path):
    """bench/preview.py, one repeat: every full-size shape gives a preview at the latents' size (at most 256 px),
    and the worker's path stores and logs previews as the steps go (at most one a step)."""
    import importlib.util
    import json

    from conftest import ROOT

    spec = importlib.util.spec_from_file_location("bench_preview", ROOT / "bench" / "preview.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    threads = torch.get_num_threads()
    try:
        assert bench.main(["--repeats", "1", "--json", str(tmp_path / "preview.json")]) == 0
    finally:
        torch.set_num_threads(threads)  # the script sets one thread for itself
    figures = json.loads((tmp_path / "preview.json").read_text())
    previews = [row["preview"] for row in figures["full_size"]]
    assert previews == ["33x90x160", "33x68x120", "21x60x104", "31x44x80", "31x45x80", "31x30x53"]
    assert all(row["webp_kb"] > 0 and row["project_ms"] > 0 for row in figures["full_size"])
    # One a step at most: the writer drops a preview that comes while the last one is still being stored (so a
    # step is never held up), which a loaded machine (the suite's other process) makes happen now and then.
    assert 10 <= figures["worker"]["previews_logged_last_job"] <= 20
