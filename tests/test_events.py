"""Live progress over server-sent events, against `python app.py` served for real with the tiny models:
the stream follows a job to its end (rising progress, previews that decode, the terminal event), a reconnect
with Last-Event-ID misses nothing, T2V_MAX_STREAMS caps open streams (429), streams end after
T2V_STREAM_MAX_S, and another key sees nothing."""

import io
import json
import sys

import pytest
import requests
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from conftest import ROOT, TINY_JOB, wait_for
from test_serving import answer, serve, stop, wait_healthy

KEY, OTHER = "k-one", "k-two"
AUTH, OTHER_AUTH = {"Authorization": f"Bearer {KEY}"}, {"Authorization": f"Bearer {OTHER}"}
TERMINAL = ("completed", "failed", "canceled")
JOB = {**TINY_JOB, "num_inference_steps": 8}  # T2V_PREVIEW_EVERY=2 below: previews after steps 2, 4, 6 and 8


def read_events(response, stop_after=TERMINAL, close=True):
    """Parse a text/event-stream as it arrives: [{event, id?, data}], up to the first event named in
    `stop_after` (or once `stop_after(events)` is true), or until the server closes the stream."""
    if not hasattr(response, "sse_lines"):  # one line iterator per response: a second would lose buffered data
        response.sse_lines = response.iter_lines(decode_unicode=True)
    events, message = [], {}
    for line in response.sse_lines:
        if line:
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if field == "event":
                message["event"] = value
            elif field == "id":
                message["id"] = int(value)
            elif field == "data":
                message["data"] = json.loads(value)
            elif field == "retry":
                events.append({"event": "retry", "data": int(value)})
            continue
        if "data" in message:
            events.append(message)
            done = stop_after(events) if callable(stop_after) else message["event"] in stop_after
            if done:
                break
        message = {}
    if close:
        response.close()
    return events


def stream(base, ref, headers=AUTH, last_event_id=None, path="jobs"):
    headers = {**headers, **({"Last-Event-ID": str(last_event_id)} if last_event_id is not None else {})}
    return requests.get(f"{base}/{path}/{ref}/events", headers=headers, stream=True, timeout=60)


def logged(events):
    return [e for e in events if "id" in e and e["event"] not in TERMINAL]


def own_data_dir(folder, data_dir):
    """A data folder (jobs, videos) of one server's own, with the session's tiny models in it."""
    (folder / "tiny").symlink_to(data_dir / "tiny")
    return folder


@pytest.fixture(scope="module")
def served(tmp_path_factory, data_dir, tiny_model, tiny_upscalers):
    folder = own_data_dir(tmp_path_factory.mktemp("events"), data_dir)
    proc, base = serve([sys.executable, str(ROOT / "app.py")], folder, folder, T2V_API_KEYS=f"{KEY},{OTHER}",
                       T2V_PREVIEW_EVERY="2")
    try:
        wait_healthy(proc, base, folder)
        yield base
    finally:
        stop(proc)


def submit(base, body=None, headers=AUTH):
    r = requests.post(f"{base}/generate_video", json={**JOB, **(body or {})}, headers=headers, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["reference_id"]


def test_the_stream_follows_a_job_from_progress_and_previews_to_its_end(served):
    ref = submit(served)
    response = stream(served, ref)
    assert response.status_code == 200 and response.headers["Content-Type"].startswith("text/event-stream")
    events = read_events(response)

    assert events[0] == {"event": "retry", "data": 1000}
    log = logged(events)
    assert [e["id"] for e in log] == list(range(1, len(log) + 1))  # every logged event, in order
    progress = [e["data"]["progress"] for e in log if e["event"] == "progress"]
    assert len(progress) >= 3 and progress == sorted(progress) and progress[0] < progress[-1]
    assert [e["data"]["stage"] for e in log if e["event"] == "stage"] == ["denoising", "upscaling", "uploading"]

    previews = [e["data"] for e in log if e["event"] == "preview"]
    steps = [p["step"] for p in previews]
    assert steps and steps == sorted(steps) and set(steps) <= {2, 4, 6, 8} and steps[-1] == 8
    for shown in (previews[0], previews[-1]):
        assert shown["total"] == 8 and "sig=" in shown["url"]
        got = requests.get(served + shown["url"], timeout=30)  # signed: no key needed, as for an <img>
        assert got.status_code == 200 and got.headers["Content-Type"] == "image/webp"
        image = Image.open(io.BytesIO(got.content))
        assert max(image.size) <= 256 and image.size == (shown["width"], shown["height"]) == (8, 8)
        assert image.n_frames == shown["frames"] == 3  # 9 frames, 3 latent frames

    end = events[-1]
    assert end["event"] == "completed" and end["id"] == log[-1]["id"] + 1
    assert end["data"]["reference_id"] == ref and end["data"]["status"] == "completed"
    assert end["data"]["progress"] == 1.0 and end["data"]["video_url"]

    # A finished job's stream replays the same log, then the same end, and closes.
    again = read_events(stream(served, ref, path="v1/videos"))
    assert [(e["id"], e["event"]) for e in logged(again)] == [(e["id"], e["event"]) for e in log]
    assert again[-1]["event"] == "completed"


def test_a_reconnect_with_last_event_id_misses_nothing(served):
    ref = submit(served)
    first = logged(read_events(stream(served, ref), stop_after=lambda events: len(logged(events)) == 3))
    assert [e["id"] for e in first] == [1, 2, 3]
    rest = read_events(stream(served, ref, last_event_id=first[-1]["id"]))
    assert rest[-1]["event"] == "completed"
    whole = logged(read_events(stream(served, ref)))
    seen = [e["id"] for e in first + logged(rest)]
    assert seen == [e["id"] for e in whole] == list(range(1, len(whole) + 1))  # no gap, no repeat
    assert [e["data"] for e in first + logged(rest)] == [e["data"] for e in whole]


def test_only_the_owner_or_a_signed_link_reads_a_jobs_events_and_preview(served):
    ref = submit(served, {"num_inference_steps": 2})
    read_events(stream(served, ref))
    for path in (f"jobs/{ref}/events", f"v1/videos/{ref}/events", f"jobs/{ref}/preview"):
        other = requests.get(f"{served}/{path}", headers=OTHER_AUTH, timeout=30)
        assert other.status_code == 404 and other.json()["error"]["code"] == "not_found"
        assert requests.get(f"{served}/{path}", timeout=30).status_code == 401
    assert requests.get(f"{served}/jobs/{ref}/preview", headers=AUTH, timeout=30).status_code == 200

    # The job view carries a signed events link, for EventSource (which cannot send a header).
    view = requests.get(f"{served}/jobs/{ref}", headers=AUTH, timeout=30).json()
    assert "sig=" in view["events_url"]
    signed = read_events(requests.get(served + view["events_url"], stream=True, timeout=60))
    assert signed[-1]["event"] == "completed"
    forged = requests.get(served + view["events_url"].replace("sig=", "sig=0"), timeout=30)
    assert forged.status_code == 401
    bad = requests.get(f"{served}/jobs/{ref}/events", headers={**AUTH, "Last-Event-ID": "x"}, timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_last_event_id"

    # Deleting the job deletes its preview and its events.
    assert requests.delete(f"{served}/jobs/{ref}", headers=AUTH, timeout=30).json()["deleted"] is True
    assert requests.get(f"{served}/jobs/{ref}/preview", headers=AUTH, timeout=30).status_code == 404
    assert requests.get(f"{served}/jobs/{ref}/events", headers=AUTH, timeout=30).status_code == 404


@pytest.fixture(scope="module")
def queue_only(tmp_path_factory, data_dir):
    """No worker, so jobs stay queued; 4 threads, at most 2 streams, each at most 3 s long."""
    folder = own_data_dir(tmp_path_factory.mktemp("streams"), data_dir)
    proc, base = serve([sys.executable, str(ROOT / "app.py")], folder, folder, T2V_WORKER="off",
                       T2V_THREADS="4", T2V_MAX_STREAMS="2", T2V_STREAM_MAX_S="3")
    try:
        wait_for(lambda: answer(lambda: requests.get(f"{base}/health", timeout=10).ok), timeout=240, every=0.2)
        yield base
    finally:
        stop(proc)


def test_streams_past_t2v_max_streams_get_429_and_each_ends_after_its_time(queue_only):
    base = queue_only
    refs = [submit(base, headers={}) for _ in range(2)]
    open_ = [stream(base, ref, headers={}) for ref in refs]
    firsts = [read_events(r, stop_after=("queued",), close=False)[-1] for r in open_]
    none = "waiting for a worker: none has reported in the last 30 s"  # T2V_WORKER=off, and no worker.py
    assert [f["data"] for f in firsts] == [{"stage": none, "queue_position": 1}, {"stage": none, "queue_position": 2}]
    refused = stream(base, refs[0], headers={})
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "too_many_streams"
    assert requests.get(f"{base}/health", timeout=30).status_code == 200  # threads are left for the rest

    # T2V_STREAM_MAX_S: each stream ends by itself, without a terminal event; EventSource would reconnect.
    for r in open_:
        rest = read_events(r)
        assert not any(e["event"] in TERMINAL for e in rest)
    # Their places are free again: two new streams open (a third is still refused).
    again = wait_for(lambda: (r := stream(base, refs[0], headers={})).status_code == 200 and r, timeout=60)
    second = stream(base, refs[1], headers={})
    assert second.status_code == 200 and stream(base, refs[1], headers={}).status_code == 429
    # A job deleted while watched ends its stream; a reconnect gets 404.
    assert requests.delete(f"{base}/jobs/{refs[1]}", timeout=30).status_code == 200
    assert not any(e["event"] in TERMINAL for e in read_events(second))
    assert stream(base, refs[1], headers={}).status_code == 404
    again.close()


def test_open_streams_counts_each_stream_until_it_closes(make_app):
    from api.events import open_streams

    app, svc = make_app(worker=False, stream_max_s=60)
    client = app.test_client()
    ref = client.post("/generate_video", json=TINY_JOB).json["reference_id"]
    responses = [client.get(f"/jobs/{ref}/events", buffered=False) for _ in range(3)]
    assert [r.status_code for r in responses] == [200, 200, 200] and open_streams(app) == 3
    metrics = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}
    assert metrics["t2v_sse_streams_open"].samples[0].value == 3
    for r in reversed(responses):  # in one thread, Flask's stream contexts must end last-opened first
        r.close()
    assert open_streams(app) == 0


def test_the_worker_keeps_no_preview_of_a_deleted_job(tmp_path, settings):
    """A preview stored after its job was deleted is removed at once; one left by a crash, by the sweep."""
    import numpy as np

    from storage.blobs import LocalBlobStore
    from storage.jobs import SqliteJobStore, new_job
    from worker.files import preview_key
    from worker.loop import Worker
    from worker.progress import PreviewWriter

    jobs, blobs = SqliteJobStore(tmp_path / "jobs.sqlite3"), LocalBlobStore(tmp_path / "blobs")
    (tmp_path / "work").mkdir()
    frames = np.stack([np.full((8, 8, 3), 60 * i, np.uint8) for i in range(3)])  # WebP merges equal frames
    jobs.create(new_job("ref00001", "s", "o", "generate", {}))
    jobs.claim("w1", 30)

    def preview_at(step):
        writer = PreviewWriter(jobs, blobs, "ref00001", "w1", tmp_path / "work", duration_s=1.0)
        writer(step, 4, frames)
        writer.close()

    preview_at(2)
    assert Image.open(blobs.local_path(preview_key("ref00001"))).n_frames == 3
    assert [e["data"] for e in jobs.events_after("ref00001", 0)] == [
        {"step": 2, "total": 4, "width": 8, "height": 8, "frames": 3}]
    jobs.delete("ref00001")
    preview_at(4)
    assert blobs.local_path(preview_key("ref00001")) is None and not list((tmp_path / "work").iterdir())

    orphan = tmp_path / "orphan.webp"
    orphan.write_bytes(b"RIFF")
    blobs.put(orphan, preview_key("ref00002"))
    worker = Worker(settings, jobs, blobs, models=object())
    assert worker.sweep_previews() == 1 and blobs.local_path(preview_key("ref00002")) is None


def test_sigterm_ends_open_streams_so_the_server_stops_without_waiting_on_them(tmp_path_factory, data_dir):
    folder = own_data_dir(tmp_path_factory.mktemp("sigterm"), data_dir)
    proc, base = serve([sys.executable, str(ROOT / "app.py")], folder, folder, T2V_WORKER="off")
    try:
        wait_for(lambda: answer(lambda: requests.get(f"{base}/health", timeout=10).ok), timeout=240, every=0.2)
        watched = stream(base, submit(base, headers={}), headers={})
        assert read_events(watched, stop_after=("queued",), close=False)[-1]["data"]["queue_position"] == 1
        proc.terminate()
        assert not any(e["event"] in TERMINAL for e in read_events(watched))  # ended; a client resumes elsewhere
        assert proc.wait(60) == 0
    finally:
        stop(proc)
    log = next(folder.glob("server-*.log")).read_text()
    assert "still running" not in log and "Traceback" not in log, log  # waitress waited on no stream
