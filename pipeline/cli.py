"""The command line shared by `test.py` (smoke run) and `finalpipeline.py` (full upscaled run), and the
argparse pieces every script uses: one-line usage errors, and settings flags whose help names their variable.

Everything a user can get wrong is checked before torch is imported or a model loads, and answered
with exit code 2 and a one-line reason, in the words of the command line.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import re
import sys
import tempfile
from pathlib import Path

from config import BOOL_WORDS, ENV_NAMES, MEMORY_PRESETS, ConfigError, Settings, parse_bool
from pipeline.models import LORA_NAME
from pipeline.spec import (DEFAULT_FPS, DEFAULT_HEIGHT, DEFAULT_WIDTH, JobParams, Limits, ParamError, Rules,
                           check_image, load_image)

EXIT_USAGE = 2

# The job parameters a CLI user types, by their JSON name (the API's). CLI errors name the flag, API errors the field.
PARAM_FLAGS = {
    "prompt": "--prompt", "negative_prompt": "--negative-prompt", "width": "--width", "height": "--height",
    "num_frames": "--num-frames", "fps": "--fps", "num_inference_steps": "--steps", "guidance_scale": "--guidance",
    "seed": "--seed", "outscale": "--outscale", "audio": "--audio",
}
# Every field an error may name, as its flag: the job parameters, the image and the LoRAs ("loras[0].scale").
FIELD_FLAGS = {**PARAM_FLAGS, "image": "--image", "loras": "--lora"}
_TYPES = {"Path": Path, "int": int, "int | None": int, "float": float}
# --model and --upscaler mean the same in every script (test.py, finalpipeline.py, app.py, worker.py): one text each.
MODEL_HELP = ("a model id (python download.py --list), a diffusers model folder, or 'tiny' / 'tiny:<id>' for a "
              "random-weight test model")
UPSCALER_HELP = ("Real-ESRGAN weights: a .pth/.safetensors file, a release name (RealESRGAN_x4plus, "
                 "realesr-animevideov3, ...), 'tiny', or 'none' to skip")


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with usage errors as one line and exit code 2."""

    def error(self, message):  # one line, not argparse's usage block
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")

    def explain(self, exc: Exception, overrides: dict) -> str:
        """An error in the words of the command line: a job field as its flag (`--steps`, not
        `num_inference_steps`), and a setting given as a flag as that flag rather than its environment variable."""
        message = " ".join(str(exc).split())
        top = re.match(r"\w+", exc.field) if isinstance(exc, ParamError) else None
        if top and top[0] in FIELD_FLAGS:
            message = re.sub(rf"\b{re.escape(exc.field)}(?![\w.\[])", FIELD_FLAGS[top[0]], message, count=1)
        flags = {action.dest: action.option_strings[0] for action in self._actions if action.option_strings}
        for name in overrides:
            message = re.sub(rf"\b{ENV_NAMES[name]}\b", flags[name], message)
        return message


def shown(value) -> str:
    """A default as help shows it: ./models rather than models, unset rather than None."""
    if value is None:
        return "unset"
    if isinstance(value, Path) and not value.is_absolute():
        return f"./{value.as_posix()}"
    return str(value).lower() if isinstance(value, bool) else str(value)


def setting_flag(parser: argparse.ArgumentParser, name: str, text: str, *flags: str, **kwargs) -> None:
    """A flag that overrides the Settings field `name`; its help names the environment variable and the default."""
    kind = Settings.__dataclass_fields__[name].type
    if kind.removesuffix(" | None") == "bool":  # `--compile` alone is on; `--compile 0` off, as T2V_COMPILE=0
        kwargs.update(type=bool_flag, nargs="?", const=True, metavar="1|0")
        text = f"{text}; {BOOL_WORDS}"
    elif "choices" not in kwargs:
        kwargs.setdefault("type", _TYPES.get(kind, str))
        kwargs.setdefault("metavar", name.split("_")[-1].upper())
    parser.add_argument(*(flags or ["--" + name.replace("_", "-")]), dest=name, **kwargs,
                        help=f"{text} (${ENV_NAMES[name]}; default: {shown(getattr(Settings, name))})")


def bool_flag(text: str) -> bool:
    """An argparse type for an on/off setting, read as its environment variable is (config.parse_bool)."""
    try:
        return parse_bool(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def setting_overrides(args: argparse.Namespace) -> dict:
    """The Settings fields given as flags."""
    return {name: value for name in Settings.__dataclass_fields__ if (value := getattr(args, name, None)) is not None}


def build_parser(prog: str, description: str, upscale: bool) -> argparse.ArgumentParser:
    p = ArgumentParser(prog=prog, description=description,
                       epilog="Every other setting comes from the environment or .env; .env.example lists them all.")
    job = p.add_argument_group("the video")

    def param(name: str, text: str, **kwargs):
        job.add_argument(PARAM_FLAGS[name], dest=name, help=text, **kwargs)

    param("prompt", "what the video shows (1-2000 characters)", required=True)
    param("negative_prompt", "what to avoid; turns on true CFG, which doubles the work per step (default: none)",
          metavar="TEXT")
    param("width", f"frame width, a multiple of the model's size step (default: the model's own; {DEFAULT_WIDTH} for "
          "HunyuanVideo, 64 for a tiny build)", type=int)
    param("height", f"frame height (default: the model's own; {DEFAULT_HEIGHT} for HunyuanVideo, 64 for a tiny "
          "build)", type=int)
    param("num_frames", f"frame count, 4k+1; 129 is about 5 s at 24 fps (default: the model's own; {Limits.max_frames} "
                        "for HunyuanVideo, 9 for a tiny build; at most $T2V_MAX_FRAMES)", type=int, metavar="N")
    param("fps", f"frame rate of the MP4, 1-60 (default: the model's own; {DEFAULT_FPS} for HunyuanVideo and Wan 2.2 "
                 "TI2V-5B, 16 for the other Wan models)", type=int)
    param("num_inference_steps", "denoising steps, 1-100 (default: the model's own; 30 for HunyuanVideo, 4 for a "
                                 "tiny build)", type=int, metavar="N")
    param("guidance_scale", "guidance scale (default: the model's own; 6.0 for HunyuanVideo, 3.5-5.0 for Wan)",
          type=float, metavar="SCALE")
    param("seed", "random seed (default: picked at random and printed)", type=int)
    if upscale:
        param("outscale", "output size over generated size (default: 4)", type=int, choices=(2, 4))
    param("audio", "the clip's own sound as an AAC track, for a model that makes it (LTX-2); --no-audio writes a "
          "silent MP4 (default: on for such a model)", action=argparse.BooleanOptionalAction)
    job.add_argument("--image", type=Path, metavar="FILE",
                     help="a PNG, JPEG or WebP to start the video from, for a model that takes an image "
                          "(at most $T2V_MAX_IMAGE_MB MB and $T2V_MAX_IMAGE_PIXELS pixels)")
    job.add_argument("--lora", dest="loras", action="append", type=lora_flag, metavar="NAME[:SCALE]",
                     help="a LoRA installed as models/loras/NAME.safetensors, at SCALE (default 1.0); repeatable")
    job.add_argument("--output", type=Path, metavar="FILE",
                     help="the MP4 to write (default: ./outputs/t2v_<seed>.mp4, in $T2V_OUTPUT_DIR)")
    job.add_argument("--enhance-prompt", action="store_true",
                     help="first ask the model's own prompt enhancer (LTX-2) for a richer prompt, print it, and ask "
                          "on stdin whether to render it instead of yours")
    job.add_argument("--yes", action="store_true",
                     help="with --enhance-prompt: render the suggestion without asking")

    setup = p.add_argument_group("models and settings (each overrides its environment variable)")
    setting_flag(setup, "model", MODEL_HELP)
    setting_flag(setup, "memory", "GPU memory preset; 'auto' picks from free VRAM", choices=MEMORY_PRESETS)
    if upscale:
        setting_flag(setup, "upscaler", UPSCALER_HELP)
        setting_flag(setup, "upscale_tile", "upscaler tile size in pixels; 0 = whole frames")
        setting_flag(setup, "upscale_batch", "frames per upscaler batch")
    setting_flag(setup, "crf", "H.264 quality, 0-51: lower is better and bigger")
    setting_flag(setup, "fp8", "store transformer weights in float8")
    setting_flag(setup, "vae_tiling", "decode the VAE in tiles")
    setting_flag(setup, "fbc_threshold", "First Block Cache threshold, e.g. 0.05; 0 turns it off")
    setting_flag(setup, "attention_backend", "diffusers attention backend, e.g. native, flash_varlen, sage_varlen")
    setting_flag(setup, "compile", "regional torch.compile of the transformer blocks")
    setting_flag(setup, "data_dir", "where tiny test models are built")
    setting_flag(setup, "models_dir", "where model ids and upscaler release names are looked up")
    return p


def main(argv: list[str] | None, prog: str, description: str, upscale: bool) -> int:
    parser = build_parser(prog, description, upscale)
    args = parser.parse_args(argv)
    overrides = setting_overrides(args)
    try:
        settings = Settings.from_env(**overrides)
        given = {name: value for name in PARAM_FLAGS if (value := getattr(args, name, None)) is not None}
        if args.loras:
            given["loras"] = args.loras
        image = read_image(args.image, settings) if args.image is not None else None
        params = JobParams.from_dict({**given, "upscale": upscale and settings.upscaler != "none"},
                                     Rules.from_settings(settings),  # a tiny model gets tiny defaults
                                     with_image=image is not None)
        enhance = enhance_params(args, params, settings)
        output = args.output or Path(settings.output_dir) / f"t2v_{params.seed}.mp4"
        check_writable(output)
        check_weights(settings, params)
    except (ConfigError, ParamError, ValueError, FileNotFoundError) as exc:
        print(f"{prog}: error: {parser.explain(exc, overrides)}", file=sys.stderr)
        return EXIT_USAGE

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from pipeline.lora import LoraError
    from pipeline.families import EnhancerUnavailable
    from pipeline.run import EmptySuggestion, Models, run_job
    from pipeline.upscale import UpscalerLoadError

    models = Models(settings, progress_bar=True)
    try:
        if params.upscale:
            models.upscaler  # a broken file fails now, not after the whole generation
    except UpscalerLoadError as exc:
        print(f"{prog}: error: {parser.explain(exc, overrides)}", file=sys.stderr)
        return EXIT_USAGE
    cuda = os.environ.get("CUDA_DEVICE_ID")
    print(f"seed {params.seed}; device {settings.device}" + (f" (CUDA_DEVICE_ID={cuda})" if cuda else ""))
    if models.generator.is_tiny:
        print("note: this is the tiny random-weight model; its video is noise, by design")
    if enhance is not None:
        try:
            params = chosen_prompt(params, enhance, settings, models, image, args.yes)
        except NoAnswer as exc:
            print(f"{prog}: error: {exc}", file=sys.stderr)
            return EXIT_USAGE
        except (EmptySuggestion, EnhancerUnavailable) as exc:
            print(f"{prog}: {exc}", file=sys.stderr)
            return 1
    try:
        result = run_job(params, settings, models=models, output=output, progress_bar=True, image=image)
    except LoraError as exc:  # a file that does not load into this model, or a setting LoRAs cannot go with
        print(f"{prog}: error: {parser.explain(exc, overrides)}", file=sys.stderr)
        return EXIT_USAGE
    sound = f", sound at {result.audio['sample_rate']} Hz" if result.audio else ""
    print(f"wrote {result.path} ({result.width}x{result.height}, {result.frames} frames at {result.fps} fps{sound}, "
          f"{human_size(result.size_bytes)})")
    print("time per stage: " + ", ".join(f"{k} {v:.2f}s" for k, v in result.timings_s.items()))
    return 0


class NoAnswer(ValueError):
    """stdin closed before the user said whether to take the suggestion."""


def enhance_params(args: argparse.Namespace, params: JobParams, settings: Settings):
    """The enhance job --enhance-prompt asks for (EnhanceParams), checked before any model loads; None without it."""
    from pipeline.spec import EnhanceParams

    if not args.enhance_prompt:
        if args.yes:
            raise ValueError("--yes takes the suggestion of --enhance-prompt; give both, or neither")
        return None
    try:
        return EnhanceParams.from_dict({"prompt": params.prompt, "model": params.model, "seed": params.seed},
                                       Rules.from_settings(settings))
    except ParamError as exc:
        raise ValueError(f"--enhance-prompt: {exc}") from None


def chosen_prompt(params: JobParams, enhance, settings: Settings, models, image, yes: bool) -> JobParams:
    """Print the model's suggestion, and take it if the user says so (or gave --yes): the job then renders it and
    keeps the user's own prompt as `original_prompt`. Declined, the job renders the user's prompt."""
    from pipeline.run import enhance_prompt

    suggestion = enhance_prompt(enhance, settings, models=models, image=image)["prompt"]
    print(f"suggested prompt ({params.model}'s enhancer):\n  {suggestion}")
    if not yes:
        print("render it instead of yours? [Y/n] ", end="", flush=True)
        answer = sys.stdin.readline()
        if not sys.stdin.isatty():
            print(answer.strip())  # what a pipe answered, so the log reads as a dialogue
        if not answer:
            raise NoAnswer("no answer on stdin to take the suggestion or not; pass --yes to take it without asking")
        if answer.strip().lower() not in ("", "y", "yes"):
            print("rendering your prompt")
            return params
    print("rendering the suggestion")
    return params.model_copy(update={"prompt": suggestion, "original_prompt": params.prompt})


def human_size(size_bytes: int) -> str:
    """A file size as people read it: 4.8 kB, 12.3 MB, 1.2 GB (powers of 1000), never 0.00 MB."""
    if size_bytes < 1000:
        return f"{size_bytes} B"
    value, unit = next((size_bytes / 1000**power, unit) for power, unit in ((3, "GB"), (2, "MB"), (1, "kB"))
                       if size_bytes >= 1000**power)
    return f"{value:.1f} {unit}"


def lora_flag(text: str) -> dict:
    """An argparse type: `NAME` or `NAME:SCALE` as a job's `loras` entry; JobParams checks the rest."""
    name, _, scale = text.rpartition(":") if ":" in text else (text, "", "")
    if not LORA_NAME.fullmatch(name):
        raise argparse.ArgumentTypeError(f"expected NAME or NAME:SCALE, with a LoRA's file name, got {text!r}")
    if not scale:
        return {"name": name}
    try:
        return {"name": name, "scale": float(scale)}
    except ValueError:
        raise argparse.ArgumentTypeError(f"the scale in {text!r} is not a number") from None


def read_image(path: Path, settings: Settings):
    """The --image file, checked as the API checks an uploaded image (its size, format and pixel cap) before any
    model loads, and turned upright by its EXIF orientation."""
    try:
        size = path.stat().st_size if path.is_file() else None
    except OSError:
        size = None
    if size is None:
        raise ParamError("image", f"{path} is not a file")
    if size > settings.max_image_mb * 2**20:
        raise ParamError("image", f"{path} is over {settings.max_image_mb} MB (T2V_MAX_IMAGE_MB)")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ParamError("image", f"{path} cannot be read ({exc.strerror})") from None
    check_image(data, settings.max_image_pixels)
    return load_image(io.BytesIO(data))


def check_writable(output: Path) -> None:
    """Fail before any model loads if the MP4 cannot be written where asked. Permission bits do not say it (root
    passes os.access on /proc), so the check writes: the file itself, or a scratch file in the nearest folder
    that exists when the rest is still to be made; what it made is removed."""
    if output.suffix.lower() != ".mp4":
        raise ValueError(f"--output must end in .mp4, got {output}")
    parent = output.parent if str(output.parent) else Path(".")
    if output.is_dir():
        raise ValueError(f"--output {output} is a directory")
    existing = next((p for p in [parent, *parent.parents] if p.exists()), Path("."))
    if not existing.is_dir():
        raise ValueError(f"cannot write {output}: {existing} is not a writable folder")
    try:
        if existing == parent:
            made = not output.exists()
            with open(output, "ab"):  # appends nothing: a file already there keeps its bytes
                pass
            if made:
                output.unlink()
        else:
            tempfile.TemporaryFile(dir=existing).close()
    except OSError as exc:
        raise ValueError(f"cannot write {output}: {exc.strerror or exc}") from None


def check_weights(settings: Settings, params: JobParams) -> None:
    """Name a missing weight file, and what to run, before any model loads."""
    from pipeline.generate import resolve_model_dir
    from pipeline.upscale import resolve_upscaler

    resolve_model_dir(settings.model, settings.data_dir, settings.models_dir)
    if params.upscale:
        resolve_upscaler(settings.upscaler, settings.models_dir, settings.data_dir)
