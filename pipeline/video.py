"""MP4 in and out with PyAV: a streaming H.264 writer, a streaming reader, and the poster image.

PyAV bundles its own ffmpeg with libx264, so nothing here needs a system ffmpeg.
"""

from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path
from typing import Iterator

import av
import numpy as np


class VideoWriter:
    """Write uint8 (H, W, 3) RGB frames one at a time to an H.264 (yuv420p) MP4.

    yuv420p needs even sizes, so odd frames are padded by one edge pixel. `+faststart` puts the
    index first, so browsers start playing before the download ends.
    Use as a context manager; the file is complete only after `close()`.
    """

    def __init__(self, path: Path, fps: float, crf: int = 18, preset: str = "medium"):
        self.path = Path(path)
        self.fps = Fraction(fps).limit_denominator(1001)
        self.crf = crf
        self.preset = preset
        self.frames = 0
        self.width = self.height = None
        self._container = av.open(str(self.path), mode="w", format="mp4", options={"movflags": "+faststart"})
        self._stream = None

    def _open_stream(self, width: int, height: int):
        stream = self._container.add_stream("libx264", rate=self.fps)
        stream.width, stream.height = width + width % 2, height + height % 2
        stream.pix_fmt = "yuv420p"
        stream.codec_context.time_base = 1 / self.fps
        stream.options = {"crf": str(self.crf), "preset": self.preset}
        self.width, self.height = width, height
        return stream

    def write(self, frame: np.ndarray) -> None:
        if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
            raise ValueError(f"expected a uint8 (H, W, 3) frame, got {frame.dtype} {frame.shape}")
        if self._stream is None:
            self._stream = self._open_stream(frame.shape[1], frame.shape[0])
        elif frame.shape[:2] != (self.height, self.width):
            raise ValueError(f"frame size changed from {self.width}x{self.height} to {frame.shape[1]}x{frame.shape[0]}")
        if frame.shape[0] % 2 or frame.shape[1] % 2:
            frame = np.pad(frame, ((0, frame.shape[0] % 2), (0, frame.shape[1] % 2), (0, 0)), mode="edge")
        video_frame = av.VideoFrame.from_ndarray(frame, format="rgb24")
        video_frame.pts = self.frames
        self._container.mux(self._stream.encode(video_frame))
        self.frames += 1

    def close(self) -> None:
        if self._container is None:
            return
        try:
            if self._stream is not None:
                self._container.mux(self._stream.encode(None))  # flush delayed frames
        finally:
            self._container.close()
            self._container = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close()


def read_frames(path: Path) -> Iterator[np.ndarray]:
    """Yield the first video stream's frames as uint8 (H, W, 3) RGB, one at a time."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for frame in container.decode(stream):
            yield frame.to_ndarray(format="rgb24")


def probe(path: Path) -> dict:
    """Width, height, frame count, fps and duration of the first video stream."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        fps = stream.average_rate or stream.guessed_rate
        frames = stream.frames or sum(1 for _ in container.decode(stream))
        return {
            "width": stream.codec_context.width,
            "height": stream.codec_context.height,
            "frames": frames,
            "fps": float(fps) if fps else None,
            "codec": stream.codec_context.name,
            "pix_fmt": stream.codec_context.pix_fmt,
            "duration_s": frames / float(fps) if fps else None,
        }


def write_poster(frame: np.ndarray, path: Path, max_side: int = 640) -> Path:
    """Save one frame as a JPEG poster, scaled down so its long side is at most `max_side`."""
    from PIL import Image

    image = Image.fromarray(frame)
    image.thumbnail((max_side, max_side))
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format="JPEG", quality=88)
    os.replace(tmp, path)
    return path
