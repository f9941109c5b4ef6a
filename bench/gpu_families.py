"""GPU bench of every registry family under every memory preset, with full-size random weights: the memory
plan's estimate (`pipeline.memory`) next to the measured peak, and the time of one job.

Each family's pipeline is its tiny build (`pipeline.tiny`: tokenizers, scheduler, processors) with the heavy
components rebuilt at their published sizes: the configs below override the tiny config's fields, and the
weights are made straight in the model dtype on the CPU (a constant per tensor, 1/sqrt(fan_in): a bench needs
the compute and the memory, not a picture). Each (family, preset) runs in a subprocess, placed by the service's
own `apply_memory_preset`, so one peak never carries into the next. The prompt keeps the tiny build's short
template (16 to 32 tokens), and image encoders keep their tiny towers (their weights are small) with the
width the transformer reads.

`bench/gpu.py --random-weights --parts families` runs it; `--list` prints the plan without running anything.
"""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline import memory, models  # noqa: E402  (pure: no torch)

GB = 10**9
# A short job at the family's default size: 1 step, 33 frames (9 latent frames), then the decode.
FRAMES, STEPS = 33, 1

# The published configs, as overrides of the tiny build's (sources: the Hub folders' config.json files).
HUNYUAN_TRANSFORMER = dict(in_channels=16, out_channels=16, num_attention_heads=24, attention_head_dim=128,
                           num_layers=20, num_single_layers=40, num_refiner_layers=2, patch_size=2, patch_size_t=1,
                           guidance_embeds=True, text_embed_dim=4096, pooled_projection_dim=768,
                           rope_axes_dim=(16, 56, 56), mlp_ratio=4.0)
HUNYUAN_VAE = dict(latent_channels=16, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                   norm_num_groups=32, spatial_compression_ratio=8, temporal_compression_ratio=4)
LLAMA_3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=8, head_dim=128, vocab_size=128320, hidden_act="silu")
CLIP_L_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   vocab_size=49408, projection_dim=768)
QWEN25_VL_7B_TEXT = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                         num_key_value_heads=4, head_dim=128, vocab_size=152064, layer_types=None,
                         rope_scaling={"mrope_section": [16, 24, 24], "rope_type": "default", "type": "default"})
BYT5_SMALL = dict(d_model=1472, d_ff=3584, d_kv=64, num_heads=6, num_layers=12, relative_attention_num_buckets=32,
                  feed_forward_proj="gated-gelu")
SIGLIP_WIDTH = dict(hidden_size=1152)  # the width HunyuanVideo-1.5's image_embed_dim reads; the tiny tower stays
UMT5_XXL = dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                relative_attention_num_buckets=32, feed_forward_proj="gated-gelu")
WAN_A14B_EXPERT = dict(num_attention_heads=40, attention_head_dim=128, text_dim=4096, ffn_dim=13824, num_layers=40)
WAN_TI2V_TRANSFORMER = dict(num_attention_heads=24, attention_head_dim=128, text_dim=4096, ffn_dim=14336,
                            num_layers=30)
WAN22_VAE = dict(base_dim=160, decoder_base_dim=256, dim_mult=[1, 2, 4, 4], num_res_blocks=2)
DEFAULTS = "class defaults"  # diffusers' own defaults are the published config (HunyuanVideo-1.5, Wan 2.1's VAE)

# registry id -> component -> overrides. LTX-2 goes here when it joins the registry.
FAMILIES = {
    "hunyuanvideo": {"transformer": HUNYUAN_TRANSFORMER, "vae": HUNYUAN_VAE, "text_encoder": LLAMA_3_8B,
                     "text_encoder_2": CLIP_L_TEXT},
    "hunyuanvideo-i2v": {"transformer": HUNYUAN_TRANSFORMER, "vae": HUNYUAN_VAE,
                         "text_encoder": {"text_config": LLAMA_3_8B}, "text_encoder_2": CLIP_L_TEXT},
    "hunyuanvideo-1.5-480p": {"transformer": DEFAULTS, "vae": DEFAULTS, "text_encoder": QWEN25_VL_7B_TEXT,
                              "text_encoder_2": BYT5_SMALL},
    "wan2.2-ti2v-5b": {"transformer": WAN_TI2V_TRANSFORMER, "vae": WAN22_VAE, "text_encoder": UMT5_XXL},
    "wan2.2-t2v-a14b": {"transformer": WAN_A14B_EXPERT, "transformer_2": WAN_A14B_EXPERT, "vae": DEFAULTS,
                        "text_encoder": UMT5_XXL},
}
KEEP = {"task_type", "target_size", "use_meanflow", "in_channels", "out_channels", "latents_mean", "latents_std",
        "z_dim", "is_residual", "patch_size", "scale_factor_spatial", "scale_factor_temporal", "temperal_downsample"}


def job_shape(model_id: str) -> tuple[int, int, int]:
    preset = models.MODELS[model_id].default_preset
    return preset.width, preset.height, FRAMES


def plan_rows(budget: int | None) -> list[dict]:
    """Every (family, preset) this bench runs, with the plan's estimate and whether it fits `budget`."""
    rows = []
    for preset in memory.PRESETS:  # preset-major: a cut-short run still covers every family
        for model_id in FAMILIES:
            width, height, frames = job_shape(model_id)
            est = memory.estimate(models.MODELS[model_id].memory, preset, width, height, frames)
            rows.append({"model": model_id, "preset": preset, "shape": f"{width}x{height}x{frames}",
                         "estimate_gb": round(est.peak / GB, 1), "phase": est.phase,
                         "fits": None if budget is None else est.fits(budget)})
    return rows


def print_plan(rows: list[dict]) -> None:
    print("| model | preset | shape | plan GB (phase) | fits | measured GB | seconds | note |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        fits = "" if r["fits"] is None else ("yes" if r["fits"] else "no")
        print(f"| {r['model']} | {r['preset']} | {r['shape']} | {r['estimate_gb']} ({r['phase']}) | {fits} "
              f"| {r.get('peak_gb', '')} | {r.get('seconds', '')} | {r.get('note', '')} |")


# ---------------------------------------------------------------------------------------- one (family, preset)

def full_size(component, overrides):
    """`component` rebuilt at the published size on the meta device (no memory): the tiny config with the
    published fields over it."""
    import torch

    cls = type(component)
    if hasattr(component.config, "to_dict"):  # transformers: a config object
        values = component.config.to_dict()
        for key, value in overrides.items():
            values[key] = {**values[key], **value} if key.endswith("_config") else value
        config = type(component.config)(**values)
        build = lambda: cls(config)  # noqa: E731
    else:  # diffusers: a frozen dict of __init__ arguments
        own = {k: v for k, v in component.config.items() if not k.startswith("_")}
        if overrides == DEFAULTS:
            signature = inspect.signature(cls.__init__).parameters
            overrides = {k: p.default for k, p in signature.items() if k in own and k not in KEEP
                         and p.default is not inspect.Parameter.empty}
        build = lambda: cls(**{**own, **overrides})  # noqa: E731
    with torch.device("meta"):
        return build().eval()


def materialize(model, dtype):
    """A meta model's tensors made on the CPU in `dtype`, each weight a constant 1/sqrt(fan_in)."""
    import torch

    model = model.to(dtype).to_empty(device="cpu")
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(p[0].numel() ** -0.5 if p.ndim >= 2 else (0.0 if name.endswith("bias") else 1.0))
        for b in model.buffers():
            b.zero_()
    return model


def tiny_pipeline(model_id: str, data_dir: Path):
    """The tiny build of `model_id` and its extra call arguments (the tiny prompt template)."""
    import diffusers

    from pipeline import tiny
    from pipeline.models import tiny_model_dir

    entry = models.MODELS[model_id]
    folder = tiny_model_dir(data_dir, model_id)
    pipe = getattr(diffusers, entry.pipeline_class_name(entry.modes[0])).from_pretrained(folder)
    return pipe, json.loads((folder / tiny.FOLDER_CONFIG).read_text()).get("call_defaults", {})


def run_one(model_id: str, preset: str, device: str, smoke: bool = False) -> dict:
    """Child process: build, place with `preset`, run one short job; the peak and the time. `smoke`: the tiny
    configs rebuilt the same way at 64x64 and 5 frames, so the CPU runs this very code
    (tests/test_bench_families.py)."""
    import torch
    from PIL import Image

    from pipeline import generate, speed

    entry = models.MODELS[model_id]
    with tempfile.TemporaryDirectory() as tmp:
        pipe, defaults = tiny_pipeline(model_id, Path(tmp))
    dtypes = entry.torch_dtypes() if device.startswith("cuda") else {"default": torch.float32}
    for name, overrides in FAMILIES[model_id].items():
        full = full_size(getattr(pipe, name), {} if smoke else overrides)
        setattr(pipe, name, None)  # the tiny one goes first
        pipe.register_modules(**{name: materialize(full, dtypes.get(name, dtypes["default"]))})
    speed.apply_speed_options(pipe, speed.SpeedOptions(vae_tiling=True), device)
    generate.apply_memory_preset(pipe, preset, device)
    width, height, frames = (64, 64, 5) if smoke else job_shape(model_id)
    image = Image.new("RGB", (width, height), (120, 90, 60)) if entry.inputs == "image" else None
    kwargs = models.prepare_call(pipe, entry, prompt="a red fox runs through the snow", num_frames=frames,
                                 steps=STEPS, generator=torch.Generator("cpu").manual_seed(0), width=width,
                                 height=height, image=image)
    kwargs.update({k: v for k, v in defaults.items() if k in inspect.signature(pipe.__call__).parameters})
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    with torch.inference_mode():
        out = pipe(**kwargs).frames
    if cuda:
        torch.cuda.synchronize(device)
    return {"seconds": round(time.perf_counter() - started, 1), "frames_out": list(out.shape),
            "peak_gb": round(torch.cuda.max_memory_allocated(device) / GB, 1) if cuda else None}


def run_all(device: str, budget_s: float, presets: list[str] | None = None) -> list[dict]:
    """Every row of the plan that fits this GPU, each in its own subprocess, until `budget_s` is spent."""
    import torch

    total = torch.cuda.get_device_properties(torch.device(device)).total_memory
    deadline = time.monotonic() + budget_s
    rows = [r for r in plan_rows(total) if not presets or r["preset"] in presets]
    for row in rows:
        if not row["fits"]:
            row["note"] = "skipped: the plan says it does not fit this GPU"
            continue
        if time.monotonic() > deadline:
            row["note"] = "skipped: --budget-min spent"
            continue
        argv = [sys.executable, __file__, "--child", row["model"], row["preset"], device]
        try:
            done = subprocess.run(argv, capture_output=True, text=True,
                                  timeout=max(60.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            row["note"] = "timed out: --budget-min spent"
            continue
        if done.returncode:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            row["note"] = ("out of memory" if "OutOfMemoryError" in done.stderr else f"failed: {last[:160]}")
            continue
        row.update(json.loads(done.stdout.strip().splitlines()[-1]))
    return rows


def bench(device: str, budget_min: float, presets: list[str] | None, json_path: Path | None) -> int:
    """`bench/gpu.py --random-weights --parts families`: run, print the table, write the rows."""
    rows = run_all(device, budget_min * 60, presets)
    print_plan(rows)
    if json_path:
        json_path.write_text(json.dumps(rows, indent=2))
    return 0 if any(r.get("peak_gb") is not None for r in rows) else 1


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        print(json.dumps(run_one(*sys.argv[2:5], smoke="--smoke" in sys.argv)))
