"""GPU benchmark: HunyuanVideo and the upscaler at full size with random weights, or whole jobs with real ones.

--random-weights builds the full-size transformer (bf16) and VAE (fp16) from the published configs
straight on the GPU, with random weights: the compute per step is the real one and nothing is
downloaded. Every timing sits between two `torch.cuda.synchronize(device)` calls, and every row
reports the peak memory of the configured device (CUDA_DEVICE_ID), not of GPU 0.

- transformer: seconds per denoising step (one forward, batch 1, embedded guidance) at 544x960 and
  720x1280 with 129 frames, `masked` (text padded to 256 tokens with a mask of 32 real ones, as the
  pipeline passes it) and `mask-free` (the same 32 tokens, no mask reaching attention), per
  attention backend usable here. The warm-up step has the very shapes of the timed ones, and with
  --compile the timed steps run under `fail_on_recompile`: a recompile there is an error, not a figure.
- VAE decode of the whole clip, tiled and untiled (one warm-up decode of one latent frame first).
- 4x upscale of 129 frames at 544x960 by random RealESRGAN_x4plus and compact (animevideov3-size)
  networks in fp16, uint8 frames in and out, at batch 1, 4 and 8.

The default matrix should take about 18 minutes on one H100 (the estimate is in BENCHMARKS.md);
--budget-min (20) skips the rows left once that time is spent, and --parts/--sizes split the run.
Out of memory in a row is reported in that row. `--smoke` runs the same code on tiny configs on the CPU.

- families (`--parts families`, not in the default matrix): every registry family (HunyuanVideo t2v and i2v,
  HunyuanVideo-1.5, Wan 2.2 TI2V-5B and A14B) under every memory preset the plan says fits this GPU, one
  short job each in a subprocess, the memory plan's estimate beside the measured peak (bench/gpu_families.py).
  `--list` prints those rows and their estimates without running anything (no GPU needed).

Without --random-weights it runs whole jobs (generate, upscale 4x, encode) with the real weights,
one memory preset per subprocess, each size warmed up at its own shape first.

    python bench/gpu.py --random-weights                      # the default matrix, about 18 minutes
    python bench/gpu.py --random-weights --parts transformer --sizes 720x1280 --json gpu-720p.json
    python bench/gpu.py --random-weights --smoke              # tiny configs on the CPU: the code path only
    python bench/gpu.py --random-weights --parts families --budget-min 9   # every family x preset, ~10 minutes
    python bench/gpu.py --list                                # what that runs, with the plan's estimates
    python bench/gpu.py --random-weights --parts ltx2         # LTX-2's transformer (48 layers, 19B) alone
    python download.py && python bench/gpu.py                 # whole jobs: presets none, model, group at 544x960
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

GiB = 1024**3
PRESETS = ("none", "model", "group", "sequential")
PARTS = ("transformer", "vae", "upscale", "families", "ltx2")
DEFAULT_PARTS = ("transformer", "vae", "upscale", "ltx2")  # "families" (bench/gpu_families.py) runs alone, ~10 min

# The published configs (HunyuanVideo's transformer/config.json and vae/config.json).
TRANSFORMER = dict(in_channels=16, out_channels=16, num_attention_heads=24, attention_head_dim=128, num_layers=20,
                   num_single_layers=40, num_refiner_layers=2, patch_size=2, patch_size_t=1, guidance_embeds=True,
                   text_embed_dim=4096, pooled_projection_dim=768, rope_axes_dim=(16, 56, 56))
VAE = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
           layers_per_block=2, spatial_compression_ratio=8, temporal_compression_ratio=4, mid_block_add_attention=True)
# pipeline/tiny.py's sizes (diffusers' own tests), for --smoke.
TINY_TRANSFORMER = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=1,
                        num_single_layers=1, num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True,
                        text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 4, 4))
TINY_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
                norm_num_groups=4, spatial_compression_ratio=8, temporal_compression_ratio=4,
                mid_block_add_attention=True)

# LTX-2's transformer, as huggingface.co/Lightricks/LTX-2 transformer/config.json has it (the keys diffusers
# 0.42.1's LTX2VideoTransformer3DModel takes), and the tiny one of pipeline/tiny.py for --smoke.
LTX2_TRANSFORMER = dict(
    in_channels=128, out_channels=128, patch_size=1, patch_size_t=1, num_attention_heads=32, attention_head_dim=128,
    cross_attention_dim=4096, audio_in_channels=128, audio_out_channels=128, audio_num_attention_heads=32,
    audio_attention_head_dim=64, audio_cross_attention_dim=2048, num_layers=48, caption_channels=3840,
    qk_norm="rms_norm_across_heads", rope_theta=10000.0, rope_double_precision=True, rope_type="split",
)
TINY_LTX2_TRANSFORMER = dict(
    in_channels=4, out_channels=4, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=8,
    cross_attention_dim=16, audio_in_channels=4, audio_out_channels=4, audio_num_attention_heads=2,
    audio_attention_head_dim=4, audio_cross_attention_dim=8, num_layers=2, caption_channels=32,
    qk_norm="rms_norm_across_heads", rope_double_precision=False, rope_type="split",
)
LTX2_AUDIO_LATENTS_PER_S = 16000 / 160 / 4  # the audio VAE's rate, hop and 4x compression (LTX2Pipeline's sizing)

# Attention backends to time, per mode: the mask-capable ones with the mask, the fastest kernels without.
# A backend is timed where diffusers' own requirement check passes (its package imports).
MASKED_BACKENDS = ("native", "_native_cudnn", "flash_varlen", "_flash_varlen_3", "sage_varlen")
MASK_FREE_BACKENDS = ("native", "_native_cudnn", "flash", "_flash_3", "sage")


@dataclass(frozen=True)
class Matrix:
    """What one --random-weights run builds and times."""
    transformer: dict = field(default_factory=lambda: TRANSFORMER)
    vae: dict = field(default_factory=lambda: VAE)
    rrdb: dict = field(default_factory=dict)  # pipeline.tiny.rrdbnet_state() arguments; {} is x4plus
    compact: dict = field(default_factory=dict)  # pipeline.tiny.compact_state() arguments; {} is general-x4v3 size
    sizes: tuple = ((544, 960), (720, 1280))
    frames: int = 129
    text_tokens: int = 256  # HunyuanVideo pads every prompt to max_sequence_length=256
    real_tokens: int = 32  # about a 25-word prompt once the template's system prompt is cropped
    warmup: int = 1  # no autotuning here (cudnn.benchmark is off), so one step at the same shapes suffices;
    steps: int = 2  # with --compile the compile happens in it. Every step does the same work.
    vae_tile: dict = field(default_factory=dict)  # enable_tiling() arguments; {} is diffusers' default (256 px)
    upscale_size: tuple = (544, 960)
    upscale_frames: int = 129
    batches: tuple = (1, 4, 8)
    ltx2: dict = field(default_factory=lambda: LTX2_TRANSFORMER)
    ltx2_sizes: tuple = ((512, 768), (704, 1216))  # LTX2Pipeline's default; the LTX-2.5 docstring example's
    ltx2_frames: int = 121  # about 5 s at 24 fps, the pipelines' default length


FULL = Matrix()
SMOKE = Matrix(transformer=TINY_TRANSFORMER, vae=TINY_VAE, rrdb=dict(num_feat=8, num_block=1),
               compact=dict(num_feat=8, num_conv=2), sizes=((32, 48),), frames=9, text_tokens=16, real_tokens=4,
               warmup=1, steps=1, vae_tile=dict(tile_sample_min_height=16, tile_sample_min_width=16,
                                                tile_sample_min_num_frames=4),
               upscale_size=(24, 32), upscale_frames=9, ltx2=TINY_LTX2_TRANSFORMER, ltx2_sizes=((64, 64),),
               ltx2_frames=9)


# ---------------------------------------------------------------------------------------- timing

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / GiB, 2) if device.type == "cuda" else None


def significant(seconds: float) -> float:
    """A timing to 4 significant figures: a fast row on a small config never rounds down to 0."""
    return float(f"{seconds:.4g}")


def timed(fn, device: torch.device) -> float:
    """Seconds that `fn()` takes on `device`, with the device drained before and after."""
    synchronize(device)
    started = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - started


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


class Budget:
    """Skips what is left once the time is spent, so the whole run stays inside its slot."""

    def __init__(self, minutes: float):
        self.deadline = time.monotonic() + minutes * 60

    def spent(self) -> bool:
        return time.monotonic() > self.deadline


def run_row(row: dict, fn, device: torch.device, budget: Budget) -> dict:
    """Fill `row` by `fn()` (which returns the timing fields); out of memory or a failure becomes the row's note."""
    if budget.spent():
        return {**row, "peak_gib": None, "note": "skipped: --budget-min spent"}
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    reset_peak(device)
    try:
        row.update(fn())
    except torch.OutOfMemoryError:
        row["note"] = "out of memory"
    except (RuntimeError, ValueError) as exc:  # a backend that cannot run here, a recompile under fail_on_recompile
        row["note"] = f"failed: {type(exc).__name__}: {str(exc).strip()[:160]}".replace("\n", " ").replace("|", "/")
    row["peak_gib"] = peak_gib(device)
    return row


# ---------------------------------------------------------------------------------------- random weights

def build_random(cls, config: dict, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """`cls(**config)` with random weights, made in `dtype` on `device` without a float32 copy first."""
    with torch.device("meta"):
        model = cls(**config)
    model = model.to(dtype).to_empty(device=device)
    gen = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:  # linear and convolution weights: PyTorch's default range, 1/sqrt(fan_in)
                bound = p[0].numel() ** -0.5
                p.uniform_(-bound, bound, generator=gen)
            else:  # biases 0, norm scales 1 (the models have no other 1-D parameters, and no buffers)
                p.fill_(0.0 if name.endswith("bias") else 1.0)
    return model.eval()


def mask_switch(transformer):
    """One shared HunyuanVideo attention processor whose `drop_mask` keeps the mask from reaching attention.

    The transformer builds a mask from `encoder_attention_mask` even when every token is real; with the
    prompt trimmed to its real tokens it is all True, so dropping it changes nothing but the kernel.
    """
    from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoAttnProcessor2_0

    class MaskSwitch(HunyuanVideoAttnProcessor2_0):
        drop_mask = False

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                     image_rotary_emb=None):
            return super().__call__(attn, hidden_states, encoder_hidden_states,
                                    None if self.drop_mask else attention_mask, image_rotary_emb)

    switch = MaskSwitch()
    for module in transformer.modules():
        if isinstance(getattr(module, "processor", None), HunyuanVideoAttnProcessor2_0):
            module.set_processor(switch)
    return switch


def backend_pairs(device: torch.device, wanted: list[str] | None) -> list[tuple[str, str]]:
    """(mode, backend) pairs to time: those of `wanted` (default: all) that diffusers can run here."""
    from diffusers.models.attention_dispatch import AttentionBackendName, _check_attention_backend_requirements

    pairs = [("masked", b) for b in MASKED_BACKENDS] + [("mask-free", b) for b in MASK_FREE_BACKENDS]
    if device.type != "cuda":
        pairs = [(mode, b) for mode, b in pairs if b == "native"]
    usable = []
    for mode, backend in pairs:
        if wanted and backend not in wanted:
            continue
        try:
            _check_attention_backend_requirements(AttentionBackendName(backend))
        except RuntimeError:
            continue
        usable.append((mode, backend))
    return usable


def transformer_rows(m: Matrix, device, dtype, pairs, compile_blocks: bool, budget: Budget) -> list[dict]:
    from diffusers import HunyuanVideoTransformer3DModel

    transformer = build_random(HunyuanVideoTransformer3DModel, m.transformer, device, dtype)
    switch = mask_switch(transformer)
    if compile_blocks:
        # Each (size, backend, mask) row may compile once, in its warm-up; dynamo's default of 8 would
        # silently leave the later rows uncompiled.
        torch._dynamo.config.recompile_limit = 64
        transformer.compile_repeated_blocks(fullgraph=True)  # no hooks here, so the full graph holds
    gen = torch.Generator(device).manual_seed(0)
    c, t = m.transformer["in_channels"], (m.frames - 1) // 4 + 1
    text, pooled = m.transformer["text_embed_dim"], m.transformer["pooled_projection_dim"]
    rows = []
    for height, width in m.sizes:
        latents = torch.randn(1, c, t, height // 8, width // 8, generator=gen, device=device, dtype=dtype)
        prompt = torch.randn(1, m.text_tokens, text, generator=gen, device=device, dtype=dtype)
        inputs = {
            "hidden_states": latents, "pooled_projections": torch.randn(1, pooled, device=device, dtype=dtype),
            "timestep": torch.tensor([999.0], device=device, dtype=dtype),
            "guidance": torch.tensor([6000.0], device=device, dtype=dtype), "return_dict": False,
        }
        padded_mask = torch.zeros(1, m.text_tokens, device=device, dtype=torch.bool)
        padded_mask[:, :m.real_tokens] = True
        texts = {
            "masked": (prompt, padded_mask),
            "mask-free": (prompt[:, :m.real_tokens], padded_mask[:, :m.real_tokens]),
        }
        for mode, backend in pairs:
            encoder_states, encoder_mask = texts[mode]

            def step():
                transformer(encoder_hidden_states=encoder_states, encoder_attention_mask=encoder_mask, **inputs)

            def measure():
                transformer.set_attention_backend(backend)
                switch.drop_mask = mode == "mask-free"
                with torch.inference_mode():
                    for _ in range(m.warmup):  # the same shapes as the timed steps: any compile happens here
                        timed(step, device)
                    with torch.compiler.set_stance("fail_on_recompile"):
                        seconds = [timed(step, device) for _ in range(m.steps)]
                return {"seconds": significant(sum(seconds) / len(seconds)), "per": f"step (mean of {m.steps})"}

            tokens = m.text_tokens if mode == "masked" else m.real_tokens
            rows.append(run_row({"part": "transformer", "shape": f"{height}x{width}x{m.frames}",
                                 "variant": f"{mode}, {tokens} text tokens" + (", compiled" if compile_blocks else ""),
                                 "backend": backend}, measure, device, budget))
    del transformer, switch
    return rows


def vae_rows(m: Matrix, device, dtype, budget: Budget) -> list[dict]:
    from diffusers import AutoencoderKLHunyuanVideo

    vae = build_random(AutoencoderKLHunyuanVideo, m.vae, device, dtype)
    gen = torch.Generator(device).manual_seed(0)
    c, t = m.vae["latent_channels"], (m.frames - 1) // 4 + 1
    rows = []
    for height, width in m.sizes:
        latents = torch.randn(1, c, t, height // 8, width // 8, generator=gen, device=device, dtype=dtype)
        for tiled in (True, False):
            def measure():
                vae.enable_tiling(**m.vae_tile) if tiled else vae.disable_tiling()
                with torch.inference_mode():
                    timed(lambda: vae.decode(latents[:, :, :1]), device)  # kernels and workspaces, not compile
                    seconds = timed(lambda: vae.decode(latents), device)
                return {"seconds": significant(seconds), "per": "decode of the clip"}

            rows.append(run_row({"part": "vae decode", "shape": f"{height}x{width}x{m.frames}",
                                 "variant": "tiled" if tiled else "untiled", "backend": ""}, measure, device, budget))
    del vae
    return rows


def upscale_rows(m: Matrix, device, folder: Path, budget: Budget) -> list[dict]:
    import numpy as np

    from pipeline import tiny
    from pipeline.upscale import Upscaler

    height, width = m.upscale_size
    frames = np.random.default_rng(0).integers(0, 256, (m.upscale_frames, height, width, 3), dtype=np.uint8)
    nets = {
        "x4plus": tiny.write_release_pth(folder / "x4plus.pth", tiny.rrdbnet_state(**m.rrdb), "params_ema"),
        "compact": tiny.write_release_pth(folder / "compact.pth", tiny.compact_state(**m.compact), "params"),
    }
    rows = []
    for name, path in nets.items():
        for batch in m.batches:
            up = Upscaler(path, str(device), batch=batch)  # fp16 on CUDA, and the device's memory format

            def measure():
                up.upscale(frames[:batch])  # warm-up at the batch's shape
                seconds = timed(lambda: sum(1 for _ in up.stream(frames)), device)
                note = f"OOM retry settled on {up.tile}px tiles" if up.tile else ""
                return {"seconds": significant(seconds), "per": f"clip ({m.upscale_frames / seconds:.1f} frames/s)",
                        "note": note}

            dtype = "fp16" if up.dtype == torch.float16 else "fp32"
            fmt = "channels_last" if up.memory_format == torch.channels_last else "contiguous"
            rows.append(run_row({"part": "upscale 4x", "shape": f"{height}x{width}x{m.upscale_frames}",
                                 "variant": f"{name}, {dtype}, {fmt}, batch {batch}", "backend": ""},
                                measure, device, budget))
            del up
    return rows


def ltx2_rows(m: Matrix, device, dtype, budget: Budget) -> list[dict]:
    """One LTX-2 transformer forward (video and audio together, one guidance branch), per size, with the audio
    tokens of a clip that long; text as 128 connector tokens."""
    from diffusers import LTX2VideoTransformer3DModel

    transformer = build_random(LTX2VideoTransformer3DModel, m.ltx2, device, dtype)
    gen = torch.Generator(device).manual_seed(0)
    frames = (m.ltx2_frames - 1) // 8 + 1
    audio_frames = round(m.ltx2_frames / 24 * LTX2_AUDIO_LATENTS_PER_S)
    text = torch.randn(1, 128, m.ltx2["caption_channels"], generator=gen, device=device, dtype=dtype)
    rows = []
    for height, width in m.ltx2_sizes:
        h, w = height // 32, width // 32
        inputs = dict(
            hidden_states=torch.randn(1, frames * h * w, m.ltx2["in_channels"], generator=gen, device=device,
                                      dtype=dtype),
            audio_hidden_states=torch.randn(1, audio_frames, m.ltx2["audio_in_channels"], generator=gen,
                                            device=device, dtype=dtype),
            encoder_hidden_states=text, audio_encoder_hidden_states=text,
            timestep=torch.tensor([999.0], device=device), sigma=torch.tensor([999.0], device=device),
            num_frames=frames, height=h, width=w, fps=24.0, audio_num_frames=audio_frames, return_dict=False,
        )

        def measure():
            with torch.inference_mode():
                for _ in range(m.warmup):
                    timed(lambda: transformer(**inputs), device)
                seconds = [timed(lambda: transformer(**inputs), device) for _ in range(m.steps)]
            return {"seconds": significant(sum(seconds) / len(seconds)), "per": f"forward (mean of {m.steps})"}

        rows.append(run_row({"part": "ltx2 transformer", "shape": f"{height}x{width}x{m.ltx2_frames}",
                             "variant": f"{frames * h * w} video + {audio_frames} audio tokens", "backend": "native"},
                            measure, device, budget))
    del transformer
    return rows


def random_weight_rows(m: Matrix, device: torch.device, parts: list[str], backends: list[str] | None,
                       compile_blocks: bool, budget: Budget) -> list[dict]:
    from diffusers.utils import logging as diffusers_logging

    cuda = device.type == "cuda"
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # the dtype cast and each backend switch warn on every call
    rows = []
    try:
        if "transformer" in parts:
            rows += transformer_rows(m, device, torch.bfloat16 if cuda else torch.float32,
                                     backend_pairs(device, backends), compile_blocks, budget)
        if "vae" in parts:
            rows += vae_rows(m, device, torch.float16 if cuda else torch.float32, budget)
    finally:
        diffusers_logging.set_verbosity(verbosity)
    if "upscale" in parts:
        with tempfile.TemporaryDirectory() as tmp:
            rows += upscale_rows(m, device, Path(tmp), budget)
    if "ltx2" in parts:
        rows += ltx2_rows(m, device, torch.bfloat16 if cuda else torch.float32, budget)
    return rows


def print_random_weight_rows(rows: list[dict], device: torch.device) -> None:
    import diffusers

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"{where}, torch {torch.__version__}, diffusers {diffusers.__version__}, device {device}\n")
    print("| part | shape | variant | backend | seconds | per | peak GiB | note |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['part']} | {r['shape']} | {r['variant']} | {r['backend']} | {r.get('seconds', '')} "
              f"| {r.get('per', '')} | {r['peak_gib'] if r['peak_gib'] is not None else ''} | {r.get('note', '')} |")


# ---------------------------------------------------------------------------------------- whole jobs

def run_preset(preset: str, sizes: list[str], frames: int, steps: int, model: str | None, upscaler: str | None,
               out_dir: str) -> list[dict]:
    """Child process: load once with `preset`; per size, a warm-up job at that shape, then the measured job."""
    from config import Settings
    from pipeline.run import Models, run_job
    from pipeline.spec import JobParams

    overrides = {"memory": preset}
    overrides.update({k: v for k, v in (("model", model), ("upscaler", upscaler)) if v})
    settings = Settings.from_env(**overrides)
    device = cuda_device() or torch.device("cpu")
    started = time.perf_counter()
    models = Models(settings)
    models.generator, models.upscaler  # noqa: B018  (load both now, and time it)
    load_s = time.perf_counter() - started
    rows = []
    for size in sizes:
        height, width = map(int, size.split("x"))
        for warmup in (True, False):  # the same frames and size: a compiled model does not recompile
            params = JobParams.from_dict({"prompt": "a red fox runs through fresh snow at dawn", "width": width,
                                          "height": height, "num_frames": frames,
                                          "num_inference_steps": 2 if warmup else steps, "seed": 0})
            step_times = []

            def on_progress(stage, done, total):
                if stage == "denoising":
                    synchronize(device)
                    step_times.append(time.perf_counter())

            synchronize(device)
            reset_peak(device)
            result = run_job(params, settings, on_progress, models=models,
                             output=Path(out_dir) / f"gpu-bench-{preset}-{size}.mp4")
        steps_s = [b - a for a, b in zip(step_times, step_times[1:])]
        rows.append({
            "preset": preset, "active_preset": models.generator.memory_preset, "size": size, "frames": frames,
            "steps": steps, "device": str(device), "load_s": round(load_s, 1),
            "step_s": round(median(steps_s), 3) if steps_s else None, "peak_vram_gb": peak_gib(device),
            "stages_s": result.timings_s,
        })
    return rows


def whole_job_rows(args) -> list[dict]:
    rows = []
    budget = Budget(args.budget_min)
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets:
            if budget.spent():
                print(f"preset {preset}: skipped, --budget-min spent", file=sys.stderr)
                continue
            argv = [sys.executable, __file__, "--child", preset, "--sizes", *args.sizes, "--frames", str(args.frames),
                    "--steps", str(args.steps), "--out-dir", tmp]
            argv += [f"--model={args.model}"] if args.model else []
            argv += [f"--upscaler={args.upscaler}"] if args.upscaler else []
            done = subprocess.run(argv, capture_output=True, text=True)
            if done.returncode:
                print(f"preset {preset}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
                continue
            rows += json.loads(done.stdout.strip().splitlines()[-1])
    print("| preset (active) | size | frames | steps | s/step | peak GiB | load s | generate s | upscale s | total s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        st = r["stages_s"]
        print(f"| {r['preset']} ({r['active_preset']}) | {r['size']} | {r['frames']} | {r['steps']} | {r['step_s']} "
              f"| {r['peak_vram_gb']} | {r['load_s']} | {st.get('generate')} | {st.get('upscale')} | {st.get('total')} |")
    return rows


# ---------------------------------------------------------------------------------------- command line

def cuda_device() -> torch.device | None:
    """The configured GPU (CUDA_DEVICE_ID), made current; None without CUDA."""
    from config import ConfigError, Settings

    device = torch.device(Settings.from_env().device)
    if device.type != "cuda":
        return None
    if device.index >= torch.cuda.device_count():
        raise ConfigError(f"CUDA_DEVICE_ID={device.index}, but this machine has {torch.cuda.device_count()} GPU(s)")
    torch.cuda.set_device(device)
    return device


def argv_names(argv: list[str] | None, flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in (sys.argv[1:] if argv is None else argv))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--random-weights", action="store_true", help="full-size random weights (no download)")
    parser.add_argument("--smoke", action="store_true", help="--random-weights on tiny configs on the CPU")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(DEFAULT_PARTS),
                        help="--random-weights: what to time ('families' runs alone)")
    parser.add_argument("--list", action="store_true", help="print what --parts families runs, with the memory "
                                                            "plan's estimate for each family and preset, and exit")
    parser.add_argument("--backends", nargs="+", help="attention backends to time (default: every one usable)")
    parser.add_argument("--compile", action="store_true", help="--random-weights: regional torch.compile")
    parser.add_argument("--presets", nargs="+", choices=PRESETS, default=["none", "model", "group"],
                        help="whole jobs: memory presets")
    parser.add_argument("--sizes", nargs="+", help="HEIGHTxWIDTH (default: 544x960 720x1280 with --random-weights, "
                                                   "544x960 for whole jobs)")
    parser.add_argument("--frames", type=int, default=129)
    parser.add_argument("--steps", type=int, help="timed steps (default: 2 with --random-weights, 4 for whole jobs)")
    parser.add_argument("--budget-min", type=float, default=20, help="skip what is left after this many minutes")
    parser.add_argument("--model", help="whole jobs: diffusers folder or 'tiny' (default: $T2V_MODEL)")
    parser.add_argument("--upscaler", help="whole jobs: weights, release name or 'tiny' (default: $T2V_UPSCALER)")
    parser.add_argument("--allow-cpu", action="store_true", help="whole jobs without a GPU (a smoke run)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if "families" in args.parts and len(args.parts) > 1:
        parser.error("--parts families runs alone (it is a run of its own, about 10 minutes)")
    args.presets_given = args.presets if argv_names(argv, "--presets") else None  # families: every preset unless named

    if args.child:
        print(json.dumps(run_preset(args.child, args.sizes, args.frames, args.steps, args.model, args.upscaler,
                                    args.out_dir)))
        return 0
    from config import ConfigError

    if args.list:
        import gpu_families

        cuda = torch.cuda.is_available()
        total = torch.cuda.get_device_properties(cuda_device()).total_memory if cuda else None
        gpu_families.print_plan(gpu_families.plan_rows(total))
        return 0
    try:
        device = None if args.smoke else cuda_device()
    except ConfigError as exc:
        print(f"gpu.py: error: {exc}", file=sys.stderr)
        return 2
    if device is None and not (args.smoke or args.allow_cpu):
        print("gpu.py: error: no CUDA GPU here; this benchmark is for GPU machines "
              "(--random-weights --smoke or --allow-cpu for a smoke run on the CPU)", file=sys.stderr)
        return 2
    if args.random_weights and args.parts == ["families"] and device is not None:
        import gpu_families

        return gpu_families.bench(str(device), args.budget_min, args.presets_given, args.json)
    if args.random_weights or args.smoke:
        matrix = SMOKE if args.smoke else FULL
        overrides = {"frames": args.frames} if not args.smoke else {}
        if args.sizes:
            overrides["sizes"] = tuple(tuple(map(int, s.split("x"))) for s in args.sizes)
        if args.steps:
            overrides["steps"] = args.steps
        device = device or torch.device("cpu")
        rows = random_weight_rows(replace(matrix, **overrides), device, args.parts, args.backends, args.compile,
                                  Budget(args.budget_min))
        print_random_weight_rows(rows, device)
        ok = any("seconds" in r for r in rows)
    else:
        args.sizes, args.steps = args.sizes or ["544x960"], args.steps or 4
        rows = whole_job_rows(args)
        ok = bool(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
