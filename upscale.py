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
from pipeline.cli import EXIT_USAGE, ArgumentParser, check_writable, human_size, setting_flag, setting_overrides

PROG = "upscale.py"


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog=PROG, description="Upscale an existing clip with Real-ESRGAN, keeping its frame "
                                               "rate, frame count and audio, and write an H.264 MP4.",
                       epilog="Example: python upscale.py --input old.mov --output old_4x.mp4 "
                              "--upscaler realesr-animevideov3")
    p.add_argument("--input", type=Path, required=True, metavar="FILE", help="the clip to upscale")
    p.add_argument("--output", type=Path, required=True, metavar="FILE", help="the MP4 to write")
    p.add_argument("--outscale", type=int, choices=(2, 4), default=4, help="output size over input size (default: 4)")
    p.add_argument("--fp32", action="store_true", help="run the upscaler in float32 even on a GPU "
                                                       "(default: float16 where the GPU and the weights allow)")
    setup = p.add_argument_group("settings (each overrides its environment variable)")
    setting_flag(setup, "upscaler", "Real-ESRGAN weights: a .pth/.safetensors file, a release name "
                                    "(RealESRGAN_x4plus, realesr-animevideov3, ...) or 'tiny'")
    setting_flag(setup, "upscale_tile", "tile size in pixels; 0 = whole frames", "--tile")
    setting_flag(setup, "upscale_batch", "frames per upscaler batch", "--batch")
    setting_flag(setup, "crf", "H.264 quality, 0-51: lower is better and bigger")
    setting_flag(setup, "models_dir", "where upscaler release names are looked up")
    setting_flag(setup, "data_dir", "where the tiny test upscaler is built")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from pipeline.upscale import UpscalerLoadError, resolve_upscaler
    from pipeline.video import VideoInputError, inspect_video

    overrides = setting_overrides(args)
    try:
        settings = Settings.from_env(**overrides)
        if not args.input.is_file():
            raise ValueError(f"--input {args.input} is not a file")
        info = inspect_video(args.input)
        check_writable(args.output)
        if args.output.resolve() == args.input.resolve():
            raise ValueError("--output must not overwrite --input")
        resolve_upscaler(settings.upscaler, settings.models_dir, settings.data_dir, none_ok=False)
    except (ConfigError, ValueError, VideoInputError, UpscalerLoadError) as exc:
        print(f"{PROG}: error: {parser.explain(exc, overrides)}", file=sys.stderr)
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
          f"{human_size(result.size_bytes)})")
    print("time per stage: " + ", ".join(f"{k} {v:.2f}s" for k, v in result.timings_s.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
