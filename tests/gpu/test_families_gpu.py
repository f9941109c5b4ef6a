"""Every registry family on a real GPU: each tiny build under every memory preset (group offload leaving the VAE
out, with record_stream), the decoding stage, and one full-size family checked against the memory plan.

Run on a CUDA machine: `python -m pytest tests/gpu -q`. Elsewhere every test here is skipped.
"""

import sys
from pathlib import Path

import pytest
import torch
from diffusers.hooks import HookRegistry
from PIL import Image

from pipeline import memory, models
from pipeline.generate import VideoGenerator
from pipeline.spec import JobParams

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

ROOT = Path(__file__).resolve().parents[2]
SIZES = {"hunyuanvideo-1.5": (48, 32), "wan2.2-ti2v-5b": (64, 32)}  # multiples of each family's size rule
PRESETS = ("none", "model", "group", "sequential")


def params(model_id, **kw):
    width, height = next((s for prefix, s in SIZES.items() if model_id.startswith(prefix)), (64, 32))
    return JobParams.from_dict({"prompt": "a red fox", "width": width, "height": height, "num_frames": 5,
                                "num_inference_steps": 2, "seed": 1, "model": model_id, **kw})


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("gpu-families")
    for entry in models.ENTRIES:
        models.tiny_model_dir(data_dir, entry.id)
    return data_dir


def group_hooks(model):
    found = []
    for module in model.modules():
        registry = getattr(module, "_diffusers_hook", None)
        if isinstance(registry, HookRegistry) and registry.get_hook("group_offloading") is not None:
            found.append(registry.get_hook("group_offloading"))
    return found


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("model_id", list(models.MODELS))
def test_every_family_runs_under_every_preset(cuda, folders, model_id, preset):
    gen = VideoGenerator(f"tiny:{model_id}", folders, device=str(cuda), memory=preset)
    job = params(model_id)
    image = Image.new("RGB", (job.width * 2, job.height), (200, 120, 40)) if gen.entry.inputs == "image" else None
    decoded = []
    frames = gen.generate(job, image=image, on_decode=lambda i, n: decoded.append((i, n)))
    width, height = gen.output_size(job, image)
    assert frames.shape == (5, height, width, 3) and frames.std() > 1
    assert decoded[0][0] == 0 and decoded[-1][0] == decoded[-1][1]
    if preset == "group":
        assert group_hooks(gen.pipe.vae) == []  # left out: placed whole on the GPU
        hooks = [h for t in gen.transformers for h in group_hooks(t)]
        assert hooks and all(h.group.record_stream and h.group.stream is not None for h in hooks)
        assert next(gen.pipe.vae.parameters()).device.type == "cuda"


def test_auto_plans_for_this_card():
    total = torch.cuda.get_device_properties(0).total_memory
    for entry in models.ENTRIES:
        preset = entry.default_preset
        chosen = memory.choose_preset(entry.memory, preset.width, preset.height, entry.default_frames, total)
        assert chosen in memory.PRESETS, f"{entry.id}: its default job fits no preset on this card"


def test_the_plan_does_not_underestimate_a_full_size_family(cuda):
    """Wan 2.2 TI2V-5B at full size (random weights), model offload: the plan may be generous, but an estimate
    well under the measured peak is what lets a job run out of memory."""
    sys.path.insert(0, str(ROOT / "bench"))
    import gpu_families

    row = gpu_families.run_one("wan2.2-ti2v-5b", "model", str(cuda))
    width, height, frames = gpu_families.job_shape("wan2.2-ti2v-5b")
    plan = memory.estimate(models.MODELS["wan2.2-ti2v-5b"].memory, "model", width, height, frames)
    assert row["peak_gb"] * 1e9 <= plan.peak * 1.25, (row, plan)


@pytest.mark.parametrize("preset", PRESETS)
def test_the_ltx2_prompt_enhancer_runs_under_every_preset_but_sequential(cuda, folders, preset):
    """diffusers' enhance_prompt moves the whole encoder to the GPU (`.to(device)`): with model or group offload it
    must still write a suggestion, and the job after it still run; under sequential offload it is refused."""
    from pipeline.families import EnhancerUnavailable

    gen = VideoGenerator("tiny:ltx-2.3", folders, device=str(cuda), memory=preset)
    if preset == "sequential":
        with pytest.raises(EnhancerUnavailable):
            gen.enhance_prompt("a red fox", 5)
        return
    assert gen.enhance_prompt("a red fox", 5).strip()
    frames = gen.generate(params("ltx-2.3", width=64, height=64, num_frames=9))
    assert frames.shape == (9, 64, 64, 3)
