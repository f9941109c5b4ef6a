"""run_job and the two scripts, end to end on the tiny models."""

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.generate import JobCanceled
from pipeline.run import Models, file_sha256, run_job
from pipeline.spec import JobParams
from pipeline.video import probe, read_frames

ROOT = Path(__file__).resolve().parents[1]


def params(**kw):
    return JobParams.from_dict({"prompt": "a red fox", "width": 64, "height": 64, "num_frames": 9,
                                "num_inference_steps": 2, "seed": 3, **kw})


@pytest.fixture(scope="module")
def models(request, data_dir, tiny_model, tiny_upscalers):
    from config import Settings

    return Models(Settings.from_env(env={}, model="tiny", upscaler="tiny", data_dir=data_dir))


def test_run_job_upscales_4x_and_reports_what_it_wrote(settings, models, tmp_path):
    stages = []
    out = tmp_path / "fox.mp4"
    result = run_job(params(), settings, lambda s, i, n: stages.append((s, i, n)), models=models, output=out)
    info = probe(out)
    assert (info["width"], info["height"], info["frames"], info["fps"]) == (256, 256, 9, 24.0)
    assert (result.width, result.height, result.frames, result.fps, result.seed) == (256, 256, 9, 24, 3)
    assert result.duration_s == pytest.approx(9 / 24)
    assert result.sha256 == file_sha256(out) and result.size_bytes == out.stat().st_size
    assert Image.open(result.poster_path).size == (256, 256)  # the video's size, not the generated 64x64
    assert {"generate", "upscale", "total"} <= set(result.timings_s)
    assert [s for s in stages if s[0] == "denoising"] == [("denoising", 1, 2), ("denoising", 2, 2)]
    assert [s[1] for s in stages if s[0] == "upscaling"] == list(range(1, 10))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fox.jpg", "fox.mp4"]  # no .part left


def test_outscale_2_and_no_upscale(settings, models, tmp_path):
    r2 = run_job(params(outscale=2), settings, models=models, output=tmp_path / "x2.mp4")
    assert (probe(r2.path)["width"], probe(r2.path)["frames"]) == (128, 9)
    r1 = run_job(params(upscale=False, num_frames=5, fps=8), settings, models=models, output=tmp_path / "x1.mp4")
    info = probe(r1.path)
    assert (info["width"], info["height"], info["frames"], info["fps"]) == (64, 64, 5, 8.0)


def test_upscaled_frames_are_the_generated_frames_upscaled(settings, models, tmp_path):
    frames = models.generator.generate(params())
    expected = models.upscaler.upscale(frames)
    result = run_job(params(), settings, models=models, output=tmp_path / "same.mp4")
    decoded = np.stack(list(read_frames(result.path)))
    assert decoded.shape == expected.shape
    assert np.abs(decoded.astype(float) - expected.astype(float)).mean() < 12  # H.264 of noise at CRF 18


def test_cancel_during_upscale_leaves_no_file(settings, models, tmp_path):
    seen = []
    with pytest.raises(JobCanceled):
        run_job(params(), settings, lambda s, i, n: seen.append(s), lambda: "upscaling" in seen,
                models=models, output=tmp_path / "c.mp4")
    assert not (tmp_path / "c.mp4").exists()
    assert not list(tmp_path.glob("*.part")) and not list(tmp_path.glob(".*.part"))


def run_script(*args, cwd):
    return subprocess.run([sys.executable, str(ROOT / args[0]), *args[1:]], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def test_finalpipeline_tiny_writes_a_256px_mp4(tmp_path, data_dir, tiny_model):
    env_dir = tmp_path
    proc = run_script("finalpipeline.py", "--model", "tiny", "--upscaler", "tiny", "--prompt", "a red fox",
                      "--width", "64", "--height", "64", "--num-frames", "9", "--steps", "4", "--fps", "12",
                      "--output", "out.mp4", cwd=env_dir)
    assert proc.returncode == 0, proc.stderr
    info = probe(env_dir / "out.mp4")
    assert (info["width"], info["height"], info["frames"], info["fps"], info["codec"]) == (256, 256, 9, 12.0, "h264")
    assert "wrote out.mp4" in proc.stdout and "time per stage" in proc.stdout and "noise" in proc.stdout
    assert "denoising" in proc.stderr and "upscaling" in proc.stderr  # the tqdm bars


def test_test_py_writes_the_64px_video(tmp_path):
    proc = run_script("test.py", "--model", "tiny", "--prompt", "a red fox", "--width", "64", "--height", "64",
                      "--num-frames", "9", "--steps", "2", "--seed", "1", "--output", "small.mp4", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    info = probe(tmp_path / "small.mp4")
    assert (info["width"], info["height"], info["frames"]) == (64, 64, 9)


def test_a_tiny_model_gets_tiny_defaults_on_the_command_line(tmp_path):
    """Issue 13: `test.py --model tiny --prompt ...` alone finishes in seconds (it took HunyuanVideo's 960x544x129)."""
    proc = run_script("test.py", "--model", "tiny", "--prompt", "a red fox", "--output", "first.mp4", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    info = probe(tmp_path / "first.mp4")
    assert (info["width"], info["height"], info["frames"]) == (64, 64, 9)


@pytest.mark.parametrize("args, reason", [
    (["--width", "65"], "--width: must be a multiple of 16"),
    (["--num-frames", "10"], "--num-frames: must be of the form 4k+1"),
    (["--steps", "0"], "--steps: must be between 1 and 100"),
    (["--fps", "abc"], "argument --fps: invalid int value"),
    (["--outscale", "3"], "argument --outscale: invalid choice"),
    (["--memory", "lots"], "argument --memory: invalid choice"),
    (["--output", "clip.avi"], "--output must end in .mp4"),
    (["--output", "a_file/x.mp4"], "cannot write"),
])
def test_bad_parameters_exit_2_with_one_line_before_loading(tmp_path, args, reason):
    (tmp_path / "a_file").write_text("not a folder")
    started = time.monotonic()
    proc = run_script("finalpipeline.py", "--prompt", "fox", "--model", "tiny", *args, cwd=tmp_path)
    assert proc.returncode == 2
    assert reason in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "data").exists()  # nothing was built or loaded
    assert time.monotonic() - started < 5


def test_missing_weights_name_the_file_and_download_py(tmp_path):
    proc = run_script("finalpipeline.py", "--prompt", "fox", cwd=tmp_path)
    assert proc.returncode == 2
    assert "models/HunyuanVideo" in proc.stderr and "python download.py" in proc.stderr
    proc = run_script("finalpipeline.py", "--prompt", "fox", "--model", "tiny", "--upscaler", "models/x4.pth",
                      cwd=tmp_path)
    assert proc.returncode == 2 and "models/x4.pth not found" in proc.stderr and "download.py --list" in proc.stderr


def test_help_explains_the_flags(tmp_path):
    proc = run_script("finalpipeline.py", "--help", cwd=tmp_path)
    assert proc.returncode == 0
    for flag in ("--prompt", "--negative-prompt", "--num-frames", "--steps", "--guidance", "--seed", "--output",
                 "--model", "--memory", "--upscaler", "--outscale"):
        assert flag in proc.stdout


def test_a_corrupt_upscaler_exits_2_naming_it_before_any_generation(tmp_path, data_dir, tiny_model):
    import os

    (tmp_path / "corrupt.pth").write_bytes(b"\x80\x02 this is not a Real-ESRGAN checkpoint" * 50)
    env = {**os.environ, "T2V_DATA_DIR": str(data_dir)}  # the tiny generator is already built there
    proc = subprocess.run([sys.executable, str(ROOT / "finalpipeline.py"), "--prompt", "fox", "--model", "tiny",
                           "--upscaler", "corrupt.pth", "--width", "64", "--height", "64", "--num-frames", "9",
                           "--steps", "2", "--output", "out.mp4"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("finalpipeline.py: error: upscaler weights corrupt.pth")
    assert proc.stdout == ""  # no seed line, no tiny-model note: the generator was never loaded
    assert not (tmp_path / "out.mp4").exists()
