"""The background GPU worker: claim one queued job at a time, run it, store the video, record the outcome.

It runs as a thread inside the API process (`T2V_WORKER=thread`, the default), or standalone with
`python worker.py`, sharing the job store and the blob store with API nodes that run `T2V_WORKER=off`.
`python worker.py --gpus all` runs one such worker process per GPU, and restarts one that dies.
The models load once per worker and are reused for every job.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from config import ENV_NAMES, MEMORY_PRESETS, ConfigError, Settings
from storage.blobs import BlobStore, StorageError, open_blob_store
from storage.jobs import (FAILED, PROCESSING, TERMINAL, WORKER_REPORT_EVERY_S, JobStore, StoreUnavailable,
                          open_job_store)
from webhooks import Dispatcher

log = logging.getLogger("t2v.worker")

# Share of the whole job each stage covers, for the progress bar and the ETA.
STAGE_SPANS = {
    "generate+upscale": {"denoising": (0.0, 0.7), "upscaling": (0.7, 0.97), "uploading": (0.97, 1.0)},
    "generate": {"denoising": (0.0, 0.9), "encoding": (0.9, 0.97), "uploading": (0.97, 1.0)},
    "upscale": {"fetching": (0.0, 0.01), "upscaling": (0.01, 0.97), "uploading": (0.97, 1.0)},
}
PROGRESS_EVERY_S = 0.5
LOAD_RETRY_FIRST_S, LOAD_RETRY_MAX_S = 30.0, 600.0  # a model that failed to load is tried again, ever less often
UPLOAD_TEMP_MAX_AGE_S = 3600  # an API process checks an upload in seconds; older temporary files are orphans
_REFERENCE_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


def upload_path(settings: Settings, reference_id: str) -> Path:
    """Where the API checks an uploaded clip before it goes to the blob store. The name is the
    server-made reference id, never the client's."""
    return Path(settings.data_dir) / "uploads" / f"{reference_id}.video"


def input_key(reference_id: str) -> str:
    """The blob key of a job's input (an upscale job's clip, an image-to-video job's image); workers on any
    node fetch it from there."""
    return f"inputs/{reference_id}"


def preview_key(reference_id: str) -> str:
    """The blob key of a job's latest preview (an animated WebP), overwritten as denoising goes on."""
    return f"previews/{reference_id}.webp"


def discard_input(settings: Settings, blobs: BlobStore, job: dict) -> None:
    """Delete a job's input (clip or image) once the job has ended, unless T2V_KEEP_INPUTS is on.
    A storage fault is only logged: the worker's sweep deletes the input later."""
    if settings.keep_inputs or (job["kind"] != "upscale" and not job["params"].get("image_key")):
        return
    try:
        blobs.delete(input_key(job["reference_id"]))
    except StorageError as exc:
        log.warning("job %s: its input was not deleted (%s); a later sweep will", job["reference_id"], exc)


class Worker:
    def __init__(self, settings: Settings, jobs: JobStore, blobs: BlobStore, models=None,
                 worker_id: str | None = None, poll_s: float = 0.5):
        from pipeline.run import Models

        self.settings = settings
        self.jobs = jobs
        self.blobs = blobs
        self.models = models or Models(settings)
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self.poll_s = poll_s
        self.work_dir = Path(settings.data_dir) / "work"
        self.load_error: str | None = None
        self.upscaler_error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_requeue = 0.0
        self._load_retry_s = 0.0
        self._next_load = 0.0
        self.served = self.served_models()
        self._loop_ended = threading.Event()  # run_forever has returned: the presence reporter stops

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> "Worker":
        self._thread = threading.Thread(target=self.run_forever, name="t2v-worker", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def model_loaded(self) -> bool:
        return self.models._generator is not None

    @property
    def model_error(self) -> str | None:
        """Why the generator or the configured upscaler cannot be used (reported on /health), or None."""
        return "; ".join(e for e in (self.load_error, self.upscaler_error) if e) or None

    def run_forever(self) -> None:
        self._loop_ended.clear()
        reporter = threading.Thread(target=self._report_presence, name="t2v-worker-report", daemon=True)
        reporter.start()
        try:
            self._loop()
        finally:
            self._loop_ended.set()
            reporter.join()

    def _loop(self) -> None:
        try:
            self.sweep_work()
        except StoreUnavailable as exc:
            log.warning("job store unavailable (%s); the work folder was not swept", exc)
        self.check_upscaler()
        self.load_models()
        log.info("worker %s: ready for jobs; models: %s", self.worker_id, ", ".join(self.served) or "none installed")
        while not self._stop.is_set():
            try:
                ran = self.run_once()
            except StoreUnavailable as exc:
                log.warning("job store unavailable (%s); retrying", exc)
                ran = False
            except Exception:  # never let one bad job or bug end the worker
                log.exception("worker loop error")
                ran = False
            if not ran:
                self._stop.wait(self.poll_s)

    def load_models(self) -> None:
        """Load the generator. Until it loads, this worker claims no generation job and tries again later,
        waiting twice as long each time; the reason is logged once (again only if it changes)."""
        try:
            self.models.generator
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            self._load_retry_s = min(self._load_retry_s * 2 or LOAD_RETRY_FIRST_S, LOAD_RETRY_MAX_S)
            self._next_load = time.monotonic() + self._load_retry_s
            if error != self.load_error:
                log.error("could not load the model: %s; this worker takes no generation jobs until it loads "
                          "(next try in %.0fs)", error, self._load_retry_s)
            else:
                log.debug("the model still does not load; next try in %.0fs", self._load_retry_s)
            self.load_error = error
            return
        if self.load_error:
            log.info("the model loaded; this worker takes generation jobs again")
        self.load_error, self._load_retry_s = None, 0.0

    def served_models(self) -> tuple[str, ...]:
        """The model ids whose generation jobs this worker claims: those installed on this node (all of them,
        as tiny builds, under T2V_MODEL=tiny). Read again at each report, so a model downloaded meanwhile counts."""
        from pipeline.models import served_models

        return tuple(served_models(self.settings))

    def _report_presence(self) -> None:
        """Every few seconds while the worker runs, record in the job store what it takes, so the API can tell
        why a queued job waits; the record is removed when the worker stops."""
        while True:
            try:
                self.served = self.served_models()
                self.jobs.worker_seen(self.worker_id, self.job_kinds, self.served)
            except StoreUnavailable as exc:
                log.debug("worker record not written: %s", exc)
            except Exception:  # a bad model folder must not silence the worker's record for good
                log.exception("worker record not written")
            if self._loop_ended.wait(WORKER_REPORT_EVERY_S):
                break
        try:
            self.jobs.worker_stopped(self.worker_id)
        except StoreUnavailable as exc:
            log.debug("worker record not removed: %s", exc)

    @property
    def job_kinds(self) -> tuple[str, ...]:
        """The kinds of job this worker can run now: generation needs the model, upscaling the upscaler."""
        return tuple(kind for kind, error in (("generate", self.load_error), ("upscale", self.upscaler_error))
                     if error is None)

    def check_upscaler(self) -> None:
        """Load the configured upscaler now: a broken file is reported at start, not after a job's denoising."""
        try:
            self.models.upscaler
            self.upscaler_error = None
        except Exception as exc:
            self.upscaler_error = str(exc)
            log.error("the upscaler cannot be used: %s", exc)

    # ------------------------------------------------------------------ one job

    def run_once(self) -> bool:
        """Requeue jobs of dead workers now and then, claim the oldest queued job and run it."""
        now = time.monotonic()
        if now - self._last_requeue >= min(self.settings.lease_s / 2, 30):
            requeued, ended = self.jobs.requeue_expired(self.settings.max_attempts)
            if requeued or ended:
                log.info("lost workers: %d job(s) re-queued, %d ended", requeued, ended)
            self.sweep_inputs()
            self.sweep_previews()
            self._last_requeue = now
        if self.load_error and now >= self._next_load:
            self.load_models()
        job = self.jobs.claim(self.worker_id, self.settings.lease_s, kinds=self.job_kinds, models=self.served)
        if job is None:
            return False
        log.info("job %s: claimed (attempt %d)", job["reference_id"], job["attempts"])
        with _Lease(self.jobs, job["reference_id"], self.worker_id, self.settings.lease_s) as lease:
            self._run(job, lease)
        if not lease.lost:
            discard_input(self.settings, self.blobs, job)
        return True

    def sweep_inputs(self, min_age_s: float = 300) -> int:
        """Delete stored inputs no job will read: their job has ended (say, failed `worker_lost`), or no job
        was ever recorded for them (the API died between storing and queueing). Returns how many."""
        if self.settings.keep_inputs:
            return 0
        removed = 0
        try:
            for key, modified in list(self.blobs.list_keys("inputs/")):
                if time.time() - modified < min_age_s:
                    continue  # its job may be about to be queued
                job = self.jobs.get(key.split("/", 1)[1])
                if job is None or job["status"] in TERMINAL:
                    self.blobs.delete(key)
                    removed += 1
        except StorageError as exc:
            log.warning("could not sweep stored inputs: %s", exc)
        if removed:
            log.info("removed %d stored input(s) whose job had ended", removed)
        return removed

    def sweep_previews(self) -> int:
        """Delete stored previews whose job is gone (deleted while its worker was storing one). Returns how many."""
        removed = 0
        try:
            for key, _ in list(self.blobs.list_keys("previews/")):
                if self.jobs.get(key.split("/", 1)[1].removesuffix(".webp")) is None:
                    self.blobs.delete(key)
                    removed += 1
        except StorageError as exc:
            log.warning("could not sweep stored previews: %s", exc)
        return removed

    def sweep_work(self) -> int:
        """At start, delete what dead workers left in the work folder (partial MP4s, posters, fetched inputs)
        once older than a lease, unless its job is running now or failed `storage_error` (that video is
        kept for the operator); and uploads an API process died while checking. Returns how many."""
        now, removed = time.time(), 0
        uploads = Path(self.settings.data_dir) / "uploads"
        for folder, max_age in ((self.work_dir, self.settings.lease_s), (uploads, UPLOAD_TEMP_MAX_AGE_S)):
            for path in folder.iterdir() if folder.is_dir() else ():
                try:
                    if not path.is_file() or now - path.stat().st_mtime < max_age:
                        continue
                    reference_id = path.name.lstrip(".").split(".", 1)[0]
                    if not _REFERENCE_ID.match(reference_id) or self._keeps_files(reference_id):
                        continue
                    path.unlink()
                    removed += 1
                except OSError:  # gone already, or not ours to delete: never a reason to stop the worker
                    continue
        if removed:
            log.info("removed %d file(s) that stopped workers or API processes had left", removed)
        return removed

    def _keeps_files(self, reference_id: str) -> bool:
        job = self.jobs.get(reference_id)
        return job is not None and (job["status"] == PROCESSING or (
            job["status"] == FAILED and (job["error"] or {}).get("code") == "storage_error"))

    def _run(self, job: dict, lease: "_Lease") -> None:
        from pipeline.generate import JobCanceled

        ref = job["reference_id"]
        try:
            with GpuPeak(self.settings.device) as gpu:
                result = self._produce(job, lease)
        except JobCanceled:
            if lease.lost:
                log.warning("job %s: lease lost to another worker; dropped", ref)
            else:
                self.jobs.mark_canceled(ref, self.worker_id)
                log.info("job %s: canceled", ref)
            return
        except Exception as exc:
            code, message = classify_error(exc)
            log.warning("job %s: failed (%s: %s)", ref, code, message)
            self.jobs.fail(ref, self.worker_id, code, message)
            return
        if gpu.peak_bytes is not None:
            result["gpu_peak_bytes"] = gpu.peak_bytes
        if self.jobs.complete(ref, self.worker_id, result):
            log.info("job %s: completed in %.1fs", ref, result["timings_s"].get("total", 0))
        else:
            log.warning("job %s: finished, but the lease was lost; the record was not changed", ref)

    def _produce(self, job: dict, lease: "_Lease") -> dict:
        """Make the job's MP4 in the work folder, then store it and its poster; return the result record."""
        from pipeline.run import run_job, upscale_file
        from pipeline.spec import JobParams

        ref, params = job["reference_id"], job["params"]
        self.work_dir.mkdir(parents=True, exist_ok=True)
        output = self.work_dir / f"{ref}.mp4"
        if job["kind"] == "upscale":
            progress = _ProgressReporter(self.jobs, ref, self.worker_id, STAGE_SPANS["upscale"])
            upscaler = self.models.upscaler_named(params["upscaler"] or self.settings.upscaler)
            if upscaler is None:
                raise ModelUnavailable("this server has no upscaler (T2V_UPSCALER=none)")
            source = self.work_dir / f"{ref}.input"
            try:
                progress("fetching", 0, 1)
                try:
                    self.blobs.get(input_key(ref), source)
                except StorageError as exc:
                    raise InputUnavailable(f"the uploaded clip could not be fetched: {exc}") from None
                result = upscale_file(source, output, upscaler, params["outscale"], self.settings.crf, progress,
                                      lease.should_cancel)
            finally:
                source.unlink(missing_ok=True)
        else:
            spec = JobParams(**params)
            progress = _ProgressReporter(self.jobs, ref, self.worker_id,
                                         STAGE_SPANS["generate+upscale" if spec.upscale else "generate"])
            image = self._fetch_image(spec.image_key, ref) if spec.image_key else None
            previews = _PreviewWriter(self.jobs, self.blobs, ref, self.worker_id, self.work_dir,
                                      spec.num_frames / spec.fps) if self.settings.preview_every else None
            try:
                result = run_job(spec, self.settings, progress, lease.should_cancel, models=self.models,
                                 output=output, model=spec.model, image=image, on_preview=previews)
            finally:
                if previews:
                    previews.close()
        progress("uploading", 0, 1)
        started = time.perf_counter()
        video_key, poster_key = f"videos/{ref}.mp4", f"posters/{ref}.jpg"
        # The poster first: if the video upload fails, the MP4 stays on local disk for a retry.
        self.blobs.put(result.poster_path, poster_key)
        self.blobs.put(result.path, video_key)
        for path in (output, result.poster_path):  # S3 uploads copy; a local store has already moved them
            Path(path).unlink(missing_ok=True)
        timings = dict(result.timings_s, upload=round(time.perf_counter() - started, 3))
        return {
            "video_key": video_key, "poster_key": poster_key, "size_bytes": result.size_bytes,
            "sha256": result.sha256, "width": result.width, "height": result.height, "frames": result.frames,
            "fps": result.fps, "duration_s": result.duration_s, "seed": result.seed, "timings_s": timings,
            "audio": result.audio,  # the soundtrack's sample rate, channels and duration; None for a silent MP4
        }


    def _fetch_image(self, key: str, ref: str):
        """The job's input image, fetched from the blob store (the API checked it before queueing)."""
        from pipeline.spec import load_image

        path = self.work_dir / f"{ref}.image"
        try:
            self.blobs.get(key, path)
            return load_image(path)  # upright by its EXIF orientation, as a phone photo needs
        except StorageError as exc:
            raise InputUnavailable(f"the input image could not be fetched: {exc}") from None
        finally:
            path.unlink(missing_ok=True)


class GpuPeak:
    """torch.cuda.max_memory_allocated over one job on a CUDA device, for GET /metrics; None on the CPU.
    One worker runs one job at a time on its GPU, so the peak is that job's."""

    def __init__(self, device: str):
        self.device, self.peak_bytes = device, None

    def __enter__(self) -> "GpuPeak":
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self.device.startswith("cuda") and exc_type is None:
            import torch

            self.peak_bytes = int(torch.cuda.max_memory_allocated(self.device))
        return False


class ModelUnavailable(RuntimeError):
    pass


class InputUnavailable(RuntimeError):
    """An upscale job's uploaded clip could not be fetched from the blob store."""


def classify_error(exc: BaseException) -> tuple[str, str]:
    """(code, message) for a failed job. Messages are short and hold no paths beyond the data folder."""
    import torch

    from pipeline.generate import LoraError, MissingWeightsError
    from pipeline.upscale import UpscalerLoadError
    from pipeline.video import VideoInputError

    if isinstance(exc, VideoInputError):
        return "invalid_video", str(exc)
    if isinstance(exc, InputUnavailable):
        return "storage_error", str(exc)
    if isinstance(exc, StorageError):
        return "storage_error", f"{exc}; the video was kept on the worker's disk"
    if isinstance(exc, (ModelUnavailable, MissingWeightsError, UpscalerLoadError, LoraError)):
        return "model_error", str(exc)
    if isinstance(exc, torch.OutOfMemoryError):
        return "out_of_memory", "the GPU ran out of memory; try a smaller size, fewer frames or another T2V_MEMORY preset"
    return "generation_error", f"{type(exc).__name__}: {exc}"[:500]


class _Lease:
    """Renews the job's lease in a thread while it runs; notices cancels and a lost lease."""

    def __init__(self, jobs: JobStore, reference_id: str, worker_id: str, lease_s: float):
        self.jobs, self.ref, self.worker_id, self.lease_s = jobs, reference_id, worker_id, lease_s
        self.every_s = min(lease_s / 3, 0.5)  # how soon a cancel is seen: the generator stops at the next block
        self.canceled = False
        self.lost = False
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._renew, name="t2v-lease", daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._done.set()
        self._thread.join()

    def _renew(self):
        while not self._done.wait(self.every_s):
            try:
                job = self.jobs.heartbeat(self.ref, self.worker_id, self.lease_s)
            except StoreUnavailable:
                continue  # keep working; the lease may still be renewed in time
            if job is None:
                self.lost = True
            elif job["cancel_requested"]:
                self.canceled = True

    def should_cancel(self) -> bool:
        return self.canceled or self.lost


class _ProgressReporter:
    """Turns per-stage progress into one overall fraction and an ETA, written at most twice a second."""

    def __init__(self, jobs: JobStore, reference_id: str, worker_id: str, spans: dict):
        self.jobs, self.ref, self.worker_id = jobs, reference_id, worker_id
        self.spans = spans
        self.started = time.monotonic()
        self.last_write = 0.0
        self.stage = None

    def __call__(self, stage: str, done: int, total: int) -> None:
        low, high = self.spans.get(stage, (0.0, 1.0))
        progress = low + (high - low) * (done / total if total else 0.0)
        now = time.monotonic()
        if stage == self.stage and now - self.last_write < PROGRESS_EVERY_S and done != total:
            return
        new_stage = stage != self.stage
        self.stage, self.last_write = stage, now
        elapsed = now - self.started
        eta = round(elapsed / progress * (1 - progress), 1) if progress > 0.02 else None
        label = f"{stage} {done}/{total}" if stage in ("denoising", "upscaling", "encoding") else stage
        fields = {"stage": label, "progress": round(progress, 4), "eta_s": eta}
        try:
            self.jobs.update_progress(self.ref, self.worker_id, **fields)
            if new_stage:  # the live event log (GET /jobs/<id>/events) gets the same, as it happens
                self.jobs.append_event(self.ref, self.worker_id, "stage", {"stage": stage})
            self.jobs.append_event(self.ref, self.worker_id, "progress", fields)
        except StoreUnavailable:
            pass  # progress is best effort; the outcome is recorded at the end


class _PreviewWriter:
    """Stores a job's latest preview as `previews/<id>.webp` and logs a `preview` event, in a thread of its own:
    denoising never waits on the encoder or the blob store. A preview that comes while another is being stored
    replaces any that waits; `close()` stores the last one and stops."""

    def __init__(self, jobs: JobStore, blobs: BlobStore, reference_id: str, worker_id: str, work_dir: Path,
                 duration_s: float):
        self.jobs, self.blobs, self.ref, self.worker_id = jobs, blobs, reference_id, worker_id
        self.path = work_dir / f"{reference_id}.preview.webp"
        self.duration_s = duration_s
        self._waiting: tuple | None = None
        self._closed = False
        self._wake = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="t2v-preview", daemon=True)
        self._thread.start()

    def __call__(self, step: int, total: int, frames) -> None:
        with self._wake:
            self._waiting = (step, total, frames)
            self._wake.notify()

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join()

    def _run(self) -> None:
        while True:
            with self._wake:
                self._wake.wait_for(lambda: self._waiting is not None or self._closed)
                if self._waiting is None:
                    return
                waiting, self._waiting = self._waiting, None
            self._store(*waiting)

    def _store(self, step: int, total: int, frames) -> None:
        from pipeline.preview import encode_webp

        key = preview_key(self.ref)
        try:
            self.path.write_bytes(encode_webp(frames, 1000 * self.duration_s / len(frames)))
            self.blobs.put(self.path, key)
            height, width = frames.shape[1:3]
            event = {"step": step, "total": total, "width": width, "height": height, "frames": len(frames)}
            if self.jobs.append_event(self.ref, self.worker_id, "preview", event) is None \
                    and self.jobs.get(self.ref) is None:
                self.blobs.delete(key)  # the job was deleted meanwhile; nothing may bring its files back
        except (OSError, StorageError, StoreUnavailable) as exc:
            log.warning("job %s: preview at step %d not stored: %s", self.ref, step, exc)  # the job goes on
        finally:
            self.path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------- python worker.py

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"

# The settings a worker uses, as flags. Each flag overrides its environment variable; the stores'
# addresses and keys (MONGODB_URI, BUCKET_NAME, AWS_*) come from the environment only.
WORKER_FLAGS = {
    "model": "diffusers model folder, or 'tiny' (random weights, for trying things)",
    "upscaler": "Real-ESRGAN weights: a .pth/.safetensors path, a release name, 'tiny' or 'none'",
    "memory": "GPU memory preset; 'auto' picks from free VRAM",
    "cuda_device_id": "which GPU, an index within CUDA_VISIBLE_DEVICES; unset means 0",
    "data_dir": "SQLite file (without MONGODB_URI), local videos (without BUCKET_NAME), work files",
    "models_dir": "where upscaler release names are looked up",
    "lease_s": "seconds of a running job's lease; an expired lease means its worker died",
    "max_attempts": "tries before a job whose worker died is failed",
    "fp8": "store transformer weights in float8",
    "vae_tiling": "decode the VAE in tiles",
    "fbc_threshold": "First Block Cache threshold, e.g. 0.05; 0 turns it off",
    "attention_backend": "diffusers attention backend, e.g. native, flash_varlen, sage_varlen",
    "compile": "regional torch.compile of the transformer blocks",
    "upscale_tile": "upscaler tile size in pixels; 0 = whole frames",
    "upscale_batch": "frames per upscaler batch",
    "crf": "H.264 quality: lower is better and bigger",
    "keep_inputs": "keep uploaded clips in the blob store after their job ends",
}
_TYPES = {"Path": Path, "int": int, "int | None": int, "float": float}


def _shown(value) -> str:
    if value is None:
        return "unset"
    if isinstance(value, Path) and not value.is_absolute():
        return f"./{value.as_posix()}"
    return str(value).lower() if isinstance(value, bool) else str(value)


def build_parser():
    import argparse

    from pipeline.cli import ArgumentParser

    p = ArgumentParser(
        prog="worker.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run t2v workers. Each claims queued jobs from the job store, one at a time, and stores\n"
                    "the videos in the blob store. Without --gpus or --cpu-workers, one worker runs in this process.",
        epilog="The job store and the blob store come from the environment (or .env): MONGODB_URI, BUCKET_NAME,\n"
               "REGION_NAME, AWS_ACCESS_KEY, AWS_SECRET_KEY, T2V_S3_ENDPOINT_URL; without them, SQLite and a folder\n"
               "under --data-dir. Examples:\n"
               "  python worker.py --gpus all           # one worker per GPU of this machine\n"
               "  python worker.py --gpus 0,1           # workers on GPUs 0 and 1 only\n"
               "  python worker.py --cpu-workers 2      # two workers on the CPU (tiny models, tests)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--gpus", metavar="LIST", help="'all', or GPU indices like 0,1,2,3: one worker process per GPU, "
                                                      "each sees only its own GPU; a worker that dies is restarted")
    group.add_argument("--cpu-workers", type=_positive_int, metavar="N", help="run N worker processes on the CPU")
    defaults = Settings()
    for name, text in WORKER_FLAGS.items():
        kind = Settings.__dataclass_fields__[name].type
        flag = "--" + name.replace("_", "-")
        text = f"{text} (${ENV_NAMES[name]}; default: {_shown(getattr(defaults, name))})"
        if kind == "bool":
            p.add_argument(flag, action=argparse.BooleanOptionalAction, help=text)
        elif name == "memory":
            p.add_argument(flag, choices=MEMORY_PRESETS, help=text)
        else:
            p.add_argument(flag, type=_TYPES.get(kind, str), metavar=name.split("_")[-1].upper(), help=text)
    return p


def _positive_int(raw: str) -> int:
    from argparse import ArgumentTypeError

    if not re.fullmatch(r"[0-9]{1,4}", raw) or int(raw) < 1:
        raise ArgumentTypeError(f"must be a whole number from 1 to 9999, got {raw!r}")
    return int(raw)


def visible_gpus() -> list[str]:
    """The GPUs this process may use: CUDA_VISIBLE_DEVICES's entries when set, else every GPU torch counts."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [gpu.strip() for gpu in visible.split(",") if gpu.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def gpu_slots(spec: str, visible: list[str]) -> list[tuple[str, dict]]:
    """(name, environment) per worker: `all`, or indices into the visible GPUs. Each worker process sees
    only its own GPU (CUDA_VISIBLE_DEVICES), as its device 0 (CUDA_DEVICE_ID)."""
    if spec == "all":
        chosen = visible
    else:
        parts = spec.split(",")
        if not all(re.fullmatch(r"[0-9]{1,3}", part.strip()) for part in parts):
            raise ValueError(f"--gpus takes 'all' or GPU indices like 0,1,2,3, got {spec!r}")
        indices = [int(part) for part in parts]
        if len(set(indices)) != len(indices):
            raise ValueError(f"--gpus {spec} names a GPU twice")
        missing = [i for i in indices if i >= len(visible)]
        if missing:
            raise ValueError(f"--gpus {spec}: there is no GPU {missing[0]}; {len(visible)} visible")
        chosen = [visible[i] for i in indices]
    if not chosen:
        raise ValueError("--gpus: no CUDA GPU is visible; use --cpu-workers N to run workers on the CPU")
    return [(f"gpu {gpu}", {"CUDA_VISIBLE_DEVICES": gpu, "CUDA_DEVICE_ID": "0"}) for gpu in chosen]


def cpu_slots(count: int) -> list[tuple[str, dict]]:
    return [(f"cpu {i}", {"CUDA_VISIBLE_DEVICES": "", "CUDA_DEVICE_ID": ""}) for i in range(count)]


def settings_env(overrides: dict) -> dict[str, str]:
    """The flags given, as the environment variables a child worker reads."""
    return {ENV_NAMES[name]: _shown(value) if isinstance(value, bool) else str(value)
            for name, value in overrides.items()}


RESTART_FIRST_S, RESTART_MAX_S = 1.0, 60.0
RAN_WELL_S = 60.0  # a worker that ran this long before it died starts the backoff over


@dataclass
class _Child:
    name: str
    env: dict
    proc: subprocess.Popen | None = None
    started: float = 0.0
    quick_exits: int = 0
    start_at: float = 0.0


class Supervisor:
    """One worker process per slot (a GPU, or the CPU). A worker that dies is started again after a delay
    that doubles while it keeps dying young. SIGTERM or SIGINT stops every worker after its current job;
    a second signal kills them."""

    def __init__(self, slots: list[tuple[str, dict]], env: dict[str, str], poll_s: float = 0.2):
        self.children = [_Child(name, {**os.environ, **env, **slot_env}) for name, slot_env in slots]
        self.poll_s = poll_s
        self.stopping = threading.Event()

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        log.info("supervisor: %d worker(s): %s", len(self.children), ", ".join(c.name for c in self.children))
        while not self.stopping.is_set():
            now = time.monotonic()
            for child in self.children:
                if child.proc is None and now >= child.start_at:
                    self._start(child)
                elif child.proc is not None and child.proc.poll() is not None:
                    self._schedule_restart(child, now)
            self.stopping.wait(self.poll_s)
        return self._stop_all()

    def _start(self, child: _Child) -> None:
        child.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve())], env=child.env)
        child.started = time.monotonic()
        log.info("supervisor: %s: worker started (pid %d)", child.name, child.proc.pid)

    def _schedule_restart(self, child: _Child, now: float) -> None:
        ran = now - child.started
        child.quick_exits = 0 if ran >= RAN_WELL_S else child.quick_exits + 1
        delay = min(RESTART_FIRST_S * 2 ** max(child.quick_exits - 1, 0), RESTART_MAX_S)
        log.warning("supervisor: %s: worker pid %d exited with code %s after %.0fs; restarting in %.0fs",
                    child.name, child.proc.pid, child.proc.returncode, ran, delay)
        child.proc, child.start_at = None, now + delay

    def _live(self) -> list[subprocess.Popen]:
        return [c.proc for c in self.children if c.proc is not None and c.proc.poll() is None]

    def _on_signal(self, signum, frame) -> None:
        if self.stopping.is_set():
            log.warning("supervisor: second signal; killing the workers")
            for proc in self._live():
                proc.kill()
        self.stopping.set()

    def _stop_all(self) -> int:
        live = self._live()
        log.info("supervisor: stopping %d worker(s) after their current job", len(live))
        for proc in live:
            proc.terminate()
        for proc in live:
            proc.wait()
        log.info("supervisor: all workers stopped")
        return 0


def run_worker(settings: Settings) -> int:
    """One worker in this process, until SIGTERM or SIGINT (it stops after its current job)."""
    try:
        worker = Worker(settings, open_job_store(settings), open_blob_store(settings))
    except (StoreUnavailable, StorageError, OSError) as exc:
        log.error("cannot open the stores: %s", exc)
        return 1

    def stop(signum, frame):
        log.info("stopping after the current job")
        worker._stop.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info("worker %s on %s, model %s", worker.worker_id, settings.device, settings.model)
    dispatcher = Dispatcher(settings, worker.jobs).start() if settings.webhook_secret else None
    try:
        worker.run_forever()
    finally:
        if dispatcher is not None:
            dispatcher.stop(timeout=settings.webhook_timeout_s + 5)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python worker.py`: one worker, or with --gpus/--cpu-workers a supervisor of one worker per slot."""
    parser = build_parser()
    args = parser.parse_args(argv)
    overrides = {name: value for name in WORKER_FLAGS if (value := getattr(args, name)) is not None}
    try:
        settings = Settings.from_env(**overrides)
        slots = (gpu_slots(args.gpus, visible_gpus()) if args.gpus is not None
                 else cpu_slots(args.cpu_workers) if args.cpu_workers else [])
    except (ConfigError, ValueError) as exc:
        message = str(exc)
        for name in overrides:  # a bad flag is named as the flag, a bad variable as the variable
            message = re.sub(rf"\b{ENV_NAMES[name]}\b", "--" + name.replace("_", "-"), message)  # not T2V_MODELS_DIR
        parser.error(message)
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    if slots:
        return Supervisor(slots, settings_env(overrides)).run()
    return run_worker(settings)


if __name__ == "__main__":
    sys.exit(main())
