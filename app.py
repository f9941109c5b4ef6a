"""The t2v REST API: `create_app(settings=None)`. Routes parse, validate, call the stores, and answer JSON.

    python app.py                                   # waitress on 127.0.0.1:7866, SQLite, local files, thread worker
    gunicorn -c gunicorn.conf.py 'app:create_app()' # the same app under gunicorn (one process, threads)
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import hashlib
import hmac
import json
import logging
import re
import secrets
import signal
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import urlsplit

import waitress
from flask import Flask, current_app, g, jsonify, redirect, request, send_file, url_for
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from config import ENV_NAMES, WORKER_MODES, Settings, settings_or_exit
from openapi import build_spec
from pipeline import models
from pipeline.cli import ArgumentParser
from pipeline.spec import OUTSCALES, JobParams, ParamError, Rules, check_image, describe, form_values
from pipeline.upscale import RELEASES, UpscalerLoadError, resolve_upscaler
from pipeline.video import VideoInputError, inspect_video
from storage.blobs import BlobStore, StorageError, open_blob_store
from storage.jobs import CANCELED, COMPLETED, TERMINAL, JobStore, QueueFull, StoreUnavailable, new_job, open_job_store
from worker import Worker, discard_input, input_key, upload_path

log = logging.getLogger("t2v.api")

ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
PUBLIC_ENDPOINTS = {"health", "static", "index"}  # everything else needs a key when keys are on
# With keys on, these also accept a signed link (?expires=&sig=), because a <video> or <img> tag
# cannot send an Authorization header. The job view hands such links to the key's owner.
SIGNED_ENDPOINTS = {"job_video", "job_poster"}
EXPIRES_PATTERN = re.compile(r"[0-9]{1,12}")  # ASCII digits only: "²".isdigit() is True, and int() refuses it
SIG_PATTERN = re.compile(r"[0-9a-f]{64}")
MAX_JSON_DEPTH = 16  # the API's bodies are flat; deeper nesting is refused before any route sees it
HOST_HEADER = re.compile(r"(?P<name>[a-z0-9.-]+|\[[0-9a-f:.]+\])(?::[0-9]{1,5})?", re.IGNORECASE)
STATE_CHANGING = {"POST", "PUT", "PATCH", "DELETE"}
# Body types a route takes, where not just application/json: multipart carries files.
BODY_TYPES = {"upscale_video": ("multipart/form-data",), "generate_video": ("application/json", "multipart/form-data")}
DATA_URI = re.compile(r"data:image/[A-Za-z0-9.+-]{1,64};base64,(?P<data>[A-Za-z0-9+/]*={0,2})")
CORS_ALLOW_HEADERS = "Authorization, Content-Type, X-API-Key"


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


def create_app(settings: Settings | None = None, *, jobs: JobStore | None = None, blobs: BlobStore | None = None,
               worker=None) -> Flask:
    """Build the app. Stores and the worker come from `settings` unless given (tests pass their own)."""
    settings = settings or Settings.from_env()
    jobs = jobs or open_job_store(settings)
    blobs = blobs or open_blob_store(settings)
    if worker is None and settings.worker == "thread":
        worker = Worker(settings, jobs, blobs).start()

    app = Flask(__name__, static_folder="static")
    app.url_map.merge_slashes = False  # "/jobs//video" is a 404, not a redirect to another URL
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_kb * 1024
    app.json.sort_keys = False
    url_secret = settings.url_secret.encode() if settings.url_secret else secrets.token_bytes(32)
    app.extensions["t2v"] = Service(settings, jobs, blobs, worker, url_secret)
    _register_errors(app)
    app.before_request(_check_host)
    app.before_request(_refuse_cross_site)
    app.before_request(_check_body_type)
    app.before_request(_authenticate)
    app.before_request(_upload_limit)
    app.after_request(_cors_headers)
    _register_routes(app)
    return app


def _svc() -> Service:
    return current_app.extensions["t2v"]


# ---------------------------------------------------------------------------------------- who may call

def _check_host():
    """Answer only to the Host names allowed (T2V_ALLOWED_HOSTS), so a page cannot reach a loopback server
    under a name of its own (DNS rebinding)."""
    trusted = _svc().settings.trusted_hosts
    match = HOST_HEADER.fullmatch(request.host)  # Werkzeug gives "" for a Host with invalid characters
    if trusted is not None and (match is None or match["name"].lower() not in trusted):
        raise ApiError(400, "host_not_allowed", "this server does not answer to that Host name (T2V_ALLOWED_HOSTS)")


def _cross_site_origin() -> str | None:
    """The Origin of a request sent by another site's page, or "" when Sec-Fetch-Site alone says so; else None."""
    origin = request.headers.get("Origin")
    if origin is not None:
        try:
            same = urlsplit(origin).netloc.lower() == request.host.lower()
        except ValueError:  # "http://[::1" and the like
            same = False
        if not same:
            return origin
    return "" if request.headers.get("Sec-Fetch-Site") == "cross-site" else None


def _cors_allowed(origin: str | None) -> bool:
    return bool(origin) and origin.lower() in {o.lower() for o in _svc().settings.cors_origins}


def _refuse_cross_site():
    """Another site's page may not change anything here unless T2V_CORS_ORIGINS names it."""
    if request.method in STATE_CHANGING and request.url_rule is not None:
        origin = _cross_site_origin()
        if origin is not None and not _cors_allowed(origin):
            raise ApiError(403, "cross_site", "requests from other sites are refused (T2V_CORS_ORIGINS)")


def _check_body_type():
    """A state-changing request's body is JSON (multipart for uploads), which no HTML form and no CORS-simple
    request can send. A POST with no body and no Content-Type (curl -X POST .../cancel) carries nothing."""
    if request.method not in STATE_CHANGING or request.url_rule is None:
        return
    bodyless = request.content_length == 0 or (request.content_length is None
                                                 and "Transfer-Encoding" not in request.headers)
    if bodyless and not request.content_type:
        return
    wanted = BODY_TYPES.get(request.endpoint, ("application/json",))
    if request.mimetype not in wanted:
        raise ApiError(415, "unsupported_media_type", f"send the request body as {' or '.join(wanted)}")


def _cors_headers(response):
    """CORS headers for the origins in T2V_CORS_ORIGINS, preflights (OPTIONS) included."""
    if not _svc().settings.cors_origins:
        return response
    response.vary.add("Origin")
    origin = request.headers.get("Origin")
    if _cors_allowed(origin):
        response.headers["Access-Control-Allow-Origin"] = origin
        if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
            response.headers["Access-Control-Allow-Methods"] = response.headers.get("Allow", "GET, POST")
            response.headers["Access-Control-Allow-Headers"] = CORS_ALLOW_HEADERS
            response.headers["Access-Control-Max-Age"] = "600"
    return response


def _authenticate():
    """With T2V_API_KEYS set, every route but /health and the page needs a key (or, for a video or
    poster, a signed link). The owner of a job is a hash of the key that made it. A CORS preflight
    (OPTIONS) never carries a key and changes nothing."""
    keys = _svc().settings.api_keys
    if request.endpoint in PUBLIC_ENDPOINTS or request.method == "OPTIONS" or not keys:
        g.owner = "local"
        return None
    if request.endpoint in SIGNED_ENDPOINTS and "sig" in request.args:
        if not _signature_valid():
            raise ApiError(401, "invalid_signature", "this link is invalid or has expired")
        g.owner, g.signed_ref = None, request.view_args["reference_id"]
        return None
    auth = request.headers.get("Authorization", "")
    key = auth[7:].strip() if auth.lower().startswith("bearer ") else request.headers.get("X-API-Key", "")
    key_bytes = key.encode("utf-8", "surrogatepass")
    if not key or not any(hmac.compare_digest(key_bytes, k.encode()) for k in keys):
        raise ApiError(401, "unauthorized", "a valid API key is required (Authorization: Bearer <key> or X-API-Key)")
    g.owner = "key:" + hashlib.sha256(key_bytes).hexdigest()[:16]
    return None


def _signature(endpoint: str, reference_id: str, expires: int) -> str:
    message = f"{endpoint}:{reference_id}:{expires}".encode()
    return hmac.new(_svc().url_secret, message, hashlib.sha256).hexdigest()


def _signature_valid() -> bool:
    expires, sig = request.args.get("expires", ""), request.args.get("sig", "")
    if not EXPIRES_PATTERN.fullmatch(expires) or not SIG_PATTERN.fullmatch(sig) or int(expires) < time.time():
        return False
    expected = _signature(request.endpoint, request.view_args["reference_id"], int(expires))
    return hmac.compare_digest(expected, sig)


def _media_url(endpoint: str, reference_id: str, external: bool = False) -> str:
    """A link to a job's video or poster; signed when keys are on, so tags and plain browsers can use it.

    The expiry is rounded to half the TTL, so the link stays the same from one poll to the next.
    """
    settings = _svc().settings
    if not settings.api_keys:
        return url_for(endpoint, reference_id=reference_id, _external=external)
    half = max(settings.url_ttl_s // 2, 1)
    expires = (int(time.time()) // half + 2) * half
    return url_for(endpoint, reference_id=reference_id, expires=expires,
                   sig=_signature(endpoint, reference_id, expires), _external=external)


def _upload_limit():
    """Uploads get their own, larger body limit (T2V_MAX_UPLOAD_MB); JSON bodies keep T2V_MAX_BODY_KB, with
    room for an image on /generate_video."""
    if request.endpoint == "upscale_video":
        request.max_content_length = _svc().settings.max_upload_mb * 2**20 + 64 * 1024  # room for the form fields
    elif request.endpoint == "generate_video":
        request.max_content_length = _generate_body_limit(_svc().settings)


def _generate_body_limit(settings: Settings) -> int:
    """A job's JSON body, plus room for an image: T2V_MAX_IMAGE_MB, grown by a third as base64 in a data: URI."""
    return settings.max_body_kb * 1024 + settings.max_image_mb * 2**20 * 4 // 3 + 64 * 1024


def _new_id() -> str:
    return secrets.token_urlsafe(16)


def _check_id(value, name: str) -> str:
    if not isinstance(value, str) or not ID_PATTERN.match(value):
        raise ApiError(400, "invalid_id", f"{name} must be 1-128 characters of A-Z, a-z, 0-9, '_' or '-'")
    return value


def _json_body() -> dict:
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
            name = f"{field}.{_printable(key)}" if field else _printable(key)
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


def _printable(key: str) -> str:
    return key.encode("utf-8", "backslashreplace").decode("utf-8")


def _owned_job(reference_id: str, session_id: str | None = None) -> dict:
    """The job, if it exists, belongs to the caller (and to `session_id` when given); else 404."""
    _check_id(reference_id, "reference_id")
    job = _svc().jobs.get(reference_id)
    owner_ok = job is not None and (job["owner"] == g.owner or g.get("signed_ref") == reference_id)
    if not owner_ok or (session_id is not None and job["session_id"] != session_id):
        raise ApiError(404, "not_found", f"no job {reference_id} for this caller")
    return job


def _enqueue(job: dict) -> dict:
    """Store the job unless the queue is full (429): one atomic step in the store, even under concurrency."""
    try:
        return _svc().jobs.create(job, max_queued=_svc().settings.max_queue)
    except QueueFull:
        raise ApiError(429, "queue_full", "the queue is full; try again later") from None


def _form_outscale() -> int:
    raw = request.form.get("outscale", str(max(OUTSCALES)))
    if raw not in {str(n) for n in OUTSCALES}:
        raise ApiError(400, "invalid_parameter", f"outscale must be one of {', '.join(map(str, OUTSCALES))}")
    return int(raw)


def _form_upscaler(settings: Settings) -> str | None:
    """A release name (or `tiny`) installed on this server; never a path from the client."""
    name = request.form.get("upscaler") or None
    if name is None:
        return None
    if name not in (*RELEASES, "tiny"):
        raise ApiError(400, "invalid_parameter", f"upscaler must be one of {', '.join(RELEASES)} or tiny")
    try:
        resolve_upscaler(name, settings.models_dir, settings.data_dir)
    except UpscalerLoadError:
        raise ApiError(400, "invalid_parameter", f"upscaler {name} is not installed on this server") from None
    return name


def _job_rules() -> Rules:
    """What a job may ask for here. With the worker in this process, only the models it serves; with
    the worker elsewhere (T2V_WORKER=off), any registry id, as a remote worker may serve it."""
    svc = _svc()
    return Rules.from_settings(svc.settings, models.served_models(svc.settings) if svc.worker is not None else None)


def _job_request(settings: Settings) -> tuple[dict, bytes | None]:
    """A job's fields and its image, if it has one: a JSON body with the image as a data: URI in `image`,
    or a multipart form with the image as the file `image` and the other fields as text."""
    if request.mimetype != "multipart/form-data":
        body = _json_body()
        return body, (_data_uri_bytes(body.pop("image"), settings) if "image" in body else None)
    form = request.form.to_dict(flat=False)
    repeated = [name for name, items in (*form.items(), *request.files.lists()) if len(items) > 1]
    if repeated:
        raise ApiError(400, "invalid_parameter", f"{_printable(repeated[0])}: is given more than once")
    others = [name for name in request.files if name != "image"]
    if others:
        raise ApiError(400, "invalid_parameter", f"{_printable(others[0])}: is not a known file field (send `image`)")
    if "image" not in request.files:
        raise ApiError(400, "missing_field", "a multipart job sends its image as the file field 'image' "
                                             "(send a job without an image as JSON)")
    fields = {name: items[0] for name, items in form.items()}
    session_id = fields.pop("session_id", None)
    body = form_values(fields)
    if session_id is not None:
        body["session_id"] = session_id
    return body, _within_image_limit(request.files["image"].stream.read(settings.max_image_mb * 2**20 + 1), settings)


def _data_uri_bytes(value, settings: Settings) -> bytes:
    """The bytes of an image sent as `data:image/...;base64,...`; the server never fetches a URL."""
    match = DATA_URI.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        raise ApiError(400, "invalid_image", "image: must be a data: URI (data:image/png;base64,...); "
                                             "this server fetches no URL")
    if len(match["data"]) // 4 * 3 > settings.max_image_mb * 2**20:  # refused before it is decoded
        raise _image_too_large(settings)
    try:
        return _within_image_limit(base64.b64decode(match["data"], validate=True), settings)
    except binascii.Error:  # the alphabet is checked above; this is the length or the padding
        raise ApiError(400, "invalid_image", "image: the data: URI is not valid base64") from None


def _within_image_limit(data: bytes, settings: Settings) -> bytes:
    if len(data) > settings.max_image_mb * 2**20:
        raise _image_too_large(settings)
    return data


def _image_too_large(settings: Settings) -> ApiError:
    return ApiError(400, "invalid_image", f"image: is over {settings.max_image_mb} MB (T2V_MAX_IMAGE_MB)")


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


def _store_image(data: bytes, reference_id: str) -> None:
    """Put a checked image in the blob store, as uploaded clips are."""
    with _staged_input(Path(_svc().settings.data_dir) / "work" / f"{reference_id}.image", "the image") as path:
        path.write_bytes(data)
        _svc().blobs.put(path, input_key(reference_id))


def _store_input(upload, reference_id: str):
    """Check the clip on a temporary file here, then put it in the blob store."""
    settings = _svc().settings
    with _staged_input(upload_path(settings, reference_id), "the upload") as path:
        upload.save(path)
        try:
            info = inspect_video(path, settings.max_upload_side, settings.max_upload_frames, settings.max_upload_s)
        except VideoInputError as exc:
            raise ApiError(400, "invalid_video", str(exc)) from None
        _svc().blobs.put(path, input_key(reference_id))
        return info


# ---------------------------------------------------------------------------------------- answers

def _accepted(job: dict):
    return jsonify(session_id=job["session_id"], reference_id=job["reference_id"], status=job["status"],
                   queue_position=_svc().jobs.queue_position(job))


def _status_view(job: dict) -> dict:
    return {
        "reference_id": job["reference_id"], "status": job["status"], "stage": job["stage"],
        "progress": job["progress"], "queue_position": _svc().jobs.queue_position(job), "eta_s": job["eta_s"],
        "error": job["error"],
    }


def _job_view(job: dict) -> dict:
    view = {"session_id": job["session_id"], "kind": job["kind"], **_status_view(job),
            "params": job["params"], "created_at": job["created_at"], "started_at": job["started_at"],
            "finished_at": job["finished_at"], "result": None, "video_url": None, "poster_url": None}
    if job["status"] == COMPLETED and job["result"]:
        view["result"] = {k: v for k, v in job["result"].items() if not k.endswith("_key")}
        view["video_url"] = _media_url("job_video", job["reference_id"])
        view["poster_url"] = _media_url("job_poster", job["reference_id"])
    return view


def _completed(job: dict) -> dict:
    if job["status"] != COMPLETED:
        raise ApiError(409, "not_ready", f"job {job['reference_id']} is {job['status']}, not completed")
    return job


def _blob_response(job: dict, key_name: str, mimetype: str):
    key = _completed(job)["result"][key_name]
    blobs = _svc().blobs
    path = blobs.local_path(key)
    if path is not None:
        return send_file(path, mimetype=mimetype, conditional=True, max_age=0)  # Range requests included
    url = blobs.presigned_url(key)
    if url is None:
        raise ApiError(404, "not_found", "the file is no longer stored")
    return redirect(url, code=302)


# ---------------------------------------------------------------------------------------- routes

def _register_routes(app: Flask) -> None:
    @app.post("/generate_video")
    def generate_video():
        settings = _svc().settings
        body, image = _job_request(settings)
        session_id = _check_id(body.pop("session_id"), "session_id") if "session_id" in body else _new_id()
        reference_id = _new_id()
        image_key = None if image is None else input_key(reference_id)
        try:
            params = JobParams.from_dict(body, _job_rules(), image_key=image_key)
        except ParamError as exc:
            raise ApiError(400, "invalid_parameter", str(exc)) from None
        if image is not None:
            try:
                check_image(image, settings.max_image_pixels)
            except ParamError as exc:
                raise ApiError(400, "invalid_image", str(exc)) from None
            _store_image(image, reference_id)
        try:
            return _accepted(_enqueue(new_job(reference_id, session_id, g.owner, "generate", params.to_dict())))
        except BaseException:
            if image_key:
                with contextlib.suppress(StorageError):
                    _svc().blobs.delete(image_key)  # no job will read it
            raise

    @app.post("/upscale_video")
    def upscale_video():
        settings = _svc().settings
        upload = request.files.get("video")
        if upload is None:
            raise ApiError(400, "missing_field", "send the clip as the multipart/form-data field 'video'")
        session_id = _check_id(request.form["session_id"], "session_id") if "session_id" in request.form else _new_id()
        params = {"outscale": _form_outscale(), "upscaler": _form_upscaler(settings),
                  "filename": (upload.filename or "")[:200]}
        reference_id = _new_id()
        info = _store_input(upload, reference_id)
        params.update(width=info.width, height=info.height, frames=info.frames, fps=info.fps,
                      duration_s=round(info.duration_s, 3), audio_codec=info.audio_codec)
        try:
            return _accepted(_enqueue(new_job(reference_id, session_id, g.owner, "upscale", params)))
        except BaseException:
            with contextlib.suppress(StorageError):
                _svc().blobs.delete(input_key(reference_id))  # no job will read it
            raise

    @app.post("/get_status")
    def get_status():
        body = _json_body()
        session_id = _check_id(body.get("session_id"), "session_id")
        job = _owned_job(_check_id(body.get("reference_id"), "reference_id"), session_id)
        return jsonify(_status_view(job))

    @app.post("/download_video/<reference_id>")
    def download_video(reference_id):
        body = _json_body()
        job = _completed(_owned_job(reference_id, _check_id(body.get("session_id"), "session_id")))
        url = _svc().blobs.presigned_url(job["result"]["video_key"])
        return jsonify(s3_url=url or _media_url("job_video", reference_id, external=True))

    @app.post("/history")
    def history():
        session_id = _check_id(_json_body().get("session_id"), "session_id")
        return jsonify(session_id=session_id,
                       history=[_job_view(j) for j in _svc().jobs.history(g.owner, session_id)])

    @app.get("/jobs/<reference_id>")
    def job(reference_id):
        return jsonify(_job_view(_owned_job(reference_id)))

    @app.post("/jobs/<reference_id>/cancel")
    def cancel_job(reference_id):
        job = _owned_job(reference_id)
        if job["status"] in TERMINAL:
            raise ApiError(409, "already_finished", f"job {reference_id} is already {job['status']}")
        status = _svc().jobs.request_cancel(reference_id)
        if status == CANCELED:
            discard_input(_svc().settings, _svc().blobs, job)
        return jsonify(reference_id=reference_id, status=status, cancel_requested=True)

    @app.delete("/jobs/<reference_id>")
    def delete_job(reference_id):
        """Remove a job for good: its video, poster and uploaded clip (T2V_KEEP_INPUTS or not), then its record.
        A queued or running job is canceled first. A running job's worker finds its lease gone at its next
        heartbeat and stops at its next cancel check; its later writes match no record, so none brings it back.
        The files go first: if that fails (503), the record stays and the DELETE can be sent again."""
        svc = _svc()
        job = _owned_job(reference_id)
        if job["status"] not in TERMINAL:
            svc.jobs.request_cancel(reference_id)
            job = svc.jobs.get(reference_id) or job  # it may have completed meanwhile, with files to delete
        try:
            for key in ("video_key", "poster_key"):
                if job["result"] and job["result"].get(key):
                    svc.blobs.delete(job["result"][key])
            svc.blobs.delete(input_key(reference_id))  # an uploaded clip or image, if the job had one
        except (OSError, StorageError) as exc:
            log.error("job %s: its files could not be deleted: %s", reference_id, exc)
            raise ApiError(503, "storage_unavailable", "the job's files could not be deleted; try again shortly") from None
        svc.jobs.delete(reference_id)
        return jsonify(reference_id=reference_id, deleted=True)

    @app.get("/jobs/<reference_id>/video")
    def job_video(reference_id):
        return _blob_response(_owned_job(reference_id), "video_key", "video/mp4")

    @app.get("/jobs/<reference_id>/poster")
    def job_poster(reference_id):
        return _blob_response(_owned_job(reference_id), "poster_key", "image/jpeg")

    @app.get("/")
    def index():
        """The web page: plain HTML, CSS and JavaScript that use this same API."""
        return app.send_static_file("index.html")

    @app.get("/limits")
    def limits():
        """What this server accepts for its default model (a tiny build's small sizes included), so a
        client (the web page) offers nothing it would refuse."""
        s, rules = _svc().settings, _job_rules()
        model = describe(rules, rules.default_model)
        caps = model["limits"]
        return jsonify(max_prompt_chars=caps["max_prompt_chars"], sizes=model["presets"], max_side=caps["max_side"],
                       max_frames=caps["max_frames"], max_steps=caps["max_steps"],
                       default_steps=model["defaults"]["num_inference_steps"], outscales=list(OUTSCALES),
                       upscale=s.upscaler != "none", max_upload_mb=s.max_upload_mb, model=model["id"],
                       inputs=model["inputs"], defaults=model["defaults"], max_image_mb=s.max_image_mb)

    @app.get("/models")
    def list_models():
        """The models a job may name here, with their inputs, presets, limits and defaults; and the LoRAs.
        `installed`: the weights (or the tiny build) are on this node."""
        rules = _job_rules()
        here = models.served_models(_svc().settings)
        return jsonify(default=rules.default_model, loras=list(rules.loras),
                       models=[{**describe(rules, model_id), "installed": model_id in here} for model_id in rules.models])

    @app.get("/health")
    def health():
        svc = _svc()
        worker = svc.worker
        body = {"status": "ok", "store": "ok", "queue_length": None,
                "worker": "off" if worker is None else ("alive" if worker.alive else "dead"),
                "model_loaded": bool(worker and worker.model_loaded),
                "model_error": worker.model_error if worker else None}
        try:
            svc.jobs.ping()
            body["queue_length"] = svc.jobs.count_queued()
        except StoreUnavailable:
            body.update(status="unavailable", store="unavailable")
            return jsonify(body), 503
        return jsonify(body)

    @app.get("/openapi.json")
    def openapi():
        return jsonify(build_spec(_svc().settings, _job_rules()))


def _register_errors(app: Flask) -> None:
    def error(status: int, code: str, message: str):
        return jsonify(error={"code": code, "message": message}), status

    @app.errorhandler(ApiError)
    def api_error(exc: ApiError):
        return error(exc.status, exc.code, exc.message)

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        code = (exc.name or "error").lower().replace(" ", "_")
        if exc.code == 413:
            settings = _svc().settings
            limit = {"upscale_video": f"{settings.max_upload_mb} MB",
                     "generate_video": f"{settings.max_body_kb} KB with an image of {settings.max_image_mb} MB",
                     }.get(request.endpoint, f"{settings.max_body_kb} KB")
            return error(413, "too_large", f"the request body is over {limit}")
        response, status = error(exc.code or 500, code, exc.description or exc.name)
        for name, value in exc.get_headers():  # keeps Allow on 405, as RFC 9110 requires
            if name.lower() != "content-type":
                response.headers[name] = value
        return response, status

    @app.errorhandler(StoreUnavailable)
    def store_unavailable(exc):
        return error(503, "store_unavailable", "the job store is unavailable; try again shortly")

    @app.errorhandler(Exception)
    def unexpected(exc):
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error(500, "internal_error", "an unexpected error happened; it was logged")


def main(argv: list[str] | None = None) -> int:
    """`python app.py`: the app under waitress, a production WSGI server. Never Flask's debug server."""
    args = _command_line().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    flags = {name: value for name, value in vars(args).items() if value is not None}
    settings = replace(settings_or_exit("app.py"), **flags)
    if settings.host not in ("127.0.0.1", "localhost", "::1") and not settings.api_keys:
        log.warning("listening on %s with no T2V_API_KEYS: anyone who can reach it can use the GPU", settings.host)
    app = create_app(settings)
    try:
        server = waitress.create_server(_access_logged(app), **_server_options(settings))
    except OSError as exc:
        print(f"app.py: error: cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}",
              file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))  # server.run() stops on SystemExit
    log.info("t2v on http://%s:%d (waitress, %d threads; model %s)",
             settings.host, settings.port, settings.threads, settings.model)
    server.run()
    return 0


def _command_line() -> argparse.ArgumentParser:
    """Flags for the main settings; each overrides its environment variable. Parsing starts nothing."""
    parser = ArgumentParser(
        prog="app.py", description="Serve the t2v API and web page with waitress, a production WSGI server.",
        epilog="Every other setting (T2V_API_KEYS, MONGODB_URI, BUCKET_NAME, T2V_MAX_*, ...) comes from the "
               "environment or .env; .env.example lists them all.")

    def flag(name: str, field: str, text: str, **kw):
        default = getattr(Settings, field)
        default = f"./{default}" if isinstance(default, Path) else default
        parser.add_argument(name, dest=field, help=f"{text} (${ENV_NAMES[field]}, default {default})", **kw)

    flag("--host", "host", "address to listen on; keep loopback unless T2V_API_KEYS is set", metavar="ADDR")
    flag("--port", "port", "port to listen on", type=_whole_number(1, 65535))
    flag("--threads", "threads", "request threads", type=_whole_number(1))
    flag("--client-timeout", "client_timeout_s", "seconds a silent connection (a stalled request, an idle "
         "keep-alive) stays open", type=_whole_number(1), metavar="SECONDS")
    flag("--worker", "worker", "run jobs in this process (thread), or leave them to python worker.py (off)",
         choices=WORKER_MODES)
    flag("--model", "model", "diffusers model folder, or 'tiny' for random weights")
    flag("--upscaler", "upscaler", "Real-ESRGAN weights: a path, a release name, 'tiny' or 'none'")
    flag("--data-dir", "data_dir", "jobs database, local videos and temporary files", type=Path, metavar="DIR")
    return parser


def _whole_number(low: int, high: int | None = None):
    """An argparse type: a whole number from `low` to `high`, with a reason when it is not."""
    def parse(text: str) -> int:
        value = int(text) if text.isascii() and text.isdigit() else None
        if value is None or value < low or (high is not None and value > high):
            span = f"from {low} to {high}" if high is not None else f"of at least {low}"
            raise argparse.ArgumentTypeError(f"expected a whole number {span}, got {text!r}")
        return value
    return parse


def _server_options(settings: Settings) -> dict:
    """waitress reads a whole request (head and body) before a thread sees it, so a slow or stalled client
    holds a connection, never a thread, and one silent for T2V_CLIENT_TIMEOUT_S is closed."""
    return {"host": settings.host, "port": settings.port, "threads": settings.threads,
            "channel_timeout": settings.client_timeout_s,
            "cleanup_interval": 1,  # how often silent connections are looked for, in seconds
            "connection_limit": 100,  # open connections; past it, new ones wait in the listen backlog
            "max_request_header_size": 16 * 1024,  # request line and headers: a longer one is a 431
            "max_request_body_size": (settings.max_upload_mb + 1) * 2**20,  # Flask's own limits answer first
            "asyncore_use_poll": True}  # poll(), not select(): no limit of 1024 open sockets


def _access_logged(wsgi_app):
    """One access line per request: the method and path, never the query string (signed links carry
    `sig=`) or headers (API keys). Escapes keep a crafted path from forging log lines."""
    access = logging.getLogger("t2v.access")

    def logged(environ, start_response):
        started = time.monotonic()

        def start(status, headers, exc_info=None):
            size = next((v for k, v in headers if k.lower() == "content-length"), "-")
            method, path = (environ.get(key, "").encode("unicode_escape").decode()
                            for key in ("REQUEST_METHOD", "PATH_INFO"))
            access.info('%s "%s %s" %s %s %.3fs', environ.get("REMOTE_ADDR", "-"), method, path,
                        status.split(" ", 1)[0], size, time.monotonic() - started)
            return start_response(status, headers, exc_info)

        return wsgi_app(environ, start)

    return logged


if __name__ == "__main__":
    sys.exit(main())
