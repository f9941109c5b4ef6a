"""One contract, every job store: SQLite, MongoDB through mongomock, and a real MongoDB when
T2V_TEST_MONGODB_URI is set."""

import functools
import io
import os
import threading
import time

import mongomock
import pytest

from conftest import TINY_JOB, make_clip
from storage.jobs import CANCELED, COMPLETED, FAILED, PROCESSING, QUEUED, QueueFull, StoreUnavailable, new_job
from storage.mongo import MongoJobStore
from storage.sqlite import SqliteJobStore

BACKENDS = ["sqlite", "mongomock"] + (["mongodb"] if os.environ.get("T2V_TEST_MONGODB_URI") else [])


@pytest.fixture(params=BACKENDS)
def store(request, tmp_path):
    if request.param == "sqlite":
        yield SqliteJobStore(tmp_path / "jobs.sqlite3")
    elif request.param == "mongomock":
        yield MongoJobStore(client=mongomock.MongoClient(), database="t2v_test")
    else:
        db = f"t2v_test_{os.getpid()}_{int(time.time() * 1000)}"
        s = MongoJobStore(os.environ["T2V_TEST_MONGODB_URI"], database=db)
        yield s
        s.client.drop_database(db)


def add(store, ref, owner="o", session="s", **params):
    job = store.create(new_job(ref, session, owner, "generate", {"prompt": "p", **params}))
    time.sleep(0.002)  # distinct created_at for stores that order by it
    return job


def test_create_get_round_trip(store):
    add(store, "ref00001", seed=5)
    job = store.get("ref00001")
    assert job["status"] == QUEUED and job["params"] == {"prompt": "p", "seed": 5}
    assert job["attempts"] == 0 and job["cancel_requested"] is False and job["error"] is None
    assert store.get("missing1") is None


def test_claims_are_fifo_and_queue_positions_follow(store):
    for i in range(3):
        add(store, f"ref0000{i}")
    assert [store.queue_position(store.get(f"ref0000{i}")) for i in range(3)] == [1, 2, 3]
    assert store.count_queued() == 3
    first = store.claim("w1", 30)
    assert first["reference_id"] == "ref00000" and first["status"] == PROCESSING and first["attempts"] == 1
    assert store.queue_position(store.get("ref00001")) == 1 and store.queue_position(first) == 0
    assert store.claim("w1", 30)["reference_id"] == "ref00001"
    assert store.claim("w1", 30)["reference_id"] == "ref00002"
    assert store.claim("w1", 30) is None


def test_a_worker_claims_only_the_kinds_it_can_run(store):
    """A worker whose model failed to load asks for upscale jobs only; one that can run nothing asks for none."""
    for ref, kind in (("gen00001", "generate"), ("ups00002", "upscale"), ("gen00003", "generate")):
        store.create(new_job(ref, "s", "o", kind, {}))
        time.sleep(0.002)
    assert store.claim("broken", 30, kinds=()) is None
    upscale = store.claim("broken", 30, kinds=("upscale",))
    assert upscale["reference_id"] == "ups00002" and upscale["worker_id"] == "broken"
    assert store.claim("broken", 30, kinds=("upscale",)) is None, "generation jobs are left for others"
    assert [store.get(r)["status"] for r in ("gen00001", "gen00003")] == [QUEUED, QUEUED]
    assert store.claim("healthy", 30)["reference_id"] == "gen00001"  # the default takes every kind, oldest first
    assert store.claim("healthy", 30, kinds=("generate", "upscale"))["reference_id"] == "gen00003"


def test_enhance_jobs_are_claimed_before_older_jobs_and_only_for_the_models_served(store):
    """A prompt's suggestion takes seconds: it goes ahead of the queued videos (and its queue position says
    so), and like a video it is claimed only by a worker serving its model."""
    for ref, kind, model in (("gen00001", "generate", "ltx-2"), ("enh00002", "enhance", "wan2.2-t2v"),
                             ("enh00003", "enhance", "ltx-2"), ("gen00004", "generate", "ltx-2")):
        store.create(new_job(ref, "s", "o", kind, {"prompt": "p", "model": model}))
        time.sleep(0.002)
    positions = [store.queue_position(store.get(r)) for r in ("enh00002", "enh00003", "gen00001", "gen00004")]
    assert positions == [1, 2, 3, 4]
    assert store.claim("w", 30, models=("ltx-2",))["reference_id"] == "enh00003", "the Wan suggestion is left"
    assert store.claim("w", 30, models=("ltx-2",))["reference_id"] == "gen00001"
    assert store.claim("w", 30, kinds=("generate", "upscale"))["reference_id"] == "gen00004"
    assert store.claim("w", 30, models=("ltx-2",)) is None
    assert store.claim("w", 30)["reference_id"] == "enh00002"


def test_a_worker_claims_only_generation_jobs_for_the_models_it_serves(store):
    """A job stored without a model (queued before jobs named one) runs the default model, hunyuanvideo;
    upscale jobs are not model-bound; a worker that serves no model takes upscale jobs only."""
    from pipeline.models import DEFAULT_MODEL
    from pipeline.spec import JobParams
    from storage.jobs import UNNAMED_MODEL

    assert UNNAMED_MODEL == DEFAULT_MODEL == JobParams(prompt="p").model == "hunyuanvideo"
    for ref, kind, params in (("wan00001", "generate", {"model": "wan2.2-ti2v-5b"}), ("old00002", "generate", {}),
                              ("hun00003", "generate", {"model": "hunyuanvideo"}), ("ups00004", "upscale", {}),
                              ("wan00005", "generate", {"model": "wan2.2-ti2v-5b"})):
        store.create(new_job(ref, "s", "o", kind, params))
        time.sleep(0.002)
    assert store.claim("nothing", 30, kinds=("generate",), models=()) is None
    assert store.claim("other", 30, models=["wan2.1-t2v-1.3b"])["reference_id"] == "ups00004"
    assert store.claim("other", 30, models=["wan2.1-t2v-1.3b"]) is None
    hunyuan = ("hunyuanvideo", "hunyuanvideo-1.5-480p")
    assert [store.claim("hun", 30, models=hunyuan)["reference_id"] for _ in range(2)] == ["old00002", "hun00003"]
    assert store.claim("hun", 30, models=hunyuan) is None, "the Wan jobs are left for a Wan worker"
    assert store.get("wan00001")["status"] == QUEUED
    assert store.claim("wan", 30, models=("wan2.2-ti2v-5b",))["reference_id"] == "wan00001"
    assert store.claim("any", 30)["reference_id"] == "wan00005"  # no models given: any model
    assert {r: store.get(r)["worker_id"] for r in ("wan00001", "old00002", "hun00003", "ups00004", "wan00005")} == \
        {"wan00001": "wan", "old00002": "hun", "hun00003": "hun", "ups00004": "other", "wan00005": "any"}


def test_workers_record_what_they_take_and_a_queued_job_says_why_it_waits(store):
    from storage.jobs import waiting_reason

    wan = store.create(new_job("wan00001", "s", "o", "generate", {"model": "wan2.2-ti2v-5b"}))
    old = store.create(new_job("old00002", "s", "o", "generate", {"prompt": "p"}))
    upscale = store.create(new_job("ups00003", "s", "o", "upscale", {}))
    assert store.live_workers(30) == []
    assert waiting_reason(store, wan) == "waiting for a worker: none has reported in the last 30 s"
    store.worker_seen("gpu-a", ("generate", "upscale"), ["hunyuanvideo"])
    store.worker_seen("gpu-b", ("upscale",), ["wan2.2-ti2v-5b"])  # its model does not load: no generation
    seen = store.live_workers(30)
    assert [(w["worker_id"], w["kinds"], w["models"]) for w in seen] == [
        ("gpu-a", ["generate", "upscale"], ["hunyuanvideo"]), ("gpu-b", ["upscale"], ["wan2.2-ti2v-5b"])]
    assert all(time.time() - w["last_seen"] < 30 for w in seen)
    assert waiting_reason(store, wan) == "waiting for a worker that serves wan2.2-ti2v-5b"
    assert waiting_reason(store, old) is None and waiting_reason(store, upscale) is None
    store.worker_seen("gpu-b", ("generate", "upscale"), ["wan2.2-ti2v-5b", "wan2.1-t2v-1.3b"])  # loaded now
    assert waiting_reason(store, wan) is None
    assert len(store.live_workers(30)) == 2, "a worker's record is replaced, not added to"
    store.worker_stopped("gpu-a")
    assert waiting_reason(store, old) == "waiting for a worker that serves hunyuanvideo"
    assert waiting_reason(store, store.claim("gpu-b", 30)) is None, "only a queued job waits"
    time.sleep(0.05)
    assert store.live_workers(0.01) == [], "a worker not seen within the window is not live"
    assert waiting_reason(store, upscale, within_s=0.01).startswith("waiting for a worker: none has reported")


def test_a_worker_group_records_its_ranks_gpus_and_state(store):
    from storage.jobs import group_facts

    store.worker_seen("alone", ("generate",), ["hunyuanvideo"])
    store.worker_seen("group-a", (), [], group=group_facts(4, ["0", "1", "2", "3"], "starting"))
    assert {w["worker_id"]: w["group"] for w in store.live_workers(30)} == {
        "alone": None, "group-a": {"ranks": 4, "gpus": ["0", "1", "2", "3"], "state": "starting"}}
    store.worker_seen("group-a", (), [], group=group_facts(4, ["0", "1", "2", "3"], "failed", "no NCCL"))
    assert store.live_workers(30)[1]["group"]["state"] == "failed: no NCCL"
    store.worker_seen("group-a", ("generate",), ["wan2.2-ti2v-5b"], 80 * 2**30,
                      group=group_facts(4, ["0", "1", "2", "3"], "ready"))
    [group] = [w for w in store.live_workers(30) if w["worker_id"] == "group-a"]
    assert (group["kinds"], group["gpu_bytes"], group["group"]["state"]) == (["generate"], 80 * 2**30, "ready")


@pytest.fixture
def serial_mongomock(monkeypatch):
    """A mongomock client whose every collection call is atomic, as each single-document write is on a
    real server. mongomock alone runs a call as Python steps that threads interleave (its
    find_one_and_update is a find, then an update); the store's own steps still interleave freely."""
    lock = threading.RLock()

    def atomic(call):
        @functools.wraps(call)
        def locked(*args, **kwargs):
            with lock:
                return call(*args, **kwargs)
        return locked

    for name in ("insert_one", "find_one", "find_one_and_update", "update_one", "update_many", "delete_one",
                 "count_documents", "distinct"):
        monkeypatch.setattr(mongomock.Collection, name, atomic(getattr(mongomock.Collection, name)))
    return mongomock.MongoClient()


@pytest.fixture(params=BACKENDS)
def atomic_store(request, tmp_path):
    """The backends under threads; mongomock made atomic per call (serial_mongomock)."""
    if request.param == "sqlite":
        return SqliteJobStore(tmp_path / "jobs.sqlite3")
    if request.param == "mongomock":
        return MongoJobStore(client=request.getfixturevalue("serial_mongomock"), database="t2v_atomic")
    return MongoJobStore(os.environ["T2V_TEST_MONGODB_URI"], database=f"t2v_atomic_{os.getpid()}_{time.time_ns()}")


def test_concurrent_claims_never_hand_out_a_job_twice(atomic_store):
    store = atomic_store
    for i in range(6):
        add(store, f"job{i:05d}")
    claimed, lock = [], threading.Lock()

    def claimer(name):
        while (job := store.claim(name, 30)) is not None:
            with lock:
                claimed.append(job["reference_id"])

    threads = [threading.Thread(target=claimer, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(claimed) == [f"job{i:05d}" for i in range(6)]


def test_concurrent_admissions_never_pass_the_cap(atomic_store):
    store, gate = atomic_store, threading.Barrier(24)
    outcomes, lock = [], threading.Lock()

    def submit(i):
        gate.wait(60)
        try:
            store.create(new_job(f"adm{i:05d}", "s", "o", "generate", {"prompt": "p"}), max_queued=2)
            outcome = "queued"
        except QueueFull:
            outcome = "full"
        with lock:
            outcomes.append(outcome)

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(outcomes) == ["full"] * 22 + ["queued"] * 2
    assert store.count_queued() == 2


def test_admission_counts_queued_jobs_only(store):
    def admit(ref):
        return store.create(new_job(ref, "s", "o", "generate", {"prompt": "p"}), max_queued=2)

    admit("cap00001")
    time.sleep(0.002)
    admit("cap00002")
    with pytest.raises(QueueFull):
        admit("cap00003")
    assert store.get("cap00003") is None, "a refused job is not stored"
    assert store.claim("w1", 30)["reference_id"] == "cap00001"  # a claimed job leaves the queue
    time.sleep(0.002)
    admit("cap00004")
    assert store.request_cancel("cap00002") == CANCELED  # so does a canceled one
    time.sleep(0.002)
    admit("cap00005")
    with pytest.raises(QueueFull):
        admit("cap00006")
    assert [store.queue_position(store.get(r)) for r in ("cap00004", "cap00005")] == [1, 2]
    assert set(store.get("cap00004")) == set(new_job("x", "s", "o", "generate", {})), "no store-private fields"
    assert [j["reference_id"] for j in store.history("o", "s")] == ["cap00005", "cap00004", "cap00002", "cap00001"]


@pytest.mark.parametrize("backend", ["sqlite", "mongomock"])
def test_24_concurrent_submits_queue_exactly_max_queue(make_app, request, tmp_path, monkeypatch, backend):
    if backend == "sqlite":
        jobs = SqliteJobStore(tmp_path / "data" / "jobs.sqlite3")
    else:
        jobs = MongoJobStore(client=request.getfixturevalue("serial_mongomock"))
    count_queued = jobs.count_queued

    def count_then_pause():  # a loaded machine: a count is old by the time anything acts on it
        n = count_queued()
        time.sleep(0.05)
        return n

    monkeypatch.setattr(jobs, "count_queued", count_then_pause)
    app, svc = make_app(worker=False, max_queue=2, jobs=jobs)
    gate, codes = threading.Barrier(24), []

    def submit():
        client = app.test_client()
        gate.wait(60)
        codes.append(client.post("/generate_video", json=TINY_JOB).status_code)

    threads = [threading.Thread(target=submit) for _ in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(codes) == [200] * 2 + [429] * 22
    assert svc.jobs.count_queued() == 2


def test_a_full_queue_refuses_an_upload_and_keeps_no_file(make_app, tmp_path):
    app, _ = make_app(worker=False, max_queue=1)
    client = app.test_client()
    assert client.post("/generate_video", json=TINY_JOB).status_code == 200
    clip = make_clip(tmp_path / "in.mp4", frames=8, audio=None).read_bytes()
    r = client.post("/upscale_video", data={"video": (io.BytesIO(clip), "in.mp4")}, content_type="multipart/form-data")
    assert r.status_code == 429 and r.json["error"]["code"] == "queue_full"
    assert not list((tmp_path / "data" / "uploads").iterdir())


def test_only_the_holder_finishes_a_job_and_only_once(store):
    add(store, "ref00001")
    store.claim("w1", 30)
    assert store.complete("ref00001", "w2", {"x": 1}) is False
    assert store.complete("ref00001", "w1", {"video_key": "k"}) is True
    assert store.complete("ref00001", "w1", {"video_key": "again"}) is False
    job = store.get("ref00001")
    assert job["status"] == COMPLETED and job["result"] == {"video_key": "k"} and job["progress"] == 1.0


def test_progress_heartbeat_and_failure(store):
    add(store, "ref00001")
    store.claim("w1", 30)
    store.update_progress("ref00001", "w1", stage="denoising 2/4", progress=0.35, eta_s=12.0)
    job = store.heartbeat("ref00001", "w1", 30)
    assert (job["stage"], job["progress"], job["eta_s"]) == ("denoising 2/4", 0.35, 12.0)
    assert store.heartbeat("ref00001", "someone-else", 30) is None
    assert store.fail("ref00001", "w1", "generation_error", "boom") is True
    job = store.get("ref00001")
    assert job["status"] == FAILED and job["error"] == {"code": "generation_error", "message": "boom"}
    assert store.heartbeat("ref00001", "w1", 30) is None  # a finished job has no lease


def test_cancel_queued_is_immediate_and_running_is_flagged(store):
    add(store, "ref00001")
    add(store, "ref00002")
    assert store.request_cancel("ref00001") == CANCELED
    running = store.claim("w1", 30)
    assert running["reference_id"] == "ref00002"
    assert store.request_cancel("ref00002") == PROCESSING
    assert store.heartbeat("ref00002", "w1", 30)["cancel_requested"] is True
    assert store.mark_canceled("ref00002", "w1") is True
    assert store.get("ref00002")["status"] == CANCELED
    assert store.request_cancel("nothere1") is None


def test_delete_removes_the_record_and_a_running_worker_cannot_bring_it_back(store):
    add(store, "ref00001")
    add(store, "ref00002")
    add(store, "ref00003")
    assert store.claim("w1", -1)["reference_id"] == "ref00001"  # running, with a lease already out
    assert store.delete("ref00002") is True  # queued
    assert store.delete("ref00002") is False and store.get("ref00002") is None
    assert store.count_queued() == 1 and store.queue_position(store.get("ref00003")) == 1

    assert store.delete("ref00001") is True  # running: every later write of its worker matches nothing
    store.update_progress("ref00001", "w1", stage="denoising 1/2", progress=0.5)
    assert store.heartbeat("ref00001", "w1", 30) is None
    assert store.complete("ref00001", "w1", {"video_key": "k"}) is False
    assert store.fail("ref00001", "w1", "generation_error", "x") is False
    assert store.mark_canceled("ref00001", "w1") is False
    assert store.requeue_expired(max_attempts=5) == (0, 0)
    assert store.request_cancel("ref00001") is None
    assert store.get("ref00001") is None and store.history("o", "s")[0]["reference_id"] == "ref00003"
    assert store.claim("w2", 30)["reference_id"] == "ref00003" and store.claim("w2", 30) is None


def test_a_deleted_queued_job_frees_its_place_under_the_cap(store):
    store.create(new_job("ref00001", "s", "o", "generate", {"prompt": "p"}), max_queued=1)  # holds the one slot
    with pytest.raises(QueueFull):
        store.create(new_job("ref00002", "s", "o", "generate", {"prompt": "p"}), max_queued=1)
    store.delete("ref00001")
    store.create(new_job("ref00002", "s", "o", "generate", {"prompt": "p"}), max_queued=1)
    assert store.get("ref00002")["status"] == QUEUED


def test_expired_leases_are_requeued_then_failed_after_the_last_attempt(store):
    add(store, "ref00001")
    store.claim("dead", -1)  # a lease already in the past: its worker died
    assert store.requeue_expired(max_attempts=2) == (1, 0)
    job = store.get("ref00001")
    assert job["status"] == QUEUED and job["worker_id"] is None and job["attempts"] == 1
    assert store.claim("dead-again", -1)["attempts"] == 2
    assert store.requeue_expired(max_attempts=2) == (0, 1)
    job = store.get("ref00001")
    assert job["status"] == FAILED and job["error"]["code"] == "worker_lost"


def test_live_leases_are_left_alone_and_lost_cancels_end_canceled(store):
    add(store, "ref00001")
    add(store, "ref00002")
    store.claim("alive", 60)
    store.claim("dead", -1)
    store.request_cancel("ref00002")
    assert store.requeue_expired(max_attempts=5) == (0, 1)
    assert store.get("ref00001")["status"] == PROCESSING
    assert store.get("ref00002")["status"] == CANCELED


def test_history_is_per_owner_and_session_newest_first(store):
    add(store, "ref00001", owner="a", session="s1")
    add(store, "ref00002", owner="a", session="s1")
    add(store, "ref00003", owner="a", session="s2")
    add(store, "ref00004", owner="b", session="s1")
    assert [j["reference_id"] for j in store.history("a", "s1")] == ["ref00002", "ref00001"]
    assert [j["reference_id"] for j in store.history("b", "s1")] == ["ref00004"]
    assert store.history("c", "s1") == []


def test_ping(store):
    store.ping()


def test_sqlite_errors_become_store_unavailable(tmp_path):
    store = SqliteJobStore(tmp_path / "jobs.sqlite3")
    add(store, "ref00001")
    store._local.conn.close()
    store._local.conn = None
    for f in tmp_path.glob("jobs.sqlite3*"):
        f.unlink()
    (tmp_path / "jobs.sqlite3").mkdir()  # the database path can no longer be opened
    with pytest.raises(StoreUnavailable):
        store.get("ref00001")


def test_a_uris_own_server_selection_timeout_is_kept():
    """pymongo lets a keyword override the URI: the 5 s default must not replace the URI's 200 ms."""
    assert MongoJobStore("mongodb://127.0.0.1:1/t2v?serverSelectionTimeoutMS=200").client.options \
        .server_selection_timeout == 0.2
    assert MongoJobStore("mongodb://127.0.0.1:1/t2v").client.options.server_selection_timeout == 5


def test_unreachable_mongodb_is_store_unavailable(caplog):
    store = MongoJobStore("mongodb://user:hunter2@127.0.0.1:1/t2v?serverSelectionTimeoutMS=200")  # starts anyway
    for call in (store.ping, store.count_queued, lambda: store.get("abc")):
        with pytest.raises(StoreUnavailable) as err:
            call()
        assert "hunter2" not in str(err.value)
    assert "unreachable" in caplog.text and "hunter2" not in caplog.text


# ------------------------------------------------------------------------------ webhook outbox, idempotency keys

ALL_EVENTS = {"url": "http://receiver.example/hook", "events": ["started", "completed", "failed", "canceled"]}


def add_hooked(store, ref, webhook=ALL_EVENTS):
    job = store.create(new_job(ref, "s", "o", "generate", {"prompt": "p"}, webhook=webhook))
    time.sleep(0.002)
    return job


def events(store, ref):
    return [(d["event"], d["job"]["status"], d["job"]["attempts"]) for d in store.deliveries(ref)]


def test_each_status_change_writes_the_deliveries_its_webhook_asked_for(store):
    add_hooked(store, "hook0001")
    add_hooked(store, "hook0002", webhook={"url": "http://r.example/", "events": ["failed"]})
    add(store, "plain001")
    add_hooked(store, "hook0003", webhook={"url": "http://r.example/", "events": ["canceled"]})
    assert store.claim("w1", 30)["reference_id"] == "hook0001"
    assert events(store, "hook0001") == [("started", PROCESSING, 1)]
    assert store.complete("hook0001", "w1", {"video_key": "k", "width": 64}) is True
    started, done = store.deliveries("hook0001")
    assert done["id"] == "msg_hook0001.completed.1" and done["url"] == ALL_EVENTS["url"]
    assert done["state"] == "pending" and done["attempts"] == 0 and done["next_at"] <= time.time()
    assert done["job"]["result"] == {"video_key": "k", "width": 64} and done["job"]["params"] == {"prompt": "p"}
    assert done["job"]["finished_at"] is not None and started["job"]["finished_at"] is None, "a copy as it was then"
    record = store.get("hook0001")
    assert {name: done["job"][name] for name in ("created_at", "started_at", "finished_at", "progress")} == {
        name: record[name] for name in ("created_at", "started_at", "finished_at", "progress")}, "to the last digit"
    assert store.complete("hook0001", "w1", {"video_key": "again"}) is False
    assert len(store.deliveries("hook0001")) == 2, "a refused change writes nothing"

    assert store.claim("w1", 30)["reference_id"] == "hook0002"
    assert store.fail("hook0002", "w1", "generation_error", "boom") is True
    assert events(store, "hook0002") == [("failed", FAILED, 1)], "only the events asked for"
    assert store.deliveries("hook0002")[0]["job"]["error"] == {"code": "generation_error", "message": "boom"}
    store.claim("w1", 30)
    store.complete("plain001", "w1", {})
    assert store.deliveries("plain001") == [], "no webhook, no delivery"
    assert store.request_cancel("hook0003") == CANCELED
    assert events(store, "hook0003") == [("canceled", CANCELED, 0)]
    assert "webhook_outbox" not in store.get("hook0001") and store.get("hook0001")["webhook"] == ALL_EVENTS
    assert store.get("plain001")["webhook"] is None


def test_a_running_cancel_and_a_lost_worker_write_their_deliveries(store):
    add_hooked(store, "hook0001")
    add_hooked(store, "hook0002")
    add_hooked(store, "hook0003")
    store.claim("w1", 30)
    store.request_cancel("hook0001")
    assert store.mark_canceled("hook0001", "w1") is True
    assert events(store, "hook0001") == [("started", PROCESSING, 1), ("canceled", CANCELED, 1)]

    store.claim("dead", -1)  # hook0002: its worker dies twice
    assert store.requeue_expired(max_attempts=2) == (1, 0)
    assert events(store, "hook0002") == [("started", PROCESSING, 1)], "a job back in the queue is no event"
    store.claim("dead", -1)
    store.claim("dead", -1)  # hook0003: a cancel asked, then its worker dies
    store.request_cancel("hook0003")
    assert store.requeue_expired(max_attempts=2) == (0, 2)
    assert events(store, "hook0002") == [("started", PROCESSING, 1), ("started", PROCESSING, 2), ("failed", FAILED, 2)]
    assert store.deliveries("hook0002")[-1]["job"]["error"]["code"] == "worker_lost"
    assert events(store, "hook0003") == [("started", PROCESSING, 1), ("canceled", CANCELED, 1)]


def test_deliveries_outlive_their_job_and_are_leased_to_one_dispatcher(store):
    add_hooked(store, "hook0001")
    store.request_cancel("hook0001")
    assert store.delete("hook0001") is True and store.get("hook0001") is None
    first = store.claim_delivery("d1", lease_s=30)
    assert first["id"] == "msg_hook0001.canceled.0" and first["job"]["status"] == CANCELED
    assert store.claim_delivery("d2", lease_s=30) is None, "leased to d1"
    assert store.record_attempt(first["id"], "d2", "delivered", 200, None) is False, "only the lease holder records"
    retry_at = time.time() + 0.3
    assert store.record_attempt(first["id"], "d1", "pending", 500, "HTTP 500", next_at=retry_at) is True
    assert store.claim_delivery("d2", lease_s=30) is None, "not due yet"
    time.sleep(0.35)
    again = store.claim_delivery("d2", lease_s=-1)  # d2 then dies: its lease runs out at once
    assert again["id"] == first["id"] and again["attempts"] == 1 and again["last_status"] == 500
    assert again["last_error"] == "HTTP 500"
    third = store.claim_delivery("d3", lease_s=30)
    assert third["id"] == first["id"]
    assert store.record_attempt(first["id"], "d2", "pending", 500, "late", next_at=time.time()) is False
    assert store.record_attempt(first["id"], "d3", "delivered", 204, None) is True
    assert store.claim_delivery("d1", lease_s=30) is None, "a delivered message is never sent again"
    done = store.deliveries("hook0001")[0]
    assert done["state"] == "delivered" and done["attempts"] == 2 and done["finished_at"] >= done["last_attempt_at"]
    assert store.webhook_counts() == {"delivered": 1, "given_up": 0, "pending": 0, "failed_attempts": 1}


def test_a_delivery_given_up_is_counted_and_left_alone(store):
    add_hooked(store, "hook0001", webhook={"url": "http://r.example/", "events": ["canceled"]})
    add_hooked(store, "hook0002", webhook={"url": "http://r.example/", "events": ["canceled"]})
    store.request_cancel("hook0001")
    store.request_cancel("hook0002")
    one = store.claim_delivery("d1", 30)
    assert store.record_attempt(one["id"], "d1", "given_up", None, "connection refused") is True
    assert store.webhook_counts() == {"delivered": 0, "given_up": 1, "pending": 1, "failed_attempts": 1}
    other = store.claim_delivery("d1", 30)
    assert other["id"] != one["id"] and store.claim_delivery("d1", 30) is None


def test_finished_deliveries_are_pruned_after_their_time_and_failed_attempts_stay_counted(store):
    for ref in ("hook0001", "hook0002", "hook0003"):
        add_hooked(store, ref, webhook={"url": "http://r.example/", "events": ["canceled"]})
        store.request_cancel(ref)
    one = store.claim_delivery("d1", 30)
    assert store.record_attempt(one["id"], "d1", "pending", 500, "HTTP 500", next_at=time.time()) is True
    assert store.record_attempt(store.claim_delivery("d1", 30)["id"], "d1", "given_up", None, "refused") is True
    assert store.record_attempt(store.claim_delivery("d1", 30)["id"], "d1", "delivered", 204, None) is True
    before = store.webhook_counts()
    assert before["failed_attempts"] == 2 and before["pending"] == 1
    assert store.prune_deliveries(finished_before=time.time() - 3600) == 0, "finished only just now"
    assert store.prune_deliveries(finished_before=time.time() + 1) == 2
    left = [d for ref in ("hook0001", "hook0002", "hook0003") for d in store.deliveries(ref)]
    assert [d["state"] for d in left] == ["pending"], "a pending delivery is never pruned"
    assert store.webhook_counts() == {"delivered": 0, "given_up": 0, "pending": 1, "failed_attempts": 2}


def test_concurrent_dispatchers_never_take_one_delivery_twice(atomic_store):
    store = atomic_store
    for i in range(6):
        add_hooked(store, f"hook{i:04d}", webhook={"url": "http://r.example/", "events": ["canceled"]})
        store.request_cancel(f"hook{i:04d}")
    taken, lock = [], threading.Lock()

    def dispatcher(name):
        while (delivery := store.claim_delivery(name, 30)) is not None:
            with lock:
                taken.append(delivery["id"])

    threads = [threading.Thread(target=dispatcher, args=(f"d{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(taken) == [f"msg_hook{i:04d}.canceled.0" for i in range(6)]


def test_idempotency_keys_are_per_owner_and_expire(store):
    assert store.reserve_idempotency_key("a", "k1", "d1", "ref00001", ttl_s=60) is None
    held = store.reserve_idempotency_key("a", "k1", "d2", "ref00002", ttl_s=60)
    assert (held["digest"], held["reference_id"]) == ("d1", "ref00001")
    assert store.reserve_idempotency_key("b", "k1", "d1", "ref00003", ttl_s=60) is None, "another owner's key"
    assert store.idempotency_key("a", "k1", ttl_s=60)["reference_id"] == "ref00001"
    assert store.idempotency_key("a", "k2", ttl_s=60) is None

    assert store.replace_idempotency_key("a", "k1", "ref00009", "ref00004") is False, "only from the job it names"
    assert store.replace_idempotency_key("a", "k1", "ref00001", "ref00004") is True
    store.release_idempotency_key("a", "k1", "ref00001")  # a stale release leaves the new owner alone
    assert store.idempotency_key("a", "k1", ttl_s=60)["reference_id"] == "ref00004"
    store.release_idempotency_key("a", "k1", "ref00004")
    assert store.idempotency_key("a", "k1", ttl_s=60) is None
    assert store.reserve_idempotency_key("a", "k1", "d5", "ref00005", ttl_s=60) is None

    time.sleep(0.05)
    assert store.idempotency_key("a", "k1", ttl_s=0.01) is None, "expired"
    assert store.reserve_idempotency_key("a", "k1", "d6", "ref00006", ttl_s=0.01) is None, "an expired key is free"


def test_deleting_a_job_frees_its_idempotency_key(store):
    store.create(new_job("ref00001", "s", "a", "generate", {"prompt": "x"}))
    assert store.reserve_idempotency_key("a", "k1", "d1", "ref00001", ttl_s=60) is None
    assert store.reserve_idempotency_key("b", "k1", "d1", "ref00002", ttl_s=60) is None
    assert store.delete("ref00001")
    assert store.idempotency_key("a", "k1", ttl_s=60) is None
    assert store.reserve_idempotency_key("a", "k1", "d1", "ref00003", ttl_s=60) is None, "free for a new job"
    assert store.idempotency_key("b", "k1", ttl_s=60)["reference_id"] == "ref00002", "another job's key stays"


def test_concurrent_reservations_of_one_key_have_one_winner(atomic_store):
    store, gate = atomic_store, threading.Barrier(20)
    outcomes, lock = [], threading.Lock()

    def reserve(i):
        gate.wait(60)
        held = store.reserve_idempotency_key("o", "same-key", "digest", f"ref{i:05d}", ttl_s=60)
        with lock:
            outcomes.append(held["reference_id"] if held else f"ref{i:05d}")

    threads = [threading.Thread(target=reserve, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(outcomes) == 20 and len(set(outcomes)) == 1
    assert store.idempotency_key("o", "same-key", 60)["reference_id"] == outcomes[0]


def test_an_older_sqlite_file_gains_the_webhook_column(tmp_path):
    import sqlite3

    path = tmp_path / "jobs.sqlite3"
    with sqlite3.connect(path) as db:  # the jobs table as the previous release made it
        db.execute("CREATE TABLE jobs (seq INTEGER PRIMARY KEY AUTOINCREMENT, reference_id TEXT NOT NULL UNIQUE, "
                   "session_id TEXT NOT NULL, owner TEXT NOT NULL, kind TEXT NOT NULL, params TEXT NOT NULL, "
                   "status TEXT NOT NULL, stage TEXT, progress REAL NOT NULL DEFAULT 0, eta_s REAL, error TEXT, "
                   "result TEXT, attempts INTEGER NOT NULL DEFAULT 0, worker_id TEXT, lease_until REAL, "
                   "cancel_requested INTEGER NOT NULL DEFAULT 0, created_at REAL NOT NULL, started_at REAL, "
                   "finished_at REAL)")
        db.execute("INSERT INTO jobs (reference_id, session_id, owner, kind, params, status, created_at) "
                   "VALUES ('old00001', 's', 'o', 'generate', '{}', 'queued', 1.0)")
    store = SqliteJobStore(path)
    assert store.get("old00001")["webhook"] is None
    add_hooked(store, "hook0001")
    assert store.claim("w1", 30)["reference_id"] == "old00001"
    assert store.claim("w1", 30)["reference_id"] == "hook0001"
    assert events(store, "hook0001") == [("started", PROCESSING, 1)] and store.deliveries("old00001") == []
    SqliteJobStore(path)  # opening it again changes nothing

# ---------------------------------------------------------------------------------------- /v1/videos and /metrics

def test_list_jobs_pages_one_owners_jobs_of_one_kind_with_a_cursor(store):
    for i in range(5):
        add(store, f"ref0000{i}", owner="a")
    add(store, "other001", owner="b")
    store.create(new_job("ups00001", "s", "a", "upscale", {}))
    tied = new_job("tied0001", "s", "a", "generate", {"prompt": "p"})
    store.create(tied)
    store.create({**new_job("tied0002", "s", "a", "generate", {"prompt": "p"}), "created_at": tied["created_at"]})

    def ids(**kw):
        return [j["reference_id"] for j in store.list_jobs("a", kind="generate", **kw)]

    newest = ["tied0002", "tied0001", "ref00004", "ref00003", "ref00002", "ref00001", "ref00000"]
    assert ids(limit=100) == newest  # jobs made in the same instant keep the order they were made in
    assert ids(limit=3) == newest[:3]
    assert ids(limit=3, after="tied0001") == newest[2:5]
    assert ids(limit=3, after="ref00001") == ["ref00000"]
    assert ids(limit=3, after="ref00000") == []
    assert ids(limit=2, oldest_first=True) == ["ref00000", "ref00001"]
    assert ids(limit=100, oldest_first=True, after="ref00004") == ["tied0001", "tied0002"]
    assert [j["reference_id"] for j in store.list_jobs("a", limit=2)] == ["tied0002", "tied0001"]
    assert "ups00001" in [j["reference_id"] for j in store.list_jobs("a", limit=100)]
    assert store.list_jobs("a", limit=1)[0]["params"] == {"prompt": "p"}  # whole records, as `get` gives
    assert store.list_jobs("nobody", limit=10) == []
    for foreign in ("other001", "missing1"):  # another owner's job is no cursor for this one
        with pytest.raises(KeyError):
            store.list_jobs("a", after=foreign)


def test_a_cursor_keeps_its_place_when_its_job_is_deleted(store):
    """The openai SDK asks for the page after the last id it saw, which its caller may have deleted meanwhile."""
    for i in range(1, 6):
        add(store, f"ref0000{i}", owner="a")
    add(store, "other001", owner="b")

    def ids(**kw):
        return [j["reference_id"] for j in store.list_jobs("a", limit=2, **kw)]

    assert ids() == ["ref00005", "ref00004"]
    store.delete("ref00005")
    store.delete("ref00004")  # deleted between pages, by this caller or another process
    assert ids(after="ref00004") == ["ref00003", "ref00002"]
    assert ids(after="ref00005") == ["ref00003", "ref00002"]
    assert ids(after="ref00004", oldest_first=True) == []
    store.delete("ref00002")
    assert ids(after="ref00003") == ["ref00001"]
    store.delete("other001")
    with pytest.raises(KeyError):  # another owner's deleted job is no cursor for this one either
        store.list_jobs("a", after="other001")
    with pytest.raises(KeyError):
        store.list_jobs("a", after="never001")


def test_job_counts_group_every_record_by_status_kind_and_model(store):
    add(store, "ref00001", model="hunyuanvideo")
    add(store, "ref00002", model="hunyuanvideo")
    add(store, "ref00003", model="wan2.2-ti2v-5b")
    add(store, "ref00004")  # stored before jobs named a model: it runs UNNAMED_MODEL
    store.create(new_job("ups00001", "s", "o", "upscale", {"outscale": 4}))
    store.claim("w1", 30)
    store.complete("ref00001", "w1", {"video_key": "k"})
    assert sorted(store.job_counts()) == [("completed", "generate", "hunyuanvideo", 1),
                                          ("queued", "generate", "hunyuanvideo", 2),
                                          ("queued", "generate", "wan2.2-ti2v-5b", 1),
                                          ("queued", "upscale", None, 1)]


def test_job_totals_count_submits_and_ends_and_never_go_down(store):
    """Monotonic counters, kept by the store with each status change: deleting records lowers none of them."""
    add(store, "ref00001", model="wan2.2-ti2v-5b")
    add(store, "ref00002")  # unnamed: it runs UNNAMED_MODEL
    add(store, "ref00003", model="wan2.2-ti2v-5b")
    store.create(new_job("ups00001", "s", "o", "upscale", {"outscale": 4}))
    first = store.claim("w1", 30, kinds=("generate",))
    assert store.complete(first["reference_id"], "w1", {"video_key": "v"}) is True
    assert store.complete(first["reference_id"], "w1", {"video_key": "v"}) is False, "one end counts once"
    store.request_cancel("ref00002")
    second = store.claim("w1", -1, kinds=("generate",))  # its worker dies at once: the lease is over
    store.requeue_expired(max_attempts=1)  # its last attempt: failed worker_lost
    assert store.get(second["reference_id"])["status"] == FAILED
    expected = sorted([("submitted", None, "generate", "wan2.2-ti2v-5b", 2), ("submitted", None, "generate",
                       "hunyuanvideo", 1), ("submitted", None, "upscale", None, 1),
                       ("finished", COMPLETED, "generate", "wan2.2-ti2v-5b", 1),
                       ("finished", CANCELED, "generate", "hunyuanvideo", 1),
                       ("finished", FAILED, "generate", "wan2.2-ti2v-5b", 1)], key=str)
    assert sorted(store.job_totals(), key=str) == expected
    for ref in ("ref00001", "ref00002", "ref00003", "ups00001"):
        store.delete(ref)
    assert sorted(store.job_totals(), key=str) == expected


def test_completed_stats_give_each_completed_jobs_timings_and_gpu_peak(store):
    add(store, "ref00001", model="hunyuanvideo")
    add(store, "ref00002", model="hunyuanvideo")
    add(store, "ref00003", model="hunyuanvideo")
    for ref in ("ref00001", "ref00002", "ref00003"):
        assert store.claim("w1", 30)["reference_id"] == ref
    store.complete("ref00001", "w1", {"timings_s": {"generate": 1.5, "total": 2.0}, "gpu_peak_bytes": 3 * 2**30})
    store.complete("ref00002", "w1", {"timings_s": {"generate": 0.5, "total": 1.0}})  # a CPU job: no peak
    store.fail("ref00003", "w1", "generation_error", "boom")
    assert sorted(store.completed_stats(), key=lambda row: row[2]["total"]) == [
        ("generate", "hunyuanvideo", {"generate": 0.5, "total": 1.0}, None),
        ("generate", "hunyuanvideo", {"generate": 1.5, "total": 2.0}, 3 * 2**30)]


# ---------------------------------------------------------------------------------------- live events

def test_events_are_logged_in_order_only_by_the_worker_holding_the_job(store):
    add(store, "ref00001")
    add(store, "ref00002")
    assert store.append_event("ref00001", "w1", "progress", {"progress": 0.1}) is None  # queued: nobody holds it
    assert store.claim("w1", 30)["reference_id"] == "ref00001"
    assert store.append_event("ref00001", "w2", "progress", {"progress": 0.1}) is None  # not the holder
    assert [store.append_event("ref00001", "w1", kind, data) for kind, data in (
        ("stage", {"stage": "denoising"}), ("progress", {"progress": 0.25, "stage": "denoising 1/4", "eta_s": None}),
        ("preview", {"step": 1, "total": 4, "width": 8, "height": 8}))] == [1, 2, 3]

    events = store.events_after("ref00001", 0)
    assert [(e["seq"], e["type"]) for e in events] == [(1, "stage"), (2, "progress"), (3, "preview")]
    assert events[1]["data"] == {"progress": 0.25, "stage": "denoising 1/4", "eta_s": None}
    assert all(isinstance(e["at"], float) for e in events)
    assert [e["seq"] for e in store.events_after("ref00001", 2)] == [3]
    assert [e["seq"] for e in store.events_after("ref00001", 0, limit=2)] == [1, 2]
    assert store.events_after("ref00001", 3) == [] and store.events_after("ref00002", 0) == []

    assert store.claim("w1", 30)["reference_id"] == "ref00002"
    assert store.append_event("ref00002", "w1", "progress", {"progress": 0.5}) == 1  # each job counts from 1
    assert store.complete("ref00001", "w1", {"video_key": "k"}) is True
    assert store.append_event("ref00001", "w1", "progress", {"progress": 1.0}) is None  # ended: the log is closed
    assert [e["seq"] for e in store.events_after("ref00001", 0)] == [1, 2, 3]
    assert "event_seq" not in store.get("ref00001")  # the record keeps its shape


def test_deleting_a_job_deletes_its_events_and_its_worker_logs_no_more(store):
    for ref in ("ref00001", "ref00002"):
        add(store, ref)
        store.claim("w1", 30)
        store.append_event(ref, "w1", "progress", {"progress": 0.5})
    assert store.delete("ref00001") is True
    assert store.events_after("ref00001", 0) == []
    assert store.append_event("ref00001", "w1", "preview", {"step": 2}) is None
    assert store.events_after("ref00001", 0) == []
    assert [e["data"] for e in store.events_after("ref00002", 0)] == [{"progress": 0.5}]  # the other job's stay


def test_concurrent_appends_by_the_holder_get_distinct_consecutive_seqs(atomic_store):
    """The worker logs progress from its denoising thread and previews from the same job at once."""
    store = atomic_store
    add(store, "ref00001")
    store.claim("w1", 30)
    seqs, lock, gate = [], threading.Lock(), threading.Barrier(4)

    def writer(n):
        gate.wait()
        for i in range(10):
            seq = store.append_event("ref00001", "w1", "progress", {"writer": n, "i": i})
            with lock:
                seqs.append(seq)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(seqs) == list(range(1, 41))
    assert [e["seq"] for e in store.events_after("ref00001", 0, limit=100)] == list(range(1, 41))


def test_an_older_sqlite_file_gets_the_worker_columns_it_lacks(tmp_path):
    import sqlite3

    from storage.jobs import group_facts
    from storage.sqlite import SqliteJobStore

    path = tmp_path / "jobs.sqlite3"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE workers (worker_id TEXT PRIMARY KEY, kinds TEXT NOT NULL, models TEXT NOT NULL, "
               "last_seen REAL NOT NULL)")  # as files written before gpu_bytes and worker groups
    db.commit()
    db.close()
    store = SqliteJobStore(path)
    store.worker_seen("group", ("generate",), ["hunyuanvideo"], 2**30, group=group_facts(2, ["0", "1"], "ready"))
    [record] = store.live_workers(30)
    assert (record["gpu_bytes"], record["group"]) == (2**30, {"ranks": 2, "gpus": ["0", "1"], "state": "ready"})
