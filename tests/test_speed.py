"""Speed presets (T2V_SPEED): what each one picks per family, device and memory preset, that explicit
settings win, that each installs exactly the hooks and backends it names, and that a job runs under each."""

import functools
import logging

import pytest
import torch

import config
from config import Settings
from pipeline import families, models, speed
from pipeline.generate import VideoGenerator
from pipeline.run import Models
from pipeline.spec import JobParams
from pipeline.speed import SpeedOptions, resolve_speed

HV = models.MODELS["hunyuanvideo"]
FBC_HOOKS = {"fbc_leader_block_hook", "fbc_block_hook"}
MAGCACHE_HOOKS = {"mag_cache_leader_block_hook", "mag_cache_block_hook"}


def params(**kw):
    base = dict(prompt="a red fox", width=64, height=64, num_frames=9, num_inference_steps=3, seed=1)
    return JobParams.from_dict({**base, **kw})


def knobs(options: SpeedOptions) -> dict:
    return {k: getattr(options, k) for k in ("attention_backend", "compile", "cache", "fp8", "vae_tiling")}


@pytest.mark.parametrize("preset, device, memory, expected", [
    ("off", "cpu", "none", dict(attention_backend="native", compile=False, cache="off", fp8=False, vae_tiling=False)),
    ("off", "cuda:0", "none", dict(attention_backend="native", compile=False, cache="off", fp8=False, vae_tiling=True)),
    ("off", "cuda:0", "group", dict(attention_backend="native", compile=False, cache="off", fp8=True, vae_tiling=True)),
    ("balanced", "cpu", "none", dict(attention_backend="native", compile=False, cache="fbc", fp8=False,
                                     vae_tiling=False)),
    ("balanced", "cuda:0", "none", dict(attention_backend="native", compile=True, cache="fbc", fp8=False,
                                        vae_tiling=True)),
    ("balanced", "cuda:0", "model", dict(attention_backend="native", compile=True, cache="fbc", fp8=False,
                                         vae_tiling=True)),
    ("fast", "cpu", "none", dict(attention_backend="native", compile=False, cache="magcache", fp8=False,
                                 vae_tiling=False)),
    ("fast", "cuda:0", "none", dict(attention_backend="native", compile=True, cache="magcache", fp8=False,
                                    vae_tiling=True)),
    ("fast", "cuda:0", "model", dict(attention_backend="native", compile=False, cache="magcache", fp8=True,
                                     vae_tiling=True)),  # fp8 casting would break a compiled graph at every Linear
    ("balanced", "cuda:0", "group", dict(attention_backend="native", compile=False, cache="fbc", fp8=True,
                                         vae_tiling=True)),
])
def test_each_preset_picks_its_knobs_for_hunyuan_video(preset, device, memory, expected):
    # No flash-attn here, so SDPA ("native") is the fastest installed backend.
    assert knobs(resolve_speed(SpeedOptions(preset=preset), HV, device, memory)) == expected


def test_explicit_settings_win_over_the_preset():
    explicit = SpeedOptions(preset="fast", attention_backend="_native_math", compile=False, cache="fbc",
                            fbc_threshold=0.1, fp8=False, vae_tiling=False)
    resolved = resolve_speed(explicit, HV, "cuda:0", "model")
    assert knobs(resolved) == dict(attention_backend="_native_math", compile=False, cache="fbc", fp8=False,
                                   vae_tiling=False)
    assert resolved.fbc_threshold == 0.1


def test_a_threshold_alone_turns_first_block_cache_on_and_zero_turns_it_off():
    assert resolve_speed(SpeedOptions(fbc_threshold=0.08), HV, "cpu", "none").cache == "fbc"
    assert resolve_speed(SpeedOptions(preset="balanced", fbc_threshold=0), HV, "cpu", "none").cache == "off"
    balanced = resolve_speed(SpeedOptions(preset="balanced"), HV, "cpu", "none")
    assert balanced.fbc_threshold == speed.FBC_THRESHOLDS["HunyuanVideoPipeline"] == 0.06


def test_a_family_without_published_settings_gets_no_cache_from_the_preset():
    resolved = resolve_speed(SpeedOptions(preset="fast"), models.MODELS["wan2.2-t2v-a14b"], "cuda:0", "none")
    assert resolved.cache == "off" and resolved.compile is True


@pytest.mark.parametrize("model_id, mask_free", [
    ("hunyuanvideo", True), ("hunyuanvideo-i2v", False), ("hunyuanvideo-1.5-480p", False),
    ("wan2.2-ti2v-5b", True), ("wan2.2-t2v-a14b", True), ("wan2.1-t2v-1.3b", True),
])
def test_only_a_model_that_passes_a_mask_is_kept_from_mask_free_backends(monkeypatch, model_id, mask_free):
    # Before: mask_free was keyed on PROMPT_TRIMS, so every Wan model was treated as masked and refused flash.
    monkeypatch.setattr(speed, "attention_backend_problem",
                        lambda name, masked: "masked" if masked and name in ("_flash_3", "flash") else None)
    resolved = resolve_speed(SpeedOptions(preset="balanced"), models.MODELS[model_id], "cuda:0", "none")
    assert resolved.mask_free is mask_free
    assert resolved.attention_backend == ("_flash_3" if mask_free else "_flash_varlen_3")
    # Wan passes no mask even with T2V_MASK_FREE off (that setting only stops HunyuanVideo's prompt trim).
    unset = resolve_speed(SpeedOptions(mask_free=False), models.MODELS[model_id], "cuda:0", "none")
    assert unset.mask_free is (models.FAMILIES[models.MODELS[model_id].family].attention_mask == "never")


def test_the_registry_names_exactly_the_pipelines_that_have_a_prompt_trim():
    assert models.TRIMMED_PIPELINES == set(families.PROMPT_TRIMS)


@pytest.mark.parametrize("model_id, cache, kept", [
    ("hunyuanvideo", "fbc", "fbc"), ("hunyuanvideo", "magcache", "magcache"),
    ("hunyuanvideo-i2v", "fbc", "off"), ("hunyuanvideo-1.5-480p", "fbc", "off"),
    ("hunyuanvideo-1.5-480p-i2v-distilled", "fbc", "off"), ("wan2.2-t2v-a14b", "fbc", "fbc"),
    ("wan2.2-ti2v-5b", "magcache", "off"),  # no magnitude ratios calibrated for Wan
])
def test_a_cache_the_model_cannot_take_is_left_off_and_logged(caplog, model_id, cache, kept):
    resolved = resolve_speed(SpeedOptions(cache=cache), models.MODELS[model_id], "cpu", "none")
    assert resolved.cache == kept
    assert (f"{model_id} cannot take the {cache} cache" in caplog.text) is (kept == "off")


def test_the_preset_prefers_flash_attention_where_installed(monkeypatch):
    installed = {"_flash_3", "flash_varlen"}
    monkeypatch.setattr(speed, "attention_backend_problem", lambda name, masked: None if name in installed else "no")
    assert resolve_speed(SpeedOptions(preset="balanced"), HV, "cuda:0", "none").attention_backend == "_flash_3"
    masked = resolve_speed(SpeedOptions(preset="balanced", mask_free=False), HV, "cuda:0", "none")
    assert masked.attention_backend == "flash_varlen"  # a mask is passed: only a varlen kernel takes it


@pytest.mark.parametrize("installed, nearest", [({"flash", "flash_varlen"}, "flash_varlen"), ({"flash"}, "native")])
@pytest.mark.parametrize("model_id, mask_free, masked", [
    ("hunyuanvideo-1.5-480p", True, True), ("hunyuanvideo-i2v", True, True), ("hunyuanvideo", False, True),
    ("hunyuanvideo", True, False), ("wan2.2-ti2v-5b", False, False),
])
def test_a_named_mask_free_backend_becomes_the_nearest_mask_capable_one_per_model(monkeypatch, installed, nearest,
                                                                                 model_id, mask_free, masked):
    # Before: `flash` stayed `flash` for every model, and a model that passes a mask refused to load.
    monkeypatch.setattr(config, "attention_backend_problem", lambda name, masked: None if name in installed else "no")
    options = SpeedOptions(attention_backend="flash", mask_free=mask_free)
    resolved = resolve_speed(options, models.MODELS[model_id], "cuda:0", "none")
    assert resolved.attention_backend == (nearest if masked else "flash")


def test_a_model_that_passes_a_mask_loads_and_runs_under_a_mask_free_backend(caplog, data_dir):
    # Before: T2V_ATTENTION_BACKEND=_native_flash failed every HunyuanVideo-1.5 job with a ConfigError at load.
    settings = Settings.from_env(env={"T2V_ATTENTION_BACKEND": "_native_flash"}, model="tiny", data_dir=data_dir)
    caplog.set_level(logging.INFO, logger="pipeline.run")
    generator = Models(settings).generator_for("hunyuanvideo-1.5-480p")
    assert generator.speed.attention_backend == "native"
    assert backends(generator.pipe.transformer) == {"native"}
    assert ("hunyuanvideo-1.5-480p passes an attention mask, which T2V_ATTENTION_BACKEND=_native_flash cannot take: "
            "it runs on native") in caplog.text
    frames = generator.generate(JobParams(prompt="a fox", model="hunyuanvideo-1.5-480p", width=32, height=32,
                                          num_frames=1, num_inference_steps=1, seed=3))
    assert frames.shape == (1, 32, 32, 3) and frames.std() > 0


# ------------------------------------------------------------------ the hooks each preset installs

def diffusers_hooks(model) -> set[str]:
    names = set()
    for module in model.modules():
        registry = getattr(module, "_diffusers_hook", None)
        names |= set(registry.hooks) if registry is not None else set()
    return names


def backends(transformer) -> set:
    return {m.processor._attention_backend.value for m in transformer.modules()
            if getattr(getattr(m, "processor", None), "_attention_backend", None) is not None}


@pytest.fixture
def eager_compile(monkeypatch):
    """torch.compile traced by Dynamo (graph breaks and fullgraph errors included) but run eagerly:
    Inductor's code generation would take minutes on these cores and proves nothing more here."""
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    yield
    torch._dynamo.reset()


def as_on_a_gpu(preset: str, memory: str) -> SpeedOptions:
    """What `preset` resolves to on CUDA with `memory`, every knob spelled out, to run on the CPU."""
    return resolve_speed(SpeedOptions(preset=preset), HV, "cuda:0", memory)


@pytest.mark.parametrize("options, hooks, fp8, compiled", [
    (SpeedOptions(preset="off"), set(), False, False),
    (SpeedOptions(preset="balanced"), FBC_HOOKS, False, False),
    (SpeedOptions(preset="fast"), MAGCACHE_HOOKS, False, False),
    (as_on_a_gpu("balanced", "none"), FBC_HOOKS, False, True),
    (as_on_a_gpu("fast", "model"), MAGCACHE_HOOKS | {"layerwise_casting"}, True, False),
], ids=["off", "balanced", "fast", "balanced-as-on-cuda", "fast-as-on-cuda-model-offload"])
def test_each_preset_installs_exactly_its_hooks_and_a_job_runs(data_dir, tiny_model, eager_compile, options, hooks,
                                                                fp8, compiled):
    gen = VideoGenerator("tiny", data_dir, speed=options)
    transformer = gen.pipe.transformer
    assert diffusers_hooks(transformer) - {"peft_autocast_disable"} == hooks
    assert backends(transformer) == {"native"}
    assert (transformer.transformer_blocks[0].attn.to_q.weight.dtype == torch.float8_e4m3fn) is fp8
    blocks = [m for m in transformer.modules() if type(m).__name__ in transformer._repeated_blocks]
    assert all((b._compiled_call_impl is not None) is compiled for b in blocks)
    frames = gen.generate(params())
    assert frames.shape == (9, 64, 64, 3) and frames.std() > 1
    second = gen.generate(params(width=48, height=32))  # the hooks' state does not leak into another size
    assert second.shape == (9, 32, 48, 3)


def test_every_speed_option_reaches_both_wan_a14b_experts(data_dir):
    # Before: fp8, the cache and the backend went to `transformer` only; the low-noise steps ran without them.
    options = SpeedOptions(fp8=True, cache="fbc", attention_backend="_native_math")
    gen = VideoGenerator("tiny:wan2.2-t2v-a14b", data_dir, speed=options)
    assert [type(t).__name__ for t in gen.transformers] == ["WanTransformer3DModel"] * 2
    for transformer in gen.transformers:
        assert FBC_HOOKS | {"layerwise_casting"} <= diffusers_hooks(transformer)
        assert transformer.blocks[0].attn1.to_q.weight.dtype == torch.float8_e4m3fn
        assert backends(transformer) == {"_native_math"}
    frames = gen.generate(params(num_frames=5, num_inference_steps=4))  # both experts run, under their caches
    assert frames.shape == (5, 64, 64, 3) and frames.std() > 1


def test_magcache_is_fitted_to_each_jobs_steps_and_skips_some(data_dir, tiny_model):
    gen = VideoGenerator("tiny", data_dir, speed=SpeedOptions(preset="fast"))
    tail = gen.pipe.transformer.single_transformer_blocks[-1].proj_mlp  # runs only when the blocks compute
    computed = []
    tail.register_forward_hook(lambda *a: computed.append(1))
    gen.generate(params(num_inference_steps=5))
    assert gen.cache.num_inference_steps == 5 and len(gen.cache.mag_ratios) == 5
    assert 0 < len(computed) < 5  # some steps reused the cached residual
    computed.clear()
    gen.generate(params(num_inference_steps=8))
    assert gen.cache.num_inference_steps == 8 and 0 < len(computed) < 8


@pytest.mark.parametrize("options, memory, why", [
    (SpeedOptions(compile=True, fp8=True), "none", "fp8 layerwise casting"),
    (SpeedOptions(compile=True, fp8=False), "group", "leaf-level group offload"),
])
def test_compile_is_dropped_where_hooks_break_the_graph_at_every_linear(caplog, options, memory, why):
    resolved = resolve_speed(options, HV, "cuda:0", memory)
    assert resolved.compile is False
    assert f"not compiling hunyuanvideo: {why} breaks the graph at every Linear" in caplog.text
    assert resolve_speed(SpeedOptions(compile=True), HV, "cuda:0", "model").compile is True


def test_compile_warms_up_at_load_at_two_sizes_and_two_prompt_lengths(data_dir, tiny_model, eager_compile,
                                                                      monkeypatch, tmp_path):
    from config import Settings
    from pipeline.run import Models

    calls = []
    real = VideoGenerator.generate
    monkeypatch.setattr(VideoGenerator, "generate", lambda self, p, *a, **k: calls.append(p) or real(self, p, *a, **k))
    # Before: a tiny build warmed up at HunyuanVideo's full size (960x544, 129 frames) unless the caps said not.
    settings = Settings.from_env(env={}, model="tiny", data_dir=data_dir, compile=True)
    assert Models(settings).generator.speed.compile is True
    assert [(p.width, p.height, p.num_frames, p.num_inference_steps) for p in calls] == [(64, 64, 9, 1),
                                                                                         (128, 64, 9, 1)]
    assert len(calls[0].prompt) < 10 < 100 < len(calls[1].prompt)
    calls.clear()
    Models(Settings.from_env(env={}, model="tiny", data_dir=data_dir)).generator  # noqa: B018
    assert calls == []  # no compile, no warm-up
