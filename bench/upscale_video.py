"""upscale.py end to end against a plain loop, on the same weights, in the same run.

The clip is synthetic and fixed (a moving gradient with fine texture, H.264). The weights are random
but full size: SRVGGNetCompact with 64 features and 16 convolutions, the size of
realesr-animevideov3 (seeded, so every run uses the same network). Each measurement runs in a
fresh subprocess, so its peak RSS is its own.

- pipeline: `upscale_file`, as `python upscale.py` runs it: a decoder thread, batches of
  T2V_UPSCALE_BATCH frames through the model, and an encoder thread, all overlapping.
- plain: decode every frame into a list, upscale them one at a time in fp32 with spandrel's model,
  then encode them all: the shape of the project this replaces.

    python bench/upscale_video.py                         # 96 frames of 128x72 -> 512x288
    python bench/upscale_video.py --frames 48 96 192 --size 160x90
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_clip(folder: Path, frames: int, width: int, height: int) -> Path:
    """The fixed synthetic clip: a moving gradient over fine, seeded texture, H.264 at 24 fps."""
    import numpy as np

    from pipeline.video import VideoWriter

    clip = folder / f"clip-{frames}-{width}x{height}.mp4"
    rng = np.random.default_rng(0)
    texture = rng.integers(0, 40, (height, width, 3), dtype=np.uint8)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    with VideoWriter(clip, fps=24, crf=18) as writer:
        for i in range(frames):
            base = np.stack([128 + 90 * np.sin((x + 3 * i) / width * 6), 128 + 90 * np.cos((y - 2 * i) / height * 5),
                             (x + y + 4 * i) % 256], axis=-1)
            writer.write((base * 0.85 + texture).clip(0, 255).astype(np.uint8))
    return clip


def make_inputs(folder: Path, frames: int, width: int, height: int) -> tuple[Path, Path]:
    """The fixed clip and the seeded full-size compact weights."""
    from pipeline import tiny

    weights = folder / "compact-64x16.pth"
    if not weights.exists():
        tiny.write_release_pth(weights, tiny.compact_state(num_feat=64, num_conv=16, seed=0), "params")
    return make_clip(folder, frames, width, height), weights


def run_pipeline(clip: Path, weights: Path, output: Path) -> dict:
    from pipeline.run import upscale_file
    from pipeline.upscale import Upscaler

    upscaler = Upscaler(weights, "cpu", batch=4)
    started = time.perf_counter()
    result = upscale_file(clip, output, upscaler, 4, crf=18)
    return {"seconds": time.perf_counter() - started, "frames": result.frames}


def run_plain(clip: Path, weights: Path, output: Path) -> dict:
    import numpy as np
    import spandrel
    import torch

    from pipeline.video import VideoWriter, read_frames

    model = spandrel.ModelLoader().load_from_file(weights).to("cpu").eval()
    started = time.perf_counter()
    frames = list(read_frames(clip))
    upscaled = []
    with torch.inference_mode():
        for frame in frames:
            x = torch.from_numpy(frame).permute(2, 0, 1)[None].float().div(255)
            y = model(x)[0].clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).numpy()
            upscaled.append(np.ascontiguousarray(y))
    with VideoWriter(output, fps=24, crf=18) as writer:
        for frame in upscaled:
            writer.write(frame)
    return {"seconds": time.perf_counter() - started, "frames": len(upscaled)}


def measure(mode: str, clip: str, weights: str, output: str) -> None:
    """Child process: run one mode, print its figures as JSON."""
    figures = (run_pipeline if mode == "pipeline" else run_plain)(Path(clip), Path(weights), Path(output))
    figures["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(figures))


def child(mode: str, clip: Path, weights: Path, output: Path) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", mode, str(clip), str(weights), str(output)],
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--frames", type=int, nargs="+", default=[96], help="clip lengths to run")
    parser.add_argument("--size", default="128x72", help="input WxH (output is 4x)")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        measure(*args.child)
        return
    width, height = map(int, args.size.lower().split("x"))
    print(f"| frames | input | output | pipeline fps | plain fps | ratio | pipeline peak RSS (MB) | plain peak RSS (MB) |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for frames in args.frames:
            clip, weights = make_inputs(folder, frames, width, height)
            pipe = child("pipeline", clip, weights, folder / "pipeline.mp4")
            plain = child("plain", clip, weights, folder / "plain.mp4")
            assert pipe["frames"] == plain["frames"] == frames
            pipe_fps, plain_fps = frames / pipe["seconds"], frames / plain["seconds"]
            print(f"| {frames} | {width}x{height} | {4 * width}x{4 * height} | {pipe_fps:.2f} | {plain_fps:.2f} "
                  f"| {pipe_fps / plain_fps:.2f} | {pipe['peak_rss_mb']:.0f} | {plain['peak_rss_mb']:.0f} |",
                  flush=True)


if __name__ == "__main__":
    main()
