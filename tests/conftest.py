"""Shared fixtures: tiny models built once per test session, and settings that point at them."""

import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from config import Settings  # noqa: E402
from pipeline import tiny  # noqa: E402


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """One data folder per test session, holding the tiny models (built once)."""
    return tmp_path_factory.mktemp("t2v-data")


@pytest.fixture(scope="session")
def tiny_model(data_dir) -> Path:
    return tiny.tiny_model_dir(data_dir)


@pytest.fixture(scope="session")
def tiny_upscalers(data_dir) -> dict:
    return tiny.build_tiny_upscalers(data_dir / "tiny")


@pytest.fixture
def settings(data_dir, tiny_model, tmp_path) -> Settings:
    return Settings.from_env(env={}, model="tiny", upscaler="tiny", data_dir=data_dir,
                             output_dir=tmp_path / "out", models_dir=tmp_path / "models")


def smooth_clip(frames: int, height: int, width: int) -> np.ndarray:
    """A smooth moving gradient, uint8 (F, H, W, 3): easy on codecs and on tile seams."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    clip = np.empty((frames, height, width, 3), np.uint8)
    for i in range(frames):
        clip[i, ..., 0] = 128 + 100 * np.sin((x + 2 * i) / width * np.pi)
        clip[i, ..., 1] = 128 + 100 * np.cos((y - i) / height * np.pi)
        clip[i, ..., 2] = (x + y + 3 * i) / (width + height + 3 * frames) * 255
    return clip


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


# ---------------------------------------------------------------------------------------- service

TINY_JOB = {"prompt": "a red fox", "width": 64, "height": 64, "num_frames": 9, "num_inference_steps": 2}


@pytest.fixture(scope="session")
def tiny_models(data_dir, tiny_model, tiny_upscalers):
    """One loaded tiny generator + upscaler shared by every worker in the session (load once, reuse)."""
    from pipeline.run import Models

    return Models(Settings.from_env(env={}, model="tiny", upscaler="tiny", data_dir=data_dir))


@pytest.fixture
def make_app(tmp_path, data_dir, tiny_models):
    """make_app(worker=True, jobs=None, blobs=None, **settings) -> (app, service); stops workers afterwards."""
    from app import create_app
    from storage.blobs import LocalBlobStore
    from storage.jobs import SqliteJobStore
    from worker.loop import Worker

    workers = []

    def make(worker=True, jobs=None, blobs=None, **overrides):
        settings = Settings.from_env(env={}, **{"model": "tiny", "upscaler": "tiny", "data_dir": tmp_path / "data",
                                               "worker": "off", "lease_s": 5.0, **overrides})
        jobs = jobs or SqliteJobStore(tmp_path / "data" / "jobs.sqlite3")
        blobs = blobs or LocalBlobStore(tmp_path / "data" / "blobs")
        w = Worker(settings, jobs, blobs, models=tiny_models, poll_s=0.05).start() if worker else None
        if w:
            workers.append(w)
        app = create_app(settings, jobs=jobs, blobs=blobs, worker=w)
        return app, app.extensions["t2v"]

    yield make
    for w in workers:
        w.stop(timeout=30)


def wait_for(predicate, timeout=60.0, every=0.05):
    """Poll until predicate() is truthy; return its value or fail the test."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {predicate}")


@pytest.fixture(scope="session")
def moto_server():
    """moto's S3 server on loopback, over real HTTP. Yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(moto_server, monkeypatch):
    """A fresh bucket on the moto server; returns (endpoint, bucket)."""
    import secrets

    import boto3

    for var in ("AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(var, raising=False)
    bucket = f"t2v-{secrets.token_hex(4)}"
    boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1", aws_access_key_id="test",
                 aws_secret_access_key="test").create_bucket(Bucket=bucket)
    return moto_server, bucket


# ---------------------------------------------------------------------------------------- clips

def make_clip(path, frames=48, width=64, height=48, fps=24, audio="aac", video_codec="libx264", rate=44100,
              faststart=False):
    """Write a test clip: a smooth moving picture and, if `audio` names a codec, a 440 Hz sine track."""
    import av

    path = Path(path)
    clip = smooth_clip(frames, height, width)
    with av.open(str(path), "w", options={"movflags": "+faststart"} if faststart else {}) as out:
        v = out.add_stream(video_codec, rate=fps)
        v.width, v.height = width, height
        v.pix_fmt = "yuv420p" if video_codec != "gif" else "rgb8"
        a = None
        if audio:
            a = out.add_stream(audio, rate=rate)
            a.layout = "mono"
        for i, frame in enumerate(clip):
            vf = av.VideoFrame.from_ndarray(frame, format="rgb24")
            vf.pts = i
            out.mux(v.encode(vf))
        out.mux(v.encode(None))
        if a is not None:
            fmt = a.codec_context.codec.audio_formats[0].name
            samples = int(rate * frames / fps)
            t = np.arange(samples) / rate
            wave = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
            chunk = 1024
            for start in range(0, samples, chunk):
                piece = wave[start:start + chunk]
                scale = {"s16": (32767, np.int16), "s32": (2**31 - 1, np.int32)}.get(fmt[:3], (1, np.float32))
                data = (piece * scale[0]).astype(scale[1])
                af = av.AudioFrame.from_ndarray(data[None, :], format=fmt, layout="mono")
                af.sample_rate, af.pts = rate, start
                out.mux(a.encode(af))
            out.mux(a.encode(None))
    return path


def audio_duration(path) -> float | None:
    """Seconds of the first audio track, from its packets, or None without one."""
    import av

    with av.open(str(path)) as c:
        if not c.streams.audio:
            return None
        s = c.streams.audio[0]
        end = 0.0
        for p in c.demux(s):
            if p.pts is not None:
                end = max(end, float((p.pts + (p.duration or 0)) * p.time_base))
        start = float(s.start_time * s.time_base) if s.start_time is not None else 0.0
        return end - start
