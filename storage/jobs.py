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
  every later write of that worker (progress, heartbeat, outcome) matches nothing, so none brings it back.
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

    def worker_seen(self, worker_id: str, kinds: tuple[str, ...], models: Collection[str]) -> None: ...
    def worker_stopped(self, worker_id: str) -> None: ...
    def live_workers(self, within_s: float) -> list[dict]: ...


def new_job(reference_id: str, session_id: str, owner: str, kind: str, params: dict) -> dict:
    """A fresh queued record with every field the stores keep."""
    return {
        "reference_id": reference_id, "session_id": session_id, "owner": owner, "kind": kind, "params": params,
        "status": QUEUED, "stage": QUEUED, "progress": 0.0, "eta_s": None, "error": None, "result": None,
        "attempts": 0, "worker_id": None, "lease_until": None, "cancel_requested": False,
        "created_at": time.time(), "started_at": None, "finished_at": None,
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

_JSON_FIELDS = ("params", "error", "result")
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
CREATE TABLE IF NOT EXISTS health (id INTEGER PRIMARY KEY, at REAL);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status, seq);
CREATE TABLE IF NOT EXISTS workers (worker_id TEXT PRIMARY KEY, kinds TEXT NOT NULL, models TEXT NOT NULL,
                                    last_seen REAL NOT NULL);
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


class SqliteJobStore(_Outcomes):
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

    def worker_seen(self, worker_id: str, kinds: tuple[str, ...], models: Collection[str]) -> None:
        """Record that this worker is alive and what it claims; forget workers silent for WORKER_FORGET_S."""
        now = time.time()
        with self._tx(write=True) as db:
            db.execute("INSERT OR REPLACE INTO workers (worker_id, kinds, models, last_seen) VALUES (?, ?, ?, ?)",
                       (worker_id, json.dumps(list(kinds)), json.dumps(sorted(models)), now))
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

class MongoJobStore(_Outcomes):
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

    def _update_one(self, query: dict, update: dict, **kw) -> dict | None:
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
            sort=[("created_at", 1), ("_id", 1)])

    def heartbeat(self, reference_id: str, worker_id: str, lease_s: float) -> dict | None:
        return self._update_one({"reference_id": reference_id, "worker_id": worker_id, "status": PROCESSING},
                                {"$set": {"lease_until": time.time() + lease_s}})

    def update_progress(self, reference_id: str, worker_id: str, **fields) -> None:
        allowed = {k: v for k, v in fields.items() if k in ("stage", "progress", "eta_s")}
        self._guard(lambda: self.jobs.update_one(
            {"reference_id": reference_id, "worker_id": worker_id, "status": PROCESSING}, {"$set": allowed}))

    def _finish(self, reference_id: str, worker_id: str, status: str, **fields) -> bool:
        values = {"status": status, "stage": status, "finished_at": time.time(), "lease_until": None, "eta_s": None,
                  **fields}
        res = self._guard(lambda: self.jobs.update_one(
            {"reference_id": reference_id, "worker_id": worker_id, "status": PROCESSING}, {"$set": values}))
        return res.modified_count == 1

    def request_cancel(self, reference_id: str) -> str | None:
        self._guard(lambda: self.jobs.update_one(
            {"reference_id": reference_id, "status": QUEUED},
            {"$set": {"status": CANCELED, "stage": CANCELED, "finished_at": time.time()}, "$unset": {"slot": ""}}))
        self._guard(lambda: self.jobs.update_one(
            {"reference_id": reference_id, "status": PROCESSING}, {"$set": {"cancel_requested": True}}))
        job = self.get(reference_id)
        return job["status"] if job else None

    def delete(self, reference_id: str) -> bool:
        """Remove the record (and with it any queue slot it held); False when there was none."""
        return self._guard(lambda: self.jobs.delete_one({"reference_id": reference_id})).deleted_count == 1

    def requeue_expired(self, max_attempts: int) -> tuple[int, int]:
        """Same rules as SqliteJobStore.requeue_expired; returns (requeued, ended)."""
        now = time.time()
        expired = {"status": PROCESSING, "lease_until": {"$lt": now}}
        ended = self._guard(lambda: self.jobs.update_many(
            {**expired, "cancel_requested": True},
            {"$set": {"status": CANCELED, "stage": CANCELED, "finished_at": now, "lease_until": None}})).modified_count
        ended += self._guard(lambda: self.jobs.update_many(
            {**expired, "attempts": {"$gte": max_attempts}},
            {"$set": {"status": FAILED, "stage": FAILED, "error": _worker_lost(max_attempts), "finished_at": now,
                      "lease_until": None}})).modified_count
        requeued = self._guard(lambda: self.jobs.update_many(
            expired, {"$set": {"status": QUEUED, "stage": QUEUED, "worker_id": None, "lease_until": None,
                               "progress": 0.0, "eta_s": None}}))
        return requeued.modified_count, ended

    def ping(self) -> None:
        self._guard(lambda: self.client.admin.command("ping"))
        self._ensure_indexes()

    # --- workers: what each takes, and when it was last seen (same contract as SqliteJobStore)

    def worker_seen(self, worker_id: str, kinds: tuple[str, ...], models: Collection[str]) -> None:
        now = time.time()
        self._guard(lambda: self.workers.update_one(
            {"_id": worker_id}, {"$set": {"kinds": list(kinds), "models": sorted(models), "last_seen": now}},
            upsert=True))
        self._guard(lambda: self.workers.delete_many({"last_seen": {"$lt": now - WORKER_FORGET_S}}))

    def worker_stopped(self, worker_id: str) -> None:
        self._guard(lambda: self.workers.delete_one({"_id": worker_id}))

    def live_workers(self, within_s: float) -> list[dict]:
        docs = self._guard(lambda: list(self.workers.find({"last_seen": {"$gte": time.time() - within_s}})
                                        .sort("_id", 1)))
        return [{"worker_id": d["_id"], "kinds": d["kinds"], "models": d["models"], "last_seen": d["last_seen"]}
                for d in docs]

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
