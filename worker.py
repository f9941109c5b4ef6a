"""The background GPU worker: claim one queued job at a time, run it, store the video, record the outcome.

It runs as a thread inside the API process (`T2V_WORKER=thread`, the default), or standalone on
a GPU node with `python worker.py`, sharing MongoDB and S3 with API nodes that run `T2V_WORKER=off`.
The models load once per worker and are reused for every job.
"""

from __future__ import annotations

import logging
import secrets
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from config import Settings, settings_or_exit
from storage.blobs import BlobStore, StorageError, open_blob_store
from storage.jobs import TERMINAL, JobStore, StoreUnavailable, open_job_store

log = logging.getLogger("t2v.worker")

# Share of the whole job each stage covers, for the progress bar and the ETA.
STAGE_SPANS = {
    "generate+upscale": {"denoising": (0.0, 0.7), "upscaling": (0.7, 0.97), "uploading": (0.97, 1.0)},
    "generate": {"denoising": (0.0, 0.9), "encoding": (0.9, 0.97), "uploading": (0.97, 1.0)},
    "upscale": {"upscaling": (0.0, 0.97), "uploading": (0.97, 1.0)},
}


def upload_path(settings: Settings, reference_id: str) -> Path:
    """Where an uploaded clip waits for its job. The name is the server-made reference id, never the client's."""
    return Path(settings.data_dir) / "uploads" / f"{reference_id}.video"


def discard_upload(settings: Settings, job: dict) -> None:
    """Delete an upscale job's input once the job has ended, unless T2V_KEEP_INPUTS is on."""
    if job["kind"] == "upscale" and not settings.keep_inputs:
        upload_path(settings, job["reference_id"]).unlink(missing_ok=True)
PROGRESS_EVERY_S = 0.5


class Worker:
    def __init__(self, settings: Settings, jobs: JobStore, blobs: BlobStore, models=None,
                 worker_id: str | None = None, poll_s: float = 0.5):
        from pipeline.run import Models

        self.settings = settings
        self.jobs = jobs
        self.blobs = blobs
        self.models = models or Models(settings)
        self.worker_id = worker_id or f"{socket.gethostname()}-{secrets.token_hex(4)}"
        self.poll_s = poll_s
        self.work_dir = Path(settings.data_dir) / "work"
        self.load_error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_requeue = 0.0

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

    def run_forever(self) -> None:
        self.load_models()
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
        try:
            self.models.generator
            self.load_error = None
        except Exception as exc:
            self.load_error = f"{type(exc).__name__}: {exc}"
            log.error("could not load the model: %s", self.load_error)

    # ------------------------------------------------------------------ one job

    def run_once(self) -> bool:
        """Requeue jobs of dead workers now and then, claim the oldest queued job and run it."""
        now = time.monotonic()
        if now - self._last_requeue >= min(self.settings.lease_s / 2, 30):
            requeued, ended = self.jobs.requeue_expired(self.settings.max_attempts)
            if requeued or ended:
                log.info("lost workers: %d job(s) re-queued, %d ended", requeued, ended)
            self.sweep_uploads()
            self._last_requeue = now
        job = self.jobs.claim(self.worker_id, self.settings.lease_s)
        if job is None:
            return False
        log.info("job %s: claimed (attempt %d)", job["reference_id"], job["attempts"])
        with _Lease(self.jobs, job["reference_id"], self.worker_id, self.settings.lease_s) as lease:
            self._run(job, lease)
        if not lease.lost:
            discard_upload(self.settings, job)
        return True

    def sweep_uploads(self, min_age_s: float = 300) -> int:
        """Delete uploads no job will read: their job has ended (say, failed `worker_lost`), or no job
        was ever recorded for them (the API died between saving and queueing). Returns how many."""
        if self.settings.keep_inputs:
            return 0
        folder = Path(self.settings.data_dir) / "uploads"
        removed = 0
        for path in folder.glob("*.video") if folder.is_dir() else ():
            try:
                if time.time() - path.stat().st_mtime < min_age_s:
                    continue  # the API may be saving it, or about to queue its job
                job = self.jobs.get(path.stem)
                if job is None or job["status"] in TERMINAL:
                    path.unlink(missing_ok=True)
                    removed += 1
            except FileNotFoundError:
                continue
        if removed:
            log.info("removed %d upload(s) whose job had ended", removed)
        return removed

    def _run(self, job: dict, lease: "_Lease") -> None:
        from pipeline.generate import JobCanceled

        ref = job["reference_id"]
        try:
            if self.load_error and job["kind"] == "generate":  # upscale jobs do not need the generator
                self.load_models()
                if self.load_error:
                    raise ModelUnavailable(self.load_error)
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
            result = upscale_file(upload_path(self.settings, ref), output, upscaler, params["outscale"],
                                  self.settings.crf, progress, lease.should_cancel)
        else:
            spec = JobParams(**params)
            progress = _ProgressReporter(self.jobs, ref, self.worker_id,
                                         STAGE_SPANS["generate+upscale" if spec.upscale else "generate"])
            result = run_job(spec, self.settings, progress, lease.should_cancel, models=self.models, output=output)
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
        }


class ModelUnavailable(RuntimeError):
    pass


def classify_error(exc: BaseException) -> tuple[str, str]:
    """(code, message) for a failed job. Messages are short and hold no paths beyond the data folder."""
    import torch

    from pipeline.generate import MissingWeightsError
    from pipeline.upscale import UpscalerLoadError
    from pipeline.video import VideoInputError

    if isinstance(exc, VideoInputError):
        return "invalid_video", str(exc)
    if isinstance(exc, StorageError):
        return "storage_error", f"{exc}; the video was kept on the worker's disk"
    if isinstance(exc, (ModelUnavailable, MissingWeightsError, UpscalerLoadError)):
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
        self.stage, self.last_write = stage, now
        elapsed = now - self.started
        eta = round(elapsed / progress * (1 - progress), 1) if progress > 0.02 else None
        label = f"{stage} {done}/{total}" if stage in ("denoising", "upscaling", "encoding") else stage
        try:
            self.jobs.update_progress(self.ref, self.worker_id, stage=label, progress=round(progress, 4), eta_s=eta)
        except StoreUnavailable:
            pass  # progress is best effort; the outcome is recorded at the end


def main() -> int:
    """`python worker.py`: run the worker standalone on a GPU node until SIGINT/SIGTERM."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = settings_or_exit("worker.py")
    worker = Worker(settings, open_job_store(settings), open_blob_store(settings))

    def stop(signum, frame):
        log.info("stopping after the current job")
        worker._stop.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info("worker %s on %s, model %s", worker.worker_id, settings.device, settings.model)
    worker.run_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
