from pathlib import Path

import pytest

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
