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
