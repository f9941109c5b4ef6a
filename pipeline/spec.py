"""Job parameters, written once: `JobParams` (pydantic) checks every generation job for the CLI, the API
and the worker, and the API's OpenAPI schema is generated from the same classes.

The rules come in three layers:
- every job: the types, the prompt's text rules, seed, fps, guidance, upscale (on `JobParams` itself);
- per model: the frame rule (frame_multiple * k + 1), the size multiple, the longest clip, and the defaults
  (size preset, frames, steps, guidance, fps), all read from the registry entry (`pipeline.models`);
- per deployment (`Rules`): the caps (`Limits`: T2V_MAX_SIDE, T2V_MAX_FRAMES, T2V_MAX_STEPS,
  T2V_MAX_PROMPT_CHARS), which models it serves, whether they are tiny builds, the installed LoRAs.

`job_class(rules, model_id)` narrows `JobParams` to one model under one deployment: its fields carry the
bounds and defaults, so `request_schema` (its JSON Schema) and `from_dict` (its validation) cannot differ.

Contract with the callers (the API, the CLI, the worker):
- `JobParams.from_dict(data, rules, image_key=None)`: untrusted input in, a complete `JobParams` out, or a
  `ParamError(field, message)` that names the field and the rule (and the model, when the request named
  one: "wan2.2-ti2v-5b: num_frames must be of the form 4k+1 ..."). Absent values get the model's defaults;
  a tiny build's defaults and caps are small (64x64, 9 frames, 4 steps), so a CPU finishes in seconds.
  Passing a bare `Limits` as `rules` means: every registry id, full size, `hunyuanvideo` by default.
- `image_key` is set by the server only (the blob key of a checked image, `inputs/<reference_id>`); a
  request that carries `image_key` is refused. `check_image` is the check an image passes first. The CLI,
  whose image is a local file, passes `with_image=True` instead, for the same rules of what a model takes.
- JSON null means "not given" for the fields in NULLABLE, and is a type error anywhere else.
- `to_dict()` is what the job record stores; `JobParams(**record)` rebuilds it in the worker.
"""

from __future__ import annotations

import io
import json
import secrets
from dataclasses import dataclass, fields
from fractions import Fraction
from functools import lru_cache
from importlib.metadata import version
from typing import Annotated, Any, Literal, Mapping, Union, get_args

from pydantic import (
    AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, TypeAdapter, ValidationError,
    create_model, field_validator,
)
from pydantic.json_schema import SkipJsonSchema
from pydantic_core import PydanticCustomError

from pipeline import models as registry
from pipeline.models import DEFAULT_MODEL, MODELS, ModelEntry

# HunyuanVideo's, the default model's (the CLI's flag defaults read these).
DEFAULT_WIDTH, DEFAULT_HEIGHT = 960, 544
DEFAULT_FPS = 24
OUTSCALES = (2, 4)
MAX_SEED = 2**32 - 1
MAX_LORAS = 4
LORA_SCALE = 4.0  # a LoRA's scale lies in [-LORA_SCALE, LORA_SCALE]

# A tiny build makes noise; these keep its jobs to seconds on a CPU (issue 13: tiny means small).
TINY_SIDE, TINY_FRAMES, TINY_STEPS = 64, 9, 4
TINY_MAX_SIDE, TINY_MAX_FRAMES = 256, 33  # T2V_MAX_STEPS still caps steps: a long tiny run is how tests watch one
TINY_ASPECTS = ((1, 1), (2, 1), (1, 2))

IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")
IMAGE_KEY_PATTERN = r"^inputs/[A-Za-z0-9_-]{1,128}$"
PROMPT_PATTERN = r"^[^\x00]*[^\s\x00][^\x00]*$"  # not blank, no NUL
TEXT_PATTERN = r"^[^\x00]*$"

ORIGINAL_NOTE = ("the user's own prompt, when `prompt` is a suggestion they took (POST /prompts/enhance); "
                 "kept on the job record beside the prompt rendered")
AUDIO_NOTE = "the clip's own sound as an AAC track, for a model that makes it (LTX-2); false writes a silent MP4"
INPUTS = {"text": "text", "image": "image", "both": "text or image"}
# Fields where JSON null means "not given"; anywhere else null is a type error.
NULLABLE = {"seed", "negative_prompt", "original_prompt"}
# The fields whose bounds depend on the model chosen (its size multiple, frame rule and longest clip), and
# the errors that break those bounds: these name the model.
MODEL_FIELDS = {"width", "height", "num_frames"}
BOUND_ERRORS = {"greater_than_equal", "less_than_equal", "multiple_of", "frame_rule"}


class ParamError(ValueError):
    """A parameter breaks a rule. `field` names it; the message says the rule, and `model` the model whose
    rule it is, when the request named one."""

    def __init__(self, field: str, message: str, model: str | None = None):
        super().__init__(f"{model}: {field} {message}" if model else f"{field}: {message}")
        self.field, self.model, self.reason = field, model, message

    def renamed(self, names: Mapping[str, str]) -> "ParamError":
        """The same error under another face's names for the fields (/v1/videos says `size`, not `width`)."""
        return ParamError(names.get(self.field, self.field), self.reason, self.model)


@dataclass(frozen=True)
class Limits:
    """The caps a deployment sets (from `Settings`); the defaults are the default model's own limits."""

    max_prompt_chars: int = 2000
    max_side: int = 1280
    max_frames: int = 129
    max_steps: int = 100

    @classmethod
    def from_settings(cls, settings) -> "Limits":
        return cls(**{f.name: getattr(settings, f.name) for f in fields(cls)})


@dataclass(frozen=True)
class Rules:
    """What a job is checked against on one deployment: its caps, the models it serves (ids), whether
    those are tiny builds, the model a job without `model` gets, and the LoRAs installed (names)."""

    limits: Limits = Limits()
    models: tuple[str, ...] = tuple(MODELS)
    tiny: bool = False
    default_model: str = DEFAULT_MODEL
    loras: tuple[str, ...] = ()
    attention_backend: str | None = None  # T2V_ATTENTION_BACKEND; None: the speed preset picks on the worker
    mask_free: bool = True  # T2V_MASK_FREE

    @classmethod
    def from_settings(cls, settings, served: Mapping[str, Any] | None = None) -> "Rules":
        """`served`: the models a worker in this process runs (`registry.served_models`); None when the
        worker is elsewhere, which may serve any registry id."""
        return cls(limits=Limits.from_settings(settings),
                   models=tuple(MODELS if served is None else served),
                   tiny=registry.split_tiny(settings.model)[1],
                   default_model=registry.default_model(settings),
                   loras=tuple(registry.installed_loras(settings.models_dir)),
                   attention_backend=settings.attention_backend, mask_free=settings.mask_free)


# ---------------------------------------------------------------------------------------- the fields

def _integral(value):
    """A JSON number without a fraction is an integer (960.0 is 960), as JSON Schema's `integer` says."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


Int = Annotated[int, BeforeValidator(_integral)]


def _blank_is_none(value: str | None) -> str | None:
    return value if value is None or value.strip() else None


class Lora(BaseModel):
    """One LoRA for one job: an installed file's name (models/loras/<name>.safetensors) and its weight."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False,
                              regex_engine="python-re")

    name: str = Field(pattern=f"^{registry.LORA_NAME.pattern}$", description="an installed LoRA (GET /models)")
    scale: float = Field(1.0, ge=-LORA_SCALE, le=LORA_SCALE)


class JobParams(BaseModel):
    """One generation job, complete: every field has its value once validated (a seed is picked if absent)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False,
                              regex_engine="python-re")

    prompt: str = Field(min_length=1, pattern=PROMPT_PATTERN, description="what the video shows")
    negative_prompt: Annotated[Annotated[str, Field(pattern=TEXT_PATTERN)] | None, AfterValidator(_blank_is_none)] = \
        Field(None, description="what to avoid")
    original_prompt: Annotated[Annotated[str, Field(pattern=TEXT_PATTERN)] | None, AfterValidator(_blank_is_none)] = \
        Field(None, description=ORIGINAL_NOTE)
    model: str = Field(DEFAULT_MODEL, description="a model id (GET /models)")
    width: Int = Field(DEFAULT_WIDTH, ge=16, multiple_of=16)
    height: Int = Field(DEFAULT_HEIGHT, ge=16, multiple_of=16)
    num_frames: Int = Field(129, ge=1)
    fps: Int = Field(DEFAULT_FPS, ge=1, le=60, description="frame rate of the MP4")
    num_inference_steps: Int = Field(30, ge=1)
    guidance_scale: float = Field(6.0, ge=1.0, le=30.0)
    # The bounds before the validator: after it, pydantic writes them to the schema as "ge"/"le", not JSON Schema.
    seed: Annotated[int, Field(ge=0, le=MAX_SEED), BeforeValidator(_integral)] | None = Field(
        None, description="picked when absent")
    upscale: bool = True
    outscale: Annotated[Literal[OUTSCALES], BeforeValidator(_integral)] = 4
    loras: list[Lora] = Field(default_factory=list, description="LoRAs to apply, for models with a LoRA loader")
    audio: bool = Field(True, description=AUDIO_NOTE)
    image_key: SkipJsonSchema[str | None] = Field(None, pattern=IMAGE_KEY_PATTERN)  # set by the server only

    @field_validator("loras")
    @classmethod
    def _distinct_loras(cls, loras: list[Lora]) -> list[Lora]:
        names = [lora.name for lora in loras]
        for name in names:
            if names.count(name) > 1:
                raise PydanticCustomError("duplicate_lora", "names the LoRA {name} twice", {"name": name})
        return loras

    @classmethod
    def from_dict(cls, data: Any, rules: Rules | Limits = Rules(), *, image_key: str | None = None,
                  with_image: bool = False) -> "JobParams":
        """Validate untrusted input (a JSON body, form fields or CLI flags) and fill the model's defaults.
        `with_image`: the job has an image that is not in the blob store (the CLI's --image file)."""
        if isinstance(rules, Limits):
            rules = Rules(limits=rules)
        values = _request_values(data)
        named = values.get("model")
        entry = _served_entry(rules, values.get("model", rules.default_model))
        _check_inputs(entry, with_image or image_key is not None, values.get("loras"), values.get("audio"))
        if "seed" not in values:
            values["seed"] = secrets.randbelow(MAX_SEED + 1)
        job = job_class(rules, entry.id)
        try:
            checked = job.model_validate({**values, "model": entry.id, "image_key": image_key})
        except ValidationError as exc:
            raise _param_error(exc, job, named, rules) from None
        return cls.model_validate(checked.model_dump())

    def to_dict(self) -> dict:
        return self.model_dump()


class EnhanceParams(BaseModel):
    """One enhance job: a prompt for the model's own enhancer to rewrite (with the image the video will start
    from, for image-to-video). The suggestion is the job's result; nothing renders until the user sends a
    generate job with the prompt they chose."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False,
                              regex_engine="python-re")

    prompt: str = Field(min_length=1, pattern=PROMPT_PATTERN, description="the prompt to improve")
    model: str = Field(DEFAULT_MODEL, description="a model with a prompt enhancer (GET /models: prompt_enhancer)")
    seed: Annotated[int, Field(ge=0, le=MAX_SEED), BeforeValidator(_integral)] | None = Field(
        None, description="the same seed gives the same suggestion; picked when absent")
    image_key: SkipJsonSchema[str | None] = Field(None, pattern=IMAGE_KEY_PATTERN)  # set by the server only

    @classmethod
    def from_dict(cls, data: Any, rules: Rules = Rules(), *, image_key: str | None = None) -> "EnhanceParams":
        """Validate an enhance request as JobParams.from_dict does a job: the model served and with an enhancer,
        the prompt within the deployment's T2V_MAX_PROMPT_CHARS."""
        values = _request_values(data)
        entry = _served_entry(rules, values.get("model", rules.default_model))
        if not entry.prompt_enhancer:
            raise ParamError("model", "has no prompt enhancer (the LTX-2 models have one)", entry.id)
        _check_inputs(entry, image_key is not None, None)
        values.setdefault("seed", secrets.randbelow(MAX_SEED + 1))
        limit, prompt = rules.limits.max_prompt_chars, values.get("prompt")
        if isinstance(prompt, str) and len(prompt) > limit:  # before the pattern, whose backtracking grows with it
            raise ParamError("prompt", f"must be at most {limit} characters, got {len(prompt)}")
        try:
            return cls.model_validate({**values, "model": entry.id, "image_key": image_key})
        except ValidationError as exc:
            raise _param_error(exc, cls, None, rules) from None

    def to_dict(self) -> dict:
        return self.model_dump()


def _request_values(data: Any) -> dict:
    """A request's fields, untrusted: a JSON object, without the server's own `image_key`, with JSON null read as
    "not given" in the NULLABLE fields."""
    if not isinstance(data, dict):
        raise ParamError("body", "must be a JSON object")
    if "image_key" in data:
        raise ParamError("image_key", "is set by the server; send the image itself as `image`")
    return {k: v for k, v in data.items() if not (v is None and k in NULLABLE)}


def _served_entry(rules: Rules, name: Any) -> ModelEntry:
    if not isinstance(name, str):
        raise ParamError("model", "must be a string")
    if name not in MODELS:
        raise ParamError("model", f"unknown model {name[:100]!r}; known: {', '.join(MODELS)}")
    if name not in rules.models:
        served = ", ".join(rules.models) or "none"
        raise ParamError("model", f"{name} is not installed on this server (it serves: {served}); "
                                  f"`python download.py --only {name}` installs it")
    return MODELS[name]


def _check_inputs(entry: ModelEntry, has_image: bool, loras: Any, audio: Any = None) -> None:
    """The rules of what a model takes: an image or not, LoRAs or not, sound or not."""
    if audio is True and not entry.audio:
        raise ParamError("audio", "is not made by this model: it makes silent video (LTX-2 models make sound)",
                         entry.id)
    if has_image and entry.inputs == "text":
        raise ParamError("image", "is not taken: this model makes video from text only", entry.id)
    if not has_image and entry.inputs == "image":
        raise ParamError("image", "is required: this model makes video from an image", entry.id)
    if isinstance(loras, list) and loras and not entry.lora:
        pipeline = entry.pipelines[entry.modes[0]]
        raise ParamError("loras", f"are not supported: diffusers {version('diffusers')} has no LoRA loader "
                                  f"for {pipeline}", entry.id)


# ---------------------------------------------------------------------------------------- one model's rules

@dataclass(frozen=True)
class ModelRules:
    """One model's bounds and defaults under one deployment (caps and tiny builds applied)."""

    entry: ModelEntry
    tiny: bool
    max_side: int
    max_frames: int
    max_steps: int
    max_prompt_chars: int
    presets: tuple[registry.SizePreset, ...]
    default_frames: int
    default_steps: int

    @property
    def default_size(self) -> registry.SizePreset:
        return self.presets[0]

    @property
    def frame_counts(self) -> list[int]:
        return list(range(1, self.max_frames + 1, self.entry.frame_multiple))


def model_rules(rules: Rules, model_id: str) -> ModelRules:
    entry, limits = MODELS[model_id], rules.limits
    multiple, step = entry.size_multiple, entry.frame_multiple
    max_side = min(limits.max_side, TINY_MAX_SIDE if rules.tiny else limits.max_side) // multiple * multiple
    frame_cap = min(entry.max_frames, limits.max_frames, TINY_MAX_FRAMES if rules.tiny else entry.max_frames)
    max_frames = (frame_cap - 1) // step * step + 1
    if rules.tiny:
        side = max(TINY_SIDE, 2 * multiple)
        presets = tuple(registry.SizePreset(f"tiny {w}:{h}", side * w, side * h) for w, h in TINY_ASPECTS
                        if side * max(w, h) <= max_side) or _fitted(TINY_ASPECTS, max_side, multiple, "tiny")
        frames, steps = min(TINY_FRAMES, max_frames), min(TINY_STEPS, limits.max_steps)
    else:
        presets = tuple(p for p in entry.presets if max(p.width, p.height) <= max_side)
        if not presets:  # none fit T2V_MAX_SIDE: the model's aspects, as large as fits
            aspects = dict.fromkeys(tuple(int(n) for n in p.label.split()[-1].split(":")) for p in entry.presets)
            presets = _fitted(aspects, max_side, multiple, "small")
        frames, steps = min(entry.default_frames, max_frames), min(entry.default_steps, limits.max_steps)
    return ModelRules(entry, rules.tiny, max_side, max_frames, limits.max_steps, limits.max_prompt_chars,
                      presets, frames, steps)


def _fitted(aspects, max_side: int, multiple: int, tier: str) -> tuple[registry.SizePreset, ...]:
    """A preset per aspect (w, h) with its long side at `max_side`, both sides multiples of `multiple`.
    Rounding can change the aspect: then the label names the one the size really has (64x32 is 2:1)."""
    long_side = max(multiple, max_side)
    presets = []
    for w, h in aspects:
        short = max(multiple, round(long_side * min(w, h) / max(w, h) / multiple) * multiple)
        width, height = (long_side, short) if w >= h else (short, long_side)
        real = Fraction(width, height)
        if abs(real / Fraction(w, h) - 1) > 0.04:
            w, h = real.numerator, real.denominator
        presets.append(registry.SizePreset(f"{tier} {w}:{h}", width, height))
    return tuple(dict.fromkeys(presets))


@lru_cache(maxsize=256)
def job_class(rules: Rules, model_id: str) -> type[JobParams]:
    """`JobParams` narrowed to one model on one deployment: its bounds and defaults in the fields."""
    m = model_rules(rules, model_id)
    entry, multiple = m.entry, m.entry.size_multiple
    frames = m.frame_counts

    rule = f"must be of the form {entry.frame_multiple}k+1 ({', '.join(map(str, frames[:3]))}, ... {m.max_frames})"

    def frame_rule(value: int) -> int:
        if value not in frames:
            raise PydanticCustomError("frame_rule", rule + ", got {value}", {"value": value})
        return value

    side = dict(ge=multiple, le=m.max_side, multiple_of=multiple)
    text = dict(max_length=m.max_prompt_chars)
    if entry.lora and rules.loras:
        loras = (list[_installed_lora(rules.loras)], Field(default_factory=list, max_length=MAX_LORAS))
    else:  # no loader, or nothing installed: no LoRA can be named
        loras = (list[Lora], Field(default_factory=list, max_length=0))
    model_field = Annotated[Literal[entry.id], Field(description="a model id (GET /models)")]
    return create_model(
        "Job_" + entry.id.replace(".", "_"),  # pydantic reads dots in a class name as a module path
        __base__=JobParams,
        __doc__=f"A {entry.id} job: {INPUTS[entry.inputs]} to video.",
        model=(model_field, entry.id) if entry.id == rules.default_model else (model_field, ...),
        prompt=(str, Field(min_length=1, pattern=PROMPT_PATTERN, description="what the video shows", **text)),
        negative_prompt=(Annotated[Annotated[str, Field(pattern=TEXT_PATTERN, **text)] | None,
                                   AfterValidator(_blank_is_none)], Field(None, description="what to avoid")),
        original_prompt=(Annotated[Annotated[str, Field(pattern=TEXT_PATTERN, **text)] | None,
                                   AfterValidator(_blank_is_none)], Field(None, description=ORIGINAL_NOTE)),
        width=(Int, Field(m.default_size.width, **side, description=_size_note(entry))),
        height=(Int, Field(m.default_size.height, **side, description=_size_note(entry))),
        num_frames=(Annotated[Int, AfterValidator(frame_rule)],
                    Field(m.default_frames, ge=1, le=m.max_frames, json_schema_extra={"enum": frames},
                          description=f"{entry.frame_multiple}k+1")),
        fps=(Int, Field(entry.fps, ge=1, le=60, description="frame rate of the MP4")),
        num_inference_steps=(Int, Field(m.default_steps, ge=1, le=m.max_steps)),
        guidance_scale=(float, Field(entry.default_guidance, ge=1.0, le=30.0)),
        loras=loras,
        audio=(bool, Field(entry.audio, description=AUDIO_NOTE)),
    )


@lru_cache(maxsize=16)
def _installed_lora(names: tuple[str, ...]) -> type[Lora]:
    """`Lora` whose name is one of those installed (one class for every model, so one schema)."""
    return create_model("InstalledLora", __base__=Lora, name=(Literal[names], Field(description="an installed LoRA")))


def _size_note(entry: ModelEntry) -> str:
    if entry.size_from_image:
        return "with an image, the image's aspect picks the size at this model's tier"
    return f"a multiple of {entry.size_multiple}"


# ---------------------------------------------------------------------------------------- errors

def _param_error(exc: ValidationError, job: type[JobParams], named_model: str | None, rules: Rules) -> ParamError:
    """The first error as a ParamError, unknown fields first (as a reader checks a request)."""
    errors = exc.errors()
    error = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    loc = error["loc"]
    field = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc).lstrip(".") or "body"
    model = named_model if loc and loc[0] in MODEL_FIELDS and error["type"] in BOUND_ERRORS else None
    return ParamError(field, _message(error, job, rules), model)


def _message(error: dict, job: type[JobParams], rules: Rules) -> str:
    kind, loc, value, ctx = error["type"], error["loc"], error.get("input"), error.get("ctx") or {}
    simple = {
        "missing": "is required", "extra_forbidden": "is not a known parameter", "int_type": "must be an integer",
        "float_type": "must be a number", "finite_number": "must be a finite number",
        "bool_type": "must be true or false", "string_type": "must be a string", "string_too_short": "must not be blank",
        "list_type": "must be a list of {name, scale} objects", "model_type": "must be an object {name, scale}",
    }
    if kind in simple:
        return simple[kind]
    if kind in ("greater_than_equal", "less_than_equal"):
        low, high = _bounds(job, loc)
        return f"must be between {low} and {high}, got {value}"
    if kind == "multiple_of":
        return f"must be a multiple of {ctx['multiple_of']}, got {value}"
    if kind == "string_too_long":
        return f"must be at most {ctx['max_length']} characters, got {len(value)}"
    if kind == "string_pattern_mismatch":
        if "\x00" in value:
            return "must not contain NUL characters"
        return "must not be blank" if loc[0] == "prompt" else "is not a valid name"
    if kind == "literal_error" and loc[-1] == "name":
        return f"is not an installed LoRA: {str(value)[:100]!r}; installed: {', '.join(rules.loras)}"
    if kind == "literal_error":
        return f"must be {ctx['expected']}, got {value!r}"
    if kind == "too_long" and loc == ("loras",):
        limit = ctx["max_length"]
        return f"may name at most {limit} LoRAs" if limit else "cannot be used: no LoRA is installed (models/loras)"
    return error["msg"]  # a custom rule's own message (frame_rule, duplicate_lora)


def _bounds(job: type[JobParams], loc: tuple) -> tuple[float, float]:
    """The (ge, le) of the field at `loc` (a top-level field, or a LoRA's scale), through Optional and Annotated."""
    found = {}

    def visit(node):
        for rule in (*getattr(node, "metadata", ()), *getattr(node, "__metadata__", ())):
            found.update({k: getattr(rule, k) for k in ("ge", "le") if isinstance(getattr(rule, k, None), (int, float))})
            visit(rule)
        for arg in get_args(node):
            visit(arg)

    field = (Lora if loc[0] == "loras" else job).model_fields[loc[-1]]
    visit(field)
    visit(field.annotation)
    return found["ge"], found["le"]


# ---------------------------------------------------------------------------------------- what clients see

@lru_cache(maxsize=64)
def _request_adapter(rules: Rules) -> TypeAdapter:
    classes = tuple(job_class(rules, model_id) for model_id in rules.models)
    return TypeAdapter(Union[classes] if len(classes) > 1 else classes[0])  # noqa: UP007


def request_schema(rules: Rules, ref_template: str = "#/$defs/{model}") -> dict:
    """The JSON Schema of a job request on this deployment: one object schema per model it serves (`anyOf`;
    only the default model's may leave `model` out), generated from `job_class`. `image` is the API's to add."""
    if not rules.models:
        return {"not": {}}  # no model is served: no request is valid
    return _request_adapter(rules).json_schema(ref_template=ref_template)


def describe(rules: Rules, model_id: str) -> dict:
    """One model as a client sees it: inputs, presets, limits, defaults, LoRA support, whether it makes sound."""
    m = model_rules(rules, model_id)
    entry = m.entry
    return {
        "id": entry.id, "inputs": entry.inputs, "tiny": m.tiny, "lora": entry.lora, "audio": entry.audio,
        "size_from_image": entry.size_from_image, "fps": entry.fps, "hub_repo": entry.hub_repo,
        "presets": [{"label": p.label, "width": p.width, "height": p.height} for p in m.presets],
        "limits": {"max_side": m.max_side, "size_multiple": entry.size_multiple, "max_frames": m.max_frames,
                   "frame_multiple": entry.frame_multiple, "max_steps": m.max_steps,
                   "max_prompt_chars": m.max_prompt_chars},
        "defaults": {"width": m.default_size.width, "height": m.default_size.height,
                     "num_frames": m.default_frames, "fps": entry.fps, "num_inference_steps": m.default_steps,
                     "guidance_scale": entry.default_guidance},
        "vram_gb": entry.vram_gb, "published_speed": entry.published_speed,
        "speed": {**speed_features(entry),
                  "attention_backend": attention_backend_for(entry, rules.attention_backend, rules.mask_free)},
        "parallel": entry.parallel, "parallel_note": entry.parallel_note,  # splits across a worker group's ranks
        "prompt_enhancer": entry.prompt_enhancer,  # POST /prompts/enhance takes it
    }


def speed_features(entry: registry.ModelEntry) -> dict:
    """The speed options the model can take, whatever a worker turns on: its caches, whether it can run with no
    attention mask (so mask-free backends apply), regional compile, and fp8 storage with the share it covers."""
    return {"cache": list(entry.caches), "mask_free": entry.mask_free,
            "compile": registry.FAMILIES[entry.family].regional_compile, "fp8": True, "fp8_share": entry.fp8_share}


def passes_attention_mask(entry: registry.ModelEntry, mask_free: bool) -> bool:
    """Whether the model's transformer gets an attention mask: always for HunyuanVideo-1.5, never for Wan, and
    for HunyuanVideo unless t2v trims its prompt (T2V_MASK_FREE on, and a pipeline t2v can trim)."""
    never_masked = registry.FAMILIES[entry.family].attention_mask == "never"
    return not (entry.mask_free and (mask_free or never_masked))


def attention_backend_for(entry: registry.ModelEntry, named: str | None, mask_free: bool) -> str | None:
    """The backend the model runs for T2V_ATTENTION_BACKEND=`named` (None: none named, the worker's speed preset
    picks): a mask-free one is swapped for its nearest mask-capable kin where the model passes a mask."""
    if named is None or not passes_attention_mask(entry, mask_free):
        return named
    from config import mask_capable_backend  # checks which kernels are installed: diffusers, only when named

    return mask_capable_backend(named)


def job_fields() -> list[str]:
    """The fields a generate request may set: every `JobParams` field but the server's own `image_key`."""
    return [name for name in JobParams.model_fields if name != "image_key"]


def form_values(form: Mapping[str, str]) -> dict:
    """Multipart form fields as a JSON body carries them: text fields stay text; numbers, booleans, null and
    `loras` are read as JSON ("64" -> 64, "true" -> True). Text that does not parse stays text (validation
    then names the field); an empty field is left out, as an HTML form sends one."""
    text_fields = {"prompt", "negative_prompt", "original_prompt", "model"}
    values = {}
    for name, text in form.items():
        if name in text_fields:
            values[name] = text
        elif text.strip():
            try:
                values[name] = json.loads(text)
            except ValueError:
                values[name] = text
    return values


# ---------------------------------------------------------------------------------------- input images

@dataclass(frozen=True)
class ImageInfo:
    format: str
    width: int
    height: int


def check_image(data: bytes, max_pixels: int) -> ImageInfo:
    """A decodable PNG, JPEG or WebP of at most `max_pixels`, or a ParamError. The size in the header is
    checked before any pixel is decoded, so a decompression bomb costs nothing."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as image:
            info = ImageInfo(image.format, *image.size)
            if info.width * info.height <= max_pixels:
                image.load()
    except Image.DecompressionBombError:
        raise ParamError("image", f"has too many pixels (over {max_pixels}, T2V_MAX_IMAGE_PIXELS)") from None
    except Exception:  # PIL raises OSError, SyntaxError, ValueError, struct.error ... for a broken file
        raise ParamError("image", "is not a decodable PNG, JPEG or WebP image") from None
    if info.width * info.height > max_pixels:
        raise ParamError("image", f"is {info.width}x{info.height}, {info.width * info.height} pixels; "
                                  f"the cap is {max_pixels} (T2V_MAX_IMAGE_PIXELS)")
    return info


def load_image(path):
    """A checked image as the pipelines take it: RGB, turned upright by its EXIF orientation."""
    from PIL import Image, ImageOps

    with Image.open(path, formats=IMAGE_FORMATS) as image:
        return ImageOps.exif_transpose(image).convert("RGB")
