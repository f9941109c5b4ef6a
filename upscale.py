"""Upscale an existing clip with Real-ESRGAN:  python upscale.py --input clip.mp4 --output clip_4x.mp4

Reads anything PyAV decodes (mp4, mov, mkv, webm, gif, ...), keeps the frame rate, the frame count
and the audio, and writes an H.264 MP4. Decoding, upscaling and encoding overlap in their own threads.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from config import ConfigError, Settings
from pipeline.cli import EXIT_USAGE, ArgumentParser, check_writable

PROG = "upscale.py"


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog=PROG, description="Upscale an existing clip with Real-ESRGAN, keeping its frame "
                                               "rate, frame count and audio, and write an H.264 MP4.",
                epilog="Example: python upscale.py --input old.mov --output old_4x.mp4 --upscaler realesr-animevideov3",
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--input", type=Path, required=True, help="the clip to upscale")
    p.add_argument("--output", type=Path, required=True, help="the MP4 to write")
    p.add_argument("--upscaler", help="Real-ESRGAN weights: a .pth/.safetensors path, a release name "
                                      "(RealESRGAN_x4plus, realesr-animevideov3, ...) or 'tiny' "
                                      "(default: $T2V_UPSCALER or ./models/RealESRGAN_x4plus.pth)")
    p.add_argument("--outscale", type=int, choices=(2, 4), default=4, help="output size over input size")
    p.add_argument("--tile", type=int, help="tile size in pixels, 0 for whole frames (default: $T2V_UPSCALE_TILE)")
    p.add_argument("--batch", type=int, help="frames per upscaler batch (default: $T2V_UPSCALE_BATCH)")
    p.add_argument("--crf", type=int, help="H.264 quality, 0-51, lower is better (default: $T2V_CRF or 18)")
    p.add_argument("--fp32", action="store_true", help="run the upscaler in float32 even on a GPU")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from pipeline.upscale import resolve_upscaler
    from pipeline.video import VideoInputError, inspect_video

    try:
        overrides = {k: v for k, v in (("upscaler", args.upscaler), ("upscale_tile", args.tile),
                                       ("upscale_batch", args.batch), ("crf", args.crf)) if v is not None}
        settings = Settings.from_env(**overrides)
        if settings.upscaler == "none":
            raise ValueError("--upscaler none has nothing to do here; name the weights to use")
        if not args.input.is_file():
            raise ValueError(f"--input {args.input} is not a file")
        info = inspect_video(args.input)
        check_writable(args.output)
        if args.output.resolve() == args.input.resolve():
            raise ValueError("--output must not overwrite --input")
        resolve_upscaler(settings.upscaler, settings.models_dir, settings.data_dir)
    except (ConfigError, ValueError, VideoInputError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from pipeline.run import Models, upscale_file

    print(f"{args.input}: {info.width}x{info.height}, {info.frames} frames at {info.fps:g} fps, "
          f"audio {info.audio_codec or 'none'}; device {settings.device}")
    upscaler = Models(settings, half_upscaler=False if args.fp32 else None).upscaler
    print(f"upscaler {upscaler.path.name} ({upscaler.architecture}, {upscaler.scale}x, {upscaler.dtype})")
    try:
        result = upscale_file(args.input, args.output, upscaler, args.outscale, settings.crf, progress_bar=True,
                              info=info)
    except VideoInputError as exc:
        print(f"{PROG}: error: {args.input}: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {result.path} ({result.width}x{result.height}, {result.frames} frames at {result.fps:g} fps, "
          f"{result.size_bytes / 1e6:.2f} MB)")
    print("time per stage: " + ", ".join(f"{k} {v:.2f}s" for k, v in result.timings_s.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
