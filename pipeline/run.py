"""`run_job` (prompt -> frames -> upscaled batches -> MP4) and `upscale_file` (an existing clip -> a
sharper MP4). The command-line scripts and the worker all call these two, and `enhance_prompt` (a prompt ->
the model's suggested rewrite) before a job the user approves.

Frames move between stages in memory: the generated clip as uint8 frames, the upscaled clip one
batch at a time, straight into the encoder, which runs in its own thread so that encoding overlaps
the next batch's model work. The upscaled clip is never held whole, and no lossy file sits between
stages. The MP4 is written under a temporary name and renamed only when complete.
"""

from __future__ import annotations

import gc
import hashlib
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import av
import numpy as np

from config import Settings
from pipeline import models as registry
from pipeline import preview
from pipeline.generate import JobCanceled, MissingWeightsError, VideoGenerator, resolve_model, use_device
from pipeline.loading import model_construction
from pipeline.spec import EnhanceParams, JobParams, Limits, Rules, model_rules
from pipeline.speed import SpeedOptions
from pipeline.upscale import Upscaler, resolve_upscaler
from pipeline.video import (Audio, VideoInfo, VideoInputError, VideoWriter, inspect_video, mux_audio,
                            mux_waveform, probe_audio, read_frames, write_poster)

log = logging.getLogger(__name__)

# on_progress(stage, done, total): stages are "denoising" (steps), "upscaling" and "encoding" (frames).
ProgressFn = Callable[[str, int, int], None]
# on_preview(step, total, frames): uint8 preview frames (F, H, W, 3) of the latents after a denoising step.
PreviewFn = Callable[[int, int, np.ndarray], None]


@dataclass
class VideoResult:
    path: Path
    width: int
    height: int
    frames: int
    fps: int
    duration_s: float
    seed: int | None  # None for an upscaled upload
    size_bytes: int
    sha256: str
    poster_path: Path | None = None
    timings_s: dict[str, float] = field(default_factory=dict)
    rendered: tuple[int, int] | None = None  # (width, height) the model made, before any upscale
    audio: dict | None = None  # the soundtrack's sample rate, channels and duration (`Audio.record`); None: silent

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["path"] = str(self.path)
        d["poster_path"] = str(self.poster_path) if self.poster_path else None
        return d


class Models:
    """The video generator and the upscalers, each loaded on first use and then reused across jobs.

    One video model is resident at a time: a job for another model unloads the current one first.
    `lock` is held while a generator is chosen and runs, so two threads sharing these models never
    switch a pipeline out from under each other (one pipeline runs one job at a time anyway).
    """

    def __init__(self, settings: Settings, progress_bar: bool = False, upscaler: str | None = None,
                 half_upscaler: bool | None = None):
        self.settings = settings
        self.progress_bar = progress_bar
        self.upscaler_name = upscaler or settings.upscaler
        self.half_upscaler = half_upscaler
        self.lock = threading.RLock()
        self._generator: VideoGenerator | None = None
        self._loaded: str | None = None  # the model name `_generator` was loaded from
        self._upscalers: dict[str, Upscaler] = {}
        use_device(settings.device)  # before anything touches CUDA: streams and contexts go to this GPU

    @property
    def generator(self) -> VideoGenerator:
        """The configured model's generator (T2V_MODEL)."""
        return self.generator_for(None)

    @property
    def resident(self) -> str | None:
        """The model name whose pipeline is loaded now, or None."""
        return self._loaded

    def generator_for(self, model: str | None, job: JobParams | None = None) -> VideoGenerator:
        """The generator of `model` (a registry id, `tiny:<id>`, or None for the configured model), loaded on
        first use; a compiled model also runs one warm-up step then, not in the first job. Another model
        resident is unloaded first, and the switch is logged with its time. Under T2V_MEMORY=auto the memory
        preset is planned for `job`; a later job that needs a smaller preset reloads the model with it."""
        name = self.source_of(model)
        generator = self._generator
        if generator is not None and self._loaded == name and not (job and generator.needs_smaller_preset(job)):
            return generator  # no wait while another thread's job runs
        with self.lock:
            if self._generator is not None and self._loaded == name:
                if not (job and self._generator.needs_smaller_preset(job)):
                    return self._generator
                log.info("%dx%d, %d frames needs the %s memory preset: reloading %s", job.width, job.height,
                         job.num_frames, self._generator.preset_for(job), name)
            started, previous = time.perf_counter(), self._loaded
            self.unload()
            generator = self._load(name, job)
            self._generator, self._loaded = generator, name
            if previous is not None:
                log.info("switched model %s -> %s in %.1f s", previous, name, time.perf_counter() - started)
            return generator

    def source_of(self, model: str | None) -> str:
        """The name a model loads from. A server whose T2V_MODEL is a tiny build serves the tiny build of
        every registry id under the id's own name; the configured model's id loads the configured folder."""
        configured = self.settings.model
        model_id, is_tiny = registry.split_tiny(model or configured)
        if is_tiny or (model is not None and registry.split_tiny(configured)[1]):
            return registry.TINY_PREFIX + model_id
        if model is None or model == configured or model_id == self._configured_id():
            return configured
        return model

    def _configured_id(self) -> str | None:
        try:
            return resolve_model(self.settings.model, self.settings.data_dir, self.settings.models_dir)[0].id
        except (OSError, ValueError):  # not there (yet): ids load from their own folders
            return None

    def _load(self, name: str, job: JobParams | None = None) -> VideoGenerator:
        s = self.settings
        speed = SpeedOptions(preset=s.speed, fp8=s.fp8, vae_tiling=s.vae_tiling, cache=s.cache,
                             fbc_threshold=s.fbc_threshold, attention_backend=s.attention_backend,
                             compile=s.compile, mask_free=s.mask_free)
        with model_construction():  # no other thread builds a module while this load patches torch.nn
            generator = VideoGenerator(name, s.data_dir, s.device, s.memory, speed, self.progress_bar,
                                       models_dir=s.models_dir, job=job)
        if s.attention_backend and generator.speed.attention_backend != s.attention_backend:
            log.info("%s passes an attention mask, which T2V_ATTENTION_BACKEND=%s cannot take: it runs on %s",
                     generator.entry.id, s.attention_backend, generator.speed.attention_backend)
        if generator.speed.compile:
            for params in warm_up_params(s, generator.entry, generator.is_tiny):
                generator.warm_up(params)
        if registry.installed_loras(s.models_dir) and (problem := generator.lora_problem()):
            log.warning("jobs with LoRAs will fail on %s: %s", name, problem)
        return generator

    def unload(self) -> None:
        """Unload the resident video model, if any, and give its memory back (to the OS, and to CUDA)."""
        with self.lock:
            if self._generator is None:
                return
            generator, self._generator, self._loaded = self._generator, None, None
            generator.unload()
            del generator
            gc.collect()
            if self.settings.device.startswith("cuda"):
                import torch

                torch.cuda.empty_cache()

    @property
    def upscaler(self) -> Upscaler | None:
        """The configured upscaler (T2V_UPSCALER), or None when it is `none`."""
        return self.upscaler_named(self.upscaler_name)

    def upscaler_named(self, name: str) -> Upscaler | None:
        """An upscaler by release name, path, `tiny` or `none`; each is loaded once."""
        if name not in self._upscalers:
            s = self.settings
            path = resolve_upscaler(name, s.models_dir, s.data_dir)
            if path is None:
                return None
            self._upscalers[name] = Upscaler(path, s.device, half=self.half_upscaler, tile=s.upscale_tile,
                                             batch=s.upscale_batch)
        return self._upscalers[name]


# A long prompt for the second warm-up job: HunyuanVideo's trimmed prompt changes length per job (issue 18).
WARM_UP_PROMPTS = ("warm-up", "a slow aerial shot over a misty pine forest at dawn, sunlight breaking through the "
                              "fog, birds circling above a river that winds between the hills, cinematic, detailed")


def warm_up_params(settings: Settings, entry: registry.ModelEntry | None = None,
                   tiny: bool = False) -> list[JobParams]:
    """Two one-step jobs a compiled model runs at load: at the size and length a job without them gets (the
    model's default size preset and clip length within the caps; a tiny build's tiny size), then at its second
    size with a long prompt. Sizes and trimmed prompts change the shapes per job; once Dynamo has seen two, it
    compiles for dynamic shapes now, not in a user's job."""
    entry = entry or registry.MODELS[registry.DEFAULT_MODEL]
    rules = model_rules(Rules(limits=Limits.from_settings(settings), tiny=tiny), entry.id)
    sizes = (rules.default_size, rules.presets[1] if len(rules.presets) > 1 else rules.default_size)
    return [JobParams(prompt=prompt[:rules.max_prompt_chars], model=entry.id, width=size.width, height=size.height,
                      num_frames=rules.default_frames, num_inference_steps=1, seed=0)
            for size, prompt in zip(sizes, WARM_UP_PROMPTS)]


def run_job(params: JobParams, settings: Settings, on_progress: ProgressFn | None = None,
            should_cancel: Callable[[], bool] | None = None, *, models: Models | None = None,
            output: Path | None = None, progress_bar: bool = False, model: str | None = None,
            image=None, on_preview: PreviewFn | None = None) -> VideoResult | None:
    """Generate (and, if `params.upscale`, upscale) one video into `output`; return what was written.

    `model` is a registry id (None: the configured model); `image`, a PIL image, makes it image-to-video.
    `on_preview` gets a preview of the latents every T2V_PREVIEW_EVERY denoising steps (`pipeline.preview`).
    In a group (`pipeline.parallel`), every rank calls this with the same job: ranks other than 0 denoise their
    share and return None; rank 0 alone reports progress and previews, decodes, upscales and encodes.
    """
    models = models or Models(settings, progress_bar=progress_bar)
    on_progress = on_progress or (lambda stage, done, total: None)
    should_cancel = should_cancel or (lambda: False)
    output = Path(output or Path(settings.output_dir) / f"t2v_{params.seed}.mp4")
    output.parent.mkdir(parents=True, exist_ok=True)
    timings = {}

    started = time.perf_counter()
    latents = output.with_suffix(".latents.pt") if settings.keep_latents else None
    loras = lora_files(params, settings.models_dir)
    with models.lock:
        generator = models.generator_for(model, params)
        previews = (preview.every_n_steps(settings.preview_every, generator.entry.family, on_preview)
                    if on_preview and settings.preview_every else None)
        with generator.loras_applied(loras):
            frames = generator.generate(params, lambda i, n: on_progress("denoising", i, n), should_cancel, latents,
                                        image=image, on_latents=previews,
                                        on_decode=lambda i, n: on_progress("decoding", i, n))
            audio = generator.last_audio
    if frames is None:  # a rank of a group other than 0: its share is done
        return None
    timings["generate"] = time.perf_counter() - started

    upscaler = models.upscaler if params.upscale else None
    outscale = params.outscale if upscaler else 1
    stream: Iterable[np.ndarray] = upscaler.stream(frames, outscale) if upscaler else frames
    stage = "upscaling" if upscaler else "encoding"
    total = len(frames)

    if progress_bar:
        stream = _bar(stream, total, stage)
    poster = output.with_suffix(".jpg")
    stream = _poster_at(stream, total // 2, poster)  # the middle frame as the MP4 shows it: upscaled, if it is
    stream = _progressed(stream, stage, total, on_progress, should_cancel)
    video_only = output.with_name(f".{output.stem}.video.mp4") if audio else output
    encode_s, upscale_s = encode_stream(stream, video_only, params.fps, settings.crf)
    timings["upscale" if upscaler else "encode"] = upscale_s
    timings["encode_thread"] = encode_s
    if audio:
        timings["audio_mux"] = with_soundtrack(video_only, audio, output)
    timings["total"] = time.perf_counter() - started

    height, width = frames.shape[1] * outscale, frames.shape[2] * outscale
    return VideoResult(
        path=output, width=width, height=height, frames=total, fps=params.fps,
        duration_s=total / params.fps, seed=params.seed, size_bytes=output.stat().st_size,
        sha256=file_sha256(output), poster_path=poster, timings_s={k: round(v, 3) for k, v in timings.items()},
        rendered=(frames.shape[2], frames.shape[1]),
        audio=audio.record() if audio else None,
    )


class EmptySuggestion(RuntimeError):
    """The enhancer wrote nothing usable (only spaces or symbols)."""


def enhance_prompt(params: EnhanceParams, settings: Settings, *, models: Models, image=None,
                   should_cancel: Callable[[], bool] | None = None) -> dict:
    """The model's suggestion for `params.prompt`: {"prompt": the suggestion, "original_prompt", "seed",
    "timings_s"}. The suggestion is cut to T2V_MAX_PROMPT_CHARS at a word, so a generate job takes it as it is."""
    started = time.perf_counter()
    with models.lock:
        generator = models.generator_for(params.model)
        text = generator.enhance_prompt(params.prompt, params.seed, image, should_cancel)
    suggestion = fit_prompt(text, settings.max_prompt_chars)
    if not suggestion:
        raise EmptySuggestion("the prompt enhancer wrote no usable text; try again (another seed)")
    return {"prompt": suggestion, "original_prompt": params.prompt, "seed": params.seed,
            "timings_s": {"enhance": round(time.perf_counter() - started, 3)}}


def fit_prompt(text: str, max_chars: int) -> str:
    """`text` without surrounding space, and at most `max_chars` long: cut at the last space that fits."""
    text = " ".join(text.split())  # one line: a prompt field keeps no layout
    if len(text) <= max_chars:
        return text
    head = text[:max_chars + 1]
    return head.rsplit(" ", 1)[0] if " " in head else text[:max_chars]


def with_soundtrack(video_only: Path, audio: Audio, output: Path) -> float:
    """Mux `audio` (AAC) beside the video of `video_only` into `output`, atomically; `video_only` is removed.
    Returns the seconds it took."""
    started = time.perf_counter()
    tmp = output.with_name(f".{output.name}.part")
    try:
        mux_waveform(video_only, audio, tmp)
        os.replace(tmp, output)
    finally:
        video_only.unlink(missing_ok=True)
        tmp.unlink(missing_ok=True)
    return time.perf_counter() - started


def lora_files(params: JobParams, models_dir: Path) -> list[tuple[str, Path, float]]:
    """(name, file, scale) of each LoRA the job names. The API checked the names against its own node's
    models/loras; one missing on this node fails the job (MissingWeightsError) before any model work."""
    files = []
    for lora in params.loras:
        try:
            files.append((lora.name, registry.lora_file(models_dir, lora.name), lora.scale))
        except KeyError:
            raise MissingWeightsError(f"LoRA {lora.name!r} is not installed on this worker's node (no "
                                      f"{lora.name}.safetensors in T2V_MODELS_DIR/loras)") from None
    return files


def upscale_file(source: Path, output: Path, upscaler: Upscaler, outscale: int, crf: int,
                 on_progress: ProgressFn | None = None, should_cancel: Callable[[], bool] | None = None,
                 progress_bar: bool = False, info: VideoInfo | None = None) -> VideoResult:
    """Upscale an existing clip into `output`, keeping its frame rate, frame count and audio.

    Decoding runs in its own thread ahead of the model, and encoding in another behind it, so on
    a GPU both overlap the upscaler. The clip is never held whole. A file that stops decoding
    early (truncated or damaged) raises VideoInputError and leaves no output behind.
    """
    on_progress = on_progress or (lambda stage, done, total: None)
    should_cancel = should_cancel or (lambda: False)
    info = info or inspect_video(source)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    video_only = output.with_name(f".{output.stem}.video.mp4")
    poster = output.with_suffix(".jpg")
    timings = {}

    started = time.perf_counter()
    decoded = [0]

    def counted(frames):
        for frame in frames:
            decoded[0] += 1
            yield frame

    stream = upscaler.stream(prefetch(counted(read_frames(source))), outscale)
    if progress_bar:
        stream = _bar(stream, info.frames, "upscaling")
    stream = _poster_at(stream, info.frames // 2, poster)
    stream = _progressed(stream, "upscaling", info.frames, on_progress, should_cancel)
    try:
        encode_s, upscale_s = encode_stream(stream, video_only, info.fps, crf)
    except (av.FFmpegError, ValueError) as exc:
        poster.unlink(missing_ok=True)
        raise VideoInputError(f"the video stopped decoding after {decoded[0]} of {info.frames} frames "
                              f"({type(exc).__name__}); the file is truncated or damaged") from None
    timings.update(upscale=upscale_s, encode_thread=encode_s)
    if decoded[0] < info.frames:
        video_only.unlink(missing_ok=True)
        poster.unlink(missing_ok=True)
        raise VideoInputError(f"the video ended after {decoded[0]} of {info.frames} frames; "
                              "the file is truncated or damaged")

    t = time.perf_counter()
    if info.audio_codec:
        tmp = output.with_name(f".{output.name}.part")
        try:
            timings_key = "audio_" + mux_audio(video_only, source, tmp)
            os.replace(tmp, output)
        finally:
            video_only.unlink(missing_ok=True)
            tmp.unlink(missing_ok=True)
        timings[timings_key] = time.perf_counter() - t
    else:
        os.replace(video_only, output)
    timings["total"] = time.perf_counter() - started

    return VideoResult(
        path=output, width=info.width * outscale, height=info.height * outscale, frames=decoded[0], fps=info.fps,
        duration_s=decoded[0] / info.fps, seed=None, size_bytes=output.stat().st_size,
        sha256=file_sha256(output), poster_path=poster, timings_s={k: round(v, 3) for k, v in timings.items()},
        audio=audio_record(output) if info.audio_codec else None,
    )


def audio_record(path: Path) -> dict | None:
    """What a job's result says of a written MP4's sound, as `Audio.record` says it of a made one."""
    sound = probe_audio(path)
    if sound is None:
        return None
    return {"sample_rate": sound["sample_rate"], "channels": sound["channels"],
            "duration_s": round(sound["duration_s"], 4)}


def _progressed(frames: Iterable[np.ndarray], stage: str, total: int, on_progress: ProgressFn,
                should_cancel: Callable[[], bool]):
    """Report each frame as it passes, and stop at a cancel."""
    for i, frame in enumerate(frames, 1):
        yield frame
        on_progress(stage, i, total)
        if should_cancel():
            raise JobCanceled()


def _bar(frames: Iterable[np.ndarray], total: int, stage: str):
    from tqdm import tqdm

    return tqdm(frames, total=total, desc=stage, unit="frame")


def _poster_at(frames: Iterable[np.ndarray], index: int, path: Path):
    for i, frame in enumerate(frames):
        if i == index:
            write_poster(frame, path)
        yield frame


def prefetch(items: Iterable, depth: int = 8):
    """Run `items` in a thread, `depth` ahead of the consumer (decoding overlaps the model)."""
    handoff: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    failure: list[BaseException] = []
    stop = threading.Event()

    def produce():
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        handoff.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
        except BaseException as exc:  # handed to the consumer
            failure.append(exc)
        handoff.put(done)

    thread = threading.Thread(target=produce, name="t2v-decoder", daemon=True)
    thread.start()
    try:
        while (item := handoff.get()) is not done:
            yield item
        if failure:
            raise failure[0]
    finally:
        stop.set()


def encode_stream(frames: Iterable[np.ndarray], output: Path, fps: float, crf: int) -> tuple[float, float]:
    """Encode frames into `output` with the encoder in its own thread; return (encode_s, produce_s).

    Writes to a temporary sibling and renames it into place only after the last frame, so a crash or
    cancel never leaves a partial MP4 under the final name.
    """
    tmp = output.with_name(f".{output.name}.part")
    handoff: queue.Queue = queue.Queue(maxsize=8)
    done = object()
    failure: list[BaseException] = []
    encode_time = [0.0]

    def encode():
        try:
            with VideoWriter(tmp, fps=fps, crf=crf) as writer:
                while (frame := handoff.get()) is not done:
                    t = time.perf_counter()
                    writer.write(frame)
                    encode_time[0] += time.perf_counter() - t
        except BaseException as exc:  # handed to the producer below
            failure.append(exc)
            while handoff.get() is not done:  # drain so the producer never blocks
                pass

    thread = threading.Thread(target=encode, name="t2v-encoder", daemon=True)
    thread.start()
    produce_time = 0.0
    try:
        iterator = iter(frames)
        while True:
            t = time.perf_counter()
            frame = next(iterator, done)
            produce_time += time.perf_counter() - t
            handoff.put(frame)
            if frame is done:
                break
    except BaseException:
        handoff.put(done)
        thread.join()
        tmp.unlink(missing_ok=True)
        raise
    thread.join()
    if failure:
        tmp.unlink(missing_ok=True)
        raise failure[0]
    os.replace(tmp, output)
    return encode_time[0], produce_time


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
