"""bench/gpu.py cannot be measured here, but its code paths run: the random-weight matrix on tiny configs,
the whole-job mode with the tiny models, and the device handling, on the CPU."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "bench" / "gpu.py")
gpu = sys.modules["bench_gpu"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu)


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from threads, and on a busy machine spinning threads make them 20x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_random_weight_smoke_times_every_part_on_the_cpu(tmp_path, capsys, one_thread):
    out = tmp_path / "rows.json"
    assert gpu.main(["--random-weights", "--smoke", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    m = gpu.SMOKE
    assert [(r["part"], r["variant"].split(",")[0], r["backend"]) for r in rows] == [
        ("transformer", "masked", "native"), ("transformer", "mask-free", "native"),
        ("vae decode", "tiled", ""), ("vae decode", "untiled", ""),
        *[("upscale 4x", net, "") for net in ("x4plus", "compact") for _ in m.batches],
        ("ltx2 transformer", "8 video + 9 audio tokens", "native"),
    ]
    assert [r["variant"].rsplit(" ", 1)[1] for r in rows[4:-1]] == [str(b) for b in m.batches] * 2
    for r in rows:
        assert r["seconds"] > 0 and r["peak_gib"] is None and not r.get("note"), r
    table = capsys.readouterr().out
    assert "| transformer | 32x48x9 | mask-free, 4 text tokens | native |" in table


def test_mask_free_rows_pass_no_mask_to_attention(monkeypatch):
    from diffusers import HunyuanVideoTransformer3DModel
    from diffusers.models.transformers import transformer_hunyuan_video as hv

    transformer = gpu.build_random(HunyuanVideoTransformer3DModel, gpu.TINY_TRANSFORMER, torch.device("cpu"),
                                   torch.float32)
    switch = gpu.mask_switch(transformer)
    masks = []
    dispatch = hv.dispatch_attention_fn

    def recording(*args, attn_mask=None, **kwargs):
        masks.append(attn_mask)
        return dispatch(*args, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(hv, "dispatch_attention_fn", recording)
    text = torch.randn(1, 4, 16)
    inputs = dict(hidden_states=torch.randn(1, 4, 3, 4, 6), timestep=torch.tensor([999.0]),
                  encoder_hidden_states=text, encoder_attention_mask=torch.ones(1, 4, dtype=torch.bool),
                  pooled_projections=torch.randn(1, 8), guidance=torch.tensor([6000.0]), return_dict=False)
    with torch.inference_mode():
        masked = transformer(**inputs)[0]
        assert len(masks) == 2 and all(m is not None for m in masks)  # one dual, one single block
        masks.clear()
        switch.drop_mask = True
        mask_free = transformer(**inputs)[0]
    assert len(masks) == 2 and all(m is None for m in masks)
    assert torch.allclose(masked, mask_free, atol=1e-5)  # every token real: the mask changed nothing


def test_every_timing_and_memory_read_names_the_configured_device(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)  # the current device: set_device made it ours
    for name in ("synchronize", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, lambda device=None, name=name: calls.append((name, device)))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated",
                        lambda device=None: calls.append(("max_memory_allocated", device)) or 3 * gpu.GiB)
    device = torch.device("cuda", 1)
    row = gpu.run_row({}, lambda: {"seconds": gpu.timed(lambda: None, device)}, device, gpu.Budget(1))
    assert row["peak_gib"] == 3.0 and row["seconds"] >= 0
    assert [n for n, _ in calls] == ["reset_peak_memory_stats", "synchronize", "synchronize", "max_memory_allocated"]
    assert {d for _, d in calls} == {device}  # never the current device or GPU 0 by default


def test_cuda_device_id_past_the_last_gpu_is_refused_in_one_line(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("CUDA_DEVICE_ID", "1")
    assert gpu.main(["--random-weights"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gpu.py: error: CUDA_DEVICE_ID=1, but this process sees 1 GPU") and err.count("\n") == 1


def test_a_row_that_runs_out_of_memory_or_fails_says_so_and_the_run_goes_on():
    cpu = torch.device("cpu")

    def out_of_memory():
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    def unusable():
        raise RuntimeError("cuDNN attention | not\nsupported")

    assert gpu.run_row({}, out_of_memory, cpu, gpu.Budget(1))["note"] == "out of memory"
    assert gpu.run_row({}, unusable, cpu, gpu.Budget(1))["note"] == \
        "failed: RuntimeError: cuDNN attention / not supported"
    skipped = gpu.run_row({"part": "vae decode"}, lambda: pytest.fail("ran past the budget"), cpu, gpu.Budget(-1))
    assert skipped == {"part": "vae decode", "peak_gib": None, "note": "skipped: --budget-min spent"}


def test_whole_job_mode_runs_on_the_cpu_with_the_tiny_models(data_dir, tiny_model, tiny_upscalers, capsys):
    assert gpu.main(["--model", "tiny", "--upscaler", "tiny"]) == 2
    assert "no CUDA GPU here" in capsys.readouterr().err

    env = {**os.environ, "PYTHONPATH": str(ROOT), "T2V_DATA_DIR": str(data_dir)}
    argv = [sys.executable, str(ROOT / "bench" / "gpu.py"), "--model", "tiny", "--upscaler", "tiny", "--allow-cpu",
            "--sizes", "32x32", "--frames", "5", "--steps", "3", "--presets", "group"]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line.split("|")[1:-1] for line in done.stdout.splitlines() if line.startswith("| group")]
    assert len(rows) == 1
    preset, size, frames, steps, step_s = (c.strip() for c in rows[0][:5])
    assert (preset, size, frames, steps) == ("group (none)", "32x32", "5", "3")  # on the CPU every preset is none
    assert float(step_s) > 0
