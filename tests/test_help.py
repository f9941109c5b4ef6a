"""Every script answers --help and starts nothing: no port bound, no data folder, no model, no job claimed.
Its help names the environment variable behind each setting, shows each default once, and none on a
required flag."""

import os
import re
import socket
import subprocess
import sys

import pytest

from conftest import ROOT

# script -> environment variables its help must name
SCRIPTS = {
    "app.py": ("T2V_HOST", "T2V_PORT", "T2V_MODEL", "T2V_UPSCALER", "T2V_DATA_DIR", "T2V_WORKER"),
    "worker.py": ("T2V_MODEL", "T2V_UPSCALER", "T2V_MEMORY", "T2V_DATA_DIR", "CUDA_DEVICE_ID", "MONGODB_URI"),
    "download.py": ("T2V_MODELS_DIR",),
    "upscale.py": ("T2V_UPSCALER", "T2V_UPSCALE_TILE", "T2V_UPSCALE_BATCH", "T2V_CRF", "T2V_MODELS_DIR"),
    "test.py": ("T2V_MODEL", "T2V_MEMORY", "T2V_CRF", "T2V_DATA_DIR", "T2V_OUTPUT_DIR"),
    "finalpipeline.py": ("T2V_MODEL", "T2V_MEMORY", "T2V_UPSCALER", "T2V_UPSCALE_TILE", "T2V_DATA_DIR",
                         "T2V_MODELS_DIR", "T2V_OUTPUT_DIR"),
}
REQUIRED = {"upscale.py": {"--input", "--output"}, "test.py": {"--prompt"}, "finalpipeline.py": {"--prompt"}}


def option_entries(help_text: str) -> dict[str, str]:
    """Each option's help, joined across wrapped lines, by its first flag."""
    entries, current = {}, None
    for line in help_text.splitlines():
        if re.match(r"^  -", line):
            current = line.split()[0].rstrip(",")
            entries[current] = line
        elif current and line.startswith("    "):
            entries[current] += " " + line.strip()
        else:
            current = None
    return {flag: " ".join(text.split()) for flag, text in entries.items()}


def required_flags(help_text: str) -> set[str]:
    usage = help_text.split("\n\n")[0]
    return set(re.findall(r"(?<![\[|] )(?<!\[)(--[a-z0-9-]+)", usage)) - set(re.findall(r"\[(--[a-z0-9-]+)", usage))


@pytest.fixture(scope="module")
def taken_port():
    """A port this test holds: a script that tried to listen on it would fail, not print its help."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_exits_0_and_starts_nothing(script, tmp_path, taken_port):
    shared = tmp_path / "shared"  # where T2V_DATA_DIR points: it must not appear
    env = {k: v for k, v in os.environ.items() if not k.startswith("T2V_")}
    env.update(T2V_DATA_DIR=str(shared), T2V_MODELS_DIR=str(tmp_path / "models"), T2V_PORT=str(taken_port),
               T2V_OUTPUT_DIR=str(tmp_path / "outputs"), COLUMNS="120")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    done = subprocess.run([sys.executable, str(ROOT / script), "--help"], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: {script}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cwd"], "no data, models or outputs folder was made"
    assert list(cwd.iterdir()) == [], "nothing was written where it ran"

    text = done.stdout
    for variable in SCRIPTS[script]:
        assert variable in text, f"{script} --help does not name {variable}"
    assert "None" not in text, "a default shown as None"
    entries = option_entries(text)
    assert len(entries) >= 4
    for flag, entry in entries.items():
        assert entry.count("default") <= 1, f"{script} {flag}: a default shown twice: {entry}"
    assert required_flags(text) == REQUIRED.get(script, set())
    for flag in REQUIRED.get(script, ()):
        assert "default" not in entries[flag], f"{script} {flag} is required, yet shows a default"


def test_the_settings_flags_name_their_variable_and_its_default_once(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("T2V_")}
    done = subprocess.run([sys.executable, str(ROOT / "finalpipeline.py"), "--help"], cwd=tmp_path,
                          env={**env, "COLUMNS": "200"}, capture_output=True, text=True, timeout=300)
    entries = option_entries(done.stdout)
    assert entries["--model"].endswith("($T2V_MODEL; default: ./models/HunyuanVideo)")
    assert entries["--memory"].endswith("($T2V_MEMORY; default: auto)")
    assert entries["--upscaler"].endswith("($T2V_UPSCALER; default: ./models/RealESRGAN_x4plus.pth)")
    assert entries["--steps"].endswith("30 for HunyuanVideo, 4 for a tiny build)")
    assert entries["--width"].endswith("960 for HunyuanVideo, 64 for a tiny build)")
    assert entries["--output"].endswith("(default: ./outputs/t2v_<seed>.mp4, in $T2V_OUTPUT_DIR)")
    assert entries["--prompt"] == "--prompt PROMPT what the video shows (1-2000 characters)"
