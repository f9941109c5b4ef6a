"""The SQLite job store (the default): one file under the data folder, with its webhook outbox, idempotency keys,
event log and workers table, and the checkpoint thread that keeps the file whole. The contract is storage.jobs'."""

from __future__ import annotations

import atexit
import json
import logging
import os
import sqlite3
import threading
import time
import urllib.parse
import weakref
from contextlib import closing
from pathlib import Path
from typing import Collection

from storage.jobs import (CANCELED, COMPLETED, CURSOR_KEEP_S, DELIVERED, EVENT_OF_STATUS, EVENTS_PER_READ, FAILED,
                          FIRST_KINDS, MODEL_KINDS, PENDING, PROCESSING, QUEUED, SNAPSHOT_FIELDS, UNNAMED_MODEL,
                          WORKER_FORGET_S, QueueFull, StoreUnavailable, _Claims, _counts, _counts_by_model, _model_of,
                          _Outcomes, _worker_lost, delivery_id)

log = logging.getLogger(__name__)

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
CREATE TABLE IF NOT EXISTS job_tombstones (reference_id TEXT PRIMARY KEY, owner TEXT NOT NULL, seq INTEGER NOT NULL,
                                           deleted_at REAL NOT NULL) WITHOUT ROWID;
CREATE TRIGGER IF NOT EXISTS jobs_leave_a_tombstone AFTER DELETE ON jobs BEGIN
    INSERT OR REPLACE INTO job_tombstones VALUES (OLD.reference_id, OLD.owner, OLD.seq,
                                                  (julianday('now') - 2440587.5) * 86400.0);
END;
CREATE TABLE IF NOT EXISTS health (id INTEGER PRIMARY KEY, at REAL);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status, seq);
CREATE TABLE IF NOT EXISTS workers (worker_id TEXT PRIMARY KEY, kinds TEXT NOT NULL, models TEXT NOT NULL,
                                    last_seen REAL NOT NULL, gpu_bytes INTEGER, worker_group TEXT);
"""
# /v1/videos lists one owner's jobs of one kind in seq order: SQLite keeps an index's rows in rowid (seq) order.
_SCHEMA += "CREATE INDEX IF NOT EXISTS jobs_owner_kind ON jobs (owner, kind);\n"

# Monotonic counters for /metrics (`job_totals`): a trigger counts each submit and each end in the same
# transaction as the insert or the status change, whichever process makes it; deleting a record lowers none.
# (v2: an enhance job counts under its model too; a file made before has its v1 triggers replaced.)
_RUN_MODEL = f"CASE WHEN NEW.kind IN ({', '.join(repr(k) for k in MODEL_KINDS)}) THEN COALESCE(json_extract(NEW.params, '$.model'), '{UNNAMED_MODEL}') " \
             "ELSE '' END"
_SCHEMA += f"""
DROP TRIGGER IF EXISTS jobs_count_submitted;
DROP TRIGGER IF EXISTS jobs_count_finished;
CREATE TABLE IF NOT EXISTS job_totals (counter TEXT NOT NULL, status TEXT NOT NULL, kind TEXT NOT NULL,
                                       model TEXT NOT NULL, n INTEGER NOT NULL,
                                       PRIMARY KEY (counter, status, kind, model)) WITHOUT ROWID;
CREATE TRIGGER IF NOT EXISTS jobs_count_submitted_v2 AFTER INSERT ON jobs BEGIN
    INSERT OR IGNORE INTO job_totals VALUES ('submitted', '', NEW.kind, {_RUN_MODEL}, 0);
    UPDATE job_totals SET n = n + 1 WHERE counter = 'submitted' AND status = '' AND kind = NEW.kind
        AND model = {_RUN_MODEL};
END;
CREATE TRIGGER IF NOT EXISTS jobs_count_finished_v2 AFTER UPDATE OF status ON jobs
WHEN NEW.status IN ('{COMPLETED}', '{FAILED}', '{CANCELED}')
    AND OLD.status NOT IN ('{COMPLETED}', '{FAILED}', '{CANCELED}')
BEGIN
    INSERT OR IGNORE INTO job_totals VALUES ('finished', NEW.status, NEW.kind, {_RUN_MODEL}, 0);
    UPDATE job_totals SET n = n + 1 WHERE counter = 'finished' AND status = NEW.status AND kind = NEW.kind
        AND model = {_RUN_MODEL};
END;
"""


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
CREATE INDEX IF NOT EXISTS webhook_deliveries_finished ON webhook_deliveries (finished_at);
CREATE TABLE IF NOT EXISTS webhook_totals (name TEXT PRIMARY KEY, n INTEGER NOT NULL) WITHOUT ROWID;
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
    """The outbox, the idempotency keys and the trigger that fills the outbox; `jobs.webhook` on older files."""
    db.execute("BEGIN IMMEDIATE")  # another process starting at the same time waits here
    try:
        if "webhook" not in {row[1] for row in db.execute("PRAGMA table_info(jobs)")}:
            db.execute("ALTER TABLE jobs ADD COLUMN webhook TEXT")
        columns = {row[1] for row in db.execute("PRAGMA table_info(workers)")}
        for column, kind in (("gpu_bytes", "INTEGER"), ("worker_group", "TEXT")):
            if column not in columns:
                db.execute(f"ALTER TABLE workers ADD COLUMN {column} {kind}")
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
            pruned = db.execute("SELECT n FROM webhook_totals WHERE name = 'pruned_failed_attempts'").fetchone()
        return _counts({state: (n, attempts) for state, n, attempts in rows}, pruned[0] if pruned else 0)

    def prune_deliveries(self, finished_before: float) -> int:
        """Delete the deliveries that ended (delivered or given up) before `finished_before` (T2V_WEBHOOK_KEEP_S);
        their failed attempts move into a total, in the same transaction. Returns how many rows went."""
        ended = f"state != '{PENDING}' AND finished_at < ?"
        with self._tx(write=True) as db:
            failed = db.execute(f"SELECT COALESCE(SUM(attempts - (state = '{DELIVERED}')), 0) FROM webhook_deliveries "
                                f"WHERE {ended}", (finished_before,)).fetchone()[0]
            db.execute("INSERT INTO webhook_totals VALUES ('pruned_failed_attempts', ?) "
                       "ON CONFLICT (name) DO UPDATE SET n = n + excluded.n", (failed,))
            return db.execute(f"DELETE FROM webhook_deliveries WHERE {ended}", (finished_before,)).rowcount

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


class SqliteJobStore(_Claims, _Outcomes, _SqliteWebhooks):
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
        """How many queued jobs a claim takes before this one, itself included (claim_passes' order)."""
        if job["status"] != QUEUED:
            return 0
        first, mine = f"kind IN ({', '.join('?' * len(FIRST_KINDS))})", "(SELECT seq FROM jobs WHERE reference_id = ?)"
        if job["kind"] in FIRST_KINDS:
            rule, args = f"{first} AND seq <= {mine}", (*FIRST_KINDS, job["reference_id"])
        else:
            rule, args = f"(seq <= {mine} OR {first})", (job["reference_id"], *FIRST_KINDS)
        with self._tx() as db:
            return db.execute(f"SELECT COUNT(*) FROM jobs WHERE status = ? AND {rule}", (QUEUED, *args)).fetchone()[0]

    def _claim_oldest(self, worker_id: str, lease_s: float, kinds: tuple[str, ...],
                      models: Collection[str] | None) -> dict | None:
        """One statement: the oldest queued job of `kinds` (a model's only if `models` serves it), leased."""
        model_rule, model_args = "", ()
        if models is not None:
            model_rule = (f" AND (kind NOT IN ({', '.join('?' * len(MODEL_KINDS))}) OR "
                          f"COALESCE(json_extract(params, '$.model'), ?) IN ({', '.join('?' * len(models))}))")
            model_args = (*MODEL_KINDS, UNNAMED_MODEL, *models)
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
        """Remove the record and free the idempotency keys that name it (a retry with one makes a new job, and
        waits on no job that is gone); False when there was none."""
        with self._tx(write=True) as db:
            db.execute("DELETE FROM job_tombstones WHERE deleted_at < ?", (time.time() - CURSOR_KEEP_S,))
            db.execute("DELETE FROM idempotency_keys WHERE reference_id = ?", (reference_id,))
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
        after the job `after`, or where it was if it was deleted (its tombstone, for CURSOR_KEEP_S). KeyError
        when `after` names no job of this owner."""
        where, args = ["owner = ?"], [owner]
        if kind is not None:
            where.append("kind = ?")
            args.append(kind)
        with self._tx() as db:
            if after is not None:
                row = db.execute("SELECT seq FROM jobs WHERE reference_id = ? AND owner = ? UNION ALL SELECT seq "
                                 "FROM job_tombstones WHERE reference_id = ? AND owner = ?",
                                 (after, owner, after, owner)).fetchone()
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

    def job_totals(self) -> list[tuple[str, str | None, str, str | None, int]]:
        """(counter, status, kind, model, n): jobs `submitted` (status None) and `finished` by status, since the
        file was made; they never go down."""
        with self._tx() as db:
            rows = db.execute("SELECT counter, status, kind, model, n FROM job_totals").fetchall()
        return [(counter, status or None, kind, model or None, n) for counter, status, kind, model, n in rows]

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
                    gpu_bytes: int | None = None, group: dict | None = None) -> None:
        """Record that this worker is alive, what it claims, its GPU's memory (None: no GPU) and, for a worker
        group's rank 0, the group's facts (storage.jobs.group_facts); forget workers silent for WORKER_FORGET_S."""
        now = time.time()
        with self._tx(write=True) as db:
            db.execute("INSERT OR REPLACE INTO workers (worker_id, kinds, models, last_seen, gpu_bytes, worker_group) "
                       "VALUES (?, ?, ?, ?, ?, ?)", (worker_id, json.dumps(list(kinds)), json.dumps(sorted(models)),
                                                     now, gpu_bytes, None if group is None else json.dumps(group)))
            db.execute("DELETE FROM workers WHERE last_seen < ?", (now - WORKER_FORGET_S,))

    def worker_stopped(self, worker_id: str) -> None:
        with self._tx(write=True) as db:
            db.execute("DELETE FROM workers WHERE worker_id = ?", (worker_id,))

    def live_workers(self, within_s: float) -> list[dict]:
        with self._tx() as db:
            rows = db.execute("SELECT * FROM workers WHERE last_seen >= ? ORDER BY worker_id",
                              (time.time() - within_s,)).fetchall()
        return [{**{k: r[k] for k in r.keys() if k != "worker_group"}, "kinds": json.loads(r["kinds"]),
                 "models": json.loads(r["models"]), "group": r["worker_group"] and json.loads(r["worker_group"])}
                for r in rows]


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
