"""The PyAV writer and reader: count, size, fps, quality, odd sizes, faststart, posters."""

from fractions import Fraction

import av
import numpy as np
import pytest
from PIL import Image

from conftest import psnr, smooth_clip
from pipeline.video import VideoWriter, probe, read_frames, write_poster


def write(path, clip, fps=24, crf=18):
    with VideoWriter(path, fps=fps, crf=crf) as w:
        for frame in clip:
            w.write(frame)
    return path


def test_round_trip_keeps_count_size_fps_and_quality(tmp_path):
    clip = smooth_clip(17, 96, 160)
    path = write(tmp_path / "a.mp4", clip, fps=12)
    info = probe(path)
    assert (info["width"], info["height"], info["frames"], info["fps"]) == (160, 96, 17, 12.0)
    assert (info["codec"], info["pix_fmt"]) == ("h264", "yuv420p")
    back = np.stack(list(read_frames(path)))
    assert back.shape == clip.shape
    assert psnr(back, clip) >= 35


def test_crf_changes_size_and_quality(tmp_path):
    clip = smooth_clip(9, 64, 64) + np.random.default_rng(0).integers(0, 30, (9, 64, 64, 3), dtype=np.uint8)
    hi = write(tmp_path / "hi.mp4", clip, crf=10)
    lo = write(tmp_path / "lo.mp4", clip, crf=40)
    assert hi.stat().st_size > lo.stat().st_size
    assert psnr(np.stack(list(read_frames(hi))), clip) > psnr(np.stack(list(read_frames(lo))), clip)


def test_faststart_puts_the_index_before_the_data(tmp_path):
    data = write(tmp_path / "f.mp4", smooth_clip(5, 32, 32)).read_bytes()
    assert 0 < data.find(b"moov") < data.find(b"mdat")


def test_odd_sizes_are_padded_by_one_edge_pixel(tmp_path):
    clip = smooth_clip(5, 33, 47)
    path = write(tmp_path / "odd.mp4", clip)
    back = np.stack(list(read_frames(path)))
    assert back.shape == (5, 34, 48, 3)
    assert psnr(back[:, :33, :47], clip) >= 35


def test_fractional_fps_is_kept(tmp_path):
    path = write(tmp_path / "ntsc.mp4", smooth_clip(9, 32, 32), fps=30000 / 1001)
    with av.open(str(path)) as c:
        assert c.streams.video[0].average_rate == Fraction(30000, 1001)


def test_bad_frames_are_refused(tmp_path):
    with VideoWriter(tmp_path / "bad.mp4", fps=24) as w:
        w.write(smooth_clip(1, 16, 16)[0])
        with pytest.raises(ValueError, match="uint8"):
            w.write(np.zeros((16, 16, 3), np.float32))
        with pytest.raises(ValueError, match="size changed"):
            w.write(np.zeros((32, 16, 3), np.uint8))


def test_poster_is_a_jpeg_no_larger_than_asked(tmp_path):
    poster = write_poster(smooth_clip(1, 544, 960)[0], tmp_path / "p.jpg", max_side=640)
    with Image.open(poster) as im:
        assert im.format == "JPEG" and im.size == (640, 363)
    assert not list(tmp_path.glob(".*"))  # no temporary left behind
