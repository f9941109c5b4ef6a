"""The job loop: `Worker` claims queued jobs one at a time, runs them, stores the videos and records the outcome."""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from pathlib import Path

from config import Settings
from storage.blobs import BlobStore, StorageError
from storage.jobs import WORKER_REPORT_EVERY_S, JobStore, StoreUnavailable
from worker.errors import InputUnavailable, ModelUnavailable, classify_error
from worker.files import discard_input, input_key
from worker.gpus import GpuPeak
from worker.lease import Lease
from worker.progress import STAGE_SPANS, PreviewWriter, ProgressReporter
from worker.sweeps import Sweeps

log = logging.getLogger("t2v.worker")

LOAD_RETRY_FIRST_S, LOAD_RETRY_MAX_S = 30.0, 600.0  # a model that failed to load is tried again, ever less often


class Worker(Sweeps):
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
        """Every few seconds while the worker runs, record in the job store what it takes and its GPU's memory,
        so the API can tell why a queued job waits and refuse one no GPU fits; the record is removed when the
        worker stops."""
        from pipeline.memory import gpu_total_bytes

        while True:
            try:
                self.served = self.served_models()
                self.jobs.worker_seen(self.worker_id, self.job_kinds, self.served,
                                      gpu_total_bytes(self.settings), group=self.group_record())
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

    def group_record(self) -> dict | None:
        """The worker group's facts for the worker record (storage.jobs.group_facts); None: a worker alone."""
        return None

    @property
    def job_kinds(self) -> tuple[str, ...]:
        """The kinds of job this worker can run now: generation and prompt suggestions need the model,
        upscaling the upscaler."""
        kinds = (("generate", self.load_error), ("enhance", self.load_error), ("upscale", self.upscaler_error))
        return tuple(kind for kind, error in kinds if error is None)

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
        with Lease(self.jobs, job["reference_id"], self.worker_id, self.settings.lease_s) as lease:
            self._run(job, lease)
        if not lease.lost:
            discard_input(self.settings, self.blobs, job)
        return True

    def _run(self, job: dict, lease: "Lease") -> None:
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
        elif self.jobs.get(ref) is None:
            self._discard_result(ref, result)
        else:
            log.warning("job %s: finished, but the lease was lost; the record was not changed", ref)

    def _discard_result(self, ref: str, result: dict) -> None:
        """The job was deleted while this worker stored its files: delete them, so none outlives the record.
        (A job re-queued to another worker keeps them: that worker writes the same keys.)"""
        try:
            for key in (result.get("video_key"), result.get("poster_key")):
                if key:  # an enhance job stores no file
                    self.blobs.delete(key)
        except StorageError as exc:
            log.warning("job %s: deleted meanwhile, but its files were not: %s", ref, exc)
            return
        log.info("job %s: deleted while its files were stored; they are deleted too", ref)

    def _produce(self, job: dict, lease: "Lease") -> dict:
        """Make the job's MP4 in the work folder, then store it and its poster; return the result record."""
        from pipeline.run import run_job, upscale_file
        from pipeline.spec import JobParams

        ref, params = job["reference_id"], job["params"]
        self.work_dir.mkdir(parents=True, exist_ok=True)
        if job["kind"] == "enhance":
            return self._enhance(job, lease)
        output = self.work_dir / f"{ref}.mp4"
        if job["kind"] == "upscale":
            progress = ProgressReporter(self.jobs, ref, self.worker_id, STAGE_SPANS["upscale"])
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
            progress = ProgressReporter(self.jobs, ref, self.worker_id,
                                         STAGE_SPANS["generate+upscale" if spec.upscale else "generate"])
            image = self._fetch_image(spec.image_key, ref) if spec.image_key else None
            previews = PreviewWriter(self.jobs, self.blobs, ref, self.worker_id, self.work_dir,
                                      spec.num_frames / spec.fps) if self.settings.preview_every else None
            self.before_generation(spec, image)
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
            **({"rendered": {"width": result.rendered[0], "height": result.rendered[1]}} if result.rendered else {}),
        }


    def _enhance(self, job: dict, lease: "Lease") -> dict:
        """An enhance job: the model's suggested prompt is its whole result; nothing is stored as a file."""
        from pipeline.run import enhance_prompt
        from pipeline.spec import EnhanceParams

        ref, params = job["reference_id"], EnhanceParams(**job["params"])
        progress = ProgressReporter(self.jobs, ref, self.worker_id, STAGE_SPANS["enhance"])
        progress("loading", 0, 1)
        image = self._fetch_image(params.image_key, ref) if params.image_key else None
        self.before_enhance(params.model)  # after the fetch, which may fail: every rank loads it, or none
        progress("enhancing", 0, 1)
        return enhance_prompt(params, self.settings, models=self.models, image=image, should_cancel=lease.should_cancel)

    def before_generation(self, spec, image) -> None:
        """Called just before a generation job runs; a worker group's rank 0 hands the job to its other ranks
        here (worker/group.py)."""

    def before_enhance(self, model: str) -> None:
        """Called just before an enhance job loads its model; a worker group's rank 0 has its other ranks load
        it too (worker/group.py)."""

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

