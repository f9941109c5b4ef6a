"""Messages that lead somewhere: each names the right flag, file or command, and never suggests one that refuses."""

import os
import re

import pytest

import download
import upscale
from conftest import make_clip
from pipeline import cli
from pipeline.upscale import RELEASES


@pytest.fixture
def run(tmp_path, monkeypatch, capsys, data_dir, tiny_model):
    """run(*args, script=...) -> (exit code, stderr) of a script's main(), in an empty folder with no other T2V_*
    set than the data folder that holds the tiny model already."""
    for name in [k for k in os.environ if k.startswith("T2V_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("T2V_DATA_DIR", str(data_dir))
    monkeypatch.chdir(tmp_path)

    def call(*args, script="finalpipeline.py"):
        if script == "upscale.py":
            code = upscale.main(list(args))
        elif script == "download.py":
            code = download.main(list(args))
        else:
            code = cli.main(list(args), prog=script, description="", upscale=script == "finalpipeline.py")
        return code, capsys.readouterr().err.strip()
    return call


# ---------------------------------------------------------------------------------------- upscaler weights

def test_a_release_download_py_can_fetch_names_that_command(run):
    code, err = run("--prompt", "fox", "--model", "tiny")  # the default upscaler, ./models/RealESRGAN_x4plus.pth
    assert code == 2 and "upscaler weights models/RealESRGAN_x4plus.pth not found" in err
    name = re.search(r"`python download\.py --only (\S+)`", err)[1]
    assert name == "RealESRGAN_x4plus" and RELEASES[name].sha256, "the command it suggests does not refuse"


def test_a_release_download_py_cannot_fetch_says_where_to_get_it_by_hand(run):
    code, err = run("--prompt", "fox", "--model", "tiny", "--upscaler", "RealESRGAN_x2plus")
    assert code == 2 and "download.py --only" not in err, "download.py refuses it: never suggest that"
    assert RELEASES["RealESRGAN_x2plus"].url in err and "save it as models/RealESRGAN_x2plus.pth" in err
    code, err = run("--only", "RealESRGAN_x2plus", script="download.py")
    assert code == 1 and RELEASES["RealESRGAN_x2plus"].url in err and "yourself" in err


@pytest.mark.parametrize("value", ["foo", "models/x4.pth"])
def test_an_unknown_upscaler_lists_the_accepted_names(run, value):
    code, err = run("--prompt", "fox", "--model", "tiny", "--upscaler", value)
    assert code == 2 and err.count("\n") == 0
    assert "RealESRGAN_x4plus`" not in err, "no download suggested for a name t2v does not know"
    accepted = err.split("accepted:")[1]
    for name in (*RELEASES, "tiny", "none", ".pth", ".safetensors", "models"):
        assert name in accepted, name
    assert f"'{value}' is neither a weight file nor a name t2v knows" in err if value == "foo" else \
        "upscaler weights models/x4.pth not found" in err


def test_upscale_py_never_suggests_none(run, tmp_path):
    make_clip(tmp_path / "in.mp4", frames=4, audio=None)
    for upscaler in ("none", "nosuch.pth", "RealESRGAN_x4plus"):
        code, err = run("--input", "in.mp4", "--output", "out.mp4", "--upscaler", upscaler, script="upscale.py")
        assert code == 2 and err.startswith("upscale.py: error: upscaler"), err
        assert not re.search(r"\bnone\b", err.split(":", 2)[2].replace("upscaler none", "")), err
    assert "upscaler none leaves nothing to do here; accepted:" in run(
        "--input", "in.mp4", "--output", "out.mp4", "--upscaler", "none", script="upscale.py")[1]


# ---------------------------------------------------------------------------------------- flag names

@pytest.mark.parametrize("args, flag, field", [
    (["--steps", "0"], "--steps: must be between 1 and 100, got 0", "num_inference_steps"),
    (["--num-frames", "10"], "--num-frames: must be of the form 4k+1", "num_frames"),
    (["--guidance", "0.5"], "--guidance: must be between", "guidance_scale"),
    (["--negative-prompt", "a\x00b"], "--negative-prompt: must not contain NUL", "negative_prompt"),
    (["--width", "65"], "--width: must be a multiple of 16", None),
])
def test_cli_errors_name_the_flag(run, args, flag, field):
    code, err = run("--prompt", "fox", "--model", "tiny", *args)
    assert code == 2 and flag in err and "data" not in os.listdir(".")
    if field:
        assert field not in err


def test_a_bad_setting_given_as_a_flag_is_named_as_the_flag(run):
    code, err = run("--prompt", "fox", "--model", "tiny", "--crf", "99")
    assert code == 2 and err == "finalpipeline.py: error: --crf must be between 0 and 51, got 99"


def test_api_errors_keep_the_json_names(make_app):
    app, _ = make_app(worker=False)
    client = app.test_client()
    for body, field in (({"num_inference_steps": 0}, "num_inference_steps"), ({"num_frames": 10}, "num_frames"),
                        ({"guidance_scale": 0.5}, "guidance_scale")):
        r = client.post("/generate_video", json={"prompt": "fox", **body})
        assert r.status_code == 400 and field in r.json["error"]["message"]
        assert "--" not in r.json["error"]["message"]


# ---------------------------------------------------------------------------------------- model folders

def test_a_missing_model_folder_is_called_missing(run):
    code, err = run("--prompt", "fox", "--model", "models/nowhere", "--upscaler", "none")
    assert code == 2 and "model folder models/nowhere is missing" in err and "python download.py" in err


def test_a_folder_that_is_not_a_diffusers_folder_is_called_that(run, tmp_path):
    (tmp_path / "my-checkpoints").mkdir()
    (tmp_path / "my-checkpoints" / "model.safetensors").write_bytes(b"x")
    code, err = run("--prompt", "fox", "--model", "my-checkpoints", "--upscaler", "none")
    assert code == 2
    assert "my-checkpoints is not a diffusers model folder (no model_index.json)" in err and "missing" not in err



def test_a_tiny_name_that_is_no_registry_id_is_refused_in_one_line(run):
    code, err = run("--prompt", "fox", "--model", "tiny:nope", "--upscaler", "none")
    assert code == 2 and err.count("\n") == 0 and "tiny:nope: no such tiny build" in err
    assert "wan2.2-ti2v-5b" in err and "Traceback" not in err

# ---------------------------------------------------------------------------------------- presets

@pytest.mark.parametrize("max_side", [128, 256, 1280])  # 128: the old labels called 128x64 "16:9"
def test_preset_labels_match_their_aspect(make_app, max_side):
    app, _ = make_app(worker=False, max_side=max_side)
    sizes = app.test_client().get("/limits").json["sizes"]
    assert sizes
    for size in sizes:
        w, h = map(int, re.search(r"(\d+):(\d+)", size["label"]).groups())
        assert abs((size["width"] / size["height"]) / (w / h) - 1) <= 0.04, size
