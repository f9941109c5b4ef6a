"""`JobParams`: what one generation job asks for, validated the same way for the CLI and the API."""

from __future__ import annotations

import secrets
from dataclasses import asdict, dataclass, fields
from typing import Any

DEFAULT_WIDTH, DEFAULT_HEIGHT = 960, 544
DEFAULT_FPS = 24  # HunyuanVideo's native frame rate
OUTSCALES = (2, 4)
MAX_SEED = 2**32 - 1


# HunyuanVideo's own resolutions (its README): (tier, aspect, width, height).
SIZE_PRESETS = (
    ("540p", "16:9", 960, 544), ("540p", "9:16", 544, 960), ("540p", "1:1", 720, 720),
    ("720p", "16:9", 1280, 720), ("720p", "9:16", 720, 1280), ("720p", "1:1", 960, 960),
)


def size_presets(max_side: int) -> list[dict]:
    """The presets this deployment allows; if none fit T2V_MAX_SIDE, each aspect scaled down to fit."""
    fitting = [{"label": f"{tier} {aspect}", "width": w, "height": h}
               for tier, aspect, w, h in SIZE_PRESETS if max(w, h) <= max_side]
    if fitting:
        return fitting
    short = max(16, max_side * 9 // 16 // 16 * 16)
    return [{"label": f"{aspect} (small)", "width": w, "height": h}
            for aspect, w, h in (("16:9", max_side, short), ("9:16", short, max_side), ("1:1", max_side, max_side))]


class ParamError(ValueError):
    """A parameter breaks a rule. `field` names it; the message says the rule."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class Limits:
    """The caps a deployment sets (from `Settings`); the defaults are the model's own limits."""

    max_prompt_chars: int = 2000
    max_side: int = 1280
    max_frames: int = 129
    max_steps: int = 100

    @classmethod
    def from_settings(cls, settings) -> "Limits":
        return cls(**{f.name: getattr(settings, f.name) for f in fields(cls)})


@dataclass(frozen=True)
class JobParams:
    prompt: str
    negative_prompt: str | None = None
    width: int = DEFAULT_WIDTH
    height: int = DEFAULT_HEIGHT
    num_frames: int = 129
    fps: int = DEFAULT_FPS
    num_inference_steps: int = 30
    guidance_scale: float = 6.0
    seed: int | None = None
    upscale: bool = True
    outscale: int = 4

    @classmethod
    def from_dict(cls, data: Any, limits: Limits = Limits()) -> "JobParams":
        """Validate untrusted input (a JSON body or CLI flags) and fill defaults; a missing seed is picked here."""
        if not isinstance(data, dict):
            raise ParamError("body", "must be a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(k for k in data if k not in known)
        if unknown:
            raise ParamError(unknown[0], "is not a known parameter")
        values = {k: v for k, v in data.items() if not (v is None and k in NULLABLE)}  # null there = absent
        if "prompt" not in values:
            raise ParamError("prompt", "is required")

        prompt = _text(values, "prompt", limits.max_prompt_chars, required=True)
        negative = _text(values, "negative_prompt", limits.max_prompt_chars, required=False)
        width = _int(values, "width", DEFAULT_WIDTH, 16, limits.max_side)
        height = _int(values, "height", DEFAULT_HEIGHT, 16, limits.max_side)
        for name, value in (("width", width), ("height", height)):
            if value % 16:
                raise ParamError(name, f"must be a multiple of 16, got {value}")
        num_frames = _int(values, "num_frames", limits.max_frames, 1, limits.max_frames)
        if num_frames % 4 != 1:
            raise ParamError("num_frames", f"must be of the form 4k+1 (1, 5, 9, ... {limits.max_frames}), got {num_frames}")
        seed = _int(values, "seed", None, 0, MAX_SEED)
        upscale = values.get("upscale", True)
        if not isinstance(upscale, bool):
            raise ParamError("upscale", "must be true or false")
        outscale = _int(values, "outscale", 4, 2, 4)
        if outscale not in OUTSCALES:
            raise ParamError("outscale", f"must be 2 or 4, got {outscale}")
        return cls(
            prompt=prompt,
            negative_prompt=negative,
            width=width,
            height=height,
            num_frames=num_frames,
            fps=_int(values, "fps", DEFAULT_FPS, 1, 60),
            num_inference_steps=_int(values, "num_inference_steps", min(30, limits.max_steps), 1, limits.max_steps),
            guidance_scale=_float(values, "guidance_scale", 6.0, 1.0, 30.0),
            seed=secrets.randbelow(MAX_SEED + 1) if seed is None else seed,
            upscale=upscale,
            outscale=outscale,
        )

    def to_dict(self) -> dict:
        return asdict(self)


# Fields where JSON null means "not given"; anywhere else null is a type error.
NULLABLE = {"seed", "negative_prompt"}


def _text(values: dict, name: str, max_chars: int, required: bool) -> str | None:
    value = values.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str):
        raise ParamError(name, "must be a string")
    if "\x00" in value:
        raise ParamError(name, "must not contain NUL characters")
    if not value.strip():
        if required:
            raise ParamError(name, "must not be blank")
        return None
    if len(value) > max_chars:
        raise ParamError(name, f"must be at most {max_chars} characters, got {len(value)}")
    return value


def _int(values: dict, name: str, default, low: int, high: int):
    value = values.get(name, default)
    if value is None and default is None:
        return None
    # bool is an int in Python; a JSON `true` is not a width.
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ParamError(name, "must be an integer")
    if not low <= value <= high:
        raise ParamError(name, f"must be between {low} and {high}, got {value}")
    return value


def _float(values: dict, name: str, default: float, low: float, high: float) -> float:
    value = values.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ParamError(name, "must be a number")
    if not low <= value <= high:
        raise ParamError(name, f"must be between {low} and {high}, got {value}")
    return float(value)
