"""MP4 in and out with PyAV: a streaming H.264 writer, a streaming reader, and the poster image.

PyAV bundles its own ffmpeg with libx264, so nothing here needs a system ffmpeg.
"""

from __future__ import annotations

import heapq
import os
from dataclasses import dataclass
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


# ---------------------------------------------------------------------------------------- existing clips

class VideoInputError(ValueError):
    """The file is not a video t2v can upscale. The message is one line, safe to show a user."""


@dataclass(frozen=True)
class VideoInfo:
    width: int
    height: int
    frames: int
    fps: float
    duration_s: float
    audio_codec: str | None  # None: no audio track


def inspect_video(path: Path, max_side: int | None = None, max_frames: int | None = None,
                  max_duration_s: float | None = None) -> VideoInfo:
    """Check that `path` holds a decodable video within the limits, without decoding its frames.

    The frame count comes from the container, or from counting packets where it does not say.
    Limits are checked on the header first, so a file claiming 100000x100000 is refused before
    any frame is decoded.
    """
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoInputError("the file has no video stream")
            stream = container.streams.video[0]
            width, height = stream.codec_context.width, stream.codec_context.height
            if not width or not height:
                raise VideoInputError("the video stream has no frame size")
            if max_side and max(width, height) > max_side:
                raise VideoInputError(f"the video is {width}x{height}; the longest side allowed is {max_side}")
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
            frames = stream.frames or sum(1 for packet in container.demux(stream) if packet.size)
            if frames < 1:
                raise VideoInputError("the video stream has no frames")
            fps = float(rate) if rate else 0.0
            if not 0 < fps <= 240:
                raise VideoInputError("the video has no usable frame rate")
            if max_frames and frames > max_frames:
                raise VideoInputError(f"the video has {frames} frames; at most {max_frames} are allowed")
            duration = frames / fps
            if max_duration_s and duration > max_duration_s:
                raise VideoInputError(f"the video lasts {duration:.1f}s; at most {max_duration_s:g}s is allowed")
            audio = _codec_name(container.streams.audio[0]) if container.streams.audio else None
            return VideoInfo(width, height, frames, fps, duration, audio)
    except VideoInputError:
        raise
    except (av.FFmpegError, ValueError, OSError) as exc:
        raise VideoInputError(f"not a video that can be decoded ({type(exc).__name__})") from None


def _codec_name(stream) -> str:
    """The codec's own name ("mp3"), not its decoder's ("mp3float")."""
    return stream.codec_context.codec.canonical_name


# Audio codecs an MP4 can carry as they are; anything else is re-encoded to AAC.
MP4_AUDIO_COPY = {"aac", "mp3", "alac", "ac3", "eac3"}


def mux_audio(video_only: Path, audio_source: Path, output: Path) -> str:
    """Write `output`: the video of `video_only` plus the first audio track of `audio_source`.

    Packets of both are interleaved by time. Audio is stream-copied when MP4 allows the codec,
    otherwise re-encoded to AAC. Returns "copy" or "aac".
    """
    with av.open(str(video_only)) as vin, av.open(str(audio_source)) as ain, \
            av.open(str(output), "w", format="mp4", options={"movflags": "+faststart"}) as out:
        v_in, a_in = vin.streams.video[0], ain.streams.audio[0]
        v_out = out.add_stream_from_template(v_in)
        copy = _codec_name(a_in) in MP4_AUDIO_COPY
        if copy:
            a_out = out.add_stream_from_template(a_in)
        else:
            a_out = out.add_stream("aac", rate=a_in.codec_context.sample_rate or 48000)
            a_out.layout = a_in.codec_context.layout.name if a_in.codec_context.layout else "stereo"
        video = _copied(vin.demux(v_in), v_out)
        audio = _copied(ain.demux(a_in), a_out) if copy else _encoded(ain.decode(a_in), a_out)
        for packet in heapq.merge(video, audio, key=_packet_time):
            out.mux(packet)
    return "copy" if copy else "aac"


def _copied(packets, stream):
    for packet in packets:
        if packet.dts is None:  # the demuxer's end-of-stream marker
            continue
        packet.stream = stream
        yield packet


def _encoded(frames, stream):
    for frame in frames:
        frame.pts = None  # let the encoder number samples from zero
        yield from stream.encode(frame)
    yield from stream.encode(None)


def _packet_time(packet) -> float:
    return float((packet.dts if packet.dts is not None else packet.pts or 0) * packet.time_base)


# ---------------------------------------------------------------------------------------- a made soundtrack

@dataclass(frozen=True)
class Audio:
    """A model's soundtrack (LTX-2's vocoder output): float32 samples (channels, samples) in [-1, 1]."""

    samples: np.ndarray
    sample_rate: int

    @property
    def duration_s(self) -> float:
        return self.samples.shape[1] / self.sample_rate

    def fitted(self, frames: int, fps: float) -> "Audio":
        """Cut or pad (with silence) to exactly the clip's length: the causal audio decode ends a few mel frames
        short of the video (a third of a frame at 121 frames; more, relatively, in a short clip)."""
        want = round(frames / fps * self.sample_rate)
        samples = self.samples[:, :want]
        if samples.shape[1] < want:
            samples = np.pad(samples, ((0, 0), (0, want - samples.shape[1])))
        return Audio(np.ascontiguousarray(samples, dtype=np.float32), self.sample_rate)

    def record(self) -> dict:
        """What a job's result says of its sound."""
        return {"sample_rate": self.sample_rate, "channels": int(self.samples.shape[0]),
                "duration_s": round(self.duration_s, 4)}


AUDIO_LAYOUTS = {1: "mono", 2: "stereo"}
AUDIO_BLOCK = 4096  # samples per frame handed to the encoder (PyAV re-blocks them to AAC's 1024)


def mux_waveform(video_only: Path, audio: Audio, output: Path, bitrate: int = 192_000) -> None:
    """Write `output`: the video of `video_only` (stream-copied) plus `audio` encoded to AAC at its own
    sample rate, packets interleaved by time."""
    channels = audio.samples.shape[0]
    if channels not in AUDIO_LAYOUTS:
        raise ValueError(f"audio with {channels} channels cannot be written; 1 or 2 can")
    with av.open(str(video_only)) as vin, \
            av.open(str(output), "w", format="mp4", options={"movflags": "+faststart"}) as out:
        v_in = vin.streams.video[0]
        v_out = out.add_stream_from_template(v_in)
        a_out = out.add_stream("aac", rate=audio.sample_rate)
        a_out.layout = AUDIO_LAYOUTS[channels]
        a_out.bit_rate = bitrate
        video = _copied(vin.demux(v_in), v_out)
        for packet in heapq.merge(video, _encoded_from_zero(_audio_frames(audio), a_out), key=_packet_time):
            out.mux(packet)


def _encoded_from_zero(frames, stream):
    """Encode frames numbered by their first sample, so the encoder's priming packets come before zero and the
    MP4's edit list hides them: the track then plays exactly the samples given."""
    for frame in frames:
        yield from stream.encode(frame)
    yield from stream.encode(None)


def _audio_frames(audio: Audio):
    samples = np.clip(audio.samples, -1.0, 1.0).astype(np.float32)
    layout = AUDIO_LAYOUTS[samples.shape[0]]
    for start in range(0, samples.shape[1], AUDIO_BLOCK):
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples[:, start:start + AUDIO_BLOCK]),
                                           format="fltp", layout=layout)
        frame.sample_rate = audio.sample_rate
        frame.pts, frame.time_base = start, Fraction(1, audio.sample_rate)
        yield frame


def probe_audio(path: Path) -> dict | None:
    """Codec, sample rate, channels and duration of the first audio stream, or None when the file has none.
    The duration is what a player plays: the track's length after its edit list (the encoder's priming
    samples hidden), from the container, or from the decoded samples where the container does not say."""
    with av.open(str(path)) as container:
        if not container.streams.audio:
            return None
        stream = container.streams.audio[0]
        rate = stream.codec_context.sample_rate
        if stream.duration:
            duration = float(stream.duration * stream.time_base)
        else:
            duration = sum(frame.samples for frame in container.decode(stream)) / rate
        return {"codec": _codec_name(stream), "sample_rate": rate, "channels": stream.codec_context.channels,
                "duration_s": duration}


# ---------------------------------------------------------------------------------------- spritesheet

def write_spritesheet(video: Path, path: Path, max_tiles: int = 25, tile_side: int = 160) -> tuple[int, int]:
    """Save a JPEG grid of up to `max_tiles` frames picked evenly through the clip (first and last included),
    in reading order, each scaled so its long side is at most `tile_side`: a picture to scrub through.
    The clip is decoded once and only the picked frames are kept. Returns (columns, rows)."""
    from PIL import Image

    count = probe(video)["frames"]
    tiles = max(1, min(max_tiles, count))
    picked = {round(i * (count - 1) / (tiles - 1)) for i in range(tiles)} if tiles > 1 else {0}
    images = []
    for index, frame in enumerate(read_frames(video)):
        if index in picked:
            image = Image.fromarray(frame)
            image.thumbnail((tile_side, tile_side))
            images.append(image)
    if not images:
        raise ValueError(f"{Path(video).name} has no frame to show")
    columns = int(np.ceil(np.sqrt(len(images))))
    rows = -(-len(images) // columns)
    width, height = images[0].size
    sheet = Image.new("RGB", (columns * width, rows * height))
    for i, image in enumerate(images):
        sheet.paste(image, ((i % columns) * width, (i // columns) * height))
    sheet.save(path, format="JPEG", quality=85)
    return columns, rows
