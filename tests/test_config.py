from pathlib import Path

import pytest
from packaging.version import Version

from config import ConfigError, Settings


def test_defaults_without_environment():
    s = Settings.from_env(env={})
    assert s.host == "127.0.0.1" and s.port == 7866
    assert s.model == "./models/HunyuanVideo" and s.memory == "auto" and s.worker == "thread"
    assert s.data_dir == Path("./data") and s.crf == 18 and s.api_keys == ()


def test_environment_names_are_the_contract():
    s = Settings.from_env(env={
        "T2V_MODEL": "tiny", "T2V_UPSCALER": "none", "T2V_MEMORY": "group", "CUDA_DEVICE_ID": "1",
        "T2V_PORT": "9000", "T2V_FP8": "yes", "T2V_FBC_THRESHOLD": "0.05", "T2V_API_KEYS": "k1, k2,",
        "AWS_ACCESS_KEY": "AKIA", "AWS_SECRET_KEY": "s3cr3t", "REGION_NAME": "eu-west-1",
        "BUCKET_NAME": "videos", "MONGODB_URI": "mongodb://user:pw@db/t2v", "T2V_DATA_DIR": "/tmp/d",
    })
    assert (s.model, s.upscaler, s.memory, s.cuda_device_id, s.port) == ("tiny", "none", "group", 1, 9000)
    assert s.fp8 is True and s.fbc_threshold == 0.05 and s.api_keys == ("k1", "k2")
    assert (s.bucket_name, s.region_name, s.data_dir) == ("videos", "eu-west-1", Path("/tmp/d"))
    shown = repr(s)
    for secret in ("s3cr3t", "AKIA", "pw@db", "k1"):
        assert secret not in shown


def test_dotenv_file_is_read_and_environment_wins(tmp_path, monkeypatch):
    env_file = tmp_path / ".env"
    env_file.write_text("T2V_PORT=8123\nT2V_CRF=20\n")
    monkeypatch.setenv("T2V_CRF", "23")
    s = Settings.from_env(dotenv_path=str(env_file))
    assert s.port == 8123 and s.crf == 23


@pytest.mark.parametrize("env, name", [
    ({"T2V_MEMORY": "huge"}, "T2V_MEMORY"),
    ({"T2V_PORT": "eighty"}, "T2V_PORT"),
    ({"T2V_FP8": "maybe"}, "T2V_FP8"),
    ({"T2V_CRF": "60"}, "T2V_CRF"),
    ({"T2V_MAX_FRAMES": "130"}, "T2V_MAX_FRAMES"),
    ({"T2V_MAX_SIDE": "1000"}, "T2V_MAX_SIDE"),
    ({"T2V_UPSCALE_TILE": "8"}, "T2V_UPSCALE_TILE"),
])
def test_bad_values_name_the_variable(env, name):
    with pytest.raises(ConfigError, match=name):
        Settings.from_env(env=env)


def test_env_example_lists_every_variable():
    from config import ENV_NAMES

    text = (Path(__file__).resolve().parents[1] / ".env.example").read_text()
    missing = [name for name in ENV_NAMES.values() if name not in text]
    assert missing == []


def test_gpu_knobs_left_empty_are_unset_so_the_speed_preset_decides():
    s = Settings.from_env(env={"T2V_SPEED": "fast"})
    assert s.speed == "fast" and (s.fp8, s.vae_tiling, s.compile, s.cache, s.fbc_threshold) == (None,) * 5
    assert s.mask_free is True and s.keep_latents is False
    s = Settings.from_env(env={"T2V_VAE_TILING": "0", "T2V_COMPILE": "1", "T2V_CACHE": "magcache",
                               "T2V_MASK_FREE": "false", "T2V_KEEP_LATENTS": "yes", "T2V_FBC_THRESHOLD": "0"})
    assert (s.vae_tiling, s.compile, s.cache, s.mask_free, s.keep_latents, s.fbc_threshold) == (
        False, True, "magcache", False, True, 0.0)


@pytest.mark.parametrize("env, name", [
    ({"T2V_SPEED": "ludicrous"}, "T2V_SPEED"),
    ({"T2V_CACHE": "teacache"}, "T2V_CACHE"),
    ({"T2V_FBC_THRESHOLD": "-0.1"}, "T2V_FBC_THRESHOLD"),
    ({"T2V_MASK_FREE": "sometimes"}, "T2V_MASK_FREE"),
    ({"CUDA_DEVICE_ID": "-1"}, "CUDA_DEVICE_ID"),
])
def test_bad_gpu_values_name_the_variable(env, name):
    with pytest.raises(ConfigError, match=name):
        Settings.from_env(env=env)


# ------------------------------------------------------------------ attention backends (bug 3)

@pytest.mark.parametrize("backend", ["native", "_native_cudnn", "_native_efficient", "_native_math", "_native_flash"])
def test_pytorch_backends_need_no_extra_package(backend):
    assert Settings.from_env(env={"T2V_ATTENTION_BACKEND": backend}).attention_backend == backend


@pytest.mark.parametrize("backend, package", [
    ("flash", "flash-attn"), ("flash_varlen", "flash-attn"), ("sage", "sageattention"),
    ("sage_varlen", "sageattention"), ("_flash_3", "FA3"),
])
def test_a_backend_whose_package_is_missing_is_refused_at_start_up(backend, package):
    # Before: accepted here, and the first job failed inside diffusers.
    with pytest.raises(ConfigError) as err:
        Settings.from_env(env={"T2V_ATTENTION_BACKEND": backend})
    message = str(err.value)
    assert f"T2V_ATTENTION_BACKEND={backend} cannot load here" in message and package in message
    assert "requirements-gpu.txt" in message


def test_a_mask_free_backend_is_accepted_with_the_mask_kept_since_masks_are_per_model():
    # Before: refused for every model with T2V_MASK_FREE=0, Wan included (which never passes a mask); a model
    # that passes one now gets the nearest mask-capable backend at load (`pipeline.spec.attention_backend_for`).
    s = Settings.from_env(env={"T2V_ATTENTION_BACKEND": "_native_flash", "T2V_MASK_FREE": "0"})
    assert (s.attention_backend, s.mask_free) == ("_native_flash", False)
    with pytest.raises(ConfigError, match="T2V_ATTENTION_BACKEND=flash cannot load here"):  # not installed
        Settings.from_env(env={"T2V_ATTENTION_BACKEND": "flash", "T2V_MASK_FREE": "0"})


def test_hub_and_unknown_backends_are_refused_with_what_to_do():
    with pytest.raises(ConfigError, match="T2V_ATTENTION_BACKEND=flash_hub fetches its kernel from the .* Hub"):
        Settings.from_env(env={"T2V_ATTENTION_BACKEND": "flash_hub"})
    with pytest.raises(ConfigError, match="T2V_ATTENTION_BACKEND must be one of native, .*sage_varlen.*'fast'"):
        Settings.from_env(env={"T2V_ATTENTION_BACKEND": "fast"})


def test_requirements_gpu_pins_the_optional_attention_packages():
    text = (Path(__file__).resolve().parents[1] / "requirements-gpu.txt").read_text()
    lines = [line.split("#")[0].strip() for line in text.splitlines()]
    pins = dict(line.split("==") for line in lines if line)
    assert list(pins) == ["flash-attn"] and Version(pins["flash-attn"]) >= Version("2.6.3")  # diffusers' minimum
    assert "sageattention >= 2.1.1" in text  # not on PyPI: the file says where it comes from


# ------------------------------------------------------------------ the GPU index (bug 5)

@pytest.fixture
def gpus(monkeypatch):
    """Pretend this process sees `n` GPUs."""
    import torch

    def see(n):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)

    return see


def test_cuda_device_id_must_name_a_visible_gpu(gpus):
    gpus(1)
    assert Settings.from_env(env={"CUDA_DEVICE_ID": "0"}).device == "cuda:0"
    with pytest.raises(ConfigError, match=r"CUDA_DEVICE_ID=1, but this process sees 1 GPU \(indices 0 to 0"):
        Settings.from_env(env={"CUDA_DEVICE_ID": "1"})
    gpus(2)
    assert Settings.from_env(env={"CUDA_DEVICE_ID": "1"}).device == "cuda:1"
    gpus(0)
    assert Settings.from_env(env={"CUDA_DEVICE_ID": "3"}).device == "cpu"  # no GPU: the CPU, as before


def test_the_clis_exit_2_on_a_gpu_index_out_of_range(gpus, monkeypatch, capsys, tmp_path):
    from pipeline import cli

    gpus(1)
    monkeypatch.setenv("CUDA_DEVICE_ID", "1")
    monkeypatch.chdir(tmp_path)  # no .env here
    code = cli.main(["--prompt", "a fox", "--model", "tiny"], "test.py", "smoke run", upscale=False)
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "CUDA_DEVICE_ID=1" in err
    for prog in ("worker.py", "app.py"):
        with pytest.raises(SystemExit) as exit_:
            __import__("config").settings_or_exit(prog)
        assert exit_.value.code == 2 and "CUDA_DEVICE_ID=1" in capsys.readouterr().err


def test_an_unknown_tiny_build_is_refused_at_start_naming_the_ids(monkeypatch, capsys, tmp_path):
    from pipeline.models import MODELS

    monkeypatch.setenv("T2V_MODEL", "tiny:nope")
    monkeypatch.chdir(tmp_path)  # no .env here
    with pytest.raises(ConfigError, match="tiny:nope") as refused:
        Settings.from_env()
    assert all(model_id in str(refused.value) for model_id in MODELS)
    for prog in ("worker.py", "app.py"):
        with pytest.raises(SystemExit) as exit_:
            __import__("config").settings_or_exit(prog)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and err.count("\n") == 1 and "T2V_MODEL=tiny:nope" in err and "wan2.2-ti2v-5b" in err
    assert Settings.from_env(env={"T2V_MODEL": "tiny:wan2.2-ti2v-5b"}).model == "tiny:wan2.2-ti2v-5b"


@pytest.mark.parametrize("flag", ["--compile", "--fp8", "--vae-tiling"])
@pytest.mark.parametrize("which", ["cli", "worker"])
def test_bool_flags_read_their_value_as_the_variable_does_and_refuse_anything_else(flag, which, capsys):
    """`--compile 0` is off (it was on: any string was truthy), `--compile` alone on, `--compile maybe` exit 2."""
    from pipeline.cli import build_parser
    from worker import cli as worker

    parser = build_parser("test.py", "t", upscale=False) if which == "cli" else worker.build_parser()
    base = ["--prompt", "p"] if which == "cli" else []
    dest = flag[2:].replace("-", "_")
    for given, value in ((["0"], False), (["false"], False), (["OFF"], False), (["1"], True), (["yes"], True),
                         ([], True)):
        assert getattr(parser.parse_args([*base, flag, *given]), dest) is value, given
    assert getattr(parser.parse_args(base), dest) is None  # unset: the preset decides
    with pytest.raises(SystemExit) as refused:
        parser.parse_args([*base, flag, "maybe"])
    assert refused.value.code == 2
    assert f"argument {flag}: expected 1/true/yes/on or 0/false/no/off, got 'maybe'" in capsys.readouterr().err
    entry = " ".join(parser.format_help().split())
    assert f"{flag} [1|0]" in entry and "1/true/yes/on or 0/false/no/off" in entry
    if which == "worker":
        assert worker.settings_env({dest: False}) == {f"T2V_{dest.upper()}": "false"}


def test_a_bad_bool_variable_names_the_values_it_takes():
    with pytest.raises(ConfigError, match=r"T2V_COMPILE .*\(1/true/yes/on or 0/false/no/off\)"):
        Settings.from_env(env={"T2V_COMPILE": "maybe"})
    assert Settings.from_env(env={"T2V_COMPILE": " Off "}).compile is False


def test_t2v_webhook_keep_s_is_a_positive_number_of_seconds():
    assert Settings.from_env(env={}).webhook_keep_s == 7 * 86400.0
    assert Settings.from_env(env={"T2V_WEBHOOK_KEEP_S": "3600"}).webhook_keep_s == 3600.0
    for bad in ("0", "-1"):
        with pytest.raises(ConfigError, match="T2V_WEBHOOK_KEEP_S must be positive"):
            Settings.from_env(env={"T2V_WEBHOOK_KEEP_S": bad})
