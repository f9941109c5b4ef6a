"""Job records: the `JobStore` contract, the job states and the record rules. Each backend is one module:
`storage.sqlite.SqliteJobStore` (default, one file under the data folder), `storage.mongo.MongoJobStore` (pymongo).

Both keep the same contract, checked by one test suite run on both (tests/test_job_store.py):
- `claim()` hands the oldest queued job of the kinds (and, for a model's jobs, the models) a worker can run to
  exactly one worker, with a lease; an enhance job goes before any other (`claim_passes`);
- a worker renews the lease with `heartbeat()`; a job whose lease ran out goes back to the queue
  (`requeue_expired`), or fails with `worker_lost` after its last attempt;
- `complete()`, `fail()` and `mark_canceled()` only act on a job the calling worker still holds,
  so a job can never complete twice;
- `create(job, max_queued=n)` admits a job only while fewer than n are queued, in one atomic step,
  and raises `QueueFull` otherwise;
- `delete()` removes a record for good; a worker still running it then finds its lease gone, and
  every later write of that worker (progress, heartbeat, outcome) matches nothing, so none brings it back;
- `append_event()` adds to a job's append-only event log (progress, stage, preview; seq 1, 2, ... per job)
  only while the calling worker holds the job, `events_after(reference_id, seq)` reads it in order, and
  deleting a job deletes its events.
Any failure to reach the store raises `StoreUnavailable` (the API answers 503).
Workers also record what they take (`worker_seen`), so a queued job no live worker takes says why
(`waiting_reason`); a worker group's rank 0 adds the group's facts (`group_facts`), which /health and /metrics
show.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Collection, Protocol

QUEUED, PROCESSING, COMPLETED, FAILED, CANCELED = "queued", "processing", "completed", "failed", "canceled"
TERMINAL = (COMPLETED, FAILED, CANCELED)
JOB_KINDS = ("generate", "upscale", "enhance")
# Kinds that run a model (`params.model`): only a worker serving it claims one. An enhance job (a prompt's
# suggested rewrite, seconds long) is claimed before any other queued job, so a user waits for it no longer
# than for the job in hand (`claim_passes`).
MODEL_KINDS = ("generate", "enhance")
FIRST_KINDS = ("enhance",)
EVENTS_PER_READ = 500  # events_after reads at most this many at once; the caller reads on from the last seq
# A deleted job leaves a tombstone (its owner and place in the order) this long, so a listing whose cursor is
# that job's id goes on from its place: the openai SDK pages with `after=<the last id it saw>`.
CURSOR_KEEP_S = 24 * 3600.0


log = logging.getLogger(__name__)


class StoreUnavailable(RuntimeError):
    """The job store cannot be reached or written. The message is safe to show (no credentials)."""


class QueueFull(RuntimeError):
    """`create(job, max_queued=n)` found n jobs queued already; the job was not stored."""


class JobStore(Protocol):
    def create(self, job: dict, max_queued: int | None = None) -> dict: ...
    def get(self, reference_id: str) -> dict | None: ...
    def history(self, owner: str, session_id: str) -> list[dict]: ...
    def count_queued(self) -> int: ...
    def queue_position(self, job: dict) -> int: ...
    def claim(self, worker_id: str, lease_s: float, kinds: tuple[str, ...] = JOB_KINDS,
              models: Collection[str] | None = None) -> dict | None: ...
    def heartbeat(self, reference_id: str, worker_id: str, lease_s: float) -> dict | None: ...
    def update_progress(self, reference_id: str, worker_id: str, **fields) -> None: ...
    def append_event(self, reference_id: str, worker_id: str, event: str, data: dict) -> int | None: ...
    def events_after(self, reference_id: str, seq: int, limit: int = EVENTS_PER_READ) -> list[dict]: ...
    def complete(self, reference_id: str, worker_id: str, result: dict) -> bool: ...
    def fail(self, reference_id: str, worker_id: str, code: str, message: str) -> bool: ...
    def mark_canceled(self, reference_id: str, worker_id: str) -> bool: ...
    def request_cancel(self, reference_id: str) -> str | None: ...
    def delete(self, reference_id: str) -> bool: ...
    def requeue_expired(self, max_attempts: int) -> tuple[int, int]: ...
    def ping(self) -> None: ...
    def close(self) -> None: ...
    # /v1/videos and /metrics
    def list_jobs(self, owner: str, kind: str | None = None, after: str | None = None, limit: int = 20,
                  oldest_first: bool = False) -> list[dict]: ...
    def job_counts(self) -> list[tuple[str, str, str | None, int]]: ...
    def job_totals(self) -> list[tuple[str, str | None, str, str | None, int]]: ...
    def completed_stats(self) -> list[tuple[str, str | None, dict, int | None]]: ...

    def worker_seen(self, worker_id: str, kinds: tuple[str, ...], models: Collection[str],
                    gpu_bytes: int | None = None, group: dict | None = None) -> None: ...
    def worker_stopped(self, worker_id: str) -> None: ...
    def live_workers(self, within_s: float) -> list[dict]: ...


def new_job(reference_id: str, session_id: str, owner: str, kind: str, params: dict,
            webhook: dict | None = None) -> dict:
    """A fresh queued record with every field the stores keep. `webhook`: {"url", "events"} or None."""
    return {
        "reference_id": reference_id, "session_id": session_id, "owner": owner, "kind": kind, "params": params,
        "status": QUEUED, "stage": QUEUED, "progress": 0.0, "eta_s": None, "error": None, "result": None,
        "attempts": 0, "worker_id": None, "lease_until": None, "cancel_requested": False,
        "created_at": time.time(), "started_at": None, "finished_at": None, "webhook": webhook,
    }


def _worker_lost(attempts: int) -> dict:
    return {"code": "worker_lost", "message": f"the worker running this job stopped responding ({attempts} attempts)"}


# ---------------------------------------------------------------------------------------- who takes which job

WORKER_REPORT_EVERY_S = 5.0  # how often a running worker records what it takes
WORKER_LIVE_S = 30.0  # a worker seen this recently counts as live (generous: busy stores, clocks a little apart)
WORKER_FORGET_S = 24 * 3600.0  # the record of a worker that died without a word is deleted after this
# What a job stored without `model` (queued before jobs named one) runs: JobParams' default,
# pipeline.models.DEFAULT_MODEL (storage imports nothing of pipeline/; a test checks the two agree).
UNNAMED_MODEL = "hunyuanvideo"


GROUP_READY, GROUP_STARTING, GROUP_FAILED = "ready", "starting", "failed"


def group_facts(ranks: int, gpus: list[str], state: str, reason: str | None = None) -> dict:
    """What a worker group's record says of it: its ranks, its GPUs (CUDA_VISIBLE_DEVICES indices; none on
    the CPU) and its state, `starting`, `ready` or `failed: <why its ranks could not start>`."""
    return {"ranks": ranks, "gpus": list(gpus), "state": f"{state}: {reason}" if reason else state}


def group_state(group: dict) -> str:
    """The state's name alone (`failed`, not its reason): a label with few values for /metrics."""
    return group["state"].split(":", 1)[0]


def job_model(job: dict) -> str | None:
    """The model a generation or enhance job runs: `params.model`, else UNNAMED_MODEL. None for other kinds."""
    if job["kind"] not in MODEL_KINDS:
        return None
    return (job["params"] or {}).get("model") or UNNAMED_MODEL


def _claimable_kinds(kinds: tuple[str, ...], models: Collection[str] | None) -> tuple[str, ...]:
    """A worker that serves no model takes no job of a model."""
    return tuple(k for k in kinds if k not in MODEL_KINDS) if models is not None and not models else tuple(kinds)


def claim_passes(kinds: tuple[str, ...], models: Collection[str] | None) -> list[tuple[str, ...]]:
    """The kinds a claim tries, pass by pass: FIRST_KINDS, then the rest; each pass takes the oldest."""
    kinds = _claimable_kinds(kinds, models)
    passes = [tuple(k for k in kinds if k in FIRST_KINDS), tuple(k for k in kinds if k not in FIRST_KINDS)]
    return [kinds for kinds in passes if kinds]


def can_take(worker: dict, job: dict) -> bool:
    """Whether a worker, as it last reported (`kinds`, `models`), would claim `job`: the rule `claim` applies."""
    return job["kind"] in worker["kinds"] and (job["kind"] not in MODEL_KINDS or job_model(job) in worker["models"])


def waiting_reason(store: "JobStore", job: dict, within_s: float = WORKER_LIVE_S) -> str | None:
    """Why a queued job waits for more than its turn: no worker is live, or no live worker takes its kind
    or model. None when some live worker would take it, and for a job that is not queued."""
    if job["status"] != QUEUED:
        return None
    live = store.live_workers(within_s)
    if not live:
        return f"waiting for a worker: none has reported in the last {within_s:.0f} s"
    if any(can_take(worker, job) for worker in live):
        return None
    if job["kind"] in MODEL_KINDS:
        return f"waiting for a worker that serves {job_model(job)}"
    return f"waiting for a worker that takes {job['kind']} jobs"


def _model_of(kind: str, model: str | None) -> str | None:
    """A grouped row's model by job_model's rule (an unnamed generation job runs UNNAMED_MODEL)."""
    return job_model({"kind": kind, "params": {"model": model}})


def _counts_by_model(rows) -> list[tuple[str, str, str | None, int]]:
    """(status, kind, stored model, count) rows regrouped by the model each job runs."""
    counts: dict[tuple[str, str, str | None], int] = {}
    for status, kind, model, count in rows:
        key = (status, kind, _model_of(kind, model))
        counts[key] = counts.get(key, 0) + count
    return [(*key, count) for key, count in counts.items()]


class _Claims:
    """`claim` by `claim_passes`: each backend supplies `_claim_oldest`, one atomic claim of the oldest queued job
    of the kinds given (and, for a model's jobs, the models)."""

    def claim(self, worker_id: str, lease_s: float, kinds: tuple[str, ...] = JOB_KINDS,
              models: Collection[str] | None = None) -> dict | None:
        """`models`: the ids whose jobs of a model this worker runs (None: any); other kinds are not model-bound."""
        for kinds_now in claim_passes(kinds, models):
            job = self._claim_oldest(worker_id, lease_s, kinds_now, models)
            if job is not None:
                return job
        return None


class _Outcomes:
    """The three ways a worker ends its job; each backend supplies `_finish`, guarded by the worker's lease."""

    def complete(self, reference_id: str, worker_id: str, result: dict) -> bool:
        return self._finish(reference_id, worker_id, COMPLETED, result=result, progress=1.0)

    def fail(self, reference_id: str, worker_id: str, code: str, message: str) -> bool:
        return self._finish(reference_id, worker_id, FAILED, error={"code": code, "message": message})

    def mark_canceled(self, reference_id: str, worker_id: str) -> bool:
        return self._finish(reference_id, worker_id, CANCELED)


# ------------------------------------------------------------------------------ webhook outbox, idempotency keys
#
# A job with a webhook (`job["webhook"] = {"url", "events"}`) gets one delivery row per event it asked for, written
# in the same transaction (on MongoDB: the same single-document write) as the status change that causes it:
# claim -> `started`; complete, fail, mark_canceled, a queued job's request_cancel and requeue_expired's last word
# -> the terminal event. A dispatcher (webhooks.py) in any process claims due rows with a lease, sends them and
# records each attempt; rows outlive their job, so deleting a job loses no delivery (they go T2V_WEBHOOK_KEEP_S
# after they ended, `prune_deliveries`). Idempotency keys map (owner, key) to the job a create made, for 24 h
# (api/service.py).

EVENT_OF_STATUS = {PROCESSING: "started", COMPLETED: "completed", FAILED: "failed", CANCELED: "canceled"}
WEBHOOK_EVENTS = tuple(EVENT_OF_STATUS.values())
PENDING, DELIVERED, GIVEN_UP = "pending", "delivered", "given_up"  # a delivery's states
SNAPSHOT_FIELDS = ("reference_id", "session_id", "kind", "params", "status", "stage", "progress", "eta_s", "error",
                   "result", "attempts", "created_at", "started_at", "finished_at")  # a delivery's copy of its job


class OutboxStore(Protocol):
    def claim_delivery(self, dispatcher_id: str, lease_s: float) -> dict | None: ...
    def record_attempt(self, delivery_id: str, dispatcher_id: str, state: str, status_code: int | None,
                       error: str | None, next_at: float | None = None) -> bool: ...
    def deliveries(self, reference_id: str) -> list[dict]: ...
    def webhook_counts(self) -> dict: ...
    def prune_deliveries(self, finished_before: float) -> int: ...
    def reserve_idempotency_key(self, owner: str, key: str, digest: str, reference_id: str,
                                ttl_s: float) -> dict | None: ...
    def idempotency_key(self, owner: str, key: str, ttl_s: float) -> dict | None: ...
    def replace_idempotency_key(self, owner: str, key: str, old_reference_id: str, reference_id: str) -> bool: ...
    def release_idempotency_key(self, owner: str, key: str, reference_id: str) -> None: ...


def delivery_id(reference_id: str, event: str, attempts: int) -> str:
    """The `webhook-id`: the same on every retry of one delivery, so a receiver can drop repeats."""
    return f"msg_{reference_id}.{event}.{attempts}"


def _counts(by_state: dict[str, tuple[int, int]], pruned_failed_attempts: int = 0) -> dict:
    """{state: (rows, attempts)} as the numbers /metrics shows; every attempt but a delivering one failed, and
    the failed attempts of pruned rows still count (a counter never goes down)."""
    delivered = by_state.get(DELIVERED, (0, 0))[0]
    return {"delivered": delivered, "given_up": by_state.get(GIVEN_UP, (0, 0))[0],
            "pending": by_state.get(PENDING, (0, 0))[0],
            "failed_attempts": sum(attempts for _, attempts in by_state.values()) - delivered
            + pruned_failed_attempts}


def open_job_store(settings) -> JobStore:
    """MongoDB when MONGODB_URI is set, else SQLite under the data folder."""
    if settings.mongodb_uri:
        from storage.mongo import MongoJobStore

        return MongoJobStore(settings.mongodb_uri)
    from storage.sqlite import SqliteJobStore

    return SqliteJobStore(Path(settings.data_dir) / "jobs.sqlite3")
