"""Upscale throughput on the CPU for both Real-ESRGAN architectures, and what batching and overlap buy.

Random weights at the release sizes (seeded, so every run uses the same networks):
- compact: SRVGGNetCompact, 64 features, 16 convolutions (realesr-animevideov3's size);
- rrdb: RRDBNet, 64 features, 23 blocks (RealESRGAN_x4plus's size).
Each arch upscales the same synthetic H.264 clip 4x at a fixed frame size, three ways, each in a
fresh subprocess (so peak RSS is its own):
Timing starts once the weights are loaded, as in a running service.

- plain: decode all frames, call spandrel's model on one frame at a time in fp32, then encode all;
- serial: t2v's Upscaler (batches) with decode, upscale and encode taking turns in one thread;
- overlapped: `upscale_file`, where decoding and encoding run in their own threads beside the model.

`--formats` times the upscaler alone (uint8 frames in, uint8 frames out, no video) on one batch,
with the weights and input in the default (NCHW) memory format against channels_last (NHWC), on
the CPU or a GPU (fp16 there). The two run interleaved on the same weights, after a warm-up at the
same shapes, and the median of the repeats is kept: on a shared machine, drift hits both alike.
The last column is the process's CPU time (all threads): with one thread (--threads 1) it is the
work done, little changed by other processes on the machine.

    python bench/upscale.py
    python bench/upscale.py --arch compact --frames 192
    python bench/upscale.py --formats                       # CPU, fp32, the sizes above
    python bench/upscale.py --formats --device cuda         # GPU, fp16, 960x544 (HunyuanVideo's 544p)
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

ARCHS = {"compact": {"frames": 96, "size": (128, 72)}, "rrdb": {"frames": 16, "size": (64, 36)}}
GPU_SIZE = (960, 544)


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


def make_weights(folder: Path, arch: str) -> Path:
    from pipeline import tiny

    path = folder / f"{arch}.pth"
    if arch == "compact":
        tiny.write_release_pth(path, tiny.compact_state(num_feat=64, num_conv=16, seed=0), "params")
    else:
        tiny.write_release_pth(path, tiny.rrdbnet_state(num_feat=64, num_block=23), "params_ema")
    return path


def run_plain(clip: Path, weights: Path, output: Path) -> int:
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
            upscaled.append(np.ascontiguousarray(
                model(x)[0].clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).numpy()))
    with VideoWriter(output, fps=24, crf=18) as writer:
        for frame in upscaled:
            writer.write(frame)
    return len(upscaled), time.perf_counter() - started


def run_serial(clip: Path, weights: Path, output: Path) -> int:
    from pipeline.upscale import Upscaler
    from pipeline.video import VideoWriter, read_frames

    upscaler = Upscaler(weights, "cpu", batch=4)
    started = time.perf_counter()
    with VideoWriter(output, fps=24, crf=18) as writer:
        for frame in upscaler.stream(read_frames(clip)):
            writer.write(frame)
    return writer.frames, time.perf_counter() - started


def run_overlapped(clip: Path, weights: Path, output: Path) -> int:
    from pipeline.run import upscale_file
    from pipeline.upscale import Upscaler

    upscaler = Upscaler(weights, "cpu", batch=4)
    started = time.perf_counter()
    return upscale_file(clip, output, upscaler, 4, crf=18).frames, time.perf_counter() - started


MODES = {"plain": run_plain, "serial": run_serial, "overlapped": run_overlapped}


def measure(mode: str, clip: str, weights: str, output: str) -> None:
    """Child process: one mode; prints seconds (after the model is loaded), frames and peak RSS as JSON."""
    import torch

    frames, seconds = MODES[mode](Path(clip), Path(weights), Path(output))
    print(json.dumps({"seconds": seconds, "frames": frames, "threads": torch.get_num_threads(),
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def compare_formats(arch: str, device: str, size: tuple[int, int], batch: int, repeats: int,
                    folder: Path) -> dict[str, tuple[float, float]]:
    """Median (wall, process CPU) seconds per batch, contiguous against channels_last, on the same weights."""
    import numpy as np

    from pipeline.upscale import Upscaler

    width, height = size
    frames = np.random.default_rng(0).integers(0, 256, (batch, height, width, 3), dtype=np.uint8)
    weights = make_weights(folder, arch)
    upscalers = {name: Upscaler(weights, device, batch=batch, channels_last=name == "channels_last")
                 for name in ("contiguous", "channels_last")}
    seconds = {name: [] for name in upscalers}
    for up in upscalers.values():
        up.upscale(frames)  # warm-up at the measured shapes
    for _ in range(repeats):
        for name, up in upscalers.items():
            wall, cpu = time.perf_counter(), time.process_time()
            up.upscale(frames)  # ends with the frames back on the host as uint8, so the GPU has finished
            seconds[name].append((time.perf_counter() - wall, time.process_time() - cpu))
    return {name: tuple(sorted(column)[len(column) // 2] for column in zip(*s)) for name, s in seconds.items()}


def print_formats(args, folder: Path) -> None:
    import torch

    dtype = "fp16" if args.device.startswith("cuda") else "fp32"
    print("| arch | device | dtype | batch | input | format | s/batch | frames/s | vs contiguous | CPU s/batch |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for arch in args.arch:
        width, height = GPU_SIZE if args.device.startswith("cuda") else ARCHS[arch]["size"]
        medians = compare_formats(arch, args.device, (width, height), args.batch, args.repeats, folder)
        where = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else \
            f"cpu ({torch.get_num_threads()} threads)"
        for name, (wall, cpu) in medians.items():
            print(f"| {arch} | {where} | {dtype} | {args.batch} | {width}x{height} | {name} | {wall:.3f} "
                  f"| {args.batch / wall:.2f} | {medians['contiguous'][0] / wall:.2f}x | {cpu:.3f} |", flush=True)


def child(*args: str) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--arch", choices=ARCHS, nargs="+", default=list(ARCHS))
    parser.add_argument("--frames", type=int, help="override the clip length for every arch")
    parser.add_argument("--formats", action="store_true", help="compare memory formats instead (upscaler alone)")
    parser.add_argument("--device", default="cpu", help="--formats: cpu, cuda or cuda:N")
    parser.add_argument("--batch", type=int, default=4, help="--formats: frames per batch")
    parser.add_argument("--repeats", type=int, default=5, help="--formats: timed runs of each format")
    parser.add_argument("--threads", type=int, help="--formats: torch CPU threads (default: torch's choice)")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        measure(*args.child)
        return
    if args.formats:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        with tempfile.TemporaryDirectory() as tmp:
            print_formats(args, Path(tmp))
        return
    print("| arch | frames | input | output | mode | frames/s | output MP/s | vs plain | peak RSS (MB) |")
    print("|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for arch in args.arch:
            frames = args.frames or ARCHS[arch]["frames"]
            width, height = ARCHS[arch]["size"]
            clip, weights = make_clip(folder, frames, width, height), make_weights(folder, arch)
            plain_fps = None
            for mode in MODES:
                r = child(mode, str(clip), str(weights), str(folder / f"{mode}.mp4"))
                assert r["frames"] == frames, r
                fps = frames / r["seconds"]
                plain_fps = plain_fps or fps
                megapixels = fps * 16 * width * height / 1e6
                print(f"| {arch} | {frames} | {width}x{height} | {4 * width}x{4 * height} | {mode} | {fps:.2f} "
                      f"| {megapixels:.2f} | {fps / plain_fps:.2f}x | {r['peak_rss_mb']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
