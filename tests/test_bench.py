"""bench/gpu.py cannot be measured here, but its code path runs: a smoke run on the CPU with tiny models."""

import os
import subprocess
import sys

from conftest import ROOT


def test_gpu_benchmark_smoke_runs_on_the_cpu(data_dir, tiny_model, tiny_upscalers):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "T2V_DATA_DIR": str(data_dir)}
    argv = [sys.executable, str(ROOT / "bench" / "gpu.py"), "--model", "tiny", "--upscaler", "tiny",
            "--sizes", "64x64", "--frames", "9", "--steps", "3", "--presets", "none", "group"]
    refused = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "no CUDA GPU here" in refused.stderr

    done = subprocess.run(argv + ["--allow-cpu"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line.split("|")[1:-1] for line in done.stdout.splitlines() if line.startswith("| none") or
            line.startswith("| group")]
    assert [r[0].strip() for r in rows] == ["none (none)", "group (none)"]  # on the CPU every preset is "none"
    for row in rows:
        size, frames, steps, step_s = (c.strip() for c in row[1:5])
        assert (size, frames, steps) == ("64x64", "9", "3") and float(step_s) > 0
