"""What a preview costs (pipeline/preview.py): the latent-to-RGB projection and the WebP encode, per preview.

1. Full-size latent shapes, random latents (N(0, 1): what the early steps look like, and the worst case for
   the WebP's size): HunyuanVideo at 720p and 544p with 129 frames, Wan 2.1 at 480p with 81 frames, Wan 2.2
   TI2V-5B at 1280x704 with 121 frames, HunyuanVideo-1.5 at 720p and 480p with 121 frames. Each shape is
   timed in its family's dtype on the GPU (bf16; the VAE-space latents are bf16 for HunyuanVideo-1.5 and Wan
   too) converted to float32 by the projection, on this CPU, as the worker runs it: `preview_frames` (where
   the latents are: here the CPU) then `encode_webp` (always on the CPU).
2. The tiny HunyuanVideo (64x64, 9 frames): one denoising step against one preview of its latents, measured
   inside the same generation (the step callback times both).
3. The worker's path on that tiny model: the denoising of a 20-step job with a preview after every step
   (projected in the step callback, then encoded, stored as previews/<id>.webp and logged as an event by the
   worker's preview thread, with SQLite and a local blob store) against the same job without previews,
   interleaved --repeats times.

Medians of --repeats runs after one warm-up, with --threads torch threads (1 by default: on a shared
machine, torch's thread pool waits on busy cores for ops this small, and the figure shows that, not the
work). On a GPU the projection runs there (an einsum and a resize of a few MB); the encode (libwebp, one
thread) stays on the CPU and runs in the worker's preview thread, beside the next step.

    python bench/preview.py
    python bench/preview.py --repeats 5 --threads 2 --json preview.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# (label, family, (channels, latent frames, latent height, latent width)): the VAE's compression per family:
# HunyuanVideo and Wan 2.1 8x8 spatially and 4x in time; Wan 2.2's VAE and HunyuanVideo-1.5's 16x16 and 4x.
SHAPES = (
    ("HunyuanVideo 1280x720, 129 frames", "hunyuanvideo", (16, 33, 90, 160)),
    ("HunyuanVideo 960x544, 129 frames", "hunyuanvideo", (16, 33, 68, 120)),
    ("Wan 2.1 832x480, 81 frames", "wan", (16, 21, 60, 104)),
    ("Wan 2.2 TI2V-5B 1280x704, 121 frames", "wan", (48, 31, 44, 80)),
    ("HunyuanVideo-1.5 1280x720, 121 frames", "hunyuanvideo15", (32, 31, 45, 80)),
    ("HunyuanVideo-1.5 848x480, 121 frames", "hunyuanvideo15", (32, 31, 30, 53)),
)


def timed(call, repeats: int) -> tuple[float, object]:
    call()  # warm-up
    times, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = call()
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


def full_size(repeats: int) -> list[dict]:
    import torch

    from pipeline.preview import encode_webp, preview_frames

    rows = []
    for label, family, shape in SHAPES:
        latents = torch.randn(1, *shape, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
        project_s, frames = timed(lambda: preview_frames(latents, family), repeats)
        encode_s, webp = timed(lambda: encode_webp(frames, 1000 / 6), repeats)
        rows.append({"shape": label, "latents": "x".join(map(str, shape)),
                     "preview": "x".join(map(str, frames.shape[:3])),
                     "project_ms": round(project_s * 1000, 1), "encode_ms": round(encode_s * 1000, 1),
                     "webp_kb": round(len(webp) / 1024, 1)})
    return rows


def tiny_step(repeats: int) -> dict:
    """One job of the tiny HunyuanVideo; its step callback times the gap between steps (one step) and a
    preview of the latents it was handed."""
    import torch

    from pipeline.generate import VideoGenerator
    from pipeline.preview import encode_webp, preview_frames
    from pipeline.spec import JobParams
    from pipeline.tiny import tiny_model_dir

    with tempfile.TemporaryDirectory() as tmp:
        generator = VideoGenerator(str(tiny_model_dir(Path(tmp))), Path(tmp))
        params = JobParams(prompt="a red fox", width=64, height=64, num_frames=9, num_inference_steps=repeats + 2,
                           seed=0, upscale=False)
        steps, previews, last = [], [], [time.perf_counter()]

        def on_latents(step, total, latents):
            now = time.perf_counter()
            steps.append(now - last[0])
            started = time.perf_counter()
            encode_webp(preview_frames(latents, generator.entry.family), 1000 / 8)
            previews.append(time.perf_counter() - started)
            last[0] = time.perf_counter()  # the next step starts now: the preview is not counted in it

        with torch.inference_mode():
            generator.generate(params, on_latents=on_latents)
    step_s, preview_s = statistics.median(steps[2:]), statistics.median(previews[2:])  # past the first steps' warm-up
    return {"step_ms": round(step_s * 1000, 1), "preview_ms": round(preview_s * 1000, 2),
            "preview_over_step": round(preview_s / step_s, 3)}


def worker_path(repeats: int) -> dict:
    """Denoising time of one tiny job with the worker's previews (every step) and without, interleaved."""
    import torch

    from pipeline.generate import VideoGenerator
    from pipeline.preview import every_n_steps
    from pipeline.spec import JobParams
    from pipeline.tiny import tiny_model_dir
    from storage.blobs import LocalBlobStore
    from storage.jobs import SqliteJobStore, new_job
    from worker.progress import PreviewWriter

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        generator = VideoGenerator(str(tiny_model_dir(tmp)), tmp)
        jobs, blobs = SqliteJobStore(tmp / "jobs.sqlite3"), LocalBlobStore(tmp / "blobs")
        params = JobParams(prompt="a red fox", width=64, height=64, num_frames=9, num_inference_steps=20, seed=0,
                           upscale=False)
        times = {"without": [], "with": []}
        for i in range(repeats + 1):
            for kind in times:
                ref = f"bench{i:04d}{kind}"
                jobs.create(new_job(ref, "s", "o", "generate", {}))
                jobs.claim("bench", 600)
                writer = PreviewWriter(jobs, blobs, ref, "bench", tmp, duration_s=9 / 24) if kind == "with" else None
                on_latents = every_n_steps(1, generator.entry.family, writer) if writer else None
                started = time.perf_counter()
                with torch.inference_mode():
                    generator.generate(params, on_latents=on_latents)
                if writer:
                    writer.close()  # the job's end waits for the last preview, as in the worker
                if i:  # the first round warms up
                    times[kind].append(time.perf_counter() - started)
        previews = len(jobs.events_after(ref, 0))
    without, with_ = statistics.median(times["without"]), statistics.median(times["with"])
    return {"job_s_without": round(without, 3), "job_s_with": round(with_, 3),
            "per_step_ms": round((with_ - without) / 20 * 1000, 2), "previews_logged_last_job": previews}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)

    rows, tiny, worker = full_size(args.repeats), tiny_step(args.repeats * 4), worker_path(args.repeats)
    print(f"torch threads: {torch.get_num_threads()}")
    print("| latents | shape (C x F x H x W) | preview (F x H x W) | projection ms | WebP encode ms | WebP KB |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['latents']} | {r['preview']} | {r['project_ms']} | {r['encode_ms']} | "
              f"{r['webp_kb']} |")
    print(f"\ntiny HunyuanVideo 64x64, 9 frames: a step {tiny['step_ms']} ms, a preview {tiny['preview_ms']} ms "
          f"({tiny['preview_over_step']:.1%} of a step)")
    print(f"worker path, tiny 20-step job: {worker['job_s_without']} s without previews, {worker['job_s_with']} s "
          f"with one after every step ({worker['per_step_ms']} ms a step; "
          f"{worker['previews_logged_last_job']} previews stored and logged in the last job)")
    if args.json:
        args.json.write_text(json.dumps({"full_size": rows, "tiny": tiny, "worker": worker}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
