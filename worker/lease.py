"""The lease of a running job: renewed in a thread, so a dead worker's job is re-queued, and a cancel is seen."""

from __future__ import annotations

import threading

from storage.jobs import JobStore, StoreUnavailable


class Lease:
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


