"""The generator on the tiny HunyuanVideo: determinism, progress, cancel, and each GPU option applied for real."""

import numpy as np
import pytest
import torch
from diffusers.hooks import HookRegistry

from pipeline import families, generate, models, speed
from pipeline.generate import (JobCanceled, MissingWeightsError, VideoGenerator, apply_memory_preset,
                               choose_memory_preset, component_dtypes)
from pipeline.spec import JobParams
from pipeline.speed import SpeedOptions

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
    # HunyuanVideo's default job, 960x544 and 129 frames (pipeline.memory plans it; tests/test_memory_plan.py)
    assert choose_memory_preset(requested, "cuda:0", free, models.MODELS["hunyuanvideo"], (960, 544, 129)) == expected


@pytest.mark.parametrize("requested", ["auto", "none", "model", "group", "sequential"])
def test_memory_preset_on_the_cpu_keeps_everything_in_ram(requested):
    assert choose_memory_preset(requested, "cpu", None, models.MODELS["hunyuanvideo"], (960, 544, 129)) == "none"


@pytest.mark.parametrize("preset, method, kwargs", [
    ("model", "enable_model_cpu_offload", {"device": "cuda:1"}),
    ("sequential", "enable_sequential_cpu_offload", {"device": "cuda:1"}),
    ("group", "enable_group_offload", {"onload_device": torch.device("cuda:1"), "offload_device": torch.device("cpu"),
                                       "offload_type": "leaf_level", "use_stream": True, "record_stream": True,
                                       "exclude_modules": ["vae"]}),
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


# ------------------------------------------------------------------ clean-up after an exception (bug 1)

def test_a_cancel_leaves_no_cache_state_behind_for_a_job_at_another_size(data_dir, tiny_model):
    # Before: First Block Cache kept the canceled 32x32 job's residuals, and every later 48x64 job failed
    # with "The size of tensor a (96) must match the size of tensor b (32)".
    gen = VideoGenerator("tiny", data_dir, speed=SpeedOptions(fbc_threshold=0.05))
    steps = []
    with pytest.raises(JobCanceled):
        gen.generate(params(width=32, height=32), on_step=lambda i, n: steps.append(i),
                     should_cancel=lambda: len(steps) >= 1)
    assert gen.generate(params(width=64, height=48)).shape == (9, 48, 64, 3)


def test_any_exception_from_the_pipeline_frees_the_model_hooks_first(generator, monkeypatch):
    freed = []
    monkeypatch.setattr(generator.pipe, "maybe_free_model_hooks", lambda: freed.append(1))
    monkeypatch.setattr(generator.pipe.scheduler, "step", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        generator.generate(params())
    assert freed == [1]


# ------------------------------------------------------------------ compile with hooks (bug 2)

@pytest.fixture
def eager_compile(monkeypatch):
    """torch.compile traced by Dynamo (graph breaks and fullgraph errors included), run eagerly."""
    import functools

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("options, fullgraph", [
    (SpeedOptions(compile=True), True),
    (SpeedOptions(compile=True, fbc_threshold=0.05), False),
], ids=["no-hooks", "first-block-cache"])
def test_compile_asks_for_a_full_graph_only_without_hooks_and_runs(data_dir, tiny_model, eager_compile, monkeypatch,
                                                                  options, fullgraph):
    # Before: fullgraph=True always, and the second case failed at its first step (Dynamo cannot trace
    # the compiler-disabled cache hook, nor fp8 casting's Parameter built inside the region).
    from diffusers import HunyuanVideoTransformer3DModel

    asked = []
    real = HunyuanVideoTransformer3DModel.compile_repeated_blocks
    monkeypatch.setattr(HunyuanVideoTransformer3DModel, "compile_repeated_blocks",
                        lambda self, **kw: asked.append(kw) or real(self, **kw))
    gen = VideoGenerator("tiny", data_dir, speed=options)
    assert asked == [{"fullgraph": fullgraph}]
    assert speed.has_hooks(gen.pipe.transformer) is not fullgraph
    assert gen.generate(params(num_inference_steps=2)).shape == (9, 64, 64, 3)


# ------------------------------------------------------------------ VAE tiling on CUDA (bug 4)

@pytest.mark.parametrize("memory", ["none", "model", "group", "sequential"])
def test_vae_tiling_is_on_with_every_memory_preset_on_cuda_unless_turned_off(memory):
    family = models.MODELS["hunyuanvideo"]
    assert speed.resolve_speed(SpeedOptions(), family, "cuda:0", memory).vae_tiling is True
    assert speed.resolve_speed(SpeedOptions(vae_tiling=False), family, "cuda:0", memory).vae_tiling is False
    assert speed.resolve_speed(SpeedOptions(), family, "cpu", "none").vae_tiling is False
    assert speed.resolve_speed(SpeedOptions(vae_tiling=True), family, "cpu", "none").vae_tiling is True


def test_a_generator_loaded_for_cuda_with_the_none_preset_tiles_its_vae(data_dir, tiny_model, monkeypatch):
    # Before: only the offload presets turned tiling on; `none` decoded 720p x 129 frames untiled (~34 GiB).
    monkeypatch.setattr(generate, "use_device", lambda device: None)  # no GPU here: load on the CPU,
    monkeypatch.setattr(generate, "component_dtypes", lambda device, entry=None: {"default": torch.float32})
    monkeypatch.setattr(generate, "free_vram_bytes", lambda device: 80 * GiB)
    placed = []
    monkeypatch.setattr(generate, "apply_memory_preset", lambda pipe, preset, device: placed.append((preset, device)))
    gen = VideoGenerator("tiny", data_dir, device="cuda:0")
    assert placed == [("none", "cuda:0")] and gen.memory_preset == "none"
    assert gen.pipe.vae.use_tiling is True
    off = VideoGenerator("tiny", data_dir, device="cuda:0", speed=SpeedOptions(vae_tiling=False))
    assert off.pipe.vae.use_tiling is False


# ------------------------------------------------------------------ the GPU index (bug 5)

def test_models_make_the_configured_gpu_current_at_start_up(data_dir, tiny_model, monkeypatch):
    from config import Settings
    from pipeline.run import Models

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    current = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: current.append(torch.device(device)))
    settings = Settings.from_env(env={"CUDA_DEVICE_ID": "1"}, model="tiny", data_dir=data_dir)
    Models(settings)
    assert current == [torch.device("cuda:1")]


# ------------------------------------------------------------------ latents before the decode (item 4)

@pytest.fixture
def fresh(data_dir, tiny_model):
    return VideoGenerator("tiny", data_dir)


def test_an_out_of_memory_decode_is_retried_in_tiles(fresh, monkeypatch):
    expected = fresh.generate(params(seed=9))
    real = fresh.pipe.vae.decode
    tiling_seen = []

    def decode(*args, **kwargs):
        tiling_seen.append((fresh.pipe.vae.use_tiling, fresh.pipe.vae.tile_sample_min_height))
        if len(tiling_seen) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real(*args, **kwargs)

    monkeypatch.setattr(fresh.pipe.vae, "decode", decode)
    steps = []
    frames = fresh.generate(params(seed=9), on_step=lambda i, n: steps.append(i))
    assert steps == [1, 2, 3]  # the denoise ran once: only the decode was retried
    assert tiling_seen == [(False, 256), (True, 256)]
    assert fresh.pipe.vae.use_tiling is False  # the tiles were for that job only (tests/test_placement.py)
    assert frames.shape == (9, 64, 64, 3)
    assert np.abs(frames.astype(int) - expected.astype(int)).max() <= 1  # a 64x64 clip fits one tile


def test_tiles_shrink_on_each_out_of_memory_until_none_is_left(fresh, monkeypatch, tmp_path):
    sizes = []

    def decode(*args, **kwargs):
        sizes.append(fresh.pipe.vae.tile_sample_min_height if fresh.pipe.vae.use_tiling else None)
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    monkeypatch.setattr(fresh.pipe.vae, "decode", decode)
    latents = tmp_path / "job.latents.pt"
    with pytest.raises(torch.OutOfMemoryError):
        fresh.generate(params(), latents_path=latents)
    assert sizes == [None, 256, 128, 64]
    saved = torch.load(latents)  # the denoise is not lost: it can be decoded again
    assert saved["latents"].shape == (1, 4, 3, 8, 8) and saved["params"]["prompt"] == "a red fox"


def test_saved_latents_decode_to_the_same_frames(fresh, tmp_path):
    path = tmp_path / "job.latents.pt"
    frames = fresh.generate(params(seed=4), latents_path=path)
    latents = torch.load(path)["latents"]
    with torch.inference_mode():
        again = generate.to_uint8_frames(families.decode_hunyuan_video(fresh.pipe, latents))
    assert np.array_equal(frames, again)


def test_keep_latents_saves_them_beside_the_video(settings, tmp_path):
    from dataclasses import replace

    from pipeline.run import Models, run_job

    kept = replace(settings, keep_latents=True, upscaler="none")
    out = tmp_path / "clip.mp4"
    run_job(params(upscale=False), kept, models=Models(kept), output=out)
    saved = torch.load(tmp_path / "clip.latents.pt")
    assert out.is_file() and saved["latents"].shape == (1, 4, 3, 8, 8)
    out2 = tmp_path / "plain.mp4"
    run_job(params(upscale=False), settings, models=Models(settings), output=out2)
    assert not (tmp_path / "plain.latents.pt").exists()


def test_the_generators_parts_do_not_import_it_back():
    """pipeline/generate.py uses speed, families and lora; none of them imports pipeline.generate (no cycle: the
    LoRA code re-places the pipeline through a callback the generator hands it)."""
    import ast

    from pipeline import lora

    for module in (speed, families, lora):
        tree = ast.parse(open(module.__file__).read())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module} | \
            {f"{n.module}.{a.name}" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module
             for a in n.names} | {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert "pipeline.generate" not in imported, module.__name__
