"""Job records: `SqliteJobStore` (default, one file under the data folder) and `MongoJobStore` (pymongo).

Both keep the same contract, checked by one test suite:
- `claim()` hands the oldest queued job of the kinds (and, for generation, the models) a worker can run to
  exactly one worker, with a lease;
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
(`waiting_reason`).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import random
import sqlite3
import threading
import time
import urllib.parse
import weakref
from contextlib import closing
from pathlib import Path
from typing import Any, Collection, Protocol

QUEUED, PROCESSING, COMPLETED, FAILED, CANCELED = "queued", "processing", "completed", "failed", "canceled"
TERMINAL = (COMPLETED, FAILED, CANCELED)
JOB_KINDS = ("generate", "upscale")
EVENTS_PER_READ = 500  # events_after reads at most this many at once; the caller reads on from the last seq


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
    def completed_stats(self) -> list[tuple[str, str | None, dict, int | None]]: ...

    def worker_seen(self, worker_id: str, kinds: tuple[str, ...], models: Collection[str],
                    gpu_bytes: int | None = None) -> None: ...
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


def job_model(job: dict) -> str | None:
    """The model a generation job runs: `params.model`, else UNNAMED_MODEL. None for other kinds."""
    if job["kind"] != "generate":
        return None
    return (job["params"] or {}).get("model") or UNNAMED_MODEL


def _claimable_kinds(kinds: tuple[str, ...], models: Collection[str] | None) -> tuple[str, ...]:
    """A worker that serves no model takes no generation job."""
    return tuple(k for k in kinds if k != "generate") if models is not None and not models else tuple(kinds)


def can_take(worker: dict, job: dict) -> bool:
    """Whether a worker, as it last reported (`kinds`, `models`), would claim `job`: the rule `claim` applies."""
    return job["kind"] in worker["kinds"] and (job["kind"] != "generate" or job_model(job) in worker["models"])


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
    if job["kind"] == "generate":
        return f"waiting for a worker that serves {job_model(job)}"
    return f"waiting for a worker that takes {job['kind']} jobs"


# ---------------------------------------------------------------------------------------- SQLite

_JSON_FIELDS = ("params", "error", "result", "webhook")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    reference_id TEXT NOT NULL UNIQUE,
    session_id TEXT NOT NULL,
    owner TEXT NOT NULL,
    kind TEXT NOT NULL,
    params TEXT NOT NULL,
    status TEXT NOT NULL,
    stage TEXT,
    progress REAL NOT NULL DEFAULT 0,
    eta_s REAL,
    error TEXT,
    result TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    worker_id TEXT,
    lease_until REAL,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL
);
CREATE INDEX IF NOT EXISTS jobs_owner_session ON jobs (owner, session_id, created_at);
CREATE TABLE IF NOT EXISTS job_events (
    reference_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    type TEXT NOT NULL,
    data TEXT NOT NULL,
    at REAL NOT NULL,
    PRIMARY KEY (reference_id, seq)
) WITHOUT ROWID;
CREATE TRIGGER IF NOT EXISTS job_events_go_with_their_job AFTER DELETE ON jobs
BEGIN DELETE FROM job_events WHERE reference_id = OLD.reference_id; END;
CREATE TABLE IF NOT EXISTS health (id INTEGER PRIMARY KEY, at REAL);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status, seq);
CREATE TABLE IF NOT EXISTS workers (worker_id TEXT PRIMARY KEY, kinds TEXT NOT NULL, models TEXT NOT NULL,
                                    last_seen REAL NOT NULL, gpu_bytes INTEGER);
"""
# /v1/videos lists one owner's jobs of one kind in seq order: SQLite keeps an index's rows in rowid (seq) order.
_SCHEMA += "CREATE INDEX IF NOT EXISTS jobs_owner_kind ON jobs (owner, kind);\n"


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
# records each attempt; rows outlive their job, so deleting a job loses no delivery. Idempotency keys map
# (owner, key) to the job a create made, for 24 h (api/service.py).

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
    def reserve_idempotency_key(self, owner: str, key: str, digest: str, reference_id: str,
                                ttl_s: float) -> dict | None: ...
    def idempotency_key(self, owner: str, key: str, ttl_s: float) -> dict | None: ...
    def replace_idempotency_key(self, owner: str, key: str, old_reference_id: str, reference_id: str) -> bool: ...
    def release_idempotency_key(self, owner: str, key: str, reference_id: str) -> None: ...


def delivery_id(reference_id: str, event: str, attempts: int) -> str:
    """The `webhook-id`: the same on every retry of one delivery, so a receiver can drop repeats."""
    return f"msg_{reference_id}.{event}.{attempts}"


def _counts(by_state: dict[str, tuple[int, int]]) -> dict:
    """{state: (rows, attempts)} as the numbers /metrics shows; every attempt but a delivering one failed."""
    delivered = by_state.get(DELIVERED, (0, 0))[0]
    return {"delivered": delivered, "given_up": by_state.get(GIVEN_UP, (0, 0))[0],
            "pending": by_state.get(PENDING, (0, 0))[0],
            "failed_attempts": sum(attempts for _, attempts in by_state.values()) - delivered}


def _snapshot_value(name: str) -> str:
    """A job column as the trigger copies it into JSON: JSON columns as JSON, and REAL columns with 17 digits
    (json_object alone keeps 15, which would round a timestamp)."""
    if name in _JSON_FIELDS:
        return f"json(NEW.{name})"
    if name in ("progress", "eta_s", "created_at", "started_at", "finished_at"):
        return f"json(CASE WHEN NEW.{name} IS NULL THEN 'null' ELSE printf('%!.17g', NEW.{name}) END)"
    return f"NEW.{name}"


_WEBHOOK_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS webhook_deliveries (
    id TEXT PRIMARY KEY,
    reference_id TEXT NOT NULL,
    event TEXT NOT NULL,
    url TEXT NOT NULL,
    job TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT '{PENDING}',
    created_at REAL NOT NULL,
    next_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    leased_by TEXT,
    lease_until REAL,
    last_attempt_at REAL,
    last_status INTEGER,
    last_error TEXT,
    finished_at REAL
);
CREATE INDEX IF NOT EXISTS webhook_deliveries_due ON webhook_deliveries (state, next_at);
CREATE INDEX IF NOT EXISTS webhook_deliveries_job ON webhook_deliveries (reference_id);
CREATE TABLE IF NOT EXISTS idempotency_keys (
    owner TEXT NOT NULL,
    key TEXT NOT NULL,
    digest TEXT NOT NULL,
    reference_id TEXT NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (owner, key)
);
CREATE INDEX IF NOT EXISTS idempotency_keys_age ON idempotency_keys (created_at);
CREATE TRIGGER IF NOT EXISTS webhook_outbox_v1 AFTER UPDATE OF status ON jobs
WHEN NEW.webhook IS NOT NULL AND NEW.status IS NOT OLD.status
BEGIN
    INSERT OR IGNORE INTO webhook_deliveries (id, reference_id, event, url, job, created_at, next_at)
    SELECT 'msg_' || NEW.reference_id || '.' || e.event || '.' || NEW.attempts, NEW.reference_id, e.event,
           json_extract(NEW.webhook, '$.url'),
           json_object({", ".join(f"'{name}', {_snapshot_value(name)}" for name in SNAPSHOT_FIELDS)}),
           t.now, t.now
    FROM (SELECT CASE NEW.status {" ".join(f"WHEN '{s}' THEN '{e}'" for s, e in EVENT_OF_STATUS.items())} END
          AS event) e,
         (SELECT (julianday('now') - 2440587.5) * 86400.0 AS now) t
    WHERE e.event IN (SELECT value FROM json_each(NEW.webhook, '$.events'));
END;
"""


def _create_webhook_tables(db: sqlite3.Connection) -> None:
    """The outbox, the idempotency keys and the trigger that fills the outbox; `jobs.webhook` and
    `workers.gpu_bytes` on older files."""
    db.execute("BEGIN IMMEDIATE")  # another process starting at the same time waits here
    try:
        if "webhook" not in {row[1] for row in db.execute("PRAGMA table_info(jobs)")}:
            db.execute("ALTER TABLE jobs ADD COLUMN webhook TEXT")
        if "gpu_bytes" not in {row[1] for row in db.execute("PRAGMA table_info(workers)")}:
            db.execute("ALTER TABLE workers ADD COLUMN gpu_bytes INTEGER")
        for statement in _statements(_WEBHOOK_SCHEMA):
            db.execute(statement)
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


def _statements(script: str):
    """The statements of a script one by one (a trigger's body holds `;`), for `execute` inside a transaction."""
    statement = ""
    for line in script.splitlines(keepends=True):
        statement += line
        if sqlite3.complete_statement(statement):
            yield statement
            statement = ""


class _SqliteWebhooks:
    """The outbox and the idempotency keys on SQLite; the trigger above writes the outbox rows."""

    @staticmethod
    def _delivery(row) -> dict | None:
        return None if row is None else {**dict(row), "job": json.loads(row["job"])}

    def claim_delivery(self, dispatcher_id: str, lease_s: float) -> dict | None:
        """The delivery due first, leased to this dispatcher so no other sends it meanwhile; None when none is due."""
        now = time.time()
        with self._tx(write=True) as db:
            row = db.execute(
                "UPDATE webhook_deliveries SET leased_by = ?, lease_until = ? WHERE id = (SELECT id FROM "
                "webhook_deliveries WHERE state = ? AND next_at <= ? AND (lease_until IS NULL OR lease_until < ?) "
                "ORDER BY next_at LIMIT 1) RETURNING *", (dispatcher_id, now + lease_s, PENDING, now, now)).fetchone()
        return self._delivery(row)

    def record_attempt(self, delivery_id: str, dispatcher_id: str, state: str, status_code: int | None,
                       error: str | None, next_at: float | None = None) -> bool:
        """One attempt's outcome; `state` is DELIVERED, PENDING (try again at `next_at`) or GIVEN_UP. Only the
        dispatcher holding the lease records; False when it no longer does."""
        now = time.time()
        with self._tx(write=True) as db:
            return db.execute(
                "UPDATE webhook_deliveries SET state = ?, attempts = attempts + 1, last_attempt_at = ?, "
                "last_status = ?, last_error = ?, next_at = COALESCE(?, next_at), leased_by = NULL, "
                "lease_until = NULL, finished_at = ? WHERE id = ? AND leased_by = ? AND state = ?",
                (state, now, status_code, error, next_at, None if state == PENDING else now, delivery_id,
                 dispatcher_id, PENDING)).rowcount == 1

    def deliveries(self, reference_id: str) -> list[dict]:
        with self._tx() as db:
            rows = db.execute("SELECT * FROM webhook_deliveries WHERE reference_id = ? ORDER BY created_at, rowid",
                              (reference_id,)).fetchall()
        return [self._delivery(r) for r in rows]

    def webhook_counts(self) -> dict:
        """{"delivered", "given_up", "pending", "failed_attempts"} over every delivery on record."""
        with self._tx() as db:
            rows = db.execute("SELECT state, COUNT(*), COALESCE(SUM(attempts), 0) FROM webhook_deliveries "
                              "GROUP BY state").fetchall()
        return _counts({state: (n, attempts) for state, n, attempts in rows})

    def reserve_idempotency_key(self, owner: str, key: str, digest: str, reference_id: str,
                                ttl_s: float) -> dict | None:
        """Take (owner, key) for `reference_id` unless a live record holds it: None when taken, else that record."""
        now = time.time()
        with self._tx(write=True) as db:
            db.execute("DELETE FROM idempotency_keys WHERE created_at < ?", (now - ttl_s,))
            taken = db.execute("INSERT OR IGNORE INTO idempotency_keys (owner, key, digest, reference_id, created_at) "
                               "VALUES (?, ?, ?, ?, ?)", (owner, key, digest, reference_id, now)).rowcount == 1
            if taken:
                return None
            row = db.execute("SELECT * FROM idempotency_keys WHERE owner = ? AND key = ?", (owner, key)).fetchone()
        return dict(row)

    def idempotency_key(self, owner: str, key: str, ttl_s: float) -> dict | None:
        with self._tx() as db:
            row = db.execute("SELECT * FROM idempotency_keys WHERE owner = ? AND key = ? AND created_at >= ?",
                             (owner, key, time.time() - ttl_s)).fetchone()
        return dict(row) if row else None

    def replace_idempotency_key(self, owner: str, key: str, old_reference_id: str, reference_id: str) -> bool:
        """Point a key whose job never appeared at a new job; False if someone else did first."""
        with self._tx(write=True) as db:
            return db.execute("UPDATE idempotency_keys SET reference_id = ?, created_at = ? WHERE owner = ? AND "
                              "key = ? AND reference_id = ?",
                              (reference_id, time.time(), owner, key, old_reference_id)).rowcount == 1

    def release_idempotency_key(self, owner: str, key: str, reference_id: str) -> None:
        """Free a key whose create was refused, unless it was already handed on."""
        with self._tx(write=True) as db:
            db.execute("DELETE FROM idempotency_keys WHERE owner = ? AND key = ? AND reference_id = ?",
                       (owner, key, reference_id))


class SqliteJobStore(_Outcomes, _SqliteWebhooks):
    """Jobs in one SQLite file (WAL mode). Each thread gets its own connection.

    The file is made once, here at start-up. Every later connection opens it with `mode=rw`, so a
    database moved away is `StoreUnavailable`, never a new empty file whose close would delete the
    `-wal` that holds the rows. A connection is dropped as soon as the path no longer names the file
    it opened (moved, replaced or gone), and the next transaction opens the file found there.
    A timer, `close()` and interpreter exit checkpoint the WAL into the main file."""

    def __init__(self, path: Path, timeout_s: float = 10.0, checkpoint_every_s: float = 30.0):
        self.path = Path(path).absolute()
        self.timeout_s = timeout_s  # how long a write waits on another writer's lock before StoreUnavailable
        self._uri = f"file:{urllib.parse.quote(str(self.path))}?mode=rw"
        self._local = threading.local()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with closing(sqlite3.connect(self.path, timeout=timeout_s, isolation_level=None)) as creator:  # may create
                creator.execute("PRAGMA journal_mode=WAL")
                creator.executescript(_SCHEMA)  # executescript manages its own transaction
                _create_webhook_tables(creator)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"job database unavailable: {exc}") from None
        self._closed = threading.Event()
        threading.Thread(target=_checkpoint_every, args=(weakref.ref(self), checkpoint_every_s, self._closed),
                         name="t2v-sqlite-checkpoint", daemon=True).start()
        _OPEN_STORES.add(self)

    def _file_id(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_dev, st.st_ino

    def _conn(self) -> sqlite3.Connection:
        """This thread's connection to the file now at `path`; one stat per call keeps it honest."""
        file_id = self._file_id()  # taken before connecting: a swap in between only costs a reconnect
        if getattr(self._local, "conn", None) is not None and self._local.file_id != file_id:
            self._drop_conn()  # SQLite neither checkpoints nor deletes the -wal when closing a moved file
        if file_id is None:
            raise StoreUnavailable(f"job database unavailable: {self.path.name} is missing")
        if getattr(self._local, "conn", None) is None:
            conn = sqlite3.connect(self._uri, uri=True, timeout=self.timeout_s, isolation_level=None)
            self._local.conn, self._local.file_id = conn, file_id  # kept first, so a failing PRAGMA drops it
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
        return self._local.conn

    def _drop_conn(self) -> None:
        conn, self._local.conn = getattr(self._local, "conn", None), None
        if conn is not None:
            try:
                conn.close()
            except sqlite3.Error:
                pass

    def checkpoint(self, truncate: bool = False) -> None:
        """Copy the WAL into the main file, so that file alone holds every committed row.

        PASSIVE never waits on other connections; TRUNCATE (at close) also empties the -wal file."""
        try:
            self._conn().execute("PRAGMA wal_checkpoint(TRUNCATE)" if truncate else "PRAGMA wal_checkpoint(PASSIVE)")
        except sqlite3.Error as exc:
            self._drop_conn()
            raise StoreUnavailable(f"job database unavailable: {exc}") from None

    def close(self) -> None:
        """Checkpoint (and empty) the WAL and stop the timer. Runs at interpreter exit for every open store."""
        self._closed.set()
        _OPEN_STORES.discard(self)
        try:
            self.checkpoint(truncate=True)
        except StoreUnavailable as exc:
            log.warning("job database not checkpointed at close: %s", exc)
        self._drop_conn()

    def _tx(self, write: bool = False) -> "_SqliteTx":
        return _SqliteTx(self, write)

    def _row(self, row) -> dict | None:
        if row is None:
            return None
        job = dict(row)
        job.pop("seq", None)
        for name in _JSON_FIELDS:
            job[name] = json.loads(job[name]) if job[name] else None
        job["cancel_requested"] = bool(job["cancel_requested"])
        return job

    def create(self, job: dict, max_queued: int | None = None) -> dict:
        values = {k: (json.dumps(v) if k in _JSON_FIELDS and v is not None else v) for k, v in job.items()}
        cols = ", ".join(values)
        with self._tx(write=True) as db:  # BEGIN IMMEDIATE: no other writer between the count and the insert
            if max_queued is not None:
                if db.execute("SELECT COUNT(*) FROM jobs WHERE status = ?", (QUEUED,)).fetchone()[0] >= max_queued:
                    raise QueueFull(f"{max_queued} jobs are queued already")
            db.execute(f"INSERT INTO jobs ({cols}) VALUES ({', '.join('?' * len(values))})", list(values.values()))
        return job

    def get(self, reference_id: str) -> dict | None:
        with self._tx() as db:
            return self._row(db.execute("SELECT * FROM jobs WHERE reference_id = ?", (reference_id,)).fetchone())

    def history(self, owner: str, session_id: str) -> list[dict]:
        with self._tx() as db:
            rows = db.execute("SELECT * FROM jobs WHERE owner = ? AND session_id = ? ORDER BY seq DESC",
                              (owner, session_id)).fetchall()
        return [self._row(r) for r in rows]

    def count_queued(self) -> int:
        with self._tx() as db:
            return db.execute("SELECT COUNT(*) FROM jobs WHERE status = ?", (QUEUED,)).fetchone()[0]

    def queue_position(self, job: dict) -> int:
        if job["status"] != QUEUED:
            return 0
        with self._tx() as db:
            return db.execute(
                "SELECT COUNT(*) FROM jobs WHERE status = ? AND seq <= (SELECT seq FROM jobs WHERE reference_id = ?)",
                (QUEUED, job["reference_id"])).fetchone()[0]

    def claim(self, worker_id: str, lease_s: float, kinds: tuple[str, ...] = JOB_KINDS,
              models: Collection[str] | None = None) -> dict | None:
        """`models`: the ids whose generation jobs this worker runs (None: any); other kinds are not model-bound."""
        kinds = _claimable_kinds(kinds, models)
        if not kinds:
            return None
        model_rule, model_args = "", ()
        if models is not None:
            model_rule = (" AND (kind != 'generate' OR COALESCE(json_extract(params, '$.model'), ?) "
                          f"IN ({', '.join('?' * len(models))}))")
            model_args = (UNNAMED_MODEL, *models)
        now = time.time()
        with self._tx(write=True) as db:
            row = db.execute(
                "UPDATE jobs SET status = ?, stage = 'starting', worker_id = ?, lease_until = ?, "
                "attempts = attempts + 1, started_at = ? "
                f"WHERE seq = (SELECT seq FROM jobs WHERE status = ? AND kind IN ({', '.join('?' * len(kinds))})"
                f"{model_rule} ORDER BY seq LIMIT 1) AND status = ? RETURNING *",
                (PROCESSING, worker_id, now + lease_s, now, QUEUED, *kinds, *model_args, QUEUED)).fetchone()
        return self._row(row)

    def heartbeat(self, reference_id: str, worker_id: str, lease_s: float) -> dict | None:
        with self._tx(write=True) as db:
            row = db.execute(
                "UPDATE jobs SET lease_until = ? WHERE reference_id = ? AND worker_id = ? AND status = ? RETURNING *",
                (time.time() + lease_s, reference_id, worker_id, PROCESSING)).fetchone()
        return self._row(row)

    def update_progress(self, reference_id: str, worker_id: str, **fields) -> None:
        allowed = {k: v for k, v in fields.items() if k in ("stage", "progress", "eta_s")}
        sets = ", ".join(f"{k} = ?" for k in allowed)
        with self._tx(write=True) as db:
            db.execute(f"UPDATE jobs SET {sets} WHERE reference_id = ? AND worker_id = ? AND status = ?",
                       [*allowed.values(), reference_id, worker_id, PROCESSING])

    # Live events: an append-only log per job, written by the worker, read by the event stream (api/events.py).

    def append_event(self, reference_id: str, worker_id: str, event: str, data: dict) -> int | None:
        """Log an event of a job this worker holds, as the next seq of that job (1, 2, ...). None when the worker
        no longer holds it (deleted, canceled, lost): as with update_progress, that write matches nothing."""
        with self._tx(write=True) as db:
            row = db.execute(
                "INSERT INTO job_events (reference_id, seq, type, data, at) "
                "SELECT ?, COALESCE((SELECT MAX(seq) FROM job_events WHERE reference_id = ?), 0) + 1, ?, ?, ? "
                "WHERE EXISTS (SELECT 1 FROM jobs WHERE reference_id = ? AND worker_id = ? AND status = ?) "
                "RETURNING seq",
                (reference_id, reference_id, event, json.dumps(data), time.time(), reference_id, worker_id,
                 PROCESSING)).fetchone()
        return row[0] if row else None

    def events_after(self, reference_id: str, seq: int, limit: int = EVENTS_PER_READ) -> list[dict]:
        """The job's events with a seq above `seq`, oldest first: [{seq, type, data, at}]."""
        with self._tx() as db:
            rows = db.execute("SELECT seq, type, data, at FROM job_events WHERE reference_id = ? AND seq > ? "
                              "ORDER BY seq LIMIT ?", (reference_id, seq, limit)).fetchall()
        return [{"seq": r["seq"], "type": r["type"], "data": json.loads(r["data"]), "at": r["at"]} for r in rows]

    def _finish(self, reference_id: str, worker_id: str, status: str, **fields) -> bool:
        values = {"status": status, "stage": status, "finished_at": time.time(), "lease_until": None,
                  "eta_s": None, **{k: json.dumps(v) if k in _JSON_FIELDS else v for k, v in fields.items()}}
        sets = ", ".join(f"{k} = ?" for k in values)
        with self._tx(write=True) as db:
            cur = db.execute(f"UPDATE jobs SET {sets} WHERE reference_id = ? AND worker_id = ? AND status = ?",
                             [*values.values(), reference_id, worker_id, PROCESSING])
            return cur.rowcount == 1

    def request_cancel(self, reference_id: str) -> str | None:
        """Cancel a queued job now; flag a running one for its worker. Returns the resulting status."""
        with self._tx(write=True) as db:
            db.execute("UPDATE jobs SET status = ?, stage = ?, finished_at = ? WHERE reference_id = ? AND status = ?",
                       (CANCELED, CANCELED, time.time(), reference_id, QUEUED))
            db.execute("UPDATE jobs SET cancel_requested = 1 WHERE reference_id = ? AND status = ?",
                       (reference_id, PROCESSING))
            row = db.execute("SELECT status FROM jobs WHERE reference_id = ?", (reference_id,)).fetchone()
        return row[0] if row else None

    def delete(self, reference_id: str) -> bool:
        """Remove the record; False when there was none."""
        with self._tx(write=True) as db:
            return db.execute("DELETE FROM jobs WHERE reference_id = ?", (reference_id,)).rowcount == 1

    def requeue_expired(self, max_attempts: int) -> tuple[int, int]:
        """Jobs whose worker died: canceled if a cancel was asked, failed after the last attempt, else queued.

        Returns (requeued, ended)."""
        now = time.time()
        error = json.dumps(_worker_lost(max_attempts))
        with self._tx(write=True) as db:
            ended = db.execute(
                "UPDATE jobs SET status = ?, stage = ?, finished_at = ?, lease_until = NULL "
                "WHERE status = ? AND lease_until < ? AND cancel_requested = 1",
                (CANCELED, CANCELED, now, PROCESSING, now)).rowcount
            ended += db.execute(
                "UPDATE jobs SET status = ?, stage = ?, error = ?, finished_at = ?, lease_until = NULL "
                "WHERE status = ? AND lease_until < ? AND attempts >= ?",
                (FAILED, FAILED, error, now, PROCESSING, now, max_attempts)).rowcount
            requeued = db.execute(
                "UPDATE jobs SET status = ?, stage = ?, worker_id = NULL, lease_until = NULL, progress = 0, eta_s = NULL "
                "WHERE status = ? AND lease_until < ?", (QUEUED, QUEUED, PROCESSING, now)).rowcount
        return requeued, ended

    def ping(self) -> None:
        """A one-row write: a locked or read-only database fails here, as it would for a new job."""
        with self._tx(write=True) as db:
            db.execute("INSERT OR REPLACE INTO health (id, at) VALUES (1, ?)", (time.time(),))

    # ------------------------------------------------------------ /v1/videos and /metrics

    def list_jobs(self, owner: str, kind: str | None = None, after: str | None = None, limit: int = 20,
                  oldest_first: bool = False) -> list[dict]:
        """Up to `limit` of the owner's jobs (of one kind, if given), newest first (or oldest first), starting
        after the job `after`. KeyError when `after` names no job of this owner."""
        where, args = ["owner = ?"], [owner]
        if kind is not None:
            where.append("kind = ?")
            args.append(kind)
        with self._tx() as db:
            if after is not None:
                row = db.execute("SELECT seq FROM jobs WHERE reference_id = ? AND owner = ?", (after, owner)).fetchone()
                if row is None:
                    raise KeyError(after)
                where.append("seq > ?" if oldest_first else "seq < ?")
                args.append(row[0])
            rows = db.execute(f"SELECT * FROM jobs WHERE {' AND '.join(where)} "
                              f"ORDER BY seq {'ASC' if oldest_first else 'DESC'} LIMIT ?", [*args, limit]).fetchall()
        return [self._row(r) for r in rows]

    def job_counts(self) -> list[tuple[str, str, str | None, int]]:
        """(status, kind, model, count) over every record: one grouped query, whatever the number of jobs."""
        with self._tx() as db:
            rows = db.execute("SELECT status, kind, json_extract(params, '$.model') AS model, COUNT(*) FROM jobs "
                              "GROUP BY status, kind, model").fetchall()
        return _counts_by_model(rows)

    def completed_stats(self) -> list[tuple[str, str | None, dict, int | None]]:
        """(kind, model, timings_s, gpu_peak_bytes) of every completed job, as its worker recorded them."""
        with self._tx() as db:
            rows = db.execute("SELECT kind, json_extract(params, '$.model'), json_extract(result, '$.timings_s'), "
                              "json_extract(result, '$.gpu_peak_bytes') FROM jobs WHERE status = ?",
                              (COMPLETED,)).fetchall()
        return [(kind, _model_of(kind, model), json.loads(timings) if timings else {}, peak)
                for kind, model, timings, peak in rows]

    # --- workers: what each takes, and when it was last seen

    def worker_seen(self, worker_id: str, kinds: tuple[str, ...], models: Collection[str],
                    gpu_bytes: int | None = None) -> None:
        """Record that this worker is alive, what it claims and its GPU's memory (None: no GPU); forget
        workers silent for WORKER_FORGET_S."""
        now = time.time()
        with self._tx(write=True) as db:
            db.execute("INSERT OR REPLACE INTO workers (worker_id, kinds, models, last_seen, gpu_bytes) "
                       "VALUES (?, ?, ?, ?, ?)", (worker_id, json.dumps(list(kinds)), json.dumps(sorted(models)),
                                                  now, gpu_bytes))
            db.execute("DELETE FROM workers WHERE last_seen < ?", (now - WORKER_FORGET_S,))

    def worker_stopped(self, worker_id: str) -> None:
        with self._tx(write=True) as db:
            db.execute("DELETE FROM workers WHERE worker_id = ?", (worker_id,))

    def live_workers(self, within_s: float) -> list[dict]:
        with self._tx() as db:
            rows = db.execute("SELECT * FROM workers WHERE last_seen >= ? ORDER BY worker_id",
                              (time.time() - within_s,)).fetchall()
        return [{**dict(r), "kinds": json.loads(r["kinds"]), "models": json.loads(r["models"])} for r in rows]


class _SqliteTx:
    """`with store._tx(write=True) as db:` runs one transaction; sqlite errors become StoreUnavailable."""

    def __init__(self, store: SqliteJobStore, write: bool):
        self.store = store
        self.write = write

    def __enter__(self) -> sqlite3.Connection:
        try:
            self.db = self.store._conn()
            self.db.execute("BEGIN IMMEDIATE" if self.write else "BEGIN")
        except sqlite3.Error as exc:
            self.store._drop_conn()
            raise StoreUnavailable(f"job database unavailable: {exc}") from None
        return self.db

    def __exit__(self, exc_type, exc, tb):
        try:
            self.db.execute("ROLLBACK" if exc_type else "COMMIT")
        except sqlite3.Error as commit_error:
            self.store._drop_conn()
            if exc_type is None:
                raise StoreUnavailable(f"job database unavailable: {commit_error}") from None
        if isinstance(exc, sqlite3.Error):
            self.store._drop_conn()
            raise StoreUnavailable(f"job database unavailable: {exc}") from None
        return False


_OPEN_STORES: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_open_stores() -> None:
    """Entry points need no shutdown code: the main file holds the data when the process ends."""
    for store in list(_OPEN_STORES):
        store.close()


def _checkpoint_every(store_ref: weakref.ref, every_s: float, closed: threading.Event) -> None:
    """The checkpoint timer. It holds the store weakly, so a store nobody uses can be collected."""
    while not closed.wait(every_s):
        store = store_ref()
        if store is None:
            return
        try:
            store.checkpoint()
        except StoreUnavailable as exc:  # the file is away; the next tick tries again
            log.debug("checkpoint skipped: %s", exc)
        del store


# ---------------------------------------------------------------------------------------- MongoDB

class _MongoWebhooks:
    """The outbox and the idempotency keys on MongoDB.

    A standalone server has no multi-document transaction, so a status change and its delivery share one
    single-document write: the delivery is pushed onto the job's own `webhook_outbox` (`_transition`). The next
    dispatcher pass (or `delete()`) moves it into the `webhook_deliveries` collection under its id, so a
    crash between the copy and the pull only repeats a copy that is then ignored."""

    @property
    def _deliveries(self):
        return self.jobs.database["webhook_deliveries"]

    @property
    def _idempotency(self):
        return self.jobs.database["idempotency_keys"]

    def _ensure_webhook_indexes(self) -> None:
        if not getattr(self, "_webhook_indexed", False):
            self._guard(lambda: (
                self.jobs.create_index("webhook_outbox.id",
                                       partialFilterExpression={"webhook_outbox.id": {"$exists": True}}),
                self._deliveries.create_index([("state", 1), ("next_at", 1)]),
                self._deliveries.create_index("reference_id"),
                self._idempotency.create_index([("owner", 1), ("key", 1)], unique=True),
                self._idempotency.create_index("created_at"),
            ))
            self._webhook_indexed = True

    def _transition(self, query: dict, update: dict, event: str, sort: list | None = None) -> dict | None:
        """find_one_and_update(query, update) that also pushes `event`'s delivery onto the job's outbox when its
        webhook wants it, in that same write. The job is read first (its webhook never changes), and the write
        matches it only while `query` still does; with `sort`, a job another caller took meanwhile is passed over."""
        ret = self._pymongo.ReturnDocument.AFTER
        while True:
            doc = self._guard(lambda: self.jobs.find_one(query, sort=sort))
            if doc is None:
                return None
            change = _with_delivery(doc, update, event)
            after = self._guard(lambda: self.jobs.find_one_and_update({**query, "_id": doc["_id"]}, change,
                                                                       return_document=ret))
            if after is not None or sort is None:
                return after

    def _transition_many(self, query: dict, update: dict, event: str) -> int:
        """update_many(query, update), where each job whose webhook wants `event` gets its delivery in its own write."""
        wanting = self._guard(lambda: list(self.jobs.find({**query, "webhook.events": event}, {"_id": 1})))
        changed = sum(self._transition({**query, "_id": doc["_id"]}, update, event) is not None for doc in wanting)
        return changed + self._guard(lambda: self.jobs.update_many(
            {**query, "webhook.events": {"$ne": event}}, update)).modified_count

    def _relay_outbox(self, query: dict | None = None) -> None:
        """Move deliveries from their jobs' outboxes into the deliveries collection: insert, then pull."""
        self._ensure_webhook_indexes()
        docs = self._guard(lambda: list(self.jobs.find({"webhook_outbox.id": {"$exists": True}, **(query or {})},
                                                       {"webhook_outbox": 1})))
        for doc in docs:
            for item in doc["webhook_outbox"]:
                try:
                    self._deliveries.insert_one({"_id": item["id"], **{k: v for k, v in item.items() if k != "id"}})
                except self._pymongo.errors.DuplicateKeyError:
                    pass  # copied before a crash, not yet pulled
                except self._pymongo.errors.PyMongoError as exc:
                    raise StoreUnavailable(f"job database unavailable: {type(exc).__name__}") from None
                self._guard(lambda: self.jobs.update_one({"_id": doc["_id"]},
                                                         {"$pull": {"webhook_outbox": {"id": item["id"]}}}))

    @staticmethod
    def _delivery(doc) -> dict | None:
        if doc is None:
            return None
        doc = dict(doc)
        doc["id"] = doc.pop("_id")
        return doc

    def claim_delivery(self, dispatcher_id: str, lease_s: float) -> dict | None:
        """As SqliteJobStore.claim_delivery."""
        self._relay_outbox()
        now = time.time()
        return self._delivery(self._guard(lambda: self._deliveries.find_one_and_update(
            {"state": PENDING, "next_at": {"$lte": now}, "$or": [{"lease_until": None}, {"lease_until": {"$lt": now}}]},
            {"$set": {"leased_by": dispatcher_id, "lease_until": now + lease_s}},
            sort=[("next_at", 1), ("_id", 1)], return_document=self._pymongo.ReturnDocument.AFTER)))

    def record_attempt(self, delivery_id: str, dispatcher_id: str, state: str, status_code: int | None,
                       error: str | None, next_at: float | None = None) -> bool:
        """As SqliteJobStore.record_attempt."""
        now = time.time()
        values = {"state": state, "last_attempt_at": now, "last_status": status_code, "last_error": error,
                  "leased_by": None, "lease_until": None, "finished_at": None if state == PENDING else now}
        if next_at is not None:
            values["next_at"] = next_at
        return self._guard(lambda: self._deliveries.update_one(
            {"_id": delivery_id, "leased_by": dispatcher_id, "state": PENDING},
            {"$set": values, "$inc": {"attempts": 1}})).modified_count == 1

    def deliveries(self, reference_id: str) -> list[dict]:
        self._relay_outbox({"reference_id": reference_id})
        docs = self._guard(lambda: list(self._deliveries.find({"reference_id": reference_id})
                                        .sort([("created_at", 1), ("_id", 1)])))
        return [self._delivery(d) for d in docs]

    def webhook_counts(self) -> dict:
        """As SqliteJobStore.webhook_counts."""
        self._relay_outbox()
        rows = self._guard(lambda: list(self._deliveries.aggregate(
            [{"$group": {"_id": "$state", "rows": {"$sum": 1}, "attempts": {"$sum": "$attempts"}}}])))
        return _counts({row["_id"]: (row["rows"], row["attempts"]) for row in rows})

    def reserve_idempotency_key(self, owner: str, key: str, digest: str, reference_id: str,
                                ttl_s: float) -> dict | None:
        """As SqliteJobStore.reserve_idempotency_key; the unique (owner, key) index settles a race."""
        self._ensure_webhook_indexes()
        now = time.time()
        self._guard(lambda: self._idempotency.delete_many({"created_at": {"$lt": now - ttl_s}}))
        while True:
            try:
                self._idempotency.insert_one({"owner": owner, "key": key, "digest": digest,
                                              "reference_id": reference_id, "created_at": now})
                return None
            except self._pymongo.errors.DuplicateKeyError:
                held = self.idempotency_key(owner, key, ttl_s)
                if held is not None:
                    return held  # else it expired or was released since: try again
            except self._pymongo.errors.PyMongoError as exc:
                raise StoreUnavailable(f"job database unavailable: {type(exc).__name__}") from None

    def idempotency_key(self, owner: str, key: str, ttl_s: float) -> dict | None:
        doc = self._guard(lambda: self._idempotency.find_one(
            {"owner": owner, "key": key, "created_at": {"$gte": time.time() - ttl_s}}, {"_id": 0}))
        return dict(doc) if doc else None

    def replace_idempotency_key(self, owner: str, key: str, old_reference_id: str, reference_id: str) -> bool:
        return self._guard(lambda: self._idempotency.update_one(
            {"owner": owner, "key": key, "reference_id": old_reference_id},
            {"$set": {"reference_id": reference_id, "created_at": time.time()}})).modified_count == 1

    def release_idempotency_key(self, owner: str, key: str, reference_id: str) -> None:
        self._guard(lambda: self._idempotency.delete_one({"owner": owner, "key": key, "reference_id": reference_id}))


def _with_delivery(doc: dict, update: dict, event: str) -> dict:
    """`update` plus, when the job's webhook wants `event`, a $push of the delivery with the job as it will be."""
    webhook = doc.get("webhook") or {}
    if event not in (webhook.get("events") or ()):
        return update
    after = {**doc, **update.get("$set", {})}
    for name, step in update.get("$inc", {}).items():
        after[name] = after.get(name, 0) + step
    now = time.time()
    item = {"id": delivery_id(doc["reference_id"], event, after["attempts"]), "reference_id": doc["reference_id"],
            "event": event, "url": webhook["url"], "job": {name: after.get(name) for name in SNAPSHOT_FIELDS},
            "state": PENDING, "created_at": now, "next_at": now, "attempts": 0, "leased_by": None,
            "lease_until": None, "last_attempt_at": None, "last_status": None, "last_error": None, "finished_at": None}
    return {**update, "$push": {"webhook_outbox": item}}


class MongoJobStore(_Outcomes, _MongoWebhooks):
    """Jobs in a MongoDB collection; claims are single `find_one_and_update` calls.

    Queue admission needs no multi-document transaction (a standalone server has none): an admitted
    job holds a numbered `slot` below the cap until it leaves the queue, and a unique index lets
    only one job hold each slot, so concurrent API processes can never queue more than the cap."""

    def __init__(self, uri: str | None = None, database: str = "t2v", client: Any = None):
        import pymongo

        self._pymongo = pymongo
        self.client = client or pymongo.MongoClient(uri, serverSelectionTimeoutMS=5000, tz_aware=False)
        self.jobs = self.client[database]["jobs"]
        self.workers = self.client[database]["workers"]  # one document per worker, keyed by its id
        self.events = self.client[database]["job_events"]
        self._indexed = False
        try:
            self._ensure_indexes()
        except StoreUnavailable:  # start anyway: the API answers 503 until MongoDB answers
            log.warning("MongoDB is unreachable; the indexes will be made when it answers")

    def _ensure_indexes(self) -> None:
        if not self._indexed:
            self._guard(lambda: (
                self.jobs.create_index("reference_id", unique=True),
                self.jobs.create_index([("owner", 1), ("session_id", 1), ("created_at", -1)]),
                self.jobs.create_index([("status", 1), ("created_at", 1)]),
                self.jobs.create_index("slot", unique=True, partialFilterExpression={"slot": {"$exists": True}}),
                self.jobs.create_index([("owner", 1), ("kind", 1), ("created_at", -1)]),  # /v1/videos lists
                self.events.create_index([("reference_id", 1), ("seq", 1)], unique=True),
            ))
            self._indexed = True

    def _guard(self, call):
        try:
            return call()
        except self._pymongo.errors.PyMongoError as exc:
            # str(exc) of a connection error can hold the host list but never the password.
            raise StoreUnavailable(f"job database unavailable: {type(exc).__name__}") from None

    @staticmethod
    def _doc(doc) -> dict | None:
        if doc is None:
            return None
        doc = dict(doc)
        doc.pop("_id", None)
        doc.pop("slot", None)
        doc.pop("webhook_outbox", None)
        doc.pop("event_seq", None)  # the job's last event seq (append_event), not part of the record
        return doc

    def create(self, job: dict, max_queued: int | None = None) -> dict:
        if max_queued is None:
            self._guard(lambda: self.jobs.insert_one(dict(job)))
            return job
        self._ensure_indexes()  # the unique slot index is what makes admission atomic
        if self.count_queued() >= max_queued:  # jobs re-queued after a lost worker hold no slot but count here
            raise QueueFull(f"{max_queued} jobs are queued already")
        taken = set(self._guard(lambda: self.jobs.distinct("slot", {"slot": {"$exists": True}})))
        free = [n for n in range(max_queued) if n not in taken]
        random.shuffle(free)  # concurrent callers seldom try the same slot first
        for slot in free:
            try:
                self.jobs.insert_one({**job, "slot": slot})
                return job
            except self._pymongo.errors.DuplicateKeyError:
                continue  # another job took this slot since `taken` was read
            except self._pymongo.errors.PyMongoError as exc:
                raise StoreUnavailable(f"job database unavailable: {type(exc).__name__}") from None
        raise QueueFull(f"{max_queued} jobs are queued already")

    def get(self, reference_id: str) -> dict | None:
        return self._doc(self._guard(lambda: self.jobs.find_one({"reference_id": reference_id})))

    def history(self, owner: str, session_id: str) -> list[dict]:
        cursor = self._guard(lambda: list(self.jobs.find({"owner": owner, "session_id": session_id})
                                          .sort([("created_at", -1), ("_id", -1)])))
        return [self._doc(d) for d in cursor]

    def count_queued(self) -> int:
        return self._guard(lambda: self.jobs.count_documents({"status": QUEUED}))

    def queue_position(self, job: dict) -> int:
        if job["status"] != QUEUED:
            return 0
        return self._guard(lambda: self.jobs.count_documents(
            {"status": QUEUED, "created_at": {"$lte": job["created_at"]}}))

    def _update_one(self, query: dict, update: dict, event: str | None = None, **kw) -> dict | None:
        """find_one_and_update; a status change names its webhook `event`, written with it (`_transition`)."""
        if event is not None:
            return self._doc(self._transition(query, update, event, **kw))
        ret = self._pymongo.ReturnDocument.AFTER
        return self._doc(self._guard(lambda: self.jobs.find_one_and_update(query, update, return_document=ret, **kw)))

    def claim(self, worker_id: str, lease_s: float, kinds: tuple[str, ...] = JOB_KINDS,
              models: Collection[str] | None = None) -> dict | None:
        """`models` as in SqliteJobStore.claim; `$in` with None matches a job stored without a model."""
        kinds = _claimable_kinds(kinds, models)
        if not kinds:
            return None
        query = {"status": QUEUED, "kind": {"$in": list(kinds)}}
        if models is not None:
            named = [*models, None] if UNNAMED_MODEL in models else list(models)
            query["$or"] = [{"kind": {"$ne": "generate"}}, {"params.model": {"$in": named}}]
        now = time.time()
        return self._update_one(
            query,
            {"$set": {"status": PROCESSING, "stage": "starting", "worker_id": worker_id, "lease_until": now + lease_s,
                      "started_at": now}, "$inc": {"attempts": 1}, "$unset": {"slot": ""}},
            event=EVENT_OF_STATUS[PROCESSING], sort=[("created_at", 1), ("_id", 1)])

    def heartbeat(self, reference_id: str, worker_id: str, lease_s: float) -> dict | None:
        return self._update_one({"reference_id": reference_id, "worker_id": worker_id, "status": PROCESSING},
                                {"$set": {"lease_until": time.time() + lease_s}})

    def update_progress(self, reference_id: str, worker_id: str, **fields) -> None:
        allowed = {k: v for k, v in fields.items() if k in ("stage", "progress", "eta_s")}
        self._guard(lambda: self.jobs.update_one(
            {"reference_id": reference_id, "worker_id": worker_id, "status": PROCESSING}, {"$set": allowed}))

    # Live events: the same contract as SqliteJobStore's.

    def append_event(self, reference_id: str, worker_id: str, event: str, data: dict) -> int | None:
        """The seq comes from the job's own `event_seq`, taken in the same single-document update that checks
        the worker still holds the job. A job deleted between that and the insert takes the event with it."""
        held = self._guard(lambda: self.jobs.find_one_and_update(
            {"reference_id": reference_id, "worker_id": worker_id, "status": PROCESSING}, {"$inc": {"event_seq": 1}},
            projection={"event_seq": 1}, return_document=self._pymongo.ReturnDocument.AFTER))
        if held is None:
            return None
        seq = held["event_seq"]
        self._guard(lambda: self.events.insert_one(
            {"reference_id": reference_id, "seq": seq, "type": event, "data": data, "at": time.time()}))
        if self._guard(lambda: self.jobs.find_one({"reference_id": reference_id}, {"_id": 1})) is None:
            self._guard(lambda: self.events.delete_many({"reference_id": reference_id}))
            return None
        return seq

    def events_after(self, reference_id: str, seq: int, limit: int = EVENTS_PER_READ) -> list[dict]:
        docs = self._guard(lambda: list(self.events.find({"reference_id": reference_id, "seq": {"$gt": seq}},
                                                         {"_id": 0, "reference_id": 0}).sort("seq", 1).limit(limit)))
        return [{"seq": d["seq"], "type": d["type"], "data": d["data"], "at": d["at"]} for d in docs]

    def _finish(self, reference_id: str, worker_id: str, status: str, **fields) -> bool:
        values = {"status": status, "stage": status, "finished_at": time.time(), "lease_until": None, "eta_s": None,
                  **fields}
        return self._update_one({"reference_id": reference_id, "worker_id": worker_id, "status": PROCESSING},
                                {"$set": values}, event=EVENT_OF_STATUS[status]) is not None

    def request_cancel(self, reference_id: str) -> str | None:
        self._update_one(
            {"reference_id": reference_id, "status": QUEUED},
            {"$set": {"status": CANCELED, "stage": CANCELED, "finished_at": time.time()}, "$unset": {"slot": ""}},
            event=EVENT_OF_STATUS[CANCELED])
        self._guard(lambda: self.jobs.update_one(
            {"reference_id": reference_id, "status": PROCESSING}, {"$set": {"cancel_requested": True}}))
        job = self.get(reference_id)
        return job["status"] if job else None

    def delete(self, reference_id: str) -> bool:
        """Remove the record (and with it any queue slot it held) and its events; False when there was none.
        Deliveries still in its outbox move to the deliveries collection first; a record that gained one meanwhile
        is not deleted yet."""
        while True:
            self._relay_outbox({"reference_id": reference_id})
            deleted = self._guard(lambda: self.jobs.delete_one(
                {"reference_id": reference_id, "webhook_outbox.id": {"$exists": False}})).deleted_count == 1
            if deleted or self.get(reference_id) is None:
                self._guard(lambda: self.events.delete_many({"reference_id": reference_id}))
                return deleted

    def requeue_expired(self, max_attempts: int) -> tuple[int, int]:
        """Same rules as SqliteJobStore.requeue_expired; returns (requeued, ended)."""
        now = time.time()
        expired = {"status": PROCESSING, "lease_until": {"$lt": now}}
        ended = self._transition_many(
            {**expired, "cancel_requested": True},
            {"$set": {"status": CANCELED, "stage": CANCELED, "finished_at": now, "lease_until": None}},
            EVENT_OF_STATUS[CANCELED])
        ended += self._transition_many(
            {**expired, "attempts": {"$gte": max_attempts}},
            {"$set": {"status": FAILED, "stage": FAILED, "error": _worker_lost(max_attempts), "finished_at": now,
                      "lease_until": None}}, EVENT_OF_STATUS[FAILED])
        requeued = self._guard(lambda: self.jobs.update_many(
            expired, {"$set": {"status": QUEUED, "stage": QUEUED, "worker_id": None, "lease_until": None,
                               "progress": 0.0, "eta_s": None}}))
        return requeued.modified_count, ended

    def ping(self) -> None:
        self._guard(lambda: self.client.admin.command("ping"))
        self._ensure_indexes()

    # --- workers: what each takes, and when it was last seen (same contract as SqliteJobStore)

    def worker_seen(self, worker_id: str, kinds: tuple[str, ...], models: Collection[str],
                    gpu_bytes: int | None = None) -> None:
        now = time.time()
        self._guard(lambda: self.workers.update_one(
            {"_id": worker_id}, {"$set": {"kinds": list(kinds), "models": sorted(models), "last_seen": now,
                                          "gpu_bytes": gpu_bytes}}, upsert=True))
        self._guard(lambda: self.workers.delete_many({"last_seen": {"$lt": now - WORKER_FORGET_S}}))

    def worker_stopped(self, worker_id: str) -> None:
        self._guard(lambda: self.workers.delete_one({"_id": worker_id}))

    def live_workers(self, within_s: float) -> list[dict]:
        docs = self._guard(lambda: list(self.workers.find({"last_seen": {"$gte": time.time() - within_s}})
                                        .sort("_id", 1)))
        return [{"worker_id": d["_id"], "kinds": d["kinds"], "models": d["models"], "last_seen": d["last_seen"],
                 "gpu_bytes": d.get("gpu_bytes")} for d in docs]

    def close(self) -> None:
        self.client.close()

    # ------------------------------------------------------------ /v1/videos and /metrics

    def list_jobs(self, owner: str, kind: str | None = None, after: str | None = None, limit: int = 20,
                  oldest_first: bool = False) -> list[dict]:
        """Same contract as SqliteJobStore.list_jobs; the order is (created_at, _id), as in `history`."""
        query: dict = {"owner": owner}
        if kind is not None:
            query["kind"] = kind
        if after is not None:
            mark = self._guard(lambda: self.jobs.find_one({"reference_id": after, "owner": owner},
                                                          {"created_at": 1}))
            if mark is None:
                raise KeyError(after)
            beyond = "$gt" if oldest_first else "$lt"
            query["$or"] = [{"created_at": {beyond: mark["created_at"]}},
                            {"created_at": mark["created_at"], "_id": {beyond: mark["_id"]}}]
        direction = 1 if oldest_first else -1
        docs = self._guard(lambda: list(self.jobs.find(query).sort([("created_at", direction), ("_id", direction)])
                                        .limit(limit)))
        return [self._doc(d) for d in docs]

    def job_counts(self) -> list[tuple[str, str, str | None, int]]:
        """(status, kind, model, count) over every record, grouped by the server."""
        groups = self._guard(lambda: list(self.jobs.aggregate([
            {"$group": {"_id": {"status": "$status", "kind": "$kind", "model": "$params.model"}, "n": {"$sum": 1}}}])))
        return _counts_by_model((g["_id"]["status"], g["_id"]["kind"], g["_id"].get("model"), g["n"]) for g in groups)

    def completed_stats(self) -> list[tuple[str, str | None, dict, int | None]]:
        """(kind, model, timings_s, gpu_peak_bytes) of every completed job, as its worker recorded them."""
        docs = self._guard(lambda: list(self.jobs.find(
            {"status": COMPLETED},
            {"_id": 0, "kind": 1, "params.model": 1, "result.timings_s": 1, "result.gpu_peak_bytes": 1})))
        return [(d["kind"], _model_of(d["kind"], d.get("params", {}).get("model")),
                 (d.get("result") or {}).get("timings_s") or {}, (d.get("result") or {}).get("gpu_peak_bytes"))
                for d in docs]


def open_job_store(settings) -> JobStore:
    """MongoDB when MONGODB_URI is set, else SQLite under the data folder."""
    if settings.mongodb_uri:
        return MongoJobStore(settings.mongodb_uri)
    return SqliteJobStore(Path(settings.data_dir) / "jobs.sqlite3")
