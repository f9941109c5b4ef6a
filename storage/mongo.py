"""The MongoDB job store (pymongo): jobs, workers and events in collections, with its webhook outbox and
idempotency keys. A standalone server has no multi-document transaction; each rule here says how it does
without one. The contract is storage.jobs'."""

from __future__ import annotations

import logging
import random
import time
from typing import Any, Collection

from storage.jobs import (CANCELED, COMPLETED, CURSOR_KEEP_S, DELIVERED, EVENT_OF_STATUS, EVENTS_PER_READ, FAILED,
                          FIRST_KINDS, MODEL_KINDS, PENDING, PROCESSING, QUEUED, SNAPSHOT_FIELDS, TERMINAL,
                          UNNAMED_MODEL, WORKER_FORGET_S, QueueFull, StoreUnavailable, _counts, _counts_by_model,
                          _Claims, _model_of, _Outcomes, _worker_lost, delivery_id, job_model)

log = logging.getLogger(__name__)


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
    def _webhook_totals(self):
        return self.jobs.database["webhook_totals"]

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
            if after is not None and event in TERMINAL:  # the event names the status it ends in
                self._count("finished", event, after)
            if after is not None or sort is None:
                return after

    def _transition_many(self, query: dict, update: dict, event: str) -> int:
        """update_many(query, update), where each job whose webhook wants `event` gets its delivery in its own write."""
        if event in TERMINAL:  # each end is counted by kind and model (job_totals): one write per job
            matching = self._guard(lambda: list(self.jobs.find(query, {"_id": 1})))
            return sum(self._transition({**query, "_id": doc["_id"]}, update, event) is not None for doc in matching)
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
        pruned = self._guard(lambda: self._webhook_totals.find_one({"_id": "pruned_failed_attempts"})) or {}
        return _counts({row["_id"]: (row["rows"], row["attempts"]) for row in rows}, pruned.get("n", 0))

    def prune_deliveries(self, finished_before: float) -> int:
        """As SqliteJobStore.prune_deliveries: one row at a time, each removed by one caller only, its failed
        attempts added just after (a crash between the two loses those, and never counts them twice)."""
        ended = {"state": {"$ne": PENDING}, "finished_at": {"$lt": finished_before}}
        removed = 0
        while (doc := self._guard(lambda: self._deliveries.find_one_and_delete(ended))) is not None:
            failed = doc["attempts"] - (doc["state"] == DELIVERED)
            self._guard(lambda: self._webhook_totals.update_one(
                {"_id": "pruned_failed_attempts"}, {"$inc": {"n": failed}}, upsert=True))
            removed += 1
        return removed

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


class MongoJobStore(_Claims, _Outcomes, _MongoWebhooks):
    """Jobs in a MongoDB collection; claims are single `find_one_and_update` calls.

    Queue admission needs no multi-document transaction (a standalone server has none): an admitted
    job holds a numbered `slot` below the cap until it leaves the queue, and a unique index lets
    only one job hold each slot, so concurrent API processes can never queue more than the cap."""

    def __init__(self, uri: str | None = None, database: str = "t2v", client: Any = None):
        import pymongo

        self._pymongo = pymongo
        self.client = client or pymongo.MongoClient(uri, tz_aware=False, **_default_timeout(uri))
        self.jobs = self.client[database]["jobs"]
        self.workers = self.client[database]["workers"]  # one document per worker, keyed by its id
        self.events = self.client[database]["job_events"]
        self.tombstones = self.client[database]["job_tombstones"]  # a deleted job's place, for list_jobs
        self.totals = self.client[database]["job_totals"]  # monotonic counters (job_totals), one document each
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
            self._count("submitted", None, job)
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
                self._count("submitted", None, job)
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
        """As SqliteJobStore.queue_position."""
        if job["status"] != QUEUED:
            return 0
        first, mine = {"kind": {"$in": list(FIRST_KINDS)}}, {"created_at": {"$lte": job["created_at"]}}
        rule = {**first, **mine} if job["kind"] in FIRST_KINDS else {"$or": [mine, first]}
        return self._guard(lambda: self.jobs.count_documents({"status": QUEUED, **rule}))

    def _update_one(self, query: dict, update: dict, event: str | None = None, **kw) -> dict | None:
        """find_one_and_update; a status change names its webhook `event`, written with it (`_transition`)."""
        if event is not None:
            return self._doc(self._transition(query, update, event, **kw))
        ret = self._pymongo.ReturnDocument.AFTER
        return self._doc(self._guard(lambda: self.jobs.find_one_and_update(query, update, return_document=ret, **kw)))

    def _claim_oldest(self, worker_id: str, lease_s: float, kinds: tuple[str, ...],
                      models: Collection[str] | None) -> dict | None:
        """As SqliteJobStore._claim_oldest; `$in` with None matches a job stored without a model."""
        query = {"status": QUEUED, "kind": {"$in": list(kinds)}}
        if models is not None:
            named = [*models, None] if UNNAMED_MODEL in models else list(models)
            query["$or"] = [{"kind": {"$nin": list(MODEL_KINDS)}}, {"params.model": {"$in": named}}]
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
        """Remove the record (and with it any queue slot it held), its events and the idempotency keys that name
        it (as on SQLite); False when there was none. Deliveries still in its outbox move to the deliveries
        collection first; a record that gained one meanwhile is not deleted yet."""
        self._leave_tombstone(reference_id)
        while True:
            self._relay_outbox({"reference_id": reference_id})
            deleted = self._guard(lambda: self.jobs.delete_one(
                {"reference_id": reference_id, "webhook_outbox.id": {"$exists": False}})).deleted_count == 1
            if deleted or self.get(reference_id) is None:
                self._guard(lambda: self.events.delete_many({"reference_id": reference_id}))
                self._guard(lambda: self._idempotency.delete_many({"reference_id": reference_id}))
                return deleted

    def _leave_tombstone(self, reference_id: str) -> None:
        """Before a delete: the job's owner and place in the order, for a cursor naming it (list_jobs), written
        first so that a listing in another process finds the job or its tombstone, never neither."""
        now = time.time()
        self._guard(lambda: self.tombstones.delete_many({"deleted_at": {"$lt": now - CURSOR_KEEP_S}}))
        doc = self._guard(lambda: self.jobs.find_one({"reference_id": reference_id}, {"owner": 1, "created_at": 1}))
        if doc is not None:
            self._guard(lambda: self.tombstones.replace_one(
                {"_id": reference_id}, {"owner": doc["owner"], "created_at": doc["created_at"], "job_id": doc["_id"],
                                        "deleted_at": now}, upsert=True))

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
                    gpu_bytes: int | None = None, group: dict | None = None) -> None:
        now = time.time()
        self._guard(lambda: self.workers.update_one(
            {"_id": worker_id}, {"$set": {"kinds": list(kinds), "models": sorted(models), "last_seen": now,
                                          "gpu_bytes": gpu_bytes, "group": group}}, upsert=True))
        self._guard(lambda: self.workers.delete_many({"last_seen": {"$lt": now - WORKER_FORGET_S}}))

    def worker_stopped(self, worker_id: str) -> None:
        self._guard(lambda: self.workers.delete_one({"_id": worker_id}))

    def live_workers(self, within_s: float) -> list[dict]:
        docs = self._guard(lambda: list(self.workers.find({"last_seen": {"$gte": time.time() - within_s}})
                                        .sort("_id", 1)))
        return [{"worker_id": d["_id"], "kinds": d["kinds"], "models": d["models"], "last_seen": d["last_seen"],
                 "gpu_bytes": d.get("gpu_bytes"), "group": d.get("group")} for d in docs]

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
            if mark is None:  # deleted: its tombstone keeps its place
                tomb = self._guard(lambda: self.tombstones.find_one({"_id": after, "owner": owner}))
                if tomb is None:
                    raise KeyError(after)
                mark = {"created_at": tomb["created_at"], "_id": tomb["job_id"]}
            beyond = "$gt" if oldest_first else "$lt"
            query["$or"] = [{"created_at": {beyond: mark["created_at"]}},
                            {"created_at": mark["created_at"], "_id": {beyond: mark["_id"]}}]
        direction = 1 if oldest_first else -1
        docs = self._guard(lambda: list(self.jobs.find(query).sort([("created_at", direction), ("_id", direction)])
                                        .limit(limit)))
        return [self._doc(d) for d in docs]

    def _count(self, counter: str, status: str | None, job: dict) -> None:
        """Add one to a `job_totals` counter, right after the write it counts (a standalone server has no
        transaction across documents: a crash between the two loses that one count, and never counts twice)."""
        key = {"counter": counter, "status": status, "kind": job["kind"], "model": job_model(job)}
        self._guard(lambda: self.totals.update_one(key, {"$inc": {"n": 1}}, upsert=True))

    def job_totals(self) -> list[tuple[str, str | None, str, str | None, int]]:
        """As SqliteJobStore.job_totals."""
        docs = self._guard(lambda: list(self.totals.find({}, {"_id": 0})))
        return [(d["counter"], d["status"], d["kind"], d["model"], d["n"]) for d in docs]

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


def _default_timeout(uri: str | None) -> dict:
    """A 5 s server selection timeout, unless the URI sets its own: pymongo lets a keyword argument
    override the URI's options, so passing it always would ignore `?serverSelectionTimeoutMS=` there."""
    from urllib.parse import parse_qsl, urlsplit

    options = {name.lower() for name, _ in parse_qsl(urlsplit(uri or "").query)}
    return {} if "serverselectiontimeoutms" in options else {"serverSelectionTimeoutMS": 5000}
