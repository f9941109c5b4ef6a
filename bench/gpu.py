"""GPU benchmark, ready to run on a CUDA machine with the real weights (not yet run: see BENCHMARKS.md).

For each memory preset (T2V_MEMORY) and each size it runs one full job (generate, upscale 4x,
encode) and reports the time per denoising step, the peak VRAM (torch.cuda.max_memory_allocated),
and the time of each stage. Each preset runs in a fresh subprocess, so peaks and caches do not
carry over; within a preset the model loads once and a warm-up job runs first.

    python download.py
    python bench/gpu.py                                  # all presets, 544x960 and 720x1280, 129 frames
    python bench/gpu.py --presets group sequential --steps 10
    python bench/gpu.py --model tiny --allow-cpu --sizes 64x64 --frames 9 --steps 2   # smoke run on a CPU
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PRESETS = ("none", "model", "group", "sequential")


def run_preset(preset: str, sizes: list[str], frames: int, steps: int, model: str | None, upscaler: str | None,
               out_dir: str) -> list[dict]:
    """Child process: load once with `preset`, warm up, then one measured job per size."""
    import torch

    from config import Settings
    from pipeline.run import Models, run_job
    from pipeline.spec import JobParams

    overrides = {"memory": preset}
    overrides.update({k: v for k, v in (("model", model), ("upscaler", upscaler)) if v})
    settings = Settings.from_env(**overrides)
    cuda = settings.device.startswith("cuda")
    started = time.perf_counter()
    models = Models(settings)
    models.generator, models.upscaler  # noqa: B018  (load both now, and time it)
    load_s = time.perf_counter() - started
    rows = []
    for i, size in enumerate(["warmup"] + sizes):
        height, width = map(int, (sizes[0] if size == "warmup" else size).split("x"))
        params = JobParams.from_dict({"prompt": "a red fox runs through fresh snow at dawn", "width": width,
                                      "height": height, "num_frames": frames if size != "warmup" else 5,
                                      "num_inference_steps": steps if size != "warmup" else 2, "seed": 0})
        step_times = []

        def on_progress(stage, done, total):
            if stage == "denoising":
                step_times.append(time.perf_counter())

        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        result = run_job(params, settings, on_progress, models=models,
                         output=Path(out_dir) / f"gpu-bench-{preset}-{i}.mp4")
        if size == "warmup":
            continue
        steps_s = [b - a for a, b in zip(step_times, step_times[1:])]
        rows.append({
            "preset": preset, "active_preset": models.generator.memory_preset, "size": size, "frames": frames,
            "steps": steps, "device": settings.device, "load_s": round(load_s, 1),
            "step_s": round(sorted(steps_s)[len(steps_s) // 2], 3) if steps_s else None,
            "peak_vram_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
            "stages_s": result.timings_s,
        })
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--presets", nargs="+", choices=PRESETS, default=list(PRESETS))
    parser.add_argument("--sizes", nargs="+", default=["544x960", "720x1280"], help="HEIGHTxWIDTH")
    parser.add_argument("--frames", type=int, default=129)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--model", help="diffusers folder or 'tiny' (default: $T2V_MODEL)")
    parser.add_argument("--upscaler", help="weights, release name or 'tiny' (default: $T2V_UPSCALER)")
    parser.add_argument("--allow-cpu", action="store_true", help="run without a GPU (a smoke run; figures mean nothing)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        print(json.dumps(run_preset(args.child, args.sizes, args.frames, args.steps, args.model, args.upscaler,
                                    args.out_dir)))
        return 0
    import torch

    if not torch.cuda.is_available() and not args.allow_cpu:
        print("gpu.py: error: no CUDA GPU here; this benchmark is for GPU machines (--allow-cpu for a smoke run)",
              file=sys.stderr)
        return 2
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets:
            argv = [sys.executable, __file__, "--child", preset, "--sizes", *args.sizes, "--frames", str(args.frames),
                    "--steps", str(args.steps), "--out-dir", tmp]
            argv += [f"--model={args.model}"] if args.model else []
            argv += [f"--upscaler={args.upscaler}"] if args.upscaler else []
            done = subprocess.run(argv, capture_output=True, text=True)
            if done.returncode:
                print(f"preset {preset}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
                continue
            rows += json.loads(done.stdout.strip().splitlines()[-1])
    print("| preset (active) | size | frames | steps | s/step | peak VRAM (GB) | load s | generate s | upscale s | total s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        st = r["stages_s"]
        print(f"| {r['preset']} ({r['active_preset']}) | {r['size']} | {r['frames']} | {r['steps']} | {r['step_s']} "
              f"| {r['peak_vram_gb']} | {r['load_s']} | {st.get('generate')} | {st.get('upscale')} | {st.get('total')} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
