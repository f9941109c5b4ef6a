"""The one service layer under every face of the API: the stores, who owns a job, how a job is queued,
how a request's fields and inputs are read, and how a job is shown. Blueprints call these; none of them
holds a rule of its own about jobs.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import functools
import hashlib
import hmac
import json
import logging
import secrets
import re
import time
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Mapping

from flask import current_app, g, jsonify, make_response, redirect, request, send_file, url_for
from werkzeug.datastructures import FileStorage
from werkzeug.exceptions import RequestEntityTooLarge

from config import Settings
from pipeline import memory, models
from pipeline.spec import EnhanceParams, JobParams, ParamError, Rules, check_image, form_values
from pipeline.upscale import UpscalerLoadError, resolve_upscaler
from storage.blobs import BlobMissing, BlobStore, StorageError
from storage.jobs import (COMPLETED, TERMINAL, WORKER_LIVE_S, JobStore, QueueFull, StoreUnavailable, can_take, new_job,
                          waiting_reason)
from pipeline.video import VideoInputError, inspect_video, write_spritesheet
from webhooks import EVENTS, WebhookRefused, check_url
from webhooks import job_view as plain_job_view
from worker.files import input_key, preview_key, upload_path

log = logging.getLogger("t2v.api")

ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
DATA_URI = re.compile(r"data:image/[A-Za-z0-9.+-]{1,64};base64,(?P<data>[A-Za-z0-9+/]*={0,2})")
MAX_JSON_DEPTH = 16  # the API's bodies are flat; deeper nesting is refused before any route sees it


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


@dataclass
class Service:
    """What the routes need, kept in `app.extensions["t2v"]`."""

    settings: Settings
    jobs: JobStore
    blobs: BlobStore
    worker: object | None  # worker.Worker when T2V_WORKER=thread
    url_secret: bytes


def svc() -> Service:
    return current_app.extensions["t2v"]


def signature(endpoint: str, reference_id: str, expires: int) -> str:
    message = f"{endpoint}:{reference_id}:{expires}".encode()
    return hmac.new(svc().url_secret, message, hashlib.sha256).hexdigest()


def media_url(endpoint: str, reference_id: str, external: bool = False) -> str:
    """A link to a job's video or poster; signed when keys are on, so tags and plain browsers can use it.

    The expiry is rounded to half the TTL, so the link stays the same from one poll to the next.
    """
    settings = svc().settings
    if not settings.api_keys:
        return url_for(endpoint, reference_id=reference_id, _external=external)
    half = max(settings.url_ttl_s // 2, 1)
    expires = (int(time.time()) // half + 2) * half
    return url_for(endpoint, reference_id=reference_id, expires=expires,
                   sig=signature(endpoint, reference_id, expires), _external=external)


def new_id() -> str:
    return secrets.token_urlsafe(16)


def check_id(value, name: str) -> str:
    if not isinstance(value, str) or not ID_PATTERN.match(value):
        raise ApiError(400, "invalid_id", f"{name} must be 1-128 characters of A-Z, a-z, 0-9, '_' or '-'")
    return value


def json_body() -> dict:
    """The body as a JSON object: shallow, and every string in it (keys included) valid Unicode text."""
    data = request.get_data(cache=True)
    # Werkzeug stops reading a chunked body at the limit without a word; one that reaches it is refused.
    if request.content_length is None and len(data) >= request.max_content_length:
        raise RequestEntityTooLarge()
    try:
        body = json.loads(data)
    except (ValueError, RecursionError):  # RecursionError: nested thousands deep
        body = None
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_json", "the request body must be a JSON object")
    _check_json_values(body, "")
    return body


def _check_json_values(value, field: str, depth: int = 1) -> None:
    """Refuse nesting past MAX_JSON_DEPTH, and text that cannot be encoded (a lone surrogate, "\\ud800")."""
    if depth > MAX_JSON_DEPTH:
        raise ApiError(400, "invalid_json", f"the request body is nested deeper than {MAX_JSON_DEPTH} levels")
    if isinstance(value, dict):
        for key, item in value.items():
            name = f"{field}.{printable(key)}" if field else printable(key)
            _check_text(key, name)
            _check_json_values(item, name, depth + 1)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_json_values(item, f"{field}[{i}]", depth + 1)
    elif isinstance(value, str):
        _check_text(value, field)


def _check_text(text: str, field: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(400, "invalid_text", f"{field} is not valid Unicode text (a lone surrogate)") from None


def printable(key: str) -> str:
    return key.encode("utf-8", "backslashreplace").decode("utf-8")


def owned_job(reference_id: str, session_id: str | None = None) -> dict:
    """The job, if it exists, belongs to the caller (and to `session_id` when given); else 404."""
    check_id(reference_id, "reference_id")
    job = svc().jobs.get(reference_id)
    owner_ok = job is not None and (job["owner"] == g.owner or g.get("signed_ref") == reference_id)
    if not owner_ok or (session_id is not None and job["session_id"] != session_id):
        raise ApiError(404, "not_found", f"no job {reference_id} for this caller")
    return job


def enqueue(job: dict) -> dict:
    """Store the job unless the queue is full (429): one atomic step in the store, even under concurrency.
    Under an Idempotency-Key, the key is taken for this job first (`_take_idempotency_key`)."""
    key = _take_idempotency_key(job["reference_id"])
    try:
        return svc().jobs.create(job, max_queued=svc().settings.max_queue)
    except BaseException as exc:
        if key is not None:
            with contextlib.suppress(StoreUnavailable):
                svc().jobs.release_idempotency_key(g.owner, key, job["reference_id"])  # a later retry may use it
        if isinstance(exc, QueueFull):
            raise ApiError(429, "queue_full", "the queue is full; try again later") from None
        raise


def create_generate_job(body: dict, image: bytes | None, session_id: str,
                        field_names: Mapping[str, str] = MappingProxyType({})) -> dict:
    """Validate a generate job's fields and image, store the image, and queue the job: the one way every
    face of the API makes a generate job. Nothing is left behind when it is refused. `field_names`: the
    face's own names for JobParams fields, used in its error messages."""
    def read(fields: dict, image_key: str | None) -> JobParams:
        params = JobParams.from_dict(fields, job_rules(), image_key=image_key)
        check_fits_a_gpu(params)
        return params

    return _create_job("generate", read, body, image, session_id, field_names)


def create_enhance_job(body: dict, image: bytes | None, session_id: str) -> dict:
    """Queue an enhance job (a prompt's suggested rewrite), checked and stored as a generate job is."""
    return _create_job("enhance", lambda fields, image_key: EnhanceParams.from_dict(fields, job_rules(),
                                                                                    image_key=image_key),
                       body, image, session_id)


def _create_job(kind: str, read_params, body: dict, image: bytes | None, session_id: str,
                field_names: Mapping[str, str] = MappingProxyType({})) -> dict:
    """Read the webhook and the params (`read_params(fields, image_key)`), check and store the image, queue."""
    settings = svc().settings
    reference_id = new_id()
    image_key = None if image is None else input_key(reference_id)
    webhook = read_webhook(body)
    try:
        params = read_params(body, image_key)
    except ParamError as exc:
        raise ApiError(400, "invalid_parameter", str(exc.renamed(field_names))) from None
    if image is not None:
        try:
            check_image(image, settings.max_image_pixels)
        except ParamError as exc:
            raise ApiError(400, "invalid_image", str(exc.renamed(field_names))) from None
        store_image(image, reference_id)
    try:
        return enqueue(new_job(reference_id, session_id, g.owner, kind, params.to_dict(), webhook))
    except BaseException:
        if image_key:
            with contextlib.suppress(StorageError):
                svc().blobs.delete(image_key)  # no job will read it
        raise


def check_fits_a_gpu(params: JobParams) -> None:
    """Refuse (400) a job that fits the GPU of no live worker serving its model in any memory preset, by
    `pipeline.memory`'s plan, naming what would fit. With no such GPU worker seen (CPU workers, tiny builds,
    or none yet) nothing is refused for memory."""
    job = {"kind": "generate", "params": params.to_dict()}
    gpus = [w["gpu_bytes"] for w in svc().jobs.live_workers(WORKER_LIVE_S) if w.get("gpu_bytes") and can_take(w, job)]
    entry = models.get(params.model)
    if not gpus or any(memory.choose_preset(entry.memory, params.width, params.height, params.num_frames, gpu)
                       for gpu in gpus):
        return
    raise ApiError(400, "too_large_for_gpu",
                   memory.what_fits(entry, params.width, params.height, params.num_frames, max(gpus)))


def job_rules() -> Rules:
    """What a job may ask for here. With the worker in this process, only the models it serves; with
    the worker elsewhere (T2V_WORKER=off), any registry id, as a remote worker may serve it."""
    service = svc()
    settings = service.settings
    return Rules.from_settings(settings, models.served_models(settings) if service.worker is not None else None)


def upscaler_problem() -> str | None:
    """Why the worker in this process cannot run an upscale job with the configured upscaler (T2V_UPSCALER),
    or None. With the worker elsewhere (T2V_WORKER=off) a remote worker decides, as for models."""
    service = svc()
    if service.worker is None:
        return None
    settings = service.settings
    try:
        resolve_upscaler(settings.upscaler, settings.models_dir, settings.data_dir, none_ok=False)
    except UpscalerLoadError as exc:
        return str(exc)
    return service.worker.upscaler_error  # weights that are there but do not load


def form_fields(file_field: str) -> dict:
    """A multipart form's text fields, each given once, beside no file but `file_field`."""
    form = request.form.to_dict(flat=False)
    repeated = [name for name, items in (*form.items(), *request.files.lists()) if len(items) > 1]
    if repeated:
        raise ApiError(400, "invalid_parameter", f"{printable(repeated[0])}: is given more than once")
    others = [name for name in request.files if name != file_field]
    if others:
        raise ApiError(400, "invalid_parameter",
                       f"{printable(others[0])}: is not a known file field (send `{file_field}`)")
    return {name: items[0] for name, items in form.items()}


def job_request(settings: Settings) -> tuple[dict, bytes | None]:
    """A job's fields and its image, if it has one: a JSON body with the image as a data: URI in `image`,
    or a multipart form with the image as the file `image` and the other fields as text."""
    if request.mimetype != "multipart/form-data":
        body = json_body()
        return body, (image_bytes(body.pop("image"), settings) if "image" in body else None)
    fields = form_fields("image")
    if "image" not in request.files:
        raise ApiError(400, "missing_field", "a multipart job sends its image as the file field 'image' "
                                             "(send a job without an image as JSON)")
    session_id = fields.pop("session_id", None)
    body = form_values(fields)
    if session_id is not None:
        body["session_id"] = session_id
    return body, image_bytes(request.files["image"], settings)


def image_bytes(value, settings: Settings, field: str = "image") -> bytes:
    """An image as a request carries it: an uploaded file (multipart), or a data: URI in JSON or a form field."""
    if isinstance(value, FileStorage):
        return _within_image_limit(value.stream.read(settings.max_image_mb * 2**20 + 1), settings, field)
    return _data_uri_bytes(value, settings, field)


def _data_uri_bytes(value, settings: Settings, field: str) -> bytes:
    """The bytes of an image sent as `data:image/...;base64,...`; the server never fetches a URL."""
    match = DATA_URI.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        raise ApiError(400, "invalid_image", f"{field}: must be a data: URI (data:image/png;base64,...); "
                                             "this server fetches no URL")
    if len(match["data"]) // 4 * 3 > settings.max_image_mb * 2**20:  # refused before it is decoded
        raise _image_too_large(settings, field)
    try:
        return _within_image_limit(base64.b64decode(match["data"], validate=True), settings, field)
    except binascii.Error:  # the alphabet is checked above; this is the length or the padding
        raise ApiError(400, "invalid_image", f"{field}: the data: URI is not valid base64") from None


def _within_image_limit(data: bytes, settings: Settings, field: str) -> bytes:
    if len(data) > settings.max_image_mb * 2**20:
        raise _image_too_large(settings, field)
    return data


def _image_too_large(settings: Settings, field: str) -> ApiError:
    return ApiError(400, "invalid_image", f"{field}: is over {settings.max_image_mb} MB (T2V_MAX_IMAGE_MB)")


@contextlib.contextmanager
def _staged_input(path: Path, what: str):
    """A temporary file for a job's input on its way into the blob store (`inputs/<id>`), where a worker on
    any node fetches it. A disk or storage fault is a 503, never a 500; the file goes either way."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield path
    except (OSError, StorageError) as exc:
        log.error("could not store %s: %s", what, exc)
        raise ApiError(503, "storage_unavailable", f"{what} could not be stored; try again shortly") from None
    finally:
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)


def store_image(data: bytes, reference_id: str) -> None:
    """Put a checked image in the blob store, as uploaded clips are."""
    with _staged_input(Path(svc().settings.data_dir) / "work" / f"{reference_id}.image", "the image") as path:
        path.write_bytes(data)
        svc().blobs.put(path, input_key(reference_id))


def store_input(upload, reference_id: str):
    """Check the clip on a temporary file here, then put it in the blob store."""
    settings = svc().settings
    with _staged_input(upload_path(settings, reference_id), "the upload") as path:
        upload.save(path)
        try:
            info = inspect_video(path, settings.max_upload_side, settings.max_upload_frames, settings.max_upload_s)
        except VideoInputError as exc:
            raise ApiError(400, "invalid_video", str(exc)) from None
        svc().blobs.put(path, input_key(reference_id))
        return info


def accepted(job: dict):
    return jsonify(session_id=job["session_id"], reference_id=job["reference_id"], status=job["status"],
                   queue_position=svc().jobs.queue_position(job))


def status_view(job: dict) -> dict:
    """A queued job that no live worker would take says why in `stage`."""
    return {
        "reference_id": job["reference_id"], "status": job["status"],
        "stage": waiting_reason(svc().jobs, job) or job["stage"],
        "progress": job["progress"], "queue_position": svc().jobs.queue_position(job), "eta_s": job["eta_s"],
        "error": job["error"],
    }


def job_view(job: dict) -> dict:
    """The job view webhooks carry too (webhooks.job_view), with the status as get_status shows it and this
    server's links: signed when keys are on. `events_url` is its live event stream (api/events.py)."""
    view = {**plain_job_view(job), **status_view(job)}
    view["events_url"] = media_url("events.job_events", job["reference_id"])
    if view["video_url"]:
        view["video_url"] = media_url("jobs.job_video", job["reference_id"])
        view["poster_url"] = media_url("jobs.job_poster", job["reference_id"])
    return view


def completed(job: dict) -> dict:
    if job["status"] != COMPLETED:
        raise ApiError(409, "not_ready", f"job {job['reference_id']} is {job['status']}, not completed")
    return job


def stored_key(job: dict, key_name: str) -> str:
    """The blob key of a completed job's file (`video_key`, `poster_key`); 404 for a job that stores none (an
    enhance job's result is a prompt)."""
    key = (completed(job)["result"] or {}).get(key_name)
    if key is None:
        raise ApiError(404, "not_found", f"job {job['reference_id']} stores no file: it is an {job['kind']} job")
    return key


def blob_response(job: dict, key_name: str, mimetype: str):
    return stored_response(stored_key(job, key_name), mimetype)


def stored_response(key: str, mimetype: str):
    """A stored file: streamed from local storage (Range requests included), or a redirect to S3."""
    blobs = svc().blobs
    path = blobs.local_path(key)
    if path is not None:
        return send_file(path, mimetype=mimetype, conditional=True, max_age=0)  # Range requests included
    url = blobs.presigned_url(key)
    if url is None:
        raise ApiError(404, "not_found", "the file is no longer stored")
    return redirect(url, code=302)


def generate_body_limit(settings: Settings) -> int:
    """A job's JSON body, plus room for an image: T2V_MAX_IMAGE_MB, grown by a third as base64 in a data: URI."""
    return settings.max_body_kb * 1024 + settings.max_image_mb * 2**20 * 4 // 3 + 64 * 1024


# ------------------------------------------------------------------------------ webhooks and idempotent submits

IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,255}")  # printable ASCII without spaces, as Stripe and IETF's draft
IDEMPOTENCY_WAIT_S = 10.0  # how long a twin waits for the job its key names to be stored


def read_webhook(fields: dict) -> dict | None:
    """Take `webhook_url` and `webhook_events` out of a create's fields and check them: the job's
    {"url", "events"}, or None without a URL. Events: a list or comma-separated text; all four when left out."""
    url, events = fields.pop("webhook_url", None), fields.pop("webhook_events", None)
    if url is None:
        if events is not None:
            raise ApiError(400, "invalid_parameter", "webhook_events: needs a webhook_url")
        return None
    settings = svc().settings
    if not settings.webhook_secret:
        raise ApiError(400, "webhooks_not_configured", "webhooks are not configured on this server "
                                                       "(T2V_WEBHOOK_SECRET is unset)")
    try:
        check_url(url, settings.webhook_allow_private)
    except WebhookRefused as exc:
        raise ApiError(400, "invalid_webhook_url", str(exc)) from None
    return {"url": url, "events": _webhook_events(events)}


def _webhook_events(events) -> list[str]:
    if events is None:
        return list(EVENTS)
    names = events.split(",") if isinstance(events, str) else events
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ApiError(400, "invalid_parameter", "webhook_events: must be a list of event names")
    chosen = {n.strip() for n in names if n.strip()}
    unknown = sorted(chosen - set(EVENTS))
    if unknown or not chosen:
        raise ApiError(400, "invalid_parameter", f"webhook_events: name one or more of {', '.join(EVENTS)}"
                                                 + (f" (not {printable(unknown[0])})" if unknown else ""))
    return [e for e in EVENTS if e in chosen]


def form_webhook() -> dict | None:
    """read_webhook for a multipart form; an empty field is left out, as an HTML form sends one."""
    return read_webhook({name: text for name, text in request.form.items() if text.strip()})


class _Replay(Exception):
    """The job an Idempotency-Key already made: answered again instead of a new one."""

    def __init__(self, job: dict):
        super().__init__(job["reference_id"])
        self.job = job


def idempotent(answer):
    """Decorate a create route. With an `Idempotency-Key` header, the same key and the same request within
    T2V_IDEMPOTENCY_TTL_S answer the job it made (200, `answer(job)`, `Idempotent-Replayed: true`) instead of
    making another; the key with another request is a 409. Keys belong to the caller (its API key)."""
    def decorate(route):
        @functools.wraps(route)
        def create(*args, **kwargs):
            key = request.headers.get("Idempotency-Key")
            if key is None:
                return route(*args, **kwargs)
            if not IDEMPOTENCY_KEY.fullmatch(key):
                raise ApiError(400, "invalid_idempotency_key",
                               "Idempotency-Key must be 1-255 printable ASCII characters without spaces")
            g.idempotency = (key, request_digest())
            try:
                _replay_if_known(key)  # a retry of a create that went through does no work
                return route(*args, **kwargs)
            except _Replay as replay:
                response = make_response(answer(replay.job))
                response.headers["Idempotent-Replayed"] = "true"
                return response
        return create
    return decorate


def request_digest() -> str:
    """What makes two creates the same request: the route and the body. A JSON body counts byte for byte; a
    multipart body by its fields and files, as its boundary differs on every send."""
    digest = hashlib.sha256(request.endpoint.encode() + b"\n")
    if request.mimetype != "multipart/form-data":
        digest.update(request.get_data(cache=True))
        return digest.hexdigest()
    digest.update(json.dumps(sorted(request.form.items(multi=True))).encode())
    for name, upload in sorted(request.files.items(multi=True), key=lambda item: item[0]):
        digest.update(json.dumps([name, upload.filename]).encode())
        for chunk in iter(lambda: upload.stream.read(2**20), b""):
            digest.update(chunk)
        upload.stream.seek(0)  # the route reads it next
    return digest.hexdigest()


def _known_job(record: dict) -> dict | None:
    """The job a key's record names, after checking the request is the same one (else 409)."""
    if not hmac.compare_digest(record["digest"], g.idempotency[1]):
        raise ApiError(409, "idempotency_key_reused", "this Idempotency-Key was used with a different request; "
                                                      "send a new key for a new job")
    return svc().jobs.get(record["reference_id"])


def _replay_if_known(key: str) -> None:
    record = svc().jobs.idempotency_key(g.owner, key, svc().settings.idempotency_ttl_s)
    job = _known_job(record) if record else None
    if job is not None:
        raise _Replay(job)


def _take_idempotency_key(reference_id: str) -> str | None:
    """Reserve the request's key for `reference_id` before its job is stored: one unique (owner, key) row, so of
    concurrent twins exactly one goes on. A twin answers the winner's job once it is stored (_Replay); a key whose
    job never appeared (its create died) passes to this job after IDEMPOTENCY_WAIT_S."""
    if g.get("idempotency") is None:
        return None
    key, digest = g.idempotency
    jobs, ttl_s = svc().jobs, svc().settings.idempotency_ttl_s
    give_up = time.monotonic() + IDEMPOTENCY_WAIT_S
    while True:
        record = jobs.reserve_idempotency_key(g.owner, key, digest, reference_id, ttl_s)
        if record is None:
            return key
        job = _known_job(record)
        if job is not None:
            raise _Replay(job)
        if time.time() - record["created_at"] > IDEMPOTENCY_WAIT_S:
            if jobs.replace_idempotency_key(g.owner, key, record["reference_id"], reference_id):
                return key
            continue
        if time.monotonic() > give_up:
            raise ApiError(409, "idempotency_key_in_use", "a request with this Idempotency-Key is still being "
                                                          "processed; try again shortly")
        time.sleep(0.05)


def remove_job(job: dict) -> None:
    """Remove a job for good: its video, poster, uploaded clip or image (T2V_KEEP_INPUTS or not) and the files
    made from them later (a spritesheet, the latest preview), then its record and its events. A queued or
    running job is canceled first. A running job's worker finds its lease gone at its next heartbeat and stops
    at its next cancel check; its later writes match no record, so none brings it back. The files go first: if
    that fails (503), the record stays and the delete can be sent again. DELETE /jobs/<id> and
    DELETE /v1/videos/<id> both end here."""
    service, reference_id = svc(), job["reference_id"]
    if job["status"] not in TERMINAL:
        service.jobs.request_cancel(reference_id)
        job = service.jobs.get(reference_id) or job  # it may have completed meanwhile, with files to delete
    try:
        for key in ("video_key", "poster_key"):
            if job["result"] and job["result"].get(key):
                service.blobs.delete(job["result"][key])
        for key in (input_key(reference_id), spritesheet_key(reference_id), preview_key(reference_id)):
            service.blobs.delete(key)  # deleting what is absent is fine
    except (OSError, StorageError) as exc:
        log.error("job %s: its files could not be deleted: %s", reference_id, exc)
        raise ApiError(503, "storage_unavailable", "the job's files could not be deleted; try again shortly") from None
    service.jobs.delete(reference_id)


def spritesheet_key(reference_id: str) -> str:
    return f"spritesheets/{reference_id}.jpg"


def spritesheet_response(job: dict):
    """A JPEG grid of frames of a completed job's video: made from the stored MP4 on first request, then kept
    as a blob beside the video (remove_job deletes it), so each later request is a plain stored file."""
    service, reference_id, video_key = svc(), job["reference_id"], stored_key(job, "video_key")
    key = spritesheet_key(reference_id)
    work, tag = Path(service.settings.data_dir) / "work", secrets.token_hex(4)  # two requests may race
    with _staged_input(work / f"{reference_id}.{tag}.sprites.jpg", "the spritesheet") as sheet:
        try:
            service.blobs.get(key, sheet)  # made before (S3: a small download, as the blob store has no HEAD)
        except BlobMissing:
            with _staged_input(work / f"{reference_id}.{tag}.mp4", "the spritesheet") as video:
                try:
                    service.blobs.get(video_key, video)
                except BlobMissing:
                    raise ApiError(404, "not_found", "the file is no longer stored") from None
                write_spritesheet(video, sheet)
            service.blobs.put(sheet, key)  # two racing requests put the same picture; the last one stays
    return stored_response(key, "image/jpeg")
