"""The model registry: every model t2v serves, what it takes, its rules and its defaults, in one place.

One frozen `ModelEntry` per id. What differs in the diffusers call between families is written once,
in `FAMILIES` and `prepare_call` (the adapter), so the rest of the service never special-cases a
model by name. Figures from upstream carry their source in a comment; an unknown figure is None.

Nothing here imports diffusers until a pipeline is asked for: the API validates requests with this module.
"""

from __future__ import annotations

import inspect
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from pipeline import memory as plans

log = logging.getLogger(__name__)

TINY_PREFIX = "tiny:"
MODES = ("t2v", "i2v")  # text-to-video; image-to-video (the prompt is still taken)
MEMORY_PRESETS = ("none", "model", "group", "sequential")  # as in pipeline.generate


@dataclass(frozen=True)
class SizePreset:
    label: str  # "<tier> <aspect W:H>", e.g. "480p 16:9"
    width: int
    height: int


@dataclass(frozen=True)
class Family:
    """What the pipeline call needs that differs between families (the adapter's data)."""

    name: str
    guidance: str  # "guidance_scale": a call argument; "guider": the pipeline's `guider` component carries it
    step_callback: bool  # __call__ takes `callback_on_step_end` (progress and cancel between steps)
    lora_loader: str | None  # the diffusers LoRA mixin of the family's pipelines, if any
    # HunyuanVideo's guidance is embedded (distilled), so a negative prompt acts only under true CFG, at this
    # `true_cfg_scale` (twice the work per step). The others use it whenever their guidance is above 1.
    negative_prompt_cfg: float | None = None
    # Whether its transformer's attention gets a mask: "padding" (the prompt's padding mask, none once t2v trims
    # the prompt: `TRIMMED_PIPELINES`), "always" (built whatever the prompt) or "never". Mask-free attention
    # backends (flash, sage, `_native_flash`) run only where none is passed.
    attention_mask: str = "padding"
    # Its transformer names `_repeated_blocks`, so diffusers' regional `compile_repeated_blocks` applies.
    regional_compile: bool = True
    # The pipeline makes the clip's sound with it (LTX-2): its call takes `frame_rate`, and it returns a waveform.
    audio: bool = False


# The pipelines whose prompt padding t2v trims off (their functions: pipeline.families.PROMPT_TRIMS).
TRIMMED_PIPELINES = frozenset({"HunyuanVideoPipeline"})
# The pipelines with their own prompt enhancer, `enhance_prompt` (their function: pipeline.families.PROMPT_ENHANCERS).
ENHANCING_PIPELINES = frozenset({"LTX2Pipeline"})

FAMILIES = {
    f.name: f for f in (
        Family("hunyuanvideo", guidance="guidance_scale", step_callback=True,
               lora_loader="HunyuanVideoLoraLoaderMixin", negative_prompt_cfg=6.0),
        # HunyuanVideo-1.5's attention processor pads and passes its mask whatever the prompt.
        Family("hunyuanvideo15", guidance="guider", step_callback=False, lora_loader=None, attention_mask="always"),
        # Wan's blocks call attention with no mask (diffusers transformer_wan.py, WanTransformerBlock.forward).
        Family("wan", guidance="guidance_scale", step_callback=True, lora_loader="WanLoraLoaderMixin",
               attention_mask="never"),
        # LTX-2's pipelines pass the prompt's attention mask to the transformer's cross-attention whatever it is.
        Family("ltx2", guidance="guidance_scale", step_callback=True, lora_loader="LTX2LoraLoaderMixin", audio=True,
               attention_mask="always"),
    )
}


@dataclass(frozen=True)
class ModelEntry:
    id: str
    family: str  # a key of FAMILIES
    hub_repo: str  # the diffusers-format folder on the Hugging Face Hub
    pipelines: dict[str, str]  # mode -> diffusers pipeline class name; the first loads the folder
    fps: int  # native frame rate
    default_frames: int  # native clip length; every frame count is frame_multiple * k + 1
    max_frames: int
    size_multiple: int  # width and height: VAE spatial compression x transformer patch
    presets: tuple[SizePreset, ...]
    default_steps: int
    default_guidance: float
    dtypes: dict[str, str]  # component -> torch dtype name; "default" for the rest (diffusers' dtype dict)
    vram_gb: dict[str, float | None]  # memory preset -> published peak VRAM; None where none is published
    tiny_builder: Callable[[Path], Path]  # writes the tiny random-weight folder
    published_speed: str | None = None  # upstream's own figure, with its source
    default_guidance_2: float | None = None  # two-expert Wan: guidance of the low-noise expert
    size_from_image: bool = False  # image-to-video output size is set by the image, not width/height
    frame_multiple: int = 4
    # The caches (T2V_CACHE) its pipelines and blocks take in diffusers 0.42.1: "fbc" needs the pipeline to open
    # a `cache_context` and its blocks in diffusers' TransformerBlockRegistry; "magcache" also needs magnitude
    # ratios calibrated for the model (t2v has HunyuanVideo's). A model loads without a cache it cannot take.
    caches: tuple[str, ...] = ()
    memory: plans.MemoryModel | None = None  # what `pipeline.memory` plans a job's GPU memory from
    # Pipeline-call arguments of the model's own published recipe, as (name, value) pairs. A `sigmas` schedule
    # applies only to a job with as many steps as it has sigmas.
    call_args: tuple[tuple[str, Any], ...] = ()
    # Its transformer splits across a worker group's ranks (`pipeline.parallel`, plans in `pipeline.cp_plans` or
    # diffusers' own `_cp_plan`); else rank 0 of a group runs it alone, and `parallel_note` says why.
    parallel: bool = False
    parallel_note: str | None = None

    @property
    def modes(self) -> tuple[str, ...]:
        return tuple(self.pipelines)

    @property
    def lora(self) -> bool:
        """diffusers 0.42.1 has a LoRA loader for this model's pipelines (HunyuanVideo-1.5 has none)."""
        return FAMILIES[self.family].lora_loader is not None

    @property
    def mask_free(self) -> bool:
        """Its transformer can run with no attention mask: never given one, or given only a prompt padding
        mask that t2v trims away (with T2V_MASK_FREE on)."""
        mask = FAMILIES[self.family].attention_mask
        return mask == "never" or (mask == "padding" and self.pipelines[self.modes[0]] in TRIMMED_PIPELINES)

    @property
    def fp8_share(self) -> float | None:
        """The share of its transformer's parameters fp8 layerwise casting stores in fp8 (`MemoryModel`)."""
        return self.memory.fp8_share if self.memory else None

    @property
    def audio(self) -> bool:
        """The model makes the clip's sound with its video (LTX-2)."""
        return FAMILIES[self.family].audio

    @property
    def prompt_enhancer(self) -> bool:
        """Its pipeline suggests a richer prompt from the user's (LTX-2's `enhance_prompt`: its Gemma text
        encoder, or LTX-2.5's dedicated Gemma 4 enhancer), for POST /prompts/enhance."""
        return self.pipelines[self.modes[0]] in ENHANCING_PIPELINES

    @property
    def inputs(self) -> str:
        """`text` (text-to-video), `image` (an image is required) or `both` (an image is optional)."""
        return {("t2v",): "text", ("i2v",): "image"}.get(self.modes, "both")

    @property
    def default_preset(self) -> SizePreset:
        return self.presets[0]

    @property
    def folder_name(self) -> str:
        """The weights' folder under T2V_MODELS_DIR: the Hub folder's own name (download.py writes it there)."""
        return self.hub_repo.rsplit("/", 1)[1]

    def pipeline_class_name(self, mode: str) -> str:
        if mode not in self.pipelines:
            raise ValueError(f"{self.id} does not do {mode}")
        return self.pipelines[mode]

    def torch_dtypes(self) -> dict[str, Any]:
        """The `dtype` argument for `from_pretrained` on a GPU (the CPU runs float32)."""
        import torch

        return {name: getattr(torch, dtype) for name, dtype in self.dtypes.items()}


def _tiny(builder: str, **options) -> Callable[[Path], Path]:
    """A builder of `pipeline.tiny`, imported when it runs: validating a request (pipeline.spec) never loads torch."""
    def build(folder: Path) -> Path:
        from pipeline import tiny

        return getattr(tiny, builder)(folder, **options)

    return build


def _presets(*rows: tuple[str, int, int]) -> tuple[SizePreset, ...]:
    return tuple(SizePreset(label, w, h) for label, w, h in rows)


# HunyuanVideo (2024): transformer bf16, text encoders and VAE fp16 (docs/DESIGN.md, GPU policy).
_HUNYUAN_DTYPES = {"transformer": "bfloat16", "default": "float16"}
# HunyuanVideo-1.5: the whole pipeline in bf16 (its README's diffusers example, `torch_dtype=torch.bfloat16`).
_HUNYUAN15_DTYPES = {"default": "bfloat16"}
# Wan: VAE in fp32, the rest bf16 (diffusers' Wan docs load `AutoencoderKLWan` with torch.float32).
_WAN_DTYPES = {"vae": "float32", "default": "bfloat16"}

# HunyuanVideo's own sizes (github.com/Tencent-Hunyuan/HunyuanVideo README, "Single-gpu Inference").
_HUNYUAN_PRESETS = _presets(
    ("540p 16:9", 960, 544), ("540p 9:16", 544, 960), ("540p 1:1", 720, 720),
    ("720p 16:9", 1280, 720), ("720p 9:16", 720, 1280), ("720p 1:1", 960, 960),
)
# HunyuanVideo-1.5's buckets for target_size 640 (480p) and 960 (720p), as its pipelines compute them.
_HUNYUAN15_480P = _presets(("480p 16:9", 848, 480), ("480p 9:16", 480, 848), ("480p 1:1", 640, 640))
_HUNYUAN15_720P = _presets(("720p 16:9", 1280, 720), ("720p 9:16", 720, 1280), ("720p 1:1", 960, 960))
# Wan 2.2 SUPPORTED_SIZES (github.com/Wan-Video/Wan2.2, wan/configs/__init__.py).
_WAN_A14B_PRESETS = _presets(("720p 16:9", 1280, 720), ("720p 9:16", 720, 1280),
                             ("480p 16:9", 832, 480), ("480p 9:16", 480, 832))
_WAN_TI2V_PRESETS = _presets(("720p 16:9", 1280, 704), ("720p 9:16", 704, 1280))
_WAN21_PRESETS = _presets(("480p 16:9", 832, 480), ("480p 9:16", 480, 832))

# LTX-2: LTX2Pipeline's own defaults (diffusers 0.42.1, pipelines/ltx2/pipeline_ltx2.py): width 768, height 512
# (check_inputs: both multiples of 32), 121 frames at frame_rate 24, 30 steps, guidance_scale 3.0; its VAE
# compresses time 8x (latent frames = (num_frames - 1) // 8 + 1), so frame counts are 8k+1. The examples load it
# in bfloat16. The longest clip is the pipeline's own duration range, max_seconds=20.0 (481 frames at 24 fps).
# A group splits its video tokens (diffusers' `_cp_plan` with t2v's RoPE and timestep fixes, pipeline.cp_plans);
# the sound's tokens stay whole on every rank.
_LTX2_PRESETS = _presets(("480p 3:2", 768, 512), ("480p 2:3", 512, 768))
_LTX2_PIPELINES = {"t2v": "LTX2Pipeline", "i2v": "LTX2ImageToVideoPipeline"}
_LTX2 = dict(family="ltx2", pipelines=_LTX2_PIPELINES, fps=24, default_frames=121, max_frames=481, size_multiple=32,
             frame_multiple=8, memory=plans.LTX2, parallel=True, presets=_LTX2_PRESETS, dtypes={"default": "bfloat16"},
             vram_gb={"none": None, "model": None, "group": None, "sequential": None},
             tiny_builder=_tiny("build_tiny_ltx2"))
# The distilled checkpoint: "8 steps, CFG=1" (huggingface.co/Lightricks/LTX-2.3 README, model table), on the
# distilled sigma schedule (diffusers.pipelines.ltx2.utils.DISTILLED_SIGMA_VALUES, as its docstring examples pass
# it), with no spatio-temporal or modality guidance (their extra passes are for the guided model).
_LTX2_DISTILLED_SIGMAS = (1.0, 0.99375, 0.9875, 0.98125, 0.975, 0.909375, 0.725, 0.421875)
_LTX2_DISTILLED_CALL = (("sigmas", _LTX2_DISTILLED_SIGMAS), ("stg_scale", 0.0), ("audio_stg_scale", 0.0),
                        ("modality_scale", 1.0), ("audio_modality_scale", 1.0), ("audio_guidance_scale", 1.0))

_HV15 = "hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-"
# Why these do not split across ranks (diffusers 0.42.1). HunyuanVideo-I2V's token_replace modulates the first
# frame's tokens by position in the sequence, which a rank holding a later shard would get wrong.
_HV_I2V_UNSPLIT = "its first-frame token modulation depends on a token's place in the whole sequence"
_HV15_SOURCE = "github.com/Tencent-Hunyuan/HunyuanVideo-1.5 README"

ENTRIES: tuple[ModelEntry, ...] = (
    ModelEntry(
        id="hunyuanvideo", family="hunyuanvideo", hub_repo="hunyuanvideo-community/HunyuanVideo",
        pipelines={"t2v": "HunyuanVideoPipeline"}, fps=24, default_frames=129, max_frames=129, size_multiple=16,
        presets=_HUNYUAN_PRESETS,
        # 30 steps is the service's default since its first release (upstream uses 50); embedded guidance 6.0.
        default_steps=30, default_guidance=6.0, dtypes=_HUNYUAN_DTYPES,
        # HunyuanVideo README, "Requirements": peak 60 GB at 720x1280x129f, 45 GB at 544x960x129f (with
        # --use-cpu-offload, which is model-level offload).
        vram_gb={"none": None, "model": 60.0, "group": None, "sequential": None},
        memory=plans.HUNYUAN_VIDEO,
        tiny_builder=_tiny("build_tiny_hunyuan"), caches=("fbc", "magcache"),
        parallel=True,
        published_speed="1904 s for 1280x720, 129 frames, 50 steps on one GPU "
                        "(HunyuanVideo README, xDiT latency table)",
    ),
    ModelEntry(
        id="hunyuanvideo-i2v", family="hunyuanvideo", hub_repo="hunyuanvideo-community/HunyuanVideo-I2V",
        pipelines={"i2v": "HunyuanVideoImageToVideoPipeline"}, fps=24, default_frames=129, max_frames=129,
        size_multiple=16, presets=_HUNYUAN_PRESETS,
        # HunyuanVideo-I2V README: 50 steps, --embedded-cfg-scale 6.0 (diffusers' own call default is 1.0).
        default_steps=50, default_guidance=6.0, dtypes=_HUNYUAN_DTYPES,
        # HunyuanVideo-I2V README, "Requirements": 60 GB peak at 720p (its commands use --use-cpu-offload).
        vram_gb={"none": None, "model": 60.0, "group": None, "sequential": None},
        memory=plans.HUNYUAN_VIDEO_I2V,
        tiny_builder=_tiny("build_tiny_hunyuan_i2v"),
        caches=(),  # its pipeline opens no cache_context: a cache fails with "No cache context is set"
        parallel_note=_HV_I2V_UNSPLIT,
    ),
    ModelEntry(
        id="hunyuanvideo-1.5-480p", family="hunyuanvideo15", hub_repo=_HV15 + "480p_t2v",
        pipelines={"t2v": "HunyuanVideo15Pipeline"}, fps=24, default_frames=121, max_frames=121, size_multiple=16,
        presets=_HUNYUAN15_480P,
        # HunyuanVideo-1.5 README, "Optimal Inference Configurations": CFG 6, shift 5, 50 steps.
        default_steps=50, default_guidance=6.0, dtypes=_HUNYUAN15_DTYPES,
        # HunyuanVideo-1.5 README, "Hardware Requirements": 14 GB minimum with offloading (its default is
        # group offloading); no figure without offloading.
        vram_gb={"none": None, "model": None, "group": 14.0, "sequential": None},
        memory=plans.HUNYUAN_VIDEO_15,
        tiny_builder=_tiny("build_tiny_hunyuan15", target_size=64, shift=5.0),
        caches=(),  # HunyuanVideo15TransformerBlock is not in diffusers' TransformerBlockRegistry
        parallel=True,
    ),
    ModelEntry(
        id="hunyuanvideo-1.5-720p", family="hunyuanvideo15", hub_repo=_HV15 + "720p_t2v",
        pipelines={"t2v": "HunyuanVideo15Pipeline"}, fps=24, default_frames=121, max_frames=121, size_multiple=16,
        presets=_HUNYUAN15_720P,
        default_steps=50, default_guidance=6.0, dtypes=_HUNYUAN15_DTYPES,  # README: CFG 6, shift 9, 50 steps
        vram_gb={"none": None, "model": None, "group": 14.0, "sequential": None},  # README: 14 GB with offloading
        memory=plans.HUNYUAN_VIDEO_15,
        tiny_builder=_tiny("build_tiny_hunyuan15", target_size=96, shift=9.0),
        parallel=True,
    ),
    ModelEntry(
        id="hunyuanvideo-1.5-480p-i2v-distilled", family="hunyuanvideo15",
        hub_repo=_HV15 + "480p_i2v_step_distilled", pipelines={"i2v": "HunyuanVideo15ImageToVideoPipeline"},
        fps=24, default_frames=121, max_frames=121, size_multiple=16, presets=_HUNYUAN15_480P, size_from_image=True,
        # README: the step-distilled model uses CFG 1, shift 7, "8 or 12 (recommended)" steps.
        default_steps=8, default_guidance=1.0, dtypes=_HUNYUAN15_DTYPES,
        vram_gb={"none": None, "model": None, "group": 14.0, "sequential": None},  # README: 14 GB with offloading
        memory=plans.HUNYUAN_VIDEO_15,
        parallel=True,
        tiny_builder=_tiny("build_tiny_hunyuan15", i2v=True, target_size=64, guidance_scale=1.0, shift=7.0,
                             use_meanflow=True),
        published_speed=f"75 s end to end on one RTX 4090 at 480p ({_HV15_SOURCE}, news of Dec 05, 2025)",
    ),
    ModelEntry(
        id="hunyuanvideo-1.5-720p-i2v-distilled", family="hunyuanvideo15", hub_repo=_HV15 + "720p_i2v_distilled",
        pipelines={"i2v": "HunyuanVideo15ImageToVideoPipeline"}, fps=24, default_frames=121, max_frames=121,
        size_multiple=16, presets=_HUNYUAN15_720P, size_from_image=True,
        # README: the CFG-distilled models use CFG 1 and "must use 50 steps"; shift 7.
        default_steps=50, default_guidance=1.0, dtypes=_HUNYUAN15_DTYPES,
        vram_gb={"none": None, "model": None, "group": 14.0, "sequential": None},  # README: 14 GB with offloading
        memory=plans.HUNYUAN_VIDEO_15,
        parallel=True,
        tiny_builder=_tiny("build_tiny_hunyuan15", i2v=True, target_size=96, guidance_scale=1.0, shift=7.0),
    ),
    ModelEntry(
        id="wan2.2-ti2v-5b", family="wan", hub_repo="Wan-AI/Wan2.2-TI2V-5B-Diffusers",
        # One model for both: the folder loads as WanPipeline; WanImageToVideoPipeline.from_pipe shares its weights.
        pipelines={"t2v": "WanPipeline", "i2v": "WanImageToVideoPipeline"},
        fps=24, default_frames=121, max_frames=121, size_multiple=32, presets=_WAN_TI2V_PRESETS,
        # Wan2.2 wan/configs/wan_ti2v_5B.py: 50 steps, guide scale 5.0, shift 5.0, 121 frames at 24 fps.
        default_steps=50, default_guidance=5.0, dtypes=_WAN_DTYPES,
        # Wan2.2 README: "at least 24GB VRAM (e.g, RTX 4090)" with --offload_model True --convert_model_dtype
        # --t5_cpu (model-level offload) at 1280x704.
        vram_gb={"none": None, "model": 24.0, "group": None, "sequential": None},
        memory=plans.WAN_TI2V_5B,
        tiny_builder=_tiny("build_tiny_wan", variant="2.2-ti2v"), caches=("fbc",),
        parallel=True,
        published_speed="a 5 s 720p clip in under 9 minutes on one consumer GPU (Wan2.2 README, "
                         "'Efficient High-Definition Hybrid TI2V')",
    ),
    ModelEntry(
        id="wan2.2-t2v-a14b", family="wan", hub_repo="Wan-AI/Wan2.2-T2V-A14B-Diffusers",
        pipelines={"t2v": "WanPipeline"}, fps=16, default_frames=81, max_frames=81, size_multiple=16,
        presets=_WAN_A14B_PRESETS,
        # Wan2.2 wan/configs/wan_t2v_A14B.py: 40 steps, guide scale (3.0 low noise, 4.0 high noise), boundary 0.875.
        default_steps=40, default_guidance=4.0, default_guidance_2=3.0, dtypes=_WAN_DTYPES,
        # Wan2.2 README: "at least 80GB VRAM" for 1280x720 with --offload_model True --convert_model_dtype.
        vram_gb={"none": None, "model": 80.0, "group": None, "sequential": None},
        memory=plans.WAN_A14B,
        tiny_builder=_tiny("build_tiny_wan", variant="2.2-t2v-a14b"), caches=("fbc",),
        parallel=True,
    ),
    ModelEntry(
        id="wan2.2-i2v-a14b", family="wan", hub_repo="Wan-AI/Wan2.2-I2V-A14B-Diffusers",
        pipelines={"i2v": "WanImageToVideoPipeline"}, fps=16, default_frames=81, max_frames=81, size_multiple=16,
        presets=_WAN_A14B_PRESETS,
        # Wan2.2 wan/configs/wan_i2v_A14B.py: 40 steps, guide scale (3.5, 3.5), boundary 0.900.
        default_steps=40, default_guidance=3.5, default_guidance_2=3.5, dtypes=_WAN_DTYPES,
        vram_gb={"none": None, "model": 80.0, "group": None, "sequential": None},  # README: 80 GB, as for T2V
        memory=plans.WAN_A14B,
        tiny_builder=_tiny("build_tiny_wan", variant="2.2-i2v-a14b"), caches=("fbc",),
        parallel=True,
    ),
    ModelEntry(
        id="wan2.1-t2v-1.3b", family="wan", hub_repo="Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
        pipelines={"t2v": "WanPipeline"}, fps=16, default_frames=81, max_frames=81, size_multiple=16,
        presets=_WAN21_PRESETS,
        default_steps=50, default_guidance=5.0, dtypes=_WAN_DTYPES,  # diffusers' WanPipeline defaults, 480p
        # Wan2.1 README: "requires only 8.19 GB VRAM" (480p, with --offload_model True --t5_cpu).
        vram_gb={"none": None, "model": 8.19, "group": None, "sequential": None},
        memory=plans.WAN_1_3B,
        tiny_builder=_tiny("build_tiny_wan", variant="2.1-t2v"), caches=("fbc",),
        parallel=True,
        published_speed="a 5 s 480p clip in about 4 minutes on an RTX 4090 (Wan2.1 README)",
    ),
    # The LTX-2 family: one folder each, text-to-video and image-to-video, video with its sound. No VRAM or speed
    # figure of diffusers' pipelines is published for them.
    ModelEntry(id="ltx-2", hub_repo="Lightricks/LTX-2", default_steps=30, default_guidance=3.0, **_LTX2),
    ModelEntry(id="ltx-2.3", hub_repo="diffusers/LTX-2.3-Diffusers", default_steps=30, default_guidance=3.0, **_LTX2),
    ModelEntry(id="ltx-2.3-distilled", hub_repo="diffusers/LTX-2.3-Distilled-Diffusers", default_steps=8,
               default_guidance=1.0, call_args=_LTX2_DISTILLED_CALL, **_LTX2),
    ModelEntry(id="ltx-2.5", hub_repo="Lightricks/LTX-2.5-Diffusers", default_steps=30, default_guidance=3.0, **_LTX2),
)

MODELS: dict[str, ModelEntry] = {entry.id: entry for entry in ENTRIES}
DEFAULT_MODEL = "hunyuanvideo"


def split_tiny(name: str) -> tuple[str, bool]:
    """`tiny:<id>` -> (id, True); plain `tiny` is the tiny HunyuanVideo; anything else -> (name, False)."""
    if name == "tiny":
        return DEFAULT_MODEL, True
    if name.startswith(TINY_PREFIX):
        return name[len(TINY_PREFIX):], True
    return name, False


def tiny_build_problem(name: str) -> str | None:
    """Why `name` names no tiny build (`tiny:<id>` with an id the registry lacks), or None."""
    model_id, tiny = split_tiny(name)
    if tiny and model_id not in MODELS:
        return f"{name}: no such tiny build; tiny:<id> takes a registry id ({', '.join(MODELS)})"
    return None


def get(name: str) -> ModelEntry:
    """The entry for a registry id or its `tiny:` name; KeyError names the known ids."""
    model_id, _ = split_tiny(name)
    try:
        return MODELS[model_id]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(MODELS)}") from None


# --- what one deployment serves ------------------------------------------------------------------------------

LORA_DIR = "loras"  # under T2V_MODELS_DIR: the operator's LoRA files, `<name>.safetensors`
LORA_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def tiny_model_dir(data_dir: Path, model_id: str = "hunyuanvideo") -> Path:
    """The tiny folder of a registry id (or its `tiny:` name) under `data_dir/tiny`, built on first use by the
    entry's own builder. The tiny HunyuanVideo keeps its first folder name, `HunyuanVideo`.
    """
    from pipeline.tiny import TINY_BUILD, tiny_build  # imported when it runs, as `_tiny` is: none to validate a request

    entry = get(model_id)
    folder = Path(data_dir) / "tiny" / ("HunyuanVideo" if entry.id == "hunyuanvideo" else entry.id)
    if tiny_build(folder) < TINY_BUILD:  # none yet, or one an older t2v wrote
        entry.tiny_builder(folder)
    return folder


@dataclass(frozen=True)
class ServedModel:
    """A registry id as this deployment serves it."""

    entry: ModelEntry
    tiny: bool  # the tiny random-weight build: `tiny_model_dir(data_dir, id)` makes it on first load
    folder: Path | None  # the diffusers folder of real weights; None for a tiny build


def served_models(settings) -> dict[str, ServedModel]:
    """The models this node can run, by id.

    T2V_MODEL=tiny (or `tiny:<id>`): every registry id, as its tiny build, under the id's own name.
    Otherwise: each id whose weights are in T2V_MODELS_DIR/<folder_name>, plus T2V_MODEL itself when it
    names a diffusers folder elsewhere (served as the id its model_index.json maps to).
    """
    _, tiny_build = split_tiny(settings.model)
    if tiny_build:
        return {e.id: ServedModel(e, True, None) for e in ENTRIES}
    served = {e.id: ServedModel(e, False, folder) for e in ENTRIES
              if is_model_folder(folder := Path(settings.models_dir) / e.folder_name)}
    named = Path(settings.model)
    if settings.model not in MODELS and is_model_folder(named):
        try:
            model_id = model_id_for_folder(named)
        except ValueError as exc:
            log.warning("T2V_MODEL is not served: %s", exc)
        else:
            served[model_id] = ServedModel(MODELS[model_id], False, named)
    return served


def default_model(settings) -> str:
    """The id a job without `model` gets: the one T2V_MODEL names (`hunyuanvideo` for its default,
    ./models/HunyuanVideo, and for plain `tiny`)."""
    name, _ = split_tiny(settings.model)
    if name in MODELS:
        return name
    folder = Path(name)
    if is_model_folder(folder):
        try:
            return model_id_for_folder(folder)
        except ValueError:
            pass
    by_name = [e.id for e in ENTRIES if e.folder_name.lower() == folder.name.lower()]
    return by_name[0] if by_name else DEFAULT_MODEL


def pipeline_class_of(folder: Path) -> str | None:
    """The pipeline class a diffusers folder names; ValueError naming the file when it cannot be read."""
    index = Path(folder) / "model_index.json"
    try:
        return json.loads(index.read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError) as exc:
        raise ValueError(f"{index} cannot be read as a diffusers model index ({exc})") from None


def is_model_folder(folder: Path) -> bool:
    return (Path(folder) / "model_index.json").is_file()


def model_id_for_folder(folder: Path) -> str:
    """The registry id of a diffusers folder, from its pipeline class; where several ids share the class
    (Wan, HunyuanVideo-1.5), from the folder's name, which must then be the Hub folder's own (or the id)."""
    folder = Path(folder)
    class_name = pipeline_class_of(folder)
    candidates = [e for e in ENTRIES if e.pipelines[e.modes[0]] == class_name]
    if len(candidates) == 1:
        return candidates[0].id
    named = [e for e in candidates if folder.name.lower() in (e.id, e.folder_name.lower())]
    if named:
        return named[0].id
    if not candidates:
        raise ValueError(f"{folder} holds a {class_name}, which t2v does not serve; "
                         f"it serves {', '.join(sorted({e.pipelines[e.modes[0]] for e in ENTRIES}))}")
    raise ValueError(f"{folder} holds a {class_name}, which is one of {', '.join(e.id for e in candidates)}; "
                     f"name the folder as its Hub folder ({', '.join(e.folder_name for e in candidates)})")


def installed_loras(models_dir: Path) -> list[str]:
    """The LoRA names an operator installed: `<name>.safetensors` files in T2V_MODELS_DIR/loras."""
    folder = Path(models_dir) / LORA_DIR
    if not folder.is_dir():
        return []
    return sorted(p.stem for p in folder.glob("*.safetensors") if p.is_file() and LORA_NAME.fullmatch(p.stem))


def lora_file(models_dir: Path, name: str) -> Path:
    """The file of an installed LoRA; `name` must be one `installed_loras` listed (never a client's path)."""
    if name not in installed_loras(models_dir):
        raise KeyError(f"no LoRA {name!r} in {Path(models_dir) / LORA_DIR}")
    return Path(models_dir) / LORA_DIR / f"{name}.safetensors"


def pipeline_for(pipe, entry: ModelEntry, mode: str):
    """The pipeline object for `mode`: `pipe` itself, or one sharing its modules (Wan TI2V's image mode).

    Not `from_pipe`: it casts every shared module to one dtype (float32 unless told), which would undo
    a bf16 transformer beside an fp32 VAE. Build it before a memory preset is applied: offload hooks
    belong to the pipeline they were set on.
    """
    name = entry.pipeline_class_name(mode)
    if type(pipe).__name__ == name:
        return pipe
    import diffusers

    cls = getattr(diffusers, name)
    accepted = inspect.signature(cls.__init__).parameters
    shared = {**{k: v for k, v in pipe.config.items() if not k.startswith("_")}, **pipe.components}
    return cls(**{k: v for k, v in shared.items() if k in accepted})


def size_for_image(pipe, entry: ModelEntry, image, width: int, height: int) -> tuple[int, int]:
    """The (width, height) the pipeline will make: the request's, or for HunyuanVideo-1.5 image-to-video the
    size bucket nearest the image's aspect at the model's `target_size` (what its pipeline computes)."""
    if not (entry.size_from_image and image is not None):
        return width, height
    h, w = pipe.video_processor.calculate_default_height_width(image.height, image.width, pipe.target_size)
    return w, h


def prepare_call(pipe, entry: ModelEntry, *, prompt: str, num_frames: int, steps: int, generator,
                 width: int | None = None, height: int | None = None, guidance: float | None = None,
                 guidance_2: float | None = None, negative_prompt: str | None = None, image=None,
                 output_type: str = "pt", fps: int | None = None) -> dict:
    """Keyword arguments for `pipe(...)` with what differs per family applied.

    HunyuanVideo-1.5 takes guidance through its `guider` component, so that is set on `pipe` here.
    Its image-to-video pipeline has no width/height: the image's aspect and the model's size tier set them.
    A family that makes sound (LTX-2) is told the frame rate: its audio lasts num_frames / frame_rate.
    """
    family = FAMILIES[entry.family]
    guidance = entry.default_guidance if guidance is None else guidance
    kwargs: dict[str, Any] = dict(prompt=prompt, num_frames=num_frames, num_inference_steps=steps,
                                  generator=generator, output_type=output_type)
    if image is not None:
        kwargs["image"] = image
    if not (entry.size_from_image and image is not None):
        kwargs.update(width=width, height=height)
    if negative_prompt:
        kwargs["negative_prompt"] = negative_prompt
        if family.negative_prompt_cfg:
            kwargs["true_cfg_scale"] = family.negative_prompt_cfg
    if family.guidance == "guider":
        pipe.guider = pipe.guider.new(guidance_scale=guidance)
    else:
        kwargs["guidance_scale"] = guidance
    if entry.default_guidance_2 is not None:
        kwargs["guidance_scale_2"] = entry.default_guidance_2 if guidance_2 is None else guidance_2
    if family.audio:
        kwargs["frame_rate"] = float(fps or entry.fps)
    kwargs.update((name, list(value) if name == "sigmas" else value) for name, value in entry.call_args
                  if name != "sigmas" or len(value) == steps)
    return kwargs


# --- weights on disk ---------------------------------------------------------------------------------------------

def local_dir(entry: ModelEntry, models_dir: Path) -> Path:
    """Where download.py puts an entry's weights: the Hub folder's own name under T2V_MODELS_DIR, so the default
    model lands in ./models/HunyuanVideo, T2V_MODEL's default."""
    return Path(models_dir) / entry.folder_name


# What download.py fetches per id, in GB, where the size was found; an id not here has no known figure.
DOWNLOAD_GB = {
    # The Hub's file listing of jobs-git/HunyuanVideoCommunity, a duplicate of hunyuanvideo-community/HunyuanVideo
    # (commit 0448068): 41.9 GB, nearly all of it the pipeline's own safetensors.
    "hunyuanvideo": 41.9,
}
