"""What a running job reports as it goes: progress with an ETA, and the latest preview of its latents."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from storage.blobs import BlobStore, StorageError
from storage.jobs import JobStore, StoreUnavailable
from worker.files import preview_key

log = logging.getLogger("t2v.worker")

# Share of the whole job each stage covers, for the progress bar and the ETA.
STAGE_SPANS = {
    "generate+upscale": {"denoising": (0.0, 0.6), "decoding": (0.6, 0.7), "upscaling": (0.7, 0.97),
                         "uploading": (0.97, 1.0)},
    "generate": {"denoising": (0.0, 0.8), "decoding": (0.8, 0.9), "encoding": (0.9, 0.97), "uploading": (0.97, 1.0)},
    "upscale": {"fetching": (0.0, 0.01), "upscaling": (0.01, 0.97), "uploading": (0.97, 1.0)},
    "enhance": {"loading": (0.0, 0.05), "enhancing": (0.05, 1.0)},
}
PROGRESS_EVERY_S = 0.5


class ProgressReporter:
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
        label = f"{stage} {done}/{total}" if stage in ("denoising", "decoding", "upscaling", "encoding") else stage
        fields = {"stage": label, "progress": round(progress, 4), "eta_s": eta}
        try:
            self.jobs.update_progress(self.ref, self.worker_id, **fields)
            if new_stage:  # the live event log (GET /jobs/<id>/events) gets the same, as it happens
                self.jobs.append_event(self.ref, self.worker_id, "stage", {"stage": stage})
            self.jobs.append_event(self.ref, self.worker_id, "progress", fields)
        except StoreUnavailable:
            pass  # progress is best effort; the outcome is recorded at the end


class PreviewWriter:
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
