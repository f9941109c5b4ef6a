"""bench/gpu_families.py (`bench/gpu.py --random-weights --parts families`) on the CPU: the plan it lists, its
full-size configs against the memory plan's parameter counts, and its very code on each family's tiny configs."""

import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from pipeline import memory, models

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import gpu_families  # noqa: E402

BILLION = 1e9


def test_list_prints_every_family_and_preset_with_the_plans_estimate():
    run = subprocess.run([sys.executable, "bench/gpu.py", "--list"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    rows = [line.split(" | ") for line in run.stdout.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert {(r[0][2:], r[1]) for r in rows} == {(m, p) for m in gpu_families.FAMILIES for p in memory.PRESETS}
    for model_id, preset, shape, plan, *_ in ((r[0][2:], *r[1:]) for r in rows):
        width, height, frames = map(int, shape.split("x"))
        expected = memory.estimate(models.MODELS[model_id].memory, preset, width, height, frames)
        assert plan == f"{round(expected.peak / 1e9, 1)} ({expected.phase})"
    assert set(gpu_families.FAMILIES) >= {"hunyuanvideo", "hunyuanvideo-i2v", "hunyuanvideo-1.5-480p",
                                          "wan2.2-ti2v-5b", "wan2.2-t2v-a14b"}


def test_families_runs_alone():
    run = subprocess.run([sys.executable, "bench/gpu.py", "--random-weights", "--parts", "families", "vae"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "--parts families runs alone" in run.stderr


@pytest.fixture(scope="module")
def tiny_pipes():
    folder = Path(tempfile.mkdtemp())
    return {model_id: gpu_families.tiny_pipeline(model_id, folder)[0] for model_id in gpu_families.FAMILIES}


@pytest.mark.parametrize("model_id", list(gpu_families.FAMILIES))
def test_the_full_size_configs_have_the_parameters_the_plan_counts(tiny_pipes, model_id):
    counts = {name: sum(p.numel() for p in gpu_families.full_size(getattr(tiny_pipes[model_id], name),
                                                                  overrides).parameters())
              for name, overrides in gpu_families.FAMILIES[model_id].items()}  # on the meta device: no memory
    plan = models.MODELS[model_id].memory
    assert counts["transformer"] == pytest.approx(plan.transformer_params, rel=0.01)
    assert counts.get("transformer_2", 0) == (counts["transformer"] if plan.denoisers == 2 else 0)
    assert counts["vae"] == pytest.approx(plan.vae_params, rel=0.02)
    text = counts["text_encoder"] + counts.get("text_encoder_2", 0)  # image towers stay tiny here
    assert plan.text_params * 0.9 < text <= plan.text_params * 1.01


@pytest.mark.parametrize("model_id", list(gpu_families.FAMILIES))
def test_its_code_runs_each_family_on_the_cpu_at_tiny_size(model_id):
    row = gpu_families.run_one(model_id, "none", "cpu", smoke=True)
    assert row["frames_out"][1:2] == [5] and row["frames_out"][-2:] == [64, 64] and row["peak_gb"] is None
