"""The upscaler on release-layout weights: loading, batches, tiles, OOM retry, outscale and bad files."""

import numpy as np
import pytest
import spandrel
import torch

from conftest import smooth_clip
from pipeline import tiny
from pipeline.upscale import RELEASES, Upscaler, UpscalerLoadError, resolve_upscaler


@pytest.mark.parametrize("filename, key, make, arch, scale, n_params", [
    ("RealESRGAN_x4plus.pth", "params_ema", lambda: tiny.rrdbnet_state(scale=4), "ESRGAN", 4, 16_697_987),
    ("RealESRGAN_x2plus.pth", "params_ema", lambda: tiny.rrdbnet_state(scale=2), "ESRGAN", 2, None),
    ("realesr-animevideov3.pth", "params", lambda: tiny.compact_state(num_conv=16), "RealESRGAN Compact", 4, None),
    ("realesr-general-x4v3.pth", "params", lambda: tiny.compact_state(num_conv=32), "RealESRGAN Compact", 4, None),
])
def test_official_release_layouts_load_and_upscale(tmp_path, filename, key, make, arch, scale, n_params):
    path = tiny.write_release_pth(tmp_path / filename, make(), key)
    raw = torch.load(path, weights_only=True)
    assert list(raw) == [key]  # the release wrapping, as published
    up = Upscaler(path, batch=2)
    assert up.architecture == arch and up.scale == scale and up.dtype == torch.float32
    if n_params:
        assert sum(p.numel() for p in up.model.model.parameters()) == n_params
    out = up.upscale(smooth_clip(1, 12, 16))
    assert out.shape == (1, 12 * scale, 16 * scale, 3) and out.dtype == np.uint8


@pytest.mark.parametrize("kind", ["rrdb", "compact"])
def test_tiled_output_matches_spandrel_untiled_within_2_of_255(tiny_upscalers, kind):
    frame = smooth_clip(1, 72, 88)
    untiled = Upscaler(tiny_upscalers[kind]).upscale(frame)
    # the same model called directly through spandrel, untiled
    desc = spandrel.ModelLoader().load_from_file(tiny_upscalers[kind]).eval()
    with torch.inference_mode():
        ref = desc(torch.from_numpy(frame).permute(0, 3, 1, 2).float() / 255)
    ref = (ref.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.array_equal(untiled, ref)
    tiled = Upscaler(tiny_upscalers[kind], tile=32, tile_pad=16).upscale(frame)
    diff = np.abs(tiled.astype(int) - ref.astype(int))
    assert tiled.shape == ref.shape and diff.max() <= 2


def test_batches_never_drop_or_duplicate_frames(tiny_upscalers):
    up = Upscaler(tiny_upscalers["compact"], batch=4)
    clip = smooth_clip(10, 16, 16)
    out = list(up.stream(iter(clip)))
    assert len(out) == 10
    one_by_one = [up.upscale(f[None])[0] for f in clip]
    # each output is its own frame's (batched convolutions may round 1/255 differently), in order
    assert all(np.abs(a.astype(int) - b.astype(int)).max() <= 1 for a, b in zip(out, one_by_one))
    assert all(np.abs(out[i].astype(int) - out[i + 1].astype(int)).mean() > 1 for i in range(9))


class _OomAbove:
    """Wraps a spandrel model: raises CUDA-style OOM for inputs larger than `limit` pixels a side."""

    def __init__(self, model, limit):
        self.model, self.limit, self.sizes = model, limit, []

    def __call__(self, x):
        self.sizes.append(tuple(x.shape[-2:]))
        if max(x.shape[-2:]) > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return self.model(x)


def test_out_of_memory_halves_the_tile_and_retries_the_same_batch(tiny_upscalers):
    clip = smooth_clip(6, 96, 128)
    reference = Upscaler(tiny_upscalers["compact"]).upscale(clip)
    up = Upscaler(tiny_upscalers["compact"], tile_pad=16, batch=3)
    up.model = _OomAbove(up.model, limit=64 + 32)
    out = np.concatenate(list(map(np.stack, _chunks(up.stream(iter(clip)), 3))))
    assert out.shape == reference.shape  # no frame dropped or duplicated
    assert np.abs(out.astype(int) - reference.astype(int)).max() <= 2
    assert up.tile == 64  # 128 -> 64: the first size that fitted, kept for later batches
    assert (96, 128) in up.model.sizes  # it did try whole frames first


def test_out_of_memory_with_no_smaller_tile_left_raises(tiny_upscalers):
    up = Upscaler(tiny_upscalers["compact"])
    up.model = _OomAbove(up.model, limit=0)
    with pytest.raises(torch.OutOfMemoryError):
        up.upscale(smooth_clip(1, 64, 64))


def test_non_native_outscale_resizes_after_the_network(tiny_upscalers):
    up = Upscaler(tiny_upscalers["rrdb"])
    frame = smooth_clip(1, 20, 30)
    x2 = up.upscale(frame, outscale=2)
    x4 = up.upscale(frame, outscale=4)
    assert x2.shape == (1, 40, 60, 3) and x4.shape == (1, 80, 120, 3)
    down = torch.nn.functional.interpolate(torch.from_numpy(x4).permute(0, 3, 1, 2).float(), size=(40, 60),
                                           mode="bicubic", antialias=True)
    assert np.abs(down.round().clamp(0, 255).permute(0, 2, 3, 1).numpy() - x2).max() <= 2


def test_corrupt_unknown_and_missing_files_name_the_file(tmp_path):
    corrupt = tmp_path / "RealESRGAN_x4plus.pth"
    corrupt.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(UpscalerLoadError, match="RealESRGAN_x4plus.pth"):
        Upscaler(corrupt)
    unknown = tmp_path / "mystery.pth"
    torch.save({"params": {"foo.weight": torch.zeros(3, 3)}}, unknown)
    with pytest.raises(UpscalerLoadError, match="mystery.pth.*not recognised"):
        Upscaler(unknown)
    with pytest.raises(UpscalerLoadError, match="missing.pth"):
        Upscaler(tmp_path / "missing.pth")


def test_resolve_upscaler_names(tmp_path, data_dir):
    assert resolve_upscaler("none", tmp_path, data_dir) is None
    assert resolve_upscaler("tiny", tmp_path, data_dir).is_file()
    with pytest.raises(UpscalerLoadError, match="RealESRGAN_x4plus.pth not found.*download.py"):
        resolve_upscaler("RealESRGAN_x4plus", tmp_path, data_dir)
    (tmp_path / RELEASES["realesr-animevideov3"].filename).write_bytes(b"x")
    assert resolve_upscaler("realesr-animevideov3", tmp_path, data_dir) == tmp_path / "realesr-animevideov3.pth"


def _chunks(iterable, n):
    batch = []
    for item in iterable:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def test_only_pth_and_safetensors_are_loaded(tmp_path, tiny_upscalers):
    import shutil

    for suffix in (".pt", ".ckpt", ".bin"):  # .pt would be loaded as TorchScript, which can carry code
        other = tmp_path / f"weights{suffix}"
        shutil.copy(tiny_upscalers["compact"], other)
        with pytest.raises(UpscalerLoadError, match=f"weights{suffix}: only .pth and .safetensors"):
            Upscaler(other)
    assert Upscaler(tiny_upscalers["compact"]).scale == 4


def test_out_of_memory_with_a_tile_larger_than_the_frame_halves_the_frame_first(tiny_upscalers, monkeypatch):
    """Bug 7: a configured tile of 512 on a 96x128 frame must not retry whole frames at 256 and 128."""
    up = Upscaler(tiny_upscalers["compact"], tile=512)
    tried = []

    def out_of_memory(x, tile):
        tried.append(tile)
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(up, "_run", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        up.upscale(smooth_clip(1, 96, 128))
    assert tried == [512, 64, 32]  # the whole frame, then half its longer side, then down to MIN_TILE


class _Recorder:
    """Wraps a spandrel model and records whether each input it gets is channels_last in memory."""

    def __init__(self, model):
        self.model, self.channels_last = model, []

    def __call__(self, x):
        self.channels_last.append(x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous())
        return self.model(x)


@pytest.mark.parametrize("kind", ["rrdb", "compact"])
def test_memory_format_applies_to_the_weights_and_every_input(tiny_upscalers, kind):
    clip = smooth_clip(3, 40, 56)
    outputs = {}
    for channels_last in (True, False):
        up = Upscaler(tiny_upscalers[kind], channels_last=channels_last, batch=3)
        convs = [p for p in up.model.model.parameters() if p.ndim == 4]
        assert convs and all(p.is_contiguous(memory_format=torch.channels_last) == channels_last
                             and p.is_contiguous() != channels_last for p in convs)
        up.model = _Recorder(up.model)
        outputs[channels_last] = up.upscale(clip)
        up.tile = 32  # the tiles' inputs too
        up.upscale(clip)
        assert len(up.model.channels_last) > 2 and set(up.model.channels_last) == {channels_last}
    # the same network either way: only float rounding may differ
    assert np.abs(outputs[True].astype(int) - outputs[False].astype(int)).max() <= 1


def test_default_memory_format_is_the_measured_one_per_device(tiny_upscalers):
    from pipeline.upscale import CHANNELS_LAST

    up = Upscaler(tiny_upscalers["compact"])  # on the CPU
    expected = torch.channels_last if CHANNELS_LAST["cpu"] else torch.contiguous_format
    assert up.memory_format == expected and CHANNELS_LAST["cuda"] is True
