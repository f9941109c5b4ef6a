"""test.py and finalpipeline.py with the registry's other models: `--image` (image-to-video) and `--lora`.

Every bad flag exits 2 with one line before anything is built or loaded; a good image runs image-to-video on a
tiny model and its MP4 starts from that image.
"""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT
from pipeline import models
from pipeline.video import read_frames
from test_families import halves, vae_round_trip
from test_lora import make_lora
from test_spec import png

WAN = "wan2.2-ti2v-5b"


def run_script(*args, cwd, input=None, **env):
    return subprocess.run([sys.executable, str(ROOT / args[0]), *args[1:]], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env={**os.environ, **env}, input=input)


def luma(rgb: np.ndarray) -> np.ndarray:
    return rgb.astype(float) @ np.array([0.299, 0.587, 0.114])


def test_image_to_video_on_the_command_line_starts_from_the_image(tmp_path, data_dir):
    """Wan TI2V keeps the image's latent as the first latent frame, and its causal VAE decodes frame 0 from that
    frame alone: frame 0 is the image as this (random) VAE reproduces it. The MP4's first frame is compared with
    that reproduction of the input and of a mirrored image, in luma, which yuv420p keeps at full resolution (the
    random VAE's pixel-scale colour noise is lost to the 4:2:0 chroma)."""
    folder = models.tiny_model_dir(data_dir, WAN)  # built once; the script finds it in T2V_DATA_DIR
    image, other = halves(64, 64), halves(64, 64, flip=True)
    image.save(tmp_path / "input.png")
    proc = run_script("test.py", "--model", f"tiny:{WAN}", "--prompt", "a red fox", "--image", "input.png",
                      "--output", "i2v.mp4", cwd=tmp_path, T2V_DATA_DIR=str(data_dir))
    assert proc.returncode == 0, proc.stderr
    frames = np.stack(list(read_frames(tmp_path / "i2v.mp4")))
    assert frames.shape == (9, 64, 64, 3)  # the tiny build's defaults: 64x64, 9 frames

    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(folder)
    first = luma(frames[0])
    own, another = (float(np.abs(first - luma(vae_round_trip(pipe, p, 64, 64))).mean()) for p in (image, other))
    assert own * 1.5 < another, (own, another)  # measured: 1.9 against 3.9 (H.264 at CRF 18 is the 1.9)


def test_a_model_id_loads_from_the_models_dir_given(tmp_path, data_dir):
    """`--model <id>` loads T2V_MODELS_DIR/<Hub folder name>; the check before loading looked in ./models."""
    shutil.copytree(models.tiny_model_dir(data_dir, WAN), tmp_path / "weights" / "Wan2.2-TI2V-5B-Diffusers")
    proc = run_script("test.py", "--model", WAN, "--models-dir", "weights", "--prompt", "a red fox", "--width", "64",
                      "--height", "64", "--num-frames", "5", "--steps", "1", "--output", "wan.mp4", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert np.stack(list(read_frames(tmp_path / "wan.mp4"))).shape == (5, 64, 64, 3)
    proc = run_script("test.py", "--model", WAN, "--models-dir", "elsewhere", "--prompt", "fox", cwd=tmp_path)
    assert proc.returncode == 2 and "model folder elsewhere/Wan2.2-TI2V-5B-Diffusers is missing" in proc.stderr


@pytest.mark.parametrize("args, env, reason", [
    (["--image", "text.png"], {}, "--image: is not a decodable PNG, JPEG or WebP image"),
    (["--image", "missing.png"], {}, "--image: missing.png is not a file"),
    (["--image", "."], {}, "--image: . is not a file"),
    (["--image", "big.png"], {"T2V_MAX_IMAGE_MB": "1"}, "--image: big.png is over 1 MB (T2V_MAX_IMAGE_MB)"),
    (["--image", "small.png"], {"T2V_MAX_IMAGE_PIXELS": "1000"}, "is 64x64, 4096 pixels; the cap is 1000"),
    (["--image", "bomb.png"], {}, "--image: has too many pixels"),  # 400 million pixels in 60 KB
    (["--image", "small.png"], {}, "hunyuanvideo: --image is not taken: this model makes video from text only"),
    (["--model", "tiny:wan2.2-i2v-a14b"], {}, "wan2.2-i2v-a14b: --image is required"),
])
def test_a_bad_image_exits_2_with_one_line_before_loading(tmp_path, args, env, reason):
    (tmp_path / "text.png").write_text("not an image")
    (tmp_path / "big.png").write_bytes(b"x" * (2**20 + 1))  # refused by its size, before it is read
    halves(64, 64).save(tmp_path / "small.png")
    (tmp_path / "bomb.png").write_bytes(png(20000, 20000))
    proc = run_script("test.py", "--prompt", "fox", "--model", "tiny", *args, cwd=tmp_path, **env)
    assert proc.returncode == 2
    assert reason in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "data").exists()  # nothing was built or loaded


@pytest.mark.parametrize("args, reason", [
    (["--lora", "ghost"], "--lora: is not an installed LoRA: 'ghost'; installed: style"),
    (["--lora", "style:9"], "--lora: must be between -4.0 and 4.0, got 9.0"),
    (["--lora", "style", "--lora", "style:0.5"], "--lora: names the LoRA style twice"),
    (["--lora", "style:x"], "argument --lora: the scale in 'style:x' is not a number"),
    (["--lora", "../style"], "argument --lora: expected NAME or NAME:SCALE"),
    (["--model", "tiny:hunyuanvideo-1.5-480p", "--lora", "style"],
     "hunyuanvideo-1.5-480p: --lora are not supported: diffusers 0.42.1 has no LoRA loader"),
])
def test_lora_flags_are_checked_against_the_installed_loras(tmp_path, args, reason):
    (tmp_path / "models" / "loras").mkdir(parents=True)
    (tmp_path / "models" / "loras" / "style.safetensors").write_bytes(b"\0" * 8)
    proc = run_script("finalpipeline.py", "--prompt", "fox", "--model", "tiny", *args, cwd=tmp_path)
    assert proc.returncode == 2
    assert reason in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "data").exists()


def test_a_lora_on_the_command_line_changes_the_video(tmp_path, data_dir, tiny_model):
    """A tiny LoRA (peft, in diffusers' format) changes the frames of the same seed; a damaged one exits 2 naming it."""
    loras = tmp_path / "models" / "loras"
    loras.mkdir(parents=True)
    make_lora("hunyuanvideo", data_dir, loras, "style")
    (loras / "broken.safetensors").write_bytes(b"\x08" + b"\0" * 15)
    job = ("test.py", "--model", "tiny", "--prompt", "a red fox", "--seed", "7", "--num-frames", "5", "--steps", "3")
    videos = {}
    for name, lora in (("bare", []), ("styled", ["--lora", "style:1.5"])):
        proc = run_script(*job, *lora, "--output", f"{name}.mp4", cwd=tmp_path, T2V_DATA_DIR=str(data_dir))
        assert proc.returncode == 0, proc.stderr
        videos[name] = np.stack(list(read_frames(tmp_path / f"{name}.mp4"))).astype(float)
    assert videos["bare"].shape == videos["styled"].shape == (5, 64, 64, 3)
    assert np.abs(videos["bare"] - videos["styled"]).mean() > 2  # measured 12.6; the same run twice: 0

    proc = run_script(*job, "--lora", "broken", "--output", "broken.mp4", cwd=tmp_path, T2V_DATA_DIR=str(data_dir))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "test.py: error: LoRA 'broken' cannot be loaded into hunyuanvideo: ")
    assert not (tmp_path / "broken.mp4").exists()


def test_no_lora_installed_is_named(tmp_path):
    proc = run_script("test.py", "--prompt", "fox", "--model", "tiny", "--lora", "style", cwd=tmp_path)
    assert proc.returncode == 2 and "--lora: cannot be used: no LoRA is installed (models/loras)" in proc.stderr
