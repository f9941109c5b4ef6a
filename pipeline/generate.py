"""Load a diffusers text-to-video pipeline once, apply the memory and speed options, and denoise.

HunyuanVideo is the default model, but any diffusers text-to-video folder loads through
`DiffusionPipeline.from_pretrained`. Frames come out as a uint8 array (frames, height, width, 3).
"""

from __future__ import annotations

import inspect
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from pipeline import tiny
from pipeline.spec import JobParams

log = logging.getLogger(__name__)

GiB = 1024**3
# Free VRAM needed by each preset for HunyuanVideo at 720p (DESIGN.md, GPU policy), largest first.
PRESET_MIN_FREE = (("none", 75 * GiB), ("model", 45 * GiB), ("group", 16 * GiB), ("sequential", 0))
OFFLOAD_PRESETS = ("model", "group", "sequential")
# A negative prompt only takes effect with HunyuanVideo's true classifier-free guidance (twice the work per step).
NEGATIVE_PROMPT_CFG = 6.0


class MissingWeightsError(FileNotFoundError):
    """The model folder or weight file is not there; the message says which and what to run."""


class JobCanceled(Exception):
    """Raised between denoising steps when the job was canceled; nothing is decoded after it."""


def resolve_model_dir(model: str, data_dir: Path) -> Path:
    """`tiny` -> the tiny folder (built on first use); anything else must be a diffusers folder."""
    if model == "tiny":
        return tiny.tiny_model_dir(data_dir)
    folder = Path(model)
    if not (folder / "model_index.json").is_file():
        raise MissingWeightsError(
            f"model folder {folder} is missing (no {folder / 'model_index.json'}); "
            "run `python download.py` to fetch HunyuanVideo, or use --model tiny"
        )
    return folder


def component_dtypes(device: str) -> dict[str, torch.dtype]:
    """HunyuanVideo's dtypes: transformer bf16, text encoders and VAE fp16. The CPU runs float32."""
    if device == "cpu":
        return {"default": torch.float32}
    return {"transformer": torch.bfloat16, "default": torch.float16}


def choose_memory_preset(requested: str, device: str, free_vram: int | None) -> str:
    """Pick the memory preset. `auto` goes by free VRAM; on the CPU there is nothing to offload."""
    if device == "cpu":
        if requested in OFFLOAD_PRESETS:
            log.warning("memory preset %r needs a GPU; on the CPU every model stays in RAM", requested)
        return "none"
    if requested != "auto":
        return requested
    return next(name for name, need in PRESET_MIN_FREE if (free_vram or 0) >= need)


def free_vram_bytes(device: str) -> int | None:
    if not device.startswith("cuda"):
        return None
    free, _total = torch.cuda.mem_get_info(torch.device(device))
    return free


def apply_memory_preset(pipe, preset: str, device: str) -> None:
    """Place the pipeline for `preset`; each offload preset is one diffusers call."""
    if preset == "none":
        pipe.to(device)
    elif preset == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif preset == "group":
        pipe.enable_group_offload(
            onload_device=torch.device(device), offload_device=torch.device("cpu"),
            offload_type="leaf_level", use_stream=True,
        )
    elif preset == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    else:
        raise ValueError(f"unknown memory preset {preset!r}")


@dataclass(frozen=True)
class SpeedOptions:
    fp8: bool = False  # store transformer weights in float8, compute in the model dtype
    vae_tiling: bool = False
    fbc_threshold: float = 0.0  # First Block Cache; 0 is off
    attention_backend: str | None = None  # e.g. "native", "flash_varlen", "sage_varlen"
    compile: bool = False  # regional torch.compile of the repeated transformer blocks


def apply_speed_options(pipe, options: SpeedOptions, device: str) -> None:
    """Apply memory/speed options to the loaded components. Run before the memory preset places them."""
    transformer = getattr(pipe, "transformer", None)
    if options.fp8 and transformer is not None:
        compute = torch.float32 if device == "cpu" else transformer.dtype
        transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=compute)
    if options.vae_tiling and hasattr(pipe, "vae"):
        pipe.vae.enable_tiling()
    if options.fbc_threshold > 0 and transformer is not None:
        from diffusers.hooks import FirstBlockCacheConfig

        transformer.enable_cache(FirstBlockCacheConfig(threshold=options.fbc_threshold))
    if options.attention_backend and transformer is not None:
        transformer.set_attention_backend(options.attention_backend)
    if options.compile and transformer is not None:
        transformer.compile_repeated_blocks(fullgraph=True)


class VideoGenerator:
    """One loaded pipeline, reused for every job: load once, generate many."""

    def __init__(self, model: str, data_dir: Path, device: str = "cpu", memory: str = "auto",
                 speed: SpeedOptions = SpeedOptions(), progress_bar: bool = False):
        from diffusers import DiffusionPipeline

        folder = resolve_model_dir(model, data_dir)
        self.device = device
        if device == "cpu":
            log.info("no GPU: running every component in float32 on the CPU")
        self.pipe = DiffusionPipeline.from_pretrained(folder, dtype=component_dtypes(device))
        self.call_defaults = _folder_call_defaults(folder)
        self.is_tiny = _folder_config(folder).get("tiny", False)
        self.memory_preset = choose_memory_preset(memory, device, free_vram_bytes(device))
        if self.memory_preset != "none" and not speed.vae_tiling:
            speed = SpeedOptions(**{**speed.__dict__, "vae_tiling": True})
        if self.memory_preset == "group" and not speed.fp8:
            speed = SpeedOptions(**{**speed.__dict__, "fp8": True})
        self.speed = speed
        apply_speed_options(self.pipe, speed, device)
        apply_memory_preset(self.pipe, self.memory_preset, device)
        self.pipe.set_progress_bar_config(disable=not progress_bar, desc="denoising", unit="step")
        self._call_params = set(inspect.signature(self.pipe.__call__).parameters)

    def generate(self, params: JobParams, on_step: Callable[[int, int], None] | None = None,
                 should_cancel: Callable[[], bool] | None = None) -> np.ndarray:
        """Denoise and decode; return uint8 frames (F, H, W, 3). Raises JobCanceled between steps."""
        if should_cancel and should_cancel():
            raise JobCanceled()

        def step_end(pipe, step, timestep, tensors):
            if on_step:
                on_step(step + 1, params.num_inference_steps)
            # Raising here stops the pipeline before the next step and before the VAE decode.
            if should_cancel and should_cancel():
                raise JobCanceled()
            return tensors

        kwargs = dict(
            prompt=params.prompt, height=params.height, width=params.width, num_frames=params.num_frames,
            num_inference_steps=params.num_inference_steps, guidance_scale=params.guidance_scale,
            generator=torch.Generator("cpu").manual_seed(params.seed), output_type="pt",
            callback_on_step_end=step_end,
        )
        if params.negative_prompt:
            kwargs["negative_prompt"] = params.negative_prompt
            if "true_cfg_scale" in self._call_params:
                kwargs["true_cfg_scale"] = NEGATIVE_PROMPT_CFG
        kwargs.update({k: v for k, v in self.call_defaults.items() if k in self._call_params})
        with torch.inference_mode():
            video = self.pipe(**kwargs).frames[0]  # (F, C, H, W) floats in [0, 1]
            return to_uint8_frames(video)


def to_uint8_frames(video: torch.Tensor) -> np.ndarray:
    """(F, C, H, W) floats in [0, 1] -> contiguous uint8 (F, H, W, C)."""
    video = (video.float().clamp(0, 1) * 255).round().to(torch.uint8)
    return video.permute(0, 2, 3, 1).contiguous().cpu().numpy()


def _folder_config(folder: Path) -> dict:
    path = folder / tiny.FOLDER_CONFIG
    return json.loads(path.read_text()) if path.is_file() else {}


def _folder_call_defaults(folder: Path) -> dict:
    return _folder_config(folder).get("call_defaults", {})
