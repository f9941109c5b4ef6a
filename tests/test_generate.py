"""The generator on the tiny HunyuanVideo: determinism, progress, cancel, and each GPU option applied for real."""

import numpy as np
import pytest
import torch
from diffusers.hooks import HookRegistry

from pipeline import generate
from pipeline.generate import (JobCanceled, MissingWeightsError, SpeedOptions, VideoGenerator, apply_memory_preset,
                               choose_memory_preset, component_dtypes)
from pipeline.spec import JobParams

GiB = 1024**3


def params(**kw):
    base = dict(prompt="a red fox", width=64, height=64, num_frames=9, num_inference_steps=3, seed=1)
    return JobParams.from_dict({**base, **kw})


@pytest.fixture(scope="module")
def generator(data_dir, tiny_model):
    return VideoGenerator("tiny", data_dir)


def test_frames_are_uint8_arrays_of_the_requested_shape(generator):
    frames = generator.generate(params())
    assert isinstance(frames, np.ndarray) and frames.dtype == np.uint8
    assert frames.shape == (9, 64, 64, 3)
    assert frames.std() > 1  # not a constant picture


def test_same_seed_same_frames_other_seed_other_frames(generator):
    a = generator.generate(params(seed=5))
    b = generator.generate(params(seed=5))
    c = generator.generate(params(seed=6))
    assert np.array_equal(a, b)
    assert np.abs(a.astype(int) - c.astype(int)).mean() > 1


def test_progress_is_reported_after_every_step(generator):
    seen = []
    generator.generate(params(num_inference_steps=4), on_step=lambda i, n: seen.append((i, n)))
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]


def test_cancel_stops_before_the_next_step_and_nothing_is_decoded(generator, monkeypatch):
    decoded = []
    real_decode = generator.pipe.vae.decode
    monkeypatch.setattr(generator.pipe.vae, "decode", lambda *a, **k: decoded.append(1) or real_decode(*a, **k))
    steps = []
    with pytest.raises(JobCanceled):
        generator.generate(params(num_inference_steps=5), on_step=lambda i, n: steps.append(i),
                           should_cancel=lambda: len(steps) >= 2)
    assert steps == [1, 2] and decoded == []
    generator.generate(params(num_inference_steps=1))
    assert decoded == [1]  # the spy works: a normal run decodes once


def test_cancel_before_start_runs_nothing(generator):
    steps = []
    with pytest.raises(JobCanceled):
        generator.generate(params(), on_step=lambda i, n: steps.append(i), should_cancel=lambda: True)
    assert steps == []


def test_cpu_runs_float32_and_gpu_dtypes_follow_the_policy(generator):
    assert component_dtypes("cpu") == {"default": torch.float32}
    assert component_dtypes("cuda:0") == {"transformer": torch.bfloat16, "default": torch.float16}
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        assert getattr(generator.pipe, name).dtype == torch.float32


@pytest.mark.parametrize("requested, free, expected", [
    ("auto", 80 * GiB, "none"),
    ("auto", 60 * GiB, "model"),
    ("auto", 24 * GiB, "group"),
    ("auto", 8 * GiB, "sequential"),
    ("model", 80 * GiB, "model"),
    ("none", 8 * GiB, "none"),
])
def test_memory_preset_decision_on_a_gpu(requested, free, expected):
    assert choose_memory_preset(requested, "cuda:0", free) == expected


@pytest.mark.parametrize("requested", ["auto", "none", "model", "group", "sequential"])
def test_memory_preset_on_the_cpu_keeps_everything_in_ram(requested):
    assert choose_memory_preset(requested, "cpu", None) == "none"


@pytest.mark.parametrize("preset, method, kwargs", [
    ("model", "enable_model_cpu_offload", {"device": "cuda:1"}),
    ("sequential", "enable_sequential_cpu_offload", {"device": "cuda:1"}),
    ("group", "enable_group_offload", {"onload_device": torch.device("cuda:1"), "offload_device": torch.device("cpu"),
                                       "offload_type": "leaf_level", "use_stream": True}),
    ("none", "to", None),
])
def test_each_preset_makes_its_diffusers_call(generator, monkeypatch, preset, method, kwargs):
    calls = []
    for name in ("enable_model_cpu_offload", "enable_sequential_cpu_offload", "enable_group_offload", "to"):
        monkeypatch.setattr(generator.pipe, name, lambda *a, _n=name, **k: calls.append((_n, a, k)))
    apply_memory_preset(generator.pipe, preset, "cuda:1")
    assert [c[0] for c in calls] == [method]
    if kwargs is not None:
        assert calls[0][2] == kwargs
    else:
        assert calls[0][1] == ("cuda:1",)


def test_gpu_options_are_applied_for_real(data_dir, tiny_model):
    options = SpeedOptions(fp8=True, vae_tiling=True, fbc_threshold=0.05, attention_backend="native")
    gen = VideoGenerator("tiny", data_dir, speed=options)
    transformer = gen.pipe.transformer
    # fp8 layerwise casting: weights stored as float8, with a casting hook on the layers.
    # (diffusers keeps embeddings and norms, its skip patterns, in the compute dtype.)
    to_q = transformer.transformer_blocks[0].attn.to_q
    assert to_q.weight.dtype == torch.float8_e4m3fn
    assert HookRegistry.check_if_exists_or_initialize(to_q).get_hook("layerwise_casting") is not None
    linears = [m for m in transformer.modules() if isinstance(m, torch.nn.Linear)]
    assert sum(m.weight.dtype == torch.float8_e4m3fn for m in linears) > len(linears) // 2
    # First Block Cache: the leader-block hook is installed on the first transformer block.
    block = transformer.transformer_blocks[0]
    assert HookRegistry.check_if_exists_or_initialize(block).get_hook("fbc_leader_block_hook") is not None
    assert gen.pipe.vae.use_tiling is True
    processors = [m.processor for m in transformer.modules() if hasattr(m, "processor")]
    assert processors and all(p._attention_backend.value == "native" for p in processors
                              if hasattr(p, "_attention_backend"))
    frames = gen.generate(params(num_inference_steps=2))  # and it still runs with all of them
    assert frames.shape == (9, 64, 64, 3)


def test_regional_compile_marks_the_repeated_blocks(data_dir, tiny_model):
    gen = VideoGenerator("tiny", data_dir, speed=SpeedOptions(compile=True))
    blocks = [m for m in gen.pipe.transformer.modules()
              if type(m).__name__ in gen.pipe.transformer._repeated_blocks]
    assert blocks and all(b._compiled_call_impl is not None for b in blocks)


def test_missing_model_folder_names_it_and_says_what_to_run(tmp_path):
    with pytest.raises(MissingWeightsError) as err:
        generate.resolve_model_dir(str(tmp_path / "HunyuanVideo"), tmp_path)
    assert "HunyuanVideo" in str(err.value) and "python download.py" in str(err.value)
