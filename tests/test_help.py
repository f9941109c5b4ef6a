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


def help_entries(script: str, tmp_path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("T2V_")}
    done = subprocess.run([sys.executable, str(ROOT / script), "--help"], cwd=tmp_path, env={**env, "COLUMNS": "200"},
                          capture_output=True, text=True, timeout=300)
    return option_entries(done.stdout)


def test_model_and_upscaler_say_the_same_in_every_script_and_defaults_that_vary_say_so(tmp_path):
    from pipeline.cli import MODEL_HELP, UPSCALER_HELP

    scripts = {script: help_entries(script, tmp_path) for script in ("finalpipeline.py", "app.py", "worker.py")}
    for entries in scripts.values():
        assert entries["--model"].startswith(f"--model MODEL {MODEL_HELP} ($T2V_MODEL; default: ")
        assert entries["--upscaler"].startswith(f"--upscaler UPSCALER {UPSCALER_HELP} ($T2V_UPSCALER; default: ")
    cli = scripts["finalpipeline.py"]
    assert "the model's own; 24 for HunyuanVideo" in cli["--fps"] and "16 for the other Wan models" in cli["--fps"]
    assert "the model's own; 6.0 for HunyuanVideo" in cli["--guidance"]
    for flag in ("--fp8", "--vae-tiling", "--compile"):
        assert cli[flag].startswith(f"{flag} [1|0] ") and "1/true/yes/on or 0/false/no/off" in cli[flag]


def test_an_output_that_cannot_be_created_exits_2_before_any_model_loads(tmp_path):
    """/proc passes a permission check as root; only creating the file tells. Nothing is left behind."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("T2V_")}
    env.update(T2V_MODEL="tiny", T2V_DATA_DIR=str(tmp_path / "data"))
    for output in ("/proc/nope/x.mp4", "/proc/x.mp4"):
        done = subprocess.run([sys.executable, str(ROOT / "test.py"), "--prompt", "p", "--output", output],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
        assert done.stderr.startswith(f"test.py: error: cannot write {output}: ") and "Traceback" not in done.stderr
    assert not (tmp_path / "data").exists(), "no model was built"
    from pipeline.cli import check_writable

    check_writable(tmp_path / "new" / "deeper" / "x.mp4")  # folders still to be made are fine, and not made
    existing = tmp_path / "keep.mp4"
    existing.write_bytes(b"old")
    check_writable(existing)
    check_writable(tmp_path / "fresh.mp4")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.mp4"] and existing.read_bytes() == b"old"


@pytest.mark.parametrize("size, shown", [(0, "0 B"), (999, "999 B"), (4800, "4.8 kB"), (12_345_678, "12.3 MB"),
                                         (1_200_000_000, "1.2 GB")])
def test_sizes_are_shown_as_people_read_them(size, shown):
    from pipeline.cli import human_size

    assert human_size(size) == shown
