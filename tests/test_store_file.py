"""The SQLite file under the running service: moved away and back, replaced by a copy, checkpointed.

Moving `jobs.sqlite3` away used to let the next connection create an empty database in its place;
closing that one deleted the `-wal` that held nearly every row, and a restart found no jobs."""

import logging
import shutil
import sqlite3
import threading
from contextlib import closing

import pytest

from conftest import TINY_JOB, wait_for
from storage.jobs import StoreUnavailable, new_job
from storage.sqlite import SqliteJobStore


def in_new_thread(call, *args, **kwargs):
    """Run call in a thread of its own, as a threaded server runs each request."""
    box = {}

    def run():
        try:
            box["value"] = call(*args, **kwargs)
        except BaseException as exc:  # handed back to the test below
            box["error"] = exc

    t = threading.Thread(target=run)
    t.start()
    t.join(60)
    if "error" in box:
        raise box["error"]
    return box["value"]


def in_this_thread(call, *args, **kwargs):
    return call(*args, **kwargs)


def finish(client, session_id):
    sub = client.post("/generate_video", json={**TINY_JOB, "session_id": session_id}).json
    job = wait_for(lambda: (j := client.get(f"/jobs/{sub['reference_id']}").json)["status"]
                   in ("completed", "failed") and j)
    assert job["status"] == "completed", job
    return job


def rows_in_main_file(db, tmp_path) -> int:
    """Jobs found in a copy of the main file alone, without its -wal: what a backup or a move takes."""
    copy = tmp_path / "copy" / db.name
    copy.parent.mkdir(exist_ok=True)
    for f in copy.parent.iterdir():
        f.unlink()
    shutil.copyfile(db, copy)
    with closing(sqlite3.connect(copy)) as conn:
        return conn.execute("SELECT COUNT(*) FROM jobs").fetchone()[0]


def test_moving_the_database_away_and_back_loses_no_job(make_app, tmp_path, caplog):
    app, svc = make_app()  # the worker thread runs
    client = app.test_client()
    db = tmp_path / "data" / "jobs.sqlite3"
    first = finish(client, "move-session")
    video = client.get(f"/jobs/{first['reference_id']}/video")
    assert video.status_code == 200 and len(video.data) == first["result"]["size_bytes"]

    away = tmp_path / "away" / db.name
    away.parent.mkdir()
    with caplog.at_level(logging.WARNING, logger="t2v.worker"):
        db.rename(away)
        for ask in (in_this_thread, in_new_thread):  # a connection opened before the move, and a new one
            answers = [ask(client.get, "/health"), ask(client.get, f"/jobs/{first['reference_id']}"),
                       ask(client.post, "/generate_video", json=TINY_JOB)]
            assert [r.status_code for r in answers] == [503, 503, 503], [r.json for r in answers]
            assert answers[0].json["store"] == "unavailable"
            assert answers[1].json["error"]["code"] == answers[2].json["error"]["code"] == "store_unavailable"
        wait_for(lambda: "job store unavailable" in caplog.text)  # the worker polled the missing file too
        assert not db.exists(), "nothing made a new, empty database in its place"
        away.rename(db)

    for ask in (in_this_thread, in_new_thread):  # the very next request is served: no wait after the return
        assert ask(client.get, "/health").status_code == 200
        assert ask(client.get, f"/jobs/{first['reference_id']}").json["status"] == "completed"
    second = finish(client, "move-session")  # the worker runs jobs again

    svc.worker.stop(timeout=30)  # the restart: a new store and app on the same file
    app, _ = make_app(worker=False, jobs=SqliteJobStore(db))
    client = app.test_client()
    history = client.post("/history", json={"session_id": "move-session"}).json["history"]
    assert [(j["reference_id"], j["status"]) for j in history] == [
        (second["reference_id"], "completed"), (first["reference_id"], "completed")]
    assert client.get(f"/jobs/{first['reference_id']}/video").data == video.data


def test_a_copy_put_back_in_place_is_used_with_every_row(tmp_path):
    db = tmp_path / "jobs.sqlite3"
    store = SqliteJobStore(db)
    store.create(new_job("before-move-1", "s", "o", "generate", {"prompt": "p"}))
    in_new_thread(store.create, new_job("before-move-2", "s", "o", "generate", {"prompt": "p"}))
    pinned = {}

    def long_lived(event, done):  # a thread whose connection outlives the move
        pinned["first"] = store.get("before-move-1")
        event.set()
        done.wait(60)
        try:
            pinned["after"] = store.get("before-move-2")
        except StoreUnavailable as exc:
            pinned["after"] = exc

    opened, go = threading.Event(), threading.Event()
    other = threading.Thread(target=long_lived, args=(opened, go))
    other.start()
    assert opened.wait(60)

    shutil.copy2(db, tmp_path / "backup.sqlite3")
    db.unlink()  # moved to another disk (copied, then deleted); the latest rows are in jobs.sqlite3-wal
    for ask in (in_this_thread, in_new_thread):
        with pytest.raises(StoreUnavailable):
            ask(store.get, "before-move-1")
    assert not db.exists()

    shutil.copy2(tmp_path / "backup.sqlite3", db)  # back, as a new file (another inode)
    go.set()
    other.join(60)
    assert pinned["after"]["reference_id"] == "before-move-2"
    assert [store.get(f"before-move-{i}")["status"] for i in (1, 2)] == ["queued", "queued"]
    store.create(new_job("after-move-3", "s", "o", "generate", {"prompt": "p"}))
    store.close()
    assert rows_in_main_file(db, tmp_path) == 3


def test_close_leaves_every_row_in_the_main_file(tmp_path):
    db = tmp_path / "jobs.sqlite3"
    store = SqliteJobStore(db, checkpoint_every_s=3600)
    other = sqlite3.connect(db)  # another process's connection: no close of the last connection folds the WAL in
    other.execute("SELECT COUNT(*) FROM jobs").fetchall()
    for i in range(5):
        store.create(new_job(f"closejob-{i}", "s", "o", "generate", {"prompt": "p"}))
    assert rows_in_main_file(db, tmp_path) == 0  # so far in the -wal only
    store.close()
    assert rows_in_main_file(db, tmp_path) == 5
    assert (tmp_path / "jobs.sqlite3-wal").stat().st_size == 0  # TRUNCATE: nothing left behind in the -wal
    other.close()


def test_the_timer_checkpoints_while_the_store_is_in_use(tmp_path):
    db = tmp_path / "jobs.sqlite3"
    store = SqliteJobStore(db, checkpoint_every_s=0.1)
    for i in range(5):
        store.create(new_job(f"timerjob-{i}", "s", "o", "generate", {"prompt": "p"}))
    wait_for(lambda: rows_in_main_file(db, tmp_path) == 5, timeout=60)
    assert store.count_queued() == 5  # the store's own connection is still open and in use
