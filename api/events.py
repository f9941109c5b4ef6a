"""Live progress as server-sent events, and the latest preview: `GET /jobs/<id>/events` (the same stream on
`/v1/videos/<id>/events`) and `GET /jobs/<id>/preview`.

A stream replays the job's event log (`JobStore.events_after`) from the client's Last-Event-ID, then follows it
by polling the store, so it is the same whether the worker runs in this process or on another node. Logged
events (`progress`, `stage`, `preview`) go out with `id: <seq>`; a queued job's place (and why no worker
takes it, if none would) goes out as `queued` (no id: it is not logged); the stream ends with one
`completed`, `failed` or `canceled` event whose data is the job view, built from the job record.

A stream holds one of the server's request threads for as long as it is open (waitress and gunicorn's
gthread worker alike), so at most T2V_MAX_STREAMS are open at once: past that a 429, and the client polls
GET /jobs/<id> instead. Each stream ends after T2V_STREAM_MAX_S; EventSource then reconnects by itself with
Last-Event-ID and misses nothing. A heartbeat every few seconds keeps proxies from closing a quiet stream,
and lets the server notice a client that has gone.
"""

from __future__ import annotations

import json
import re
import threading
import time

from flask import Blueprint, Flask, Response, current_app, redirect, request, send_file, stream_with_context

from api.service import ApiError, job_view, media_url, owned_job, status_view, svc
from storage.jobs import QUEUED, TERMINAL, StoreUnavailable
from worker.files import preview_key

bp = Blueprint("events", __name__)

POLL_S = 0.5  # how often an open stream reads the store; the worker logs progress at most every 0.5 s
HEARTBEAT_S = 5.0  # a comment line after this long with nothing sent
RETRY_MS = 1000  # how long EventSource waits before it reconnects
LAST_EVENT_ID = re.compile(r"[0-9]{1,12}")
_SLOTS = "t2v.event_streams"
closing = threading.Event()  # set when the server stops (app.py, on SIGTERM): every open stream ends at once


class StreamSlots:
    """Counts the open event streams of one app against its limit (T2V_MAX_STREAMS)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.open = 0
        self._lock = threading.Lock()

    def take(self) -> bool:
        with self._lock:
            if self.open >= self.limit:
                return False
            self.open += 1
            return True

    def give_back(self) -> None:
        with self._lock:
            self.open -= 1


def _slots() -> StreamSlots:
    slots = current_app.extensions.get(_SLOTS)
    if slots is None:
        slots = current_app.extensions.setdefault(_SLOTS, StreamSlots(svc().settings.stream_limit))
    return slots


def open_streams(app: Flask | None = None) -> int:
    """How many event streams `app` (the current app by default) has open now."""
    slots = (app or current_app).extensions.get(_SLOTS)
    return slots.open if slots is not None else 0


@bp.get("/jobs/<reference_id>/events")
def job_events(reference_id):
    return event_stream(owned_job(reference_id))


@bp.get("/v1/videos/<reference_id>/events")
def video_events(reference_id):
    """The same stream for the /v1/videos face: a video's id is its job's reference_id."""
    return event_stream(owned_job(reference_id))


@bp.get("/jobs/<reference_id>/preview")
def job_preview(reference_id):
    """The job's latest preview, an animated WebP of the latents (T2V_PREVIEW_EVERY). On S3, a 302 to a
    presigned URL, as for the video."""
    owned_job(reference_id)
    blobs = svc().blobs
    path = blobs.local_path(preview_key(reference_id))
    try:
        preview = open(path, "rb") if path is not None else None  # opened here: the worker may replace it
    except FileNotFoundError:
        preview = None
    if preview is not None:
        response = send_file(preview, mimetype="image/webp")
        response.headers["Cache-Control"] = "no-store"  # the next step's preview comes under the same path
        return response
    url = blobs.presigned_url(preview_key(reference_id))
    if url is None:
        raise ApiError(404, "not_found", f"job {reference_id} has no preview (yet)")
    return redirect(url, code=302)


def event_stream(job: dict) -> Response:
    """Open a stream for `job` (ownership checked by the caller), or 429 when T2V_MAX_STREAMS are open."""
    after = _last_event_id()
    slots = _slots()
    if not slots.take():
        raise ApiError(429, "too_many_streams", f"{slots.limit} event streams are open, the most this server "
                                                "allows (T2V_MAX_STREAMS); poll GET /jobs/<id> meanwhile")
    try:
        response = Response(stream_with_context(_events(job["reference_id"], after)), mimetype="text/event-stream")
    except BaseException:
        slots.give_back()
        raise
    response.call_on_close(slots.give_back)  # however the stream ends: its last event, a gone client, an error
    response.headers["Cache-Control"] = "no-store"
    response.headers["X-Accel-Buffering"] = "no"  # nginx: pass each event on as it comes
    return response


def _last_event_id() -> int:
    raw = request.headers.get("Last-Event-ID", "").strip()
    if not raw:
        return 0
    if not LAST_EVENT_ID.fullmatch(raw):
        raise ApiError(400, "invalid_last_event_id", "Last-Event-ID must be the id of an event this stream sent")
    return int(raw)


def _events(reference_id: str, after: int):
    """The stream itself: the log after `after`, then each new event as the worker logs it, then the end."""
    jobs, stream_max_s = svc().jobs, svc().settings.stream_max_s
    yield f"retry: {RETRY_MS}\n\n"
    now = time.monotonic()
    ends, quiet_since, position = now + stream_max_s, now, None
    while time.monotonic() < ends and not closing.is_set():
        try:
            job = jobs.get(reference_id)  # read first: an ended job has logged its last event by then
            if job is None:
                return  # deleted; a reconnect gets its 404
            while events := jobs.events_after(reference_id, after):
                for event in events:
                    after = event["seq"]
                    yield _message(event["type"], _shown(event, reference_id), after)
                quiet_since = time.monotonic()
            if job["status"] in TERMINAL:
                yield _message(job["status"], job_view(job), after + 1)
                return
            if job["status"] == QUEUED:
                place = {key: value for key, value in status_view(job).items() if key in ("queue_position", "stage")}
                if place != position:  # its place, or why no worker takes it (as get_status says)
                    position = place
                    yield _message("queued", place)
                    quiet_since = time.monotonic()
        except StoreUnavailable:
            pass  # the store is away for a moment; the next round reads again
        if time.monotonic() - quiet_since >= HEARTBEAT_S:
            yield ": heartbeat\n\n"
            quiet_since = time.monotonic()
        closing.wait(POLL_S)


def _shown(event: dict, reference_id: str) -> dict:
    """An event's data as a client sees it: a preview's carries a link to the image (signed when keys are on;
    `v` changes with each preview so that an <img> loads the new one)."""
    if event["type"] != "preview":
        return event["data"]
    url = media_url("events.job_preview", reference_id)
    return {**event["data"], "url": f"{url}{'&' if '?' in url else '?'}v={event['seq']}"}


def _message(name: str, data: dict, seq: int | None = None) -> str:
    head = f"event: {name}\n" + (f"id: {seq}\n" if seq is not None else "")
    return f"{head}data: {json.dumps(data, separators=(',', ':'))}\n\n"
