"""Where the weights sit for each offload preset and what a failed decode leaves behind, on the tiny HunyuanVideo (CPU).

`group` offload leaves the VAE out and, on CUDA, copies on a side stream with `record_stream`; a decode that
runs out of memory frees the failed attempt before emptying the cache, and puts the VAE's tiles back after.
"""

import gc
import weakref

import pytest
import torch
from diffusers.hooks import HookRegistry

from pipeline.generate import VideoGenerator, apply_memory_preset, group_offload_options
from pipeline.spec import JobParams

GROUP_HOOK = "group_offloading"  # diffusers.hooks.group_offloading._GROUP_OFFLOADING


def params(**kw):
    return JobParams.from_dict({"prompt": "a red fox", "width": 64, "height": 64, "num_frames": 9,
                                "num_inference_steps": 2, "seed": 1, **kw})


@pytest.fixture
def fresh(data_dir, tiny_model):
    return VideoGenerator("tiny", data_dir)


def group_hooks(model: torch.nn.Module) -> list:
    hooks = []
    for module in model.modules():
        registry = getattr(module, "_diffusers_hook", None)
        if isinstance(registry, HookRegistry) and registry.get_hook(GROUP_HOOK) is not None:
            hooks.append(registry.get_hook(GROUP_HOOK))
    return hooks


def test_group_offload_leaves_the_vae_out_and_the_job_still_runs(fresh):
    apply_memory_preset(fresh.pipe, "group", "cpu")  # onload to the CPU: the hooks are real, no streams
    assert group_hooks(fresh.pipe.transformer) and group_hooks(fresh.pipe.text_encoder)
    assert group_hooks(fresh.pipe.vae) == []
    frames = fresh.generate(params())
    assert frames.shape == (9, 64, 64, 3) and frames.std() > 1


def test_model_offload_hooks_every_component_and_the_job_still_runs(fresh):
    from accelerate.hooks import CpuOffload

    apply_memory_preset(fresh.pipe, "model", "cpu")
    for name in ("transformer", "text_encoder", "text_encoder_2", "vae"):
        assert isinstance(getattr(fresh.pipe, name)._hf_hook, CpuOffload), name
    frames = fresh.generate(params())
    assert frames.shape == (9, 64, 64, 3) and frames.std() > 1


def test_sequential_offload_streams_every_weight_from_the_cpu(fresh):
    """Only the hooks are checked here, not a forward: diffusers hands accelerate `cpu:0`, and on the CPU torch's
    `Parameter.to(torch.device("cpu:0"))` returns a plain tensor, which accelerate's post-forward cannot wrap again
    (a CUDA onload is already on `cuda:N`, so the GPU path is not affected; t2v never offloads on the CPU)."""
    from accelerate.hooks import AlignDevicesHook

    apply_memory_preset(fresh.pipe, "sequential", "cpu")
    for name in ("transformer", "text_encoder", "vae"):
        streaming = [m._hf_hook for m in getattr(fresh.pipe, name).modules()
                     if isinstance(getattr(m, "_hf_hook", None), AlignDevicesHook) and m._hf_hook.offload]
        assert streaming and {h.execution_device for h in streaming} == {torch.device("cpu:0")}, name
        weights = list(getattr(fresh.pipe, name).parameters())
        assert weights and all(w.device.type == "meta" for w in weights), name  # streamed in per module


def test_group_offload_on_cuda_streams_with_record_stream(fresh):
    options = group_offload_options(fresh.pipe, "cuda:1")
    assert options["use_stream"] is True and options["record_stream"] is True  # record_stream needs use_stream
    assert options["exclude_modules"] == ["vae"] and options["onload_device"] == torch.device("cuda:1")
    assert group_offload_options(fresh.pipe, "cpu")["record_stream"] is False


def test_an_out_of_memory_decode_frees_the_failed_attempt_before_emptying_the_cache(fresh, monkeypatch):
    real = fresh.pipe.vae.decode
    held, alive_at_empty = [], []

    def decode(*args, **kwargs):
        if not held:
            activations = torch.ones(1024, 1024)  # what a real decode holds when it runs out of memory
            held.append(weakref.ref(activations))
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real(*args, **kwargs)

    def empty_cache():
        gc.collect()  # only a reference still held (the traceback's frames) can keep it alive now
        alive_at_empty.append(held[0]() is not None)

    monkeypatch.setattr(fresh.pipe.vae, "decode", decode)
    monkeypatch.setattr(torch.cuda, "empty_cache", empty_cache)
    assert fresh.generate(params()).shape == (9, 64, 64, 3)
    assert alive_at_empty == [False]


def test_smaller_tiles_after_an_out_of_memory_decode_are_for_that_job_only(fresh, monkeypatch):
    vae = fresh.pipe.vae
    vae.enable_tiling(tile_sample_min_height=256, tile_sample_min_width=256)
    before = {k: v for k, v in vars(vae).items() if k == "use_tiling" or k.startswith("tile_")}
    real, failures = vae.decode, [2]

    def decode(*args, **kwargs):
        if failures[0]:
            failures[0] -= 1
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real(*args, **kwargs)

    monkeypatch.setattr(vae, "decode", decode)
    seen = []
    monkeypatch.setattr(vae, "enable_tiling", lambda **kw: (seen.append(kw["tile_sample_min_height"]),
                                                             type(vae).enable_tiling(vae, **kw)))
    fresh.generate(params())
    assert seen == [128, 64]  # the job went down to 64-pixel tiles
    after = {k: v for k, v in vars(vae).items() if k == "use_tiling" or k.startswith("tile_")}
    assert after == before and vae.tile_sample_min_height == 256
