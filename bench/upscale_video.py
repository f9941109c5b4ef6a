"""upscale.py end to end against a plain loop, on the same weights, in the same run, as the clip grows.

The clip, the weights and both ways of running them are bench/upscale.py's: the fixed synthetic
H.264 clip, seeded random SRVGGNetCompact weights of full size (64 features, 16 convolutions: the
size of realesr-animevideov3), and each measurement in a fresh subprocess so its peak RSS is its own.

- pipeline: `upscale_file`, as `python upscale.py` runs it: a decoder thread, batches of 4 frames
  through the model, and an encoder thread, all overlapping ("overlapped" in bench/upscale.py).
- plain: decode every frame into a list, upscale them one at a time in fp32 with spandrel's model,
  then encode them all: the shape of the project this replaces.

    python bench/upscale_video.py                         # 96 frames of 128x72 -> 512x288
    python bench/upscale_video.py --frames 48 192 384 --size 160x90
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from upscale import child, make_clip, make_weights  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--frames", type=int, nargs="+", default=[96], help="clip lengths to run")
    parser.add_argument("--size", default="128x72", help="input WxH (output is 4x)")
    args = parser.parse_args()
    width, height = map(int, args.size.lower().split("x"))
    print("| frames | input | output | pipeline fps | plain fps | ratio | pipeline peak RSS (MB) | plain peak RSS (MB) |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        weights = make_weights(folder, "compact")
        for frames in args.frames:
            clip = make_clip(folder, frames, width, height)
            pipe = child("overlapped", str(clip), str(weights), str(folder / "pipeline.mp4"))
            plain = child("plain", str(clip), str(weights), str(folder / "plain.mp4"))
            assert pipe["frames"] == plain["frames"] == frames
            pipe_fps, plain_fps = frames / pipe["seconds"], frames / plain["seconds"]
            print(f"| {frames} | {width}x{height} | {4 * width}x{4 * height} | {pipe_fps:.2f} | {plain_fps:.2f} "
                  f"| {pipe_fps / plain_fps:.2f} | {pipe['peak_rss_mb']:.0f} | {plain['peak_rss_mb']:.0f} |",
                  flush=True)


if __name__ == "__main__":
    main()
