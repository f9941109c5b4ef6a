"""Every knob of t2v, read once from the environment (and `.env`) into one frozen `Settings`.

The variable names are a contract with scripts and deployments: `T2V_*`, plus the original
`AWS_ACCESS_KEY`, `AWS_SECRET_KEY`, `REGION_NAME`, `BUCKET_NAME`, `MONGODB_URI` and `CUDA_DEVICE_ID`.
`.env.example` lists them all.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import os
import re
import sys
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from dotenv import dotenv_values

MEMORY_PRESETS = ("auto", "none", "model", "group", "sequential")
WORKER_MODES = ("thread", "off")
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")
HOST_NAME = re.compile(r"[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\]")
ORIGIN = re.compile(r"https?://(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")
SPEED_PRESETS = ("off", "balanced", "fast")
CACHES = ("off", "fbc", "magcache")  # First Block Cache, MagCache (diffusers hooks)

# Attention backends t2v accepts, by their diffusers 0.42.1 names. HunyuanVideo passes a text mask to
# attention unless its prompt is trimmed (T2V_MASK_FREE, on by default), HunyuanVideo-1.5 always does, Wan
# never; while a mask is passed, only the first group works: the second rejects the mask, but only at the first
# denoising step. So a model that passes one gets the mask-capable backend nearest to the one named.
MASK_CAPABLE_BACKENDS = ("native", "_native_math", "_native_efficient", "_native_cudnn",
                         "flash_varlen", "_flash_varlen_3", "sage_varlen")
MASK_FREE_BACKENDS = ("_native_flash", "flash", "_flash_3", "sage", "_sage_qk_int8_pv_fp8_cuda",
                      "_sage_qk_int8_pv_fp8_cuda_sm90", "_sage_qk_int8_pv_fp16_cuda", "_sage_qk_int8_pv_fp16_triton")
ATTENTION_BACKENDS = MASK_CAPABLE_BACKENDS + MASK_FREE_BACKENDS
# The same kernels' mask-capable forms, tried in order (the first installed wins; `native` after them all).
NEAREST_MASK_CAPABLE = {
    "_native_flash": (), "flash": ("flash_varlen",), "_flash_3": ("_flash_varlen_3", "flash_varlen"),
    **{name: ("sage_varlen",) for name in MASK_FREE_BACKENDS if "sage" in name},
}


class ConfigError(ValueError):
    """A setting has a value t2v cannot use. The message names the variable."""


def _secret(default=None):
    # repr=False keeps secrets out of logs that print the settings.
    return field(default=default, repr=False)


@dataclass(frozen=True)
class Settings:
    # Where things live.
    data_dir: Path = Path("./data")
    output_dir: Path = Path("./outputs")
    models_dir: Path = Path("./models")
    host: str = "127.0.0.1"
    port: int = 7866
    threads: int = 16  # request threads (python app.py and gunicorn)
    client_timeout_s: int = 30  # a connection silent this long (stalled request, idle keep-alive) is closed

    # Models and the GPU.
    model: str = "./models/HunyuanVideo"
    upscaler: str = "./models/RealESRGAN_x4plus.pth"
    cuda_device_id: int | None = None
    memory: str = "auto"
    speed: str = "off"  # a speed preset: fills in each knob below that is left unset (None)
    fp8: bool | None = None
    vae_tiling: bool | None = None  # unset: on with every preset on CUDA, off on the CPU
    cache: str | None = None
    fbc_threshold: float | None = None  # setting it alone turns First Block Cache on (0: off)
    attention_backend: str | None = None
    compile: bool | None = None
    parallel: int = 1  # ranks per worker group: one clip split across this many GPUs (pipeline/parallel.py)
    group_timeout_s: float = 300.0  # a group's collective that waits this long on a hung rank fails the group
    mask_free: bool = True  # batch 1: trim the prompt's padding so no attention mask is needed
    keep_latents: bool = False  # save each job's latents (.latents.pt) beside its video, before the decode

    # Upscale and encode.
    upscale_tile: int = 0
    upscale_batch: int = 4
    crf: int = 18

    # Limits on one job.
    max_prompt_chars: int = 2000
    max_side: int = 1280
    max_frames: int = 129
    max_steps: int = 100
    max_image_mb: int = 20  # an image for image-to-video (POST /generate_video)
    max_image_pixels: int = 4096 * 4096  # width x height of that image, checked before it is decoded

    # Limits on an uploaded clip (POST /upscale_video).
    max_upload_mb: int = 200
    max_upload_side: int = 1920
    max_upload_frames: int = 1800
    max_upload_s: float = 120.0
    keep_inputs: bool = False

    # Service.
    worker: str = "thread"
    api_keys: tuple[str, ...] = _secret(())
    lease_s: float = 60.0
    max_attempts: int = 2
    max_queue: int = 100
    max_body_kb: int = 64
    url_ttl_s: int = 3600
    preview_every: int = 1  # a preview of the latents after every this many denoising steps; 0: none
    max_streams: int | None = None  # open event streams (GET /jobs/<id>/events); unset: half of T2V_THREADS
    stream_max_s: int = 300  # an event stream ends after this long; the client resumes it with Last-Event-ID
    url_secret: str | None = _secret()  # signs the web page's video links; random per process if unset
    allowed_hosts: tuple[str, ...] = ()  # Host names answered; empty: loopback names on a loopback T2V_HOST, else any
    cors_origins: tuple[str, ...] = ()  # other sites whose pages may call the API from a browser
    metrics_public: bool = False  # with keys on, GET /metrics answers without a key (a scraper on a private network)

    # Webhooks and idempotent submits.
    webhook_secret: str | None = _secret()  # whsec_<base64>: signs deliveries; unset, a job with a webhook is a 400
    webhook_allow_private: bool = False  # let webhooks reach loopback and private addresses (tests, a LAN)
    webhook_timeout_s: float = 10.0  # one delivery attempt: connect, send and read the status
    webhook_retry_s: float = 30.0  # first retry after this; each later one waits twice as long
    webhook_retry_window_s: float = 7200.0  # the last try is this long after the event; then it is given up
    webhook_keep_s: float = 7 * 86400.0  # a delivery that ended (delivered or given up) is deleted after this
    idempotency_ttl_s: int = 86400  # how long an Idempotency-Key answers with its job

    # Stores. Without MONGODB_URI jobs go to SQLite; without BUCKET_NAME videos stay local.
    mongodb_uri: str | None = _secret()
    bucket_name: str | None = None
    region_name: str | None = None
    aws_access_key: str | None = _secret()
    aws_secret_key: str | None = _secret()
    s3_endpoint_url: str | None = None

    @property
    def device(self) -> str:
        """`cuda:N` when a GPU is present, else `cpu`. CUDA_DEVICE_ID picks N."""
        import torch

        if not torch.cuda.is_available():
            return "cpu"
        return f"cuda:{self.cuda_device_id or 0}"

    @property
    def stream_limit(self) -> int:
        """How many event streams may be open at once: each holds a request thread while it lasts."""
        return self.max_streams if self.max_streams is not None else self.threads // 2

    @property
    def trusted_hosts(self) -> tuple[str, ...] | None:
        """The Host names the API answers to, lowercase; None means any.

        A loopback listener answers only loopback names by default, so a web page cannot reach it
        under a name of its own (DNS rebinding). "*" in T2V_ALLOWED_HOSTS lifts the check.
        """
        if self.allowed_hosts:
            return None if "*" in self.allowed_hosts else tuple(h.lower() for h in self.allowed_hosts)
        return LOOPBACK_NAMES if is_loopback(self.host) else None

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, dotenv_path: str | None = ".env", **overrides) -> "Settings":
        """Build settings from `env` (default: `.env` overlaid by `os.environ`), then `overrides`."""
        if env is None:
            env = {k: v for k, v in dotenv_values(dotenv_path).items() if v is not None} if dotenv_path else {}
            env.update(os.environ)
        values = {}
        for f in fields(cls):
            name = ENV_NAMES[f.name]
            raw = env.get(name, "").strip()
            if raw:
                values[f.name] = _parse(name, f.name, raw)
        settings = cls(**values)
        settings = replace(settings, **overrides) if overrides else settings
        settings.check()
        return settings

    def check(self) -> None:
        """Reject values that cannot work, naming the variable."""
        if self.memory not in MEMORY_PRESETS:
            raise ConfigError(f"T2V_MEMORY must be one of {', '.join(MEMORY_PRESETS)}, got {self.memory!r}")
        if self.speed not in SPEED_PRESETS:
            raise ConfigError(f"T2V_SPEED must be one of {', '.join(SPEED_PRESETS)}, got {self.speed!r}")
        if self.cache is not None and self.cache not in CACHES:
            raise ConfigError(f"T2V_CACHE must be one of {', '.join(CACHES)}, got {self.cache!r}")
        if self.fbc_threshold is not None and not 0 <= self.fbc_threshold < 1:
            raise ConfigError(f"T2V_FBC_THRESHOLD must be at least 0 and below 1, got {self.fbc_threshold}")
        if self.attention_backend is not None:
            # Masks are per model: one that passes a mask gets the nearest mask-capable backend at load.
            problem = attention_backend_problem(self.attention_backend, masked=False)
            if problem:
                raise ConfigError(problem)
        if self.cuda_device_id is not None:
            check_cuda_device(self.cuda_device_id)
        from pipeline.models import tiny_build_problem  # the registry, which imports no torch

        if problem := tiny_build_problem(self.model):
            raise ConfigError(f"T2V_MODEL={problem}")
        if self.worker not in WORKER_MODES:
            raise ConfigError(f"T2V_WORKER must be one of {', '.join(WORKER_MODES)}, got {self.worker!r}")
        if not 0 <= self.crf <= 51:
            raise ConfigError(f"T2V_CRF must be between 0 and 51, got {self.crf}")
        if self.upscale_batch < 1:
            raise ConfigError(f"T2V_UPSCALE_BATCH must be at least 1, got {self.upscale_batch}")
        if self.upscale_tile and self.upscale_tile < 32:
            raise ConfigError(f"T2V_UPSCALE_TILE must be 0 (off) or at least 32, got {self.upscale_tile}")
        if self.max_side < 16 or self.max_side % 16:
            raise ConfigError(f"T2V_MAX_SIDE must be a positive multiple of 16, got {self.max_side}")
        if self.max_frames < 1 or self.max_frames % 4 != 1:
            raise ConfigError(f"T2V_MAX_FRAMES must be of the form 4k+1, got {self.max_frames}")
        for name, value in (("T2V_THREADS", self.threads), ("T2V_CLIENT_TIMEOUT_S", self.client_timeout_s),
                            ("T2V_MAX_STEPS", self.max_steps), ("T2V_MAX_PROMPT_CHARS", self.max_prompt_chars),
                            ("T2V_MAX_IMAGE_MB", self.max_image_mb), ("T2V_MAX_IMAGE_PIXELS", self.max_image_pixels),
                            ("T2V_MAX_QUEUE", self.max_queue), ("T2V_MAX_ATTEMPTS", self.max_attempts),
                            ("T2V_MAX_BODY_KB", self.max_body_kb), ("T2V_URL_TTL_S", self.url_ttl_s),
                            ("T2V_MAX_UPLOAD_MB", self.max_upload_mb), ("T2V_MAX_UPLOAD_SIDE", self.max_upload_side),
                            ("T2V_MAX_UPLOAD_FRAMES", self.max_upload_frames),
                            ("T2V_MAX_UPLOAD_S", self.max_upload_s), ("T2V_PARALLEL", self.parallel)):
            if value < 1:
                raise ConfigError(f"{name} must be at least 1, got {value}")
        if self.lease_s <= 0:
            raise ConfigError(f"T2V_LEASE_S must be positive, got {self.lease_s}")
        if self.group_timeout_s <= 0:
            raise ConfigError(f"T2V_GROUP_TIMEOUT_S must be positive, got {self.group_timeout_s}")
        if self.preview_every < 0:
            raise ConfigError(f"T2V_PREVIEW_EVERY must be 0 (no previews) or more, got {self.preview_every}")
        if self.stream_max_s < 1:
            raise ConfigError(f"T2V_STREAM_MAX_S must be at least 1, got {self.stream_max_s}")
        if self.max_streams is not None and not 0 <= self.max_streams < self.threads:
            raise ConfigError(f"T2V_MAX_STREAMS must be from 0 (no event streams) to below T2V_THREADS "
                              f"({self.threads}), so other requests always find a thread; got {self.max_streams}")
        for host in self.allowed_hosts:
            if host != "*" and not HOST_NAME.fullmatch(host):
                raise ConfigError(f"T2V_ALLOWED_HOSTS takes host names without scheme or port (or *), got {host!r}")
        for origin in self.cors_origins:
            if not ORIGIN.fullmatch(origin):
                raise ConfigError(f"T2V_CORS_ORIGINS takes origins such as https://app.example.com, got {origin!r}")
        for name, value in (("T2V_WEBHOOK_TIMEOUT_S", self.webhook_timeout_s),
                            ("T2V_WEBHOOK_RETRY_S", self.webhook_retry_s),
                            ("T2V_WEBHOOK_RETRY_WINDOW_S", self.webhook_retry_window_s),
                            ("T2V_WEBHOOK_KEEP_S", self.webhook_keep_s),
                            ("T2V_IDEMPOTENCY_TTL_S", self.idempotency_ttl_s)):
            if value <= 0:
                raise ConfigError(f"{name} must be positive, got {value}")
        if self.webhook_secret is not None and not webhook_secret_ok(self.webhook_secret):
            raise ConfigError("T2V_WEBHOOK_SECRET must be whsec_ and the base64 of at least 16 random bytes; make one "
                              "with: python -c \"import base64, secrets; "
                              "print('whsec_' + base64.b64encode(secrets.token_bytes(24)).decode())\"")


def webhook_secret_ok(secret: str) -> bool:
    """A Standard Webhooks secret: `whsec_` and base64 of at least 16 bytes (the prefix may be left out)."""
    try:
        return len(base64.b64decode(secret.removeprefix("whsec_"), validate=True)) >= 16
    except (binascii.Error, ValueError):
        return False


def is_loopback(host: str) -> bool:
    """Whether a listen address (T2V_HOST) only accepts connections from this machine."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def attention_backend_problem(name: str, masked: bool) -> str | None:
    """Why `name` cannot run (the model passes an attention mask when `masked`), or None when it can."""
    if name.endswith("_hub"):
        return (f"T2V_ATTENTION_BACKEND={name} fetches its kernel from the Hugging Face Hub at run time, which t2v "
                "never does; install the package from requirements-gpu.txt and name its backend instead")
    if name not in ATTENTION_BACKENDS:
        return f"T2V_ATTENTION_BACKEND must be one of {', '.join(ATTENTION_BACKENDS)}, got {name!r}"
    if masked and name in MASK_FREE_BACKENDS:
        return (f"T2V_ATTENTION_BACKEND={name} cannot take an attention mask, and the model passes one (with "
                f"T2V_MASK_FREE off, or a model t2v cannot trim); use one of {', '.join(MASK_CAPABLE_BACKENDS)}")
    from diffusers.models.attention_dispatch import AttentionBackendName, _check_attention_backend_requirements

    try:
        _check_attention_backend_requirements(AttentionBackendName(name))
    except RuntimeError as exc:
        return f"T2V_ATTENTION_BACKEND={name} cannot load here: {exc} (see requirements-gpu.txt)"
    return None


def mask_capable_backend(name: str) -> str:
    """The backend a model that passes an attention mask runs for T2V_ATTENTION_BACKEND=`name`: `name` itself
    when it takes a mask, else the nearest installed mask-capable one (`native` when none is)."""
    if name not in MASK_FREE_BACKENDS:
        return name
    return next((c for c in NEAREST_MASK_CAPABLE[name] if attention_backend_problem(c, masked=True) is None), "native")


def check_cuda_device(index: int) -> None:
    """CUDA_DEVICE_ID is an index among the GPUs this process sees (after CUDA_VISIBLE_DEVICES)."""
    if index < 0:
        raise ConfigError(f"CUDA_DEVICE_ID must be 0 or more, got {index}")
    import torch

    if torch.cuda.is_available() and index >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise ConfigError(f"CUDA_DEVICE_ID={index}, but this process sees {count} GPU{'s' * (count != 1)} "
                          f"(indices 0 to {count - 1}; CUDA_VISIBLE_DEVICES renumbers them from 0)")


def settings_or_exit(prog: str) -> Settings:
    """Settings for a server entry point; a bad value exits 2 with a one-line reason naming the variable."""
    try:
        return Settings.from_env()
    except ConfigError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


# Field name -> environment variable. The original project's names are kept as they were.
ENV_NAMES = {f: f"T2V_{f.upper()}" for f in Settings.__dataclass_fields__}
ENV_NAMES.update(
    cuda_device_id="CUDA_DEVICE_ID",
    mongodb_uri="MONGODB_URI",
    bucket_name="BUCKET_NAME",
    region_name="REGION_NAME",
    aws_access_key="AWS_ACCESS_KEY",
    aws_secret_key="AWS_SECRET_KEY",
)

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
BOOL_WORDS = f"{'/'.join(_TRUE)} or {'/'.join(_FALSE)}"  # what --help and errors say an on/off setting takes


def parse_bool(text: str) -> bool:
    """The one reading of an on/off setting, from its variable or its flag: anything but BOOL_WORDS is an error,
    so `0` or `false` never reads as on, and a typo never runs."""
    word = text.strip().lower()
    if word in _TRUE or word in _FALSE:
        return word in _TRUE
    raise ValueError(f"expected {BOOL_WORDS}, got {text[:40]!r}")


def _parse(env_name: str, field_name: str, raw: str):
    kind = Settings.__dataclass_fields__[field_name].type.removesuffix(" | None")
    try:
        if kind == "Path":
            return Path(raw)
        if kind == "bool":
            return parse_bool(raw)
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
        if kind == "tuple[str, ...]":
            return tuple(k.strip() for k in raw.split(",") if k.strip())
        return raw
    except ValueError:
        words = f" ({BOOL_WORDS})" if kind == "bool" else ""
        raise ConfigError(f"{env_name} has an invalid value for a {kind} setting{words}") from None
