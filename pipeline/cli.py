"""The command line shared by `test.py` (smoke run) and `finalpipeline.py` (full upscaled run).

Everything a user can get wrong is checked before torch is imported or a model loads, and answered
with exit code 2 and a one-line reason.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from config import MEMORY_PRESETS, ConfigError, Settings
from pipeline.spec import DEFAULT_FPS, DEFAULT_HEIGHT, DEFAULT_WIDTH, JobParams, Limits, ParamError

EXIT_USAGE = 2


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with usage errors as one line and exit code 2."""

    def error(self, message):  # one line, not argparse's usage block
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def build_parser(prog: str, description: str, upscale: bool) -> argparse.ArgumentParser:
    p = ArgumentParser(prog=prog, description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--prompt", required=True, help="what the video shows (1-2000 characters)")
    p.add_argument("--negative-prompt", help="what to avoid; turns on true CFG, which doubles the work per step")
    p.add_argument("--width", type=int, default=DEFAULT_WIDTH, help="frame width, a multiple of 16")
    p.add_argument("--height", type=int, default=DEFAULT_HEIGHT, help="frame height, a multiple of 16")
    p.add_argument("--num-frames", type=int, default=129, help="frame count, 4k+1 (129 is about 5 s at 24 fps)")
    p.add_argument("--fps", type=int, default=DEFAULT_FPS, help="frame rate of the MP4 (1-60)")
    p.add_argument("--steps", type=int, default=30, help="denoising steps (1-100)")
    p.add_argument("--guidance", type=float, default=6.0, help="embedded guidance scale")
    p.add_argument("--seed", type=int, help="random seed; picked and printed when absent")
    p.add_argument("--output", type=Path, help="MP4 to write (default: outputs/t2v_<seed>.mp4)")
    p.add_argument("--model", help="diffusers model folder, or 'tiny' for a random-weight test model "
                                   "(default: $T2V_MODEL or ./models/HunyuanVideo)")
    p.add_argument("--memory", choices=MEMORY_PRESETS,
                   help="GPU memory preset; 'auto' picks from free VRAM (default: $T2V_MEMORY or auto)")
    if upscale:
        p.add_argument("--upscaler", help="Real-ESRGAN weights: a .pth/.safetensors path, a release name "
                                          "(RealESRGAN_x4plus, realesr-animevideov3, ...), 'tiny' or 'none' "
                                          "(default: $T2V_UPSCALER or ./models/RealESRGAN_x4plus.pth)")
        p.add_argument("--outscale", type=int, choices=(2, 4), default=4, help="output size over generated size")
    return p


def main(argv: list[str] | None, prog: str, description: str, upscale: bool) -> int:
    args = build_parser(prog, description, upscale).parse_args(argv)
    try:
        overrides = {k: v for k, v in (("model", args.model), ("memory", args.memory),
                                       ("upscaler", getattr(args, "upscaler", None))) if v}
        settings = Settings.from_env(**overrides)
        params = JobParams.from_dict({
            "prompt": args.prompt, "negative_prompt": args.negative_prompt, "width": args.width,
            "height": args.height, "num_frames": args.num_frames, "fps": args.fps,
            "num_inference_steps": args.steps, "guidance_scale": args.guidance, "seed": args.seed,
            "upscale": upscale and settings.upscaler != "none", "outscale": getattr(args, "outscale", 4),
        }, Limits.from_settings(settings))
        output = args.output or Path(settings.output_dir) / f"t2v_{params.seed}.mp4"
        check_writable(output)
        check_weights(settings, params)
    except (ConfigError, ParamError, ValueError, FileNotFoundError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from pipeline.run import Models, run_job
    from pipeline.upscale import UpscalerLoadError

    models = Models(settings, progress_bar=True)
    try:
        if params.upscale:
            models.upscaler  # a broken file fails now, not after the whole generation
    except UpscalerLoadError as exc:
        print(f"{prog}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return EXIT_USAGE
    cuda = os.environ.get("CUDA_DEVICE_ID")
    print(f"seed {params.seed}; device {settings.device}" + (f" (CUDA_DEVICE_ID={cuda})" if cuda else ""))
    if models.generator.is_tiny:
        print("note: this is the tiny random-weight model; its video is noise, by design")
    result = run_job(params, settings, models=models, output=output, progress_bar=True)
    print(f"wrote {result.path} ({result.width}x{result.height}, {result.frames} frames at {result.fps} fps, "
          f"{result.size_bytes / 1e6:.2f} MB)")
    print("time per stage: " + ", ".join(f"{k} {v:.2f}s" for k, v in result.timings_s.items()))
    return 0


def check_writable(output: Path) -> None:
    """Fail before any model loads if the MP4 cannot be written where asked."""
    if output.suffix.lower() != ".mp4":
        raise ValueError(f"--output must end in .mp4, got {output}")
    parent = output.parent if str(output.parent) else Path(".")
    if output.is_dir():
        raise ValueError(f"--output {output} is a directory")
    existing = next((p for p in [parent, *parent.parents] if p.exists()), Path("."))
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise ValueError(f"cannot write {output}: {existing} is not a writable folder")


def check_weights(settings: Settings, params: JobParams) -> None:
    """Name a missing weight file, and what to run, before any model loads."""
    from pipeline.generate import resolve_model_dir
    from pipeline.upscale import resolve_upscaler

    resolve_model_dir(settings.model, settings.data_dir)
    if params.upscale:
        resolve_upscaler(settings.upscaler, settings.models_dir, settings.data_dir)
