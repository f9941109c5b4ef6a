"""The speed knobs: one `SpeedOptions` per worker, made concrete per model and device (`resolve_speed`), then
applied to the pipeline's transformers as diffusers hooks (cache, fp8 layerwise casting, attention backend) and a
regional torch.compile. The published cache settings they draw on sit here too.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import torch

from config import ConfigError, attention_backend_problem
from pipeline import models
from pipeline.families import DENSE_MASK_PIPELINES
from pipeline.spec import JobParams, attention_backend_for, passes_attention_mask

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SpeedOptions:
    """The speed knobs. None leaves a knob to the speed preset (`resolve_speed` fills it in)."""

    preset: str = "off"  # off | balanced | fast
    fp8: bool | None = None  # store transformer weights in float8, compute in the model dtype
    vae_tiling: bool | None = None
    cache: str | None = None  # off | fbc (First Block Cache) | magcache
    fbc_threshold: float | None = None
    attention_backend: str | None = None  # a diffusers backend name; config.ATTENTION_BACKENDS
    compile: bool | None = None  # regional torch.compile of the repeated transformer blocks
    mask_free: bool = True  # batch 1: trim the prompt's padding, so no attention mask is passed


# HunyuanVideo's published cache settings.
# First Block Cache: "0.06 is the default residual difference value for HunyuanVideo models"
# (diffusers docs, optimization/para_attn.md, from ParaAttention; 1.62x at 720p, "nearly zero quality loss").
FBC_THRESHOLDS = {"HunyuanVideoPipeline": 0.06}  # per family; others get diffusers' default, 0.05
# MagCache (github.com/Zehong-Ma/MagCache, MagCache4HunyuanVideo/magcache_sample_video.py): the faster of the
# two published settings, E024K06R02 (threshold 0.24, at most 6 skipped steps in a row, the first 20% of
# steps never skipped; about 2.8x), and the magnitude ratios calibrated there over 50 steps at 544p and 720p.
HUNYUAN_VIDEO_MAGCACHE = dict(threshold=0.24, max_skip_steps=6, retention_ratio=0.2)
HUNYUAN_VIDEO_MAG_RATIOS = {
    544: [1.0, 1.06971, 1.29073, 1.11245, 1.09596, 1.05233, 1.01415, 1.05672, 1.00848, 1.03632, 1.02974, 1.00984,
          1.03028, 1.00681, 1.06614, 1.05022, 1.02592, 1.01776, 1.02985, 1.00726, 1.03727, 1.01502, 1.00992,
          1.03371, 0.9976, 1.02742, 1.0093, 1.01869, 1.00815, 1.01461, 1.01152, 1.03082, 1.0061, 1.02162, 1.01999,
          0.99063, 1.01186, 1.0217, 0.99947, 1.01711, 0.9904, 1.00258, 1.00878, 0.97039, 0.97686, 0.94315,
          0.97728, 0.91154, 0.86139, 0.76592],
    720: [1.0, 1.0754, 1.27807, 1.11596, 1.09504, 1.05188, 1.00844, 1.05779, 1.00657, 1.04142, 1.03101, 1.00679,
          1.02556, 1.00908, 1.06949, 1.05438, 1.02214, 1.02321, 1.03019, 1.00779, 1.03381, 1.01886, 1.01161,
          1.02968, 1.00544, 1.02822, 1.00689, 1.02119, 1.0105, 1.01044, 1.01572, 1.02972, 1.0094, 1.02368, 1.0226,
          0.98965, 1.01588, 1.02146, 1.0018, 1.01687, 0.99436, 1.00283, 1.01139, 0.97122, 0.98251, 0.94513,
          0.97656, 0.90943, 0.85703, 0.75456],
}
# The cache each speed preset turns on, per family. A family with no published settings gets none.
PRESET_CACHES = {"HunyuanVideoPipeline": {"balanced": "fbc", "fast": "magcache"}}


def preset_choices(preset: str, family: str, device: str, memory_preset: str, mask_free: bool) -> dict:
    """What a speed preset turns on for this family, device and memory preset: fp8 only where weights travel
    (offload presets), since with every weight resident it would only add a cast per layer; compile, which
    `resolve_speed` then drops where fp8 or group offload would break its graph at every Linear."""
    if preset == "off":
        return {}
    cuda = device.startswith("cuda")
    return {
        "attention_backend": best_attention_backend(masked=not mask_free) if cuda else "native",
        "compile": cuda,
        "cache": PRESET_CACHES.get(family, {}).get(preset, "off"),
        "fp8": preset == "fast" and memory_preset in ("model", "group"),
    }


def best_attention_backend(masked: bool) -> str:
    """The fastest installed backend: FlashAttention 3, then 2, then PyTorch's SDPA (which, given no
    mask, picks its own flash or cuDNN kernel on CUDA)."""
    candidates = ("_flash_varlen_3", "flash_varlen") if masked else ("_flash_3", "flash")
    return next((name for name in candidates if attention_backend_problem(name, masked) is None), "native")


def resolve_speed(options: SpeedOptions, entry: models.ModelEntry, device: str, memory_preset: str) -> SpeedOptions:
    """Every knob concrete: an explicit setting wins, then the speed preset, then off.

    VAE tiling is on by default on CUDA with every memory preset (HunyuanVideo's VAE mid-block alone
    peaks near 34 GiB at 720p untiled); the `group` preset stores weights in fp8 unless told not to.
    No compile under fp8 casting or the `group` preset, whose hooks break the graph at every Linear. A cache
    the model cannot take (`ModelEntry.caches`) is left off, and the log says so: the setting is per worker,
    and the worker loads any model. For the same reason a named mask-free attention backend becomes its nearest
    mask-capable kin for a model that passes a mask (`pipeline.spec.attention_backend_for`).
    """
    family = entry.pipelines[entry.modes[0]]
    mask_free = not passes_attention_mask(entry, options.mask_free)
    chosen = preset_choices(options.preset, family, device, memory_preset, mask_free)
    # A family whose attention takes dense (N, N) masks gets a varlen kernel even with the speed preset off:
    # SDPA would expand each mask to the query's dtype (`pipeline.memory.mask_bytes`).
    dense = family in DENSE_MASK_PIPELINES and device.startswith("cuda")
    default_backend = best_attention_backend(masked=True) if dense else "native"
    cache = options.cache
    if cache is None and options.fbc_threshold is not None:
        cache = "fbc" if options.fbc_threshold > 0 else "off"
    cache = cache or chosen.get("cache", "off")
    if cache != "off" and cache not in entry.caches:
        log.warning("%s cannot take the %s cache in diffusers 0.42.1 (it takes: %s); it runs without one",
                    entry.id, cache, ", ".join(entry.caches) or "none")
        cache = "off"
    fp8 = options.fp8 if options.fp8 is not None else (memory_preset == "group" or chosen.get("fp8", False))
    compile_ = options.compile if options.compile is not None else chosen.get("compile", False)
    if compile_ and (graph_breaker := "fp8 layerwise casting" if fp8 else
                     "leaf-level group offload" if memory_preset == "group" else None):
        log.warning("not compiling %s: %s breaks the graph at every Linear, so a compile would gain little",
                    entry.id, graph_breaker)
        compile_ = False
    return replace(
        options,
        fp8=fp8,
        vae_tiling=options.vae_tiling if options.vae_tiling is not None else device.startswith("cuda"),
        cache=cache,
        fbc_threshold=options.fbc_threshold or FBC_THRESHOLDS.get(family, 0.05),
        # Always named: diffusers also makes the last backend set the process-wide default.
        attention_backend=(attention_backend_for(entry, options.attention_backend, options.mask_free)
                           or chosen.get("attention_backend") or default_backend),
        compile=compile_,
        mask_free=mask_free,
    )


def cache_config(options: SpeedOptions, family: str):
    """The diffusers cache config for `options.cache`, from the family's published settings."""
    from diffusers.hooks import FirstBlockCacheConfig, MagCacheConfig

    if options.cache == "fbc":
        return FirstBlockCacheConfig(threshold=options.fbc_threshold)
    if options.cache == "magcache":
        if family != "HunyuanVideoPipeline":
            raise ConfigError(f"T2V_CACHE=magcache needs magnitude ratios calibrated for {family}; t2v has them "
                              "only for HunyuanVideo (use fbc)")
        ratios = HUNYUAN_VIDEO_MAG_RATIOS[720]
        return MagCacheConfig(**HUNYUAN_VIDEO_MAGCACHE, num_inference_steps=len(ratios), mag_ratios=ratios)
    return None


def fit_cache_to_job(config, params: JobParams) -> None:
    """MagCache's ratios are per step: fit them to this job's step count and size before it runs.
    diffusers' hooks hold this same config object, so they read the new values."""
    from diffusers.hooks import MagCacheConfig
    from diffusers.hooks.mag_cache import nearest_interp

    if isinstance(config, MagCacheConfig):
        ratios = HUNYUAN_VIDEO_MAG_RATIOS[544 if min(params.width, params.height) <= 544 else 720]
        config.num_inference_steps = params.num_inference_steps
        config.mag_ratios = nearest_interp(torch.tensor(ratios), params.num_inference_steps)


def denoisers(pipe) -> list:
    """The pipeline's transformers: `transformer`, and the low-noise expert `transformer_2` of the two-expert
    Wan 2.2 A14B models (it runs the later steps, so every speed option goes to both)."""
    return [t for t in (getattr(pipe, name, None) for name in ("transformer", "transformer_2")) if t is not None]


def apply_speed_options(pipe, options: SpeedOptions, device: str):
    """Apply resolved speed options to every transformer, before the memory preset places the components
    (compile comes after it, see `compile_transformer`). Returns the cache config it enabled, if any."""
    transformers = denoisers(pipe)
    if options.vae_tiling and hasattr(pipe, "vae"):
        pipe.vae.enable_tiling()
    config = cache_config(options, type(pipe).__name__) if transformers else None
    for transformer in transformers:
        if options.fp8:
            compute = torch.float32 if device == "cpu" else transformer.dtype
            transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=compute)
        if config is not None:
            transformer.enable_cache(config)  # one config: MagCache's fitted ratios reach every transformer
        if options.attention_backend:
            transformer.set_attention_backend(options.attention_backend)
    return config


def has_hooks(model: torch.nn.Module) -> bool:
    """Whether any diffusers hook (cache, layerwise casting, group offload) or accelerate hook
    (model or sequential CPU offload) sits on `model` or inside it."""
    for module in model.modules():
        registry = getattr(module, "_diffusers_hook", None)
        if (registry is not None and registry.hooks) or hasattr(module, "_hf_hook"):
            return True
    return False


def compile_transformer(transformer) -> None:
    """Regional torch.compile of the repeated blocks. fullgraph=True fails under every diffusers and
    accelerate hook (they are compiler-disabled, and fp8 casting builds a Parameter inside the region),
    so it is asked for only when none is present."""
    fullgraph = not has_hooks(transformer)
    log.info("compiling the repeated transformer blocks (fullgraph=%s)", fullgraph)
    transformer.compile_repeated_blocks(fullgraph=fullgraph)
