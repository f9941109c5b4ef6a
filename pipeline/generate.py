"""Load one registry model's pipeline once, apply the memory and speed options, and denoise.

Any registry entry loads (HunyuanVideo, HunyuanVideo-1.5, Wan, LTX-2; `pipeline.models`): from its folder, a
`tiny:<id>` build, or a diffusers folder whose pipeline class is a registry entry's. The call is built
by the registry's adapter (`models.prepare_call`), so nothing here names a model. Frames come out as a
uint8 array (frames, height, width, 3).

What differs per family beyond the call (trimming the prompt's padding, decoding kept latents) is one
small function each in `pipeline.families`, looked up by the pipeline's class name; a family without one
takes the generic path. The speed knobs live in `pipeline.speed`, the LoRA checks in `pipeline.lora`.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from config import ConfigError, attention_backend_problem
from pipeline import decoding, families, lora, memory, models, parallel, tiny
from pipeline.spec import JobParams
from pipeline.speed import (SpeedOptions, apply_speed_options, compile_transformer, denoisers, fit_cache_to_job,
                            resolve_speed)
from pipeline.video import Audio

log = logging.getLogger(__name__)

GiB = 1024**3
OFFLOAD_PRESETS = ("model", "group", "sequential")
# VAE tiles tried, in sample pixels, after a decode runs out of memory: (tile, stride), 25% overlap.
DECODE_TILES = ((256, 192), (128, 96), (64, 48))


class MissingWeightsError(FileNotFoundError):
    """The model folder or weight file is not there; the message says which and what to run."""


class JobCanceled(Exception):
    """Raised at the next transformer block once the job is canceled; nothing is decoded after it."""


def resolve_model(model: str, data_dir: Path, models_dir: Path | None = None) -> tuple[models.ModelEntry, Path]:
    """The registry entry and folder a model name loads from.

    `tiny` / `tiny:<id>` -> the tiny build (made on first use); a registry id -> `models_dir/<Hub folder
    name>`; anything else -> a diffusers folder, whose entry is read from its pipeline class.
    """
    model_id, is_tiny = models.split_tiny(model)
    if problem := models.tiny_build_problem(model):
        raise ConfigError(problem)
    if is_tiny:
        return models.MODELS[model_id], models.tiny_model_dir(data_dir, model_id)
    entry = models.MODELS.get(model)
    folder = Path(models_dir or "models") / entry.folder_name if entry else Path(model)
    if folder.is_dir() and not (folder / "model_index.json").is_file():
        raise MissingWeightsError(f"{folder} is not a diffusers model folder (no model_index.json); "
                                  "point --model (T2V_MODEL) at a folder that `save_pretrained` or download.py wrote")
    if not (folder / "model_index.json").is_file():
        fetch = f"python download.py --only {entry.id}" if entry else "python download.py"
        raise MissingWeightsError(
            f"model folder {folder} is missing (no {folder / 'model_index.json'}); "
            f"run `{fetch}` to fetch it, or use --model tiny"
        )
    try:
        return entry or models.MODELS[models.model_id_for_folder(folder)], folder
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def resolve_model_dir(model: str, data_dir: Path, models_dir: Path | None = None) -> Path:
    """The folder `resolve_model` loads; MissingWeightsError names it and what to run when it is not there."""
    return resolve_model(model, data_dir, models_dir)[1]


def component_dtypes(device: str, entry: models.ModelEntry | None = None) -> dict[str, torch.dtype]:
    """The entry's dtypes on a GPU (HunyuanVideo's by default: transformer bf16, text encoders and VAE fp16).
    The CPU runs float32."""
    if device == "cpu":
        return {"default": torch.float32}
    return (entry or models.MODELS[models.DEFAULT_MODEL]).torch_dtypes()


def use_device(device: str) -> None:
    """Make `device` this process's current CUDA device, so side streams, contexts and memory
    statistics land on it rather than on GPU 0. CUDA_DEVICE_ID was checked by `Settings`."""
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))


def choose_memory_preset(requested: str, device: str, free_vram: int | None, entry: models.ModelEntry,
                         job: tuple[int, int, int], **plan) -> str:
    """Pick the memory preset. `auto`: the fastest whose plan (`pipeline.memory`) for this model and job
    (width, height, frames) fits the free VRAM, else `sequential`. On the CPU there is nothing to offload."""
    if device == "cpu":
        if requested in OFFLOAD_PRESETS:
            log.warning("memory preset %r needs a GPU; on the CPU every model stays in RAM", requested)
        return "none"
    if requested != "auto":
        return requested
    return memory.choose_preset(entry.memory, *job, free_vram or 0, **plan) or memory.PRESETS[-1]


def job_shape(params: JobParams | None, entry: models.ModelEntry) -> tuple[int, int, int]:
    """(width, height, frames) a memory plan is made for: the job's, or the entry's default size and length."""
    if params is None:
        return entry.default_preset.width, entry.default_preset.height, entry.default_frames
    return params.width, params.height, params.num_frames


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
        pipe.enable_group_offload(**group_offload_options(pipe, device))
    elif preset == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    else:
        raise ValueError(f"unknown memory preset {preset!r}")


def group_offload_options(pipe, device: str) -> dict:
    """`enable_group_offload` arguments. The VAE is left out (placed whole on the GPU): it runs through
    `decode`, not `forward`, so the prefetch would never learn its order (a blocking copy per layer on every
    decode), and diffusers warns against group offload over a tiled VAE. On CUDA the copies run on a side
    stream, and `record_stream` lets the allocator reuse onloaded weights without a sync; the CPU (tests)
    has no streams."""
    stream = torch.device(device).type == "cuda"
    return dict(onload_device=torch.device(device), offload_device=torch.device("cpu"), offload_type="leaf_level",
                use_stream=stream, record_stream=stream,
                exclude_modules=[name for name in ("vae",) if getattr(pipe, name, None) is not None])


class _BlockHook:
    """A forward pre-hook on each repeated transformer block (those its class names in `_repeated_blocks`:
    HunyuanVideo's dual- and single-stream blocks, Wan's `WanTransformerBlock`, HunyuanVideo-1.5's blocks,
    token refiner and patch embedding). It raises JobCanceled as soon as the
    job is canceled (so a cancel lands within one block, not one step), and, for a trimmed prompt,
    drops the all-ones attention mask that the transformer still builds, so attention gets none."""

    def __init__(self):
        self.should_cancel: Callable[[], bool] | None = None
        self.drop_mask = False

    def install(self, transformer) -> int:
        repeated = getattr(transformer, "_repeated_blocks", None) or ()
        blocks = [m for m in transformer.modules() if type(m).__name__ in repeated]
        for block in blocks:
            block.register_forward_pre_hook(self._hook_for(type(block)), with_kwargs=True)
        return len(blocks)

    def _hook_for(self, block_class):
        names = [n for n in inspect.signature(block_class.forward).parameters if n != "self"]
        index = names.index("attention_mask") if "attention_mask" in names else None

        @torch.compiler.disable  # plain Python, run outside any compiled region
        def before_block(module, args, kwargs):
            if self.should_cancel is not None and self.should_cancel():
                raise JobCanceled()
            if not self.drop_mask or index is None:
                return None
            if len(args) > index:
                return args[:index] + (None,) + args[index + 1:], kwargs
            return args, {**kwargs, "attention_mask": None}

        return before_block


@contextlib.contextmanager
def _steps_reported(pipe, call_kwargs: dict, total: int, on_step, should_cancel, on_latents=None):
    """Report each finished step, and stop at a cancel between steps, during one pipeline call: through
    the pipeline's step callback, or for a pipeline without one (HunyuanVideo-1.5) by counting its
    scheduler's `step` calls. Raising there stops the pipeline before the next step and before the decode.
    `on_latents(step, total, latents)` gets the latents after each step: the callback's `latents`, or what
    the scheduler's `step` returned (its `prev_sample`, the latents the pipeline carries on with)."""

    def finished(step: int, latents):
        if on_step:
            on_step(step, total)
        if should_cancel and should_cancel():
            raise JobCanceled()
        if on_latents:
            on_latents(step, total, latents)

    if "callback_on_step_end" in inspect.signature(pipe.__call__).parameters:
        def step_end(pipe, step, timestep, tensors):
            finished(step + 1, tensors["latents"])
            return tensors

        call_kwargs["callback_on_step_end"] = step_end
        yield
        return
    scheduler, done = pipe.scheduler, [0]
    step, own = scheduler.step, scheduler.__dict__.get("step")

    def counted(*args, **kwargs):
        result = step(*args, **kwargs)
        done[0] += 1
        finished(done[0], result[0] if isinstance(result, tuple) else result.prev_sample)
        return result

    scheduler.step = counted
    try:
        yield
    finally:
        if own is None:
            del scheduler.step
        else:
            scheduler.step = own


class VideoGenerator:
    """One loaded model, reused for every job: load once, generate many.

    `pipes` holds a pipeline per mode of the entry (text-to-video, image-to-video); Wan TI2V's two share
    one set of modules. The memory preset and the hooks sit on those shared modules, set through `pipe`.
    """

    def __init__(self, model: str, data_dir: Path, device: str = "cpu", memory: str = "auto",
                 speed: SpeedOptions = SpeedOptions(), progress_bar: bool = False, models_dir: Path | None = None,
                 job: JobParams | None = None):
        import diffusers

        self.entry, folder = resolve_model(model, data_dir, models_dir)
        self.device = device
        use_device(device)
        if device == "cpu":
            log.info("no GPU: running every component in float32 on the CPU")
        loader = getattr(diffusers, self.entry.pipeline_class_name(self.entry.modes[0]))
        self.pipe = loader.from_pretrained(folder, dtype=component_dtypes(device, self.entry))
        # Built before the memory preset: offload hooks belong to the pipeline they were set on.
        self.pipes = {mode: models.pipeline_for(self.pipe, self.entry, mode) for mode in self.entry.modes}
        self.family = type(self.pipe).__name__
        self.call_defaults = _folder_call_defaults(folder)
        self.enhance_defaults = _folder_config(folder).get("enhance_defaults", {})
        self.is_tiny = _folder_config(folder).get("tiny", False)
        # `auto` plans for the job that loads the model (or the model's default job); `preset_for` tells
        # whether a later job needs a smaller preset (`pipeline.run.Models` then reloads).
        self.memory_requested, self.vram_budget = memory, free_vram_bytes(device)  # before any weight is placed
        backend = resolve_speed(speed, self.entry, device, "none").attention_backend
        self.plan_options = dict(fp8=bool(speed.fp8), varlen="varlen" in backend)
        self.memory_preset = self.preset_for(job)
        self.speed = resolve_speed(speed, self.entry, device, self.memory_preset)
        # Settings checked the backend by name; only here is it known whether this family passes a mask.
        problem = attention_backend_problem(self.speed.attention_backend, masked=not self.speed.mask_free)
        if problem:
            raise ConfigError(problem)
        self.cache = apply_speed_options(self.pipe, self.speed, device)
        apply_memory_preset(self.pipe, self.memory_preset, device)
        self.last_audio: Audio | None = None  # the soundtrack of the last `generate`; None when it made none
        self.split = self._split(parallel.current())
        self._blocks = _BlockHook()
        for transformer in self.transformers:
            self._blocks.install(transformer)
            if self.speed.compile:
                compile_transformer(transformer)
        for pipe in self.pipes.values():
            pipe.set_progress_bar_config(disable=not progress_bar, desc="denoising", unit="step")
        log.info("loaded %s from %s; speed: %s", self.entry.id, folder, self.speed)

    def _split(self, group: parallel.Group | None) -> bool:
        """Split the transformers across `group`'s ranks, when there is a group and the registry says this model
        splits. A model that does not runs on rank 0 alone, and the log says so once, at load."""
        if group is None:
            return False
        if not self.entry.parallel:
            log.warning("%s does not split across a group's ranks (%s): rank 0 runs its jobs alone",
                        self.entry.id, self.entry.parallel_note or "no plan")
            return False
        if self.cache is not None:  # each rank would decide on its own shard whether to skip blocks, and hang
            raise ConfigError("a cache (T2V_CACHE, or a speed preset's) cannot run across a group's ranks; "
                              "set T2V_CACHE=off")
        try:
            for transformer in self.transformers:
                how = parallel.split(transformer, group, self.speed.attention_backend, not self.speed.mask_free)
        except ValueError as exc:
            raise ConfigError(f"{self.entry.id} cannot split across ranks: {exc}") from None
        log.info("%s split across %d ranks: %s", self.entry.id, group.size, how)
        return True

    @property
    def transformers(self) -> list:
        """The denoisers: `transformer`, and the low-noise expert `transformer_2` of the two-expert Wan models."""
        return denoisers(self.pipe)

    def preset_for(self, params: JobParams | None) -> str:
        """The memory preset this model's setting gives a job (`auto`: by the plan for its size and frames)."""
        return choose_memory_preset(self.memory_requested, self.device, self.vram_budget, self.entry,
                                    job_shape(params, self.entry), **self.plan_options)

    def needs_smaller_preset(self, params: JobParams) -> bool:
        """Whether `params` needs a preset below the loaded one to fit this GPU. A smaller job keeps the loaded
        (slower) preset: re-placing a pipeline means reloading it."""
        return memory.PRESETS.index(self.preset_for(params)) > memory.PRESETS.index(self.memory_preset)

    def output_size(self, params: JobParams, image=None) -> tuple[int, int]:
        """(width, height) of the frames `generate` makes: the job's, or the image's bucket where the model
        sizes its video by the image (HunyuanVideo-1.5 image-to-video)."""
        return models.size_for_image(self.pipe, self.entry, image, params.width, params.height)

    def generate(self, params: JobParams, on_step: Callable[[int, int], None] | None = None,
                 should_cancel: Callable[[], bool] | None = None, latents_path: Path | None = None,
                 image=None, on_latents: Callable[[int, int, torch.Tensor], None] | None = None,
                 on_decode: Callable[[int, int], None] | None = None) -> np.ndarray | None:
        """Denoise and decode; return uint8 frames (F, H, W, 3). With `image` (a PIL image), image-to-video.
        In a group (`pipeline.parallel`) every rank denoises its share and only rank 0 decodes: the other ranks
        return None, and a cancel reaches them through rank 0's decision (`Group.agreed`).

        Raises JobCanceled within one transformer block of a cancel. With `latents_path`, the denoised
        latents are saved there before the decode, and a decode that runs out of memory is retried in
        tiles, then smaller tiles: a finished denoise is never lost to the decode. Only HunyuanVideo's
        text-to-video and LTX-2 decode here (`families.LATENT_DECODERS`; LTX-2 keeps its sound's latents beside
        the video's); the other pipelines decode inside their own call (output_type="pt"), so for them `latents_path`
        is not written. `on_latents(step, total, latents)` sees the latents after every step (for previews);
        `on_decode(done, total)` follows the VAE decode. A model that makes sound (LTX-2) leaves the job's
        soundtrack, cut to the clip's length, in `last_audio`, unless the job says `audio: false` (then it is
        never decoded).
        """
        self.last_audio = None
        mode = "i2v" if image is not None else "t2v"
        pipe = self.pipes.get(mode)
        if pipe is None:
            raise ValueError(f"{self.entry.id} needs an image" if image is None else f"{self.entry.id} takes no image")
        group = parallel.current()
        follower = group is not None and not group.leader
        if follower and not self.split:
            return None  # rank 0 runs a model that does not split alone
        own_cancel = should_cancel  # rank 0's own, for what it does alone after the denoise (the sound's decode)
        if self.split:
            should_cancel = group.agreed(should_cancel)
        if should_cancel and should_cancel():
            raise JobCanceled()
        decode = families.LATENT_DECODERS.get(type(pipe).__name__)
        try:
            with torch.inference_mode(), decoding.reported(getattr(self.pipe, "vae", None), on_decode):
                self._blocks.should_cancel = should_cancel
                image = fit_image(image, self.entry, params.width, params.height) if image is not None else None
                result = self._denoise(pipe, params, image, on_step, should_cancel,
                                       latent=decode is not None or follower, on_latents=on_latents)
                self._blocks.should_cancel = None
                if follower:
                    return None  # rank 0 decodes
                output = result.frames  # latents (B, C, F, H, W), or frames (B, F, C, H, W)
                if decode is None:
                    return to_uint8_frames(output[0])  # (F, C, H, W) floats in [0, 1]
                if latents_path is not None:
                    save_latents(output, params, Path(latents_path), getattr(result, "audio", None))
                frames = to_uint8_frames(self._decode(decode, output))
                self.last_audio = self._audio(pipe, result, params, len(frames), own_cancel)
                return frames
        finally:
            # The pipeline resets its cache hooks and offload placement only when its call ends normally;
            # after an exception (a cancel included) they would hold this job's state into the next one.
            # `pipe` holds the hooks of every mode's pipeline (they share its modules).
            self._blocks.should_cancel, self._blocks.drop_mask = None, False
            self.pipe.maybe_free_model_hooks()

    def enhance_prompt(self, prompt: str, seed: int, image=None,
                       should_cancel: Callable[[], bool] | None = None) -> str:
        """The model's own rewrite of `prompt` (for image-to-video, looking at `image`, a PIL image), made by its
        text encoder or dedicated enhancer (`families.PROMPT_ENHANCERS`); the same seed gives the same text.
        Raises JobCanceled within one token of a cancel. Sequential offload keeps weights on the meta device,
        which diffusers' `enhance_prompt` cannot move (it calls `.to(device)` on the enhancer): refused."""
        enhance = families.PROMPT_ENHANCERS.get(type(self.pipe).__name__)
        if enhance is None:
            raise families.EnhancerUnavailable(f"{self.entry.id} has no prompt enhancer")
        if self.memory_preset == "sequential":
            raise families.EnhancerUnavailable("the prompt enhancer cannot run under the sequential memory preset "
                                               "(T2V_MEMORY=sequential); use group or model")
        try:
            with torch.inference_mode():
                text = enhance(self.pipe, prompt, image, seed, should_cancel, **self.enhance_defaults)
        finally:
            self.pipe.maybe_free_model_hooks()  # an offload preset puts the encoder back
        if should_cancel and should_cancel():
            raise JobCanceled()
        return text

    def lora_problem(self) -> str | None:
        """Why this loaded model cannot take LoRAs per job, or None (`pipeline.lora.lora_problem`)."""
        return lora.lora_problem(self.pipe, self.speed)

    def loras_applied(self, loras: list[tuple[str, Path, float]]):
        """A context in which the job's LoRAs (name, file, scale) are loaded; unloaded after, whatever happens
        (`pipeline.lora.loras_applied`). Should the loader leave a component unplaced, the preset is applied again."""
        return lora.loras_applied(self.pipe, self.entry.id, self.speed, loras,
                                  lambda: apply_memory_preset(self.pipe, self.memory_preset, self.device))

    def warm_up(self, params: JobParams) -> None:
        """Run one short job (one step) at `params`' size and prompt, so a compiled model compiles now and not
        in the first user's job (`pipeline.run.warm_up_params`: two sizes, two prompt lengths)."""
        log.info("warm-up: one step at %dx%d, %d frames, a %d-character prompt", params.width, params.height,
                 params.num_frames, len(params.prompt))
        self.generate(params.model_copy(update={"num_inference_steps": 1}))

    def unload(self) -> None:
        """Let go of the model's memory: offload hooks freed and removed, compiled graphs dropped. The caller
        drops its references, then collects and empties the CUDA cache (`pipeline.run.Models`)."""
        self.pipe.maybe_free_model_hooks()
        self.pipe.remove_all_hooks()
        if self.speed.compile:
            torch._dynamo.reset()  # compiled graphs hold the blocks they were traced from
        self.pipes.clear()
        self.pipe = None

    def _denoise(self, pipe, params: JobParams, image, on_step, should_cancel, latent: bool, on_latents=None):
        kwargs = models.prepare_call(
            pipe, self.entry, prompt=params.prompt, num_frames=params.num_frames, steps=params.num_inference_steps,
            generator=torch.Generator("cpu").manual_seed(params.seed), width=params.width, height=params.height,
            guidance=params.guidance_scale, negative_prompt=params.negative_prompt, image=image,
            output_type="latent" if latent else "pt", fps=params.fps,
        )
        accepted = inspect.signature(pipe.__call__).parameters
        kwargs.update({k: v for k, v in self.call_defaults.items() if k in accepted})
        trim = families.PROMPT_TRIMS.get(type(pipe).__name__)
        if self.speed.mask_free and trim is not None:
            kwargs.update(trim(pipe, params.prompt, params.negative_prompt, kwargs))
            self._blocks.drop_mask = True
        fit_cache_to_job(self.cache, params)
        unpack = families.LATENT_UNPACKERS.get(type(pipe).__name__)
        if on_latents is not None and unpack is not None:
            shown = on_latents
            on_latents = lambda step, total, latents: shown(step, total, unpack(pipe, params, latents))  # noqa: E731
        with _steps_reported(pipe, kwargs, params.num_inference_steps, on_step, should_cancel, on_latents):
            return pipe(**kwargs)

    def _audio(self, pipe, result, params: JobParams, frames: int, should_cancel) -> Audio | None:
        """Decode the soundtrack the pipeline denoised with the video, fitted to the clip; None when the model
        makes none or the job asked for none."""
        decode = families.AUDIO_DECODERS.get(type(pipe).__name__)
        if decode is None or not params.audio:
            return None
        if should_cancel and should_cancel():
            raise JobCanceled()
        return decode(pipe, result.audio).fitted(frames, params.fps)

    def _decode(self, decode, latents: torch.Tensor) -> torch.Tensor:
        """Decode; on out-of-memory turn VAE tiling on, then shrink the tiles, until one fits. The smaller
        tiles are for this job only: the VAE's own tiling settings are put back after it."""
        vae = self.pipe.vae
        saved = tiling_settings(vae)
        try:
            while True:
                try:
                    return decode(self.pipe, latents)
                except torch.OutOfMemoryError:
                    smaller = _next_tile(vae)
                    if smaller is None:
                        raise
                # Past the except block the exception and its traceback are gone, and with them the frames
                # that held the failed decode's tensors: only now can the cache give their memory back.
                torch.cuda.empty_cache()  # a no-op where CUDA was never initialised
                log.warning("VAE decode ran out of memory; retrying with %dx%d-pixel tiles", smaller[0], smaller[0])
                vae.enable_tiling(tile_sample_min_height=smaller[0], tile_sample_min_width=smaller[0],
                                  tile_sample_stride_height=smaller[1], tile_sample_stride_width=smaller[1])
        finally:
            for name, value in saved.items():
                setattr(vae, name, value)


def tiling_settings(vae) -> dict:
    """The VAE's tiling switch and tile sizes (`use_tiling`, `tile_sample_*`), to put back after a job."""
    return {name: value for name, value in vars(vae).items() if name == "use_tiling" or name.startswith("tile_")}


def _next_tile(vae) -> tuple[int, int] | None:
    """The next tile to try after an OOM: the VAE's default tile if tiling was off, else a smaller one."""
    if not getattr(vae, "use_tiling", False):
        return DECODE_TILES[0]
    current = min(vae.tile_sample_min_height, vae.tile_sample_min_width)
    return next((tile for tile in DECODE_TILES if tile[0] < current), None)


def fit_image(image, entry: models.ModelEntry, width: int, height: int):
    """The image as the pipeline should get it: RGB, centre-cropped to the video's aspect and sized to it, since
    the Wan and HunyuanVideo-I2V pipelines resize to width x height and would stretch it. A model that sizes its
    video by the image (HunyuanVideo-1.5) gets it whole: its own bucket keeps the aspect."""
    from PIL import Image, ImageOps

    image = image.convert("RGB")
    if entry.size_from_image or image.size == (width, height):
        return image
    return ImageOps.fit(image, (width, height), method=Image.Resampling.LANCZOS)


def save_latents(latents: torch.Tensor, params: JobParams, path: Path, audio_latents: torch.Tensor | None = None) -> None:
    """Write the denoised latents and the job's parameters, so the video can be decoded again later; for a model
    with sound (LTX-2) its audio latents too (`audio_latents`), so the soundtrack can be as well."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.part")
    saved = {"latents": latents.detach().cpu(), "params": params.to_dict()}
    if audio_latents is not None:
        saved["audio_latents"] = audio_latents.detach().cpu()
    torch.save(saved, tmp)
    tmp.replace(path)
    log.info("latents saved to %s", path)


def to_uint8_frames(video: torch.Tensor) -> np.ndarray:
    """(F, C, H, W) floats in [0, 1] -> contiguous uint8 (F, H, W, C)."""
    video = (video.float().clamp(0, 1) * 255).round().to(torch.uint8)
    return video.permute(0, 2, 3, 1).contiguous().cpu().numpy()


def _folder_config(folder: Path) -> dict:
    path = folder / tiny.FOLDER_CONFIG
    return json.loads(path.read_text()) if path.is_file() else {}


def _folder_call_defaults(folder: Path) -> dict:
    return _folder_config(folder).get("call_defaults", {})
