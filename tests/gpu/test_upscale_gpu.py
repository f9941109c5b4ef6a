"""The upscaler on a real GPU, with full-size random weights in the release layouts: fp16 against fp32,
channels_last against NCHW, and the out-of-memory retry under a real memory limit.

Tolerances (stated once here): fp16 against a true fp32 reference (TF32 off) is at least 40 dB PSNR
for both networks; on the CPU the same comparison gives 68 dB (compact) and 52 dB (x4plus, whose
random output is mostly saturated noise). channels_last against NCHW, both fp16, is at least 45 dB:
cuDNN may pick other kernels for the two layouts, so the rounding may differ.
"""

import numpy as np
import pytest
import torch

from conftest import psnr, smooth_clip
from pipeline import tiny
from pipeline.upscale import Upscaler

GiB = 1024**3


@pytest.fixture(scope="module")
def full_size(tmp_path_factory) -> dict:
    """Random weights at the release sizes: RealESRGAN_x4plus (RRDBNet) and animevideov3 (compact)."""
    folder = tmp_path_factory.mktemp("upscalers")
    return {
        "x4plus": tiny.write_release_pth(folder / "x4plus.pth", tiny.rrdbnet_state(), "params_ema"),
        "compact": tiny.write_release_pth(folder / "compact.pth", tiny.compact_state(), "params"),
    }


@pytest.fixture
def no_tf32(monkeypatch):
    """fp32 convolutions in true fp32: cuDNN's default TF32 has fp16's mantissa and would blur the reference."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


@pytest.mark.parametrize("net", ["x4plus", "compact"])
def test_fp16_matches_fp32_within_40_db(cuda, full_size, no_tf32, net):
    clip = smooth_clip(2, 96, 160)
    half = Upscaler(full_size[net], str(cuda))
    full = Upscaler(full_size[net], str(cuda), half=False)
    assert half.dtype == torch.float16 and full.dtype == torch.float32
    out_half, out_full = half.upscale(clip), full.upscale(clip)
    assert out_half.shape == out_full.shape == (2, 384, 640, 3)
    assert psnr(out_half, out_full) >= 40


@pytest.mark.parametrize("net", ["x4plus", "compact"])
def test_channels_last_matches_nchw(cuda, full_size, net):
    clip = smooth_clip(4, 96, 160)
    last = Upscaler(full_size[net], str(cuda), channels_last=True)
    nchw = Upscaler(full_size[net], str(cuda), channels_last=False)
    assert last.memory_format == torch.channels_last and nchw.memory_format == torch.contiguous_format
    assert Upscaler(full_size[net], str(cuda)).memory_format == torch.channels_last  # the CUDA default
    assert psnr(last.upscale(clip), nchw.upscale(clip)) >= 45


def test_out_of_memory_under_a_real_limit_retries_with_tiles(cuda, full_size):
    """A 1024x1024 frame through x4plus needs several GiB whole; with 1.5 GiB allowed, only tiles fit."""
    clip = smooth_clip(1, 1024, 1024)
    up = Upscaler(full_size["x4plus"], str(cuda))
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(cuda).total_memory
    torch.cuda.set_per_process_memory_fraction((torch.cuda.memory_reserved(cuda) + 1.5 * GiB) / total, cuda)
    try:
        out = up.upscale(clip)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, cuda)
        torch.cuda.empty_cache()
    assert out.shape == (1, 4096, 4096, 3)
    assert up.tile and up.tile <= 512  # whole frame failed, then 512, 256... down to what fitted
    reference = Upscaler(full_size["x4plus"], str(cuda), tile=up.tile).upscale(clip)  # same tiles, no limit
    assert psnr(out, reference) >= 45
    assert np.abs(out.astype(int) - 128).mean() > 1  # a picture, not a blank
