"""The worker's housekeeping: delete what no job will read any more (stored inputs and previews whose job is
gone, files that stopped workers or API processes left on disk). `Worker` runs these now and then."""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

from storage.blobs import StorageError
from storage.jobs import FAILED, PROCESSING, TERMINAL

log = logging.getLogger("t2v.worker")

UPLOAD_TEMP_MAX_AGE_S = 3600  # an API process checks an upload in seconds; older temporary files are orphans
_REFERENCE_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


class Sweeps:
    """Mixed into `Worker`, whose settings, jobs, blobs and work_dir it uses."""

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
