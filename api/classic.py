"""The original routes, with the request and response keys the first service had: existing curl and Postman
collections keep working. `/upscale_video` is the second kind of job on the same queue."""

from __future__ import annotations

import contextlib

from flask import Blueprint, g, jsonify, request

from api.service import (ApiError, accepted, check_id, create_generate_job, enqueue, form_webhook, idempotent,
                         input_key, job_request, job_view, json_body, media_url, new_id, owned_job, status_view,
                         store_input, stored_key, svc, upscaler_problem)
from config import Settings
from pipeline.spec import OUTSCALES
from pipeline.upscale import RELEASES, UpscalerLoadError, resolve_upscaler
from storage.blobs import StorageError
from storage.jobs import new_job

bp = Blueprint("classic", __name__)


@bp.post("/generate_video")
@idempotent(accepted)
def generate_video():
    body, image = job_request(svc().settings)
    session_id = check_id(body.pop("session_id"), "session_id") if "session_id" in body else new_id()
    return accepted(create_generate_job(body, image, session_id))


@bp.post("/upscale_video")
@idempotent(accepted)
def upscale_video():
    settings = svc().settings
    upload = request.files.get("video")
    if upload is None:
        raise ApiError(400, "missing_field", "send the clip as the multipart/form-data field 'video'")
    session_id = check_id(request.form["session_id"], "session_id") if "session_id" in request.form else new_id()
    params = {"outscale": _form_outscale(), "upscaler": _form_upscaler(settings),
              "filename": (upload.filename or "")[:200]}
    if params["upscaler"] is None and (problem := upscaler_problem()):  # no worker here would ever take the job
        raise ApiError(400, "upscaler_not_installed", f"this server cannot upscale: {problem}")
    webhook = form_webhook()
    reference_id = new_id()
    info = store_input(upload, reference_id)
    params.update(width=info.width, height=info.height, frames=info.frames, fps=info.fps,
                  duration_s=round(info.duration_s, 3), audio_codec=info.audio_codec)
    try:
        return accepted(enqueue(new_job(reference_id, session_id, g.owner, "upscale", params, webhook)))
    except BaseException:
        with contextlib.suppress(StorageError):
            svc().blobs.delete(input_key(reference_id))  # no job will read it
        raise


@bp.post("/get_status")
def get_status():
    body = json_body()
    session_id = check_id(body.get("session_id"), "session_id")
    job = owned_job(check_id(body.get("reference_id"), "reference_id"), session_id)
    return jsonify(status_view(job))


@bp.post("/download_video/<reference_id>")
def download_video(reference_id):
    body = json_body()
    job = owned_job(reference_id, check_id(body.get("session_id"), "session_id"))
    url = svc().blobs.presigned_url(stored_key(job, "video_key"))
    return jsonify(s3_url=url or media_url("jobs.job_video", reference_id, external=True))


@bp.post("/history")
def history():
    session_id = check_id(json_body().get("session_id"), "session_id")
    return jsonify(session_id=session_id,
                   history=[job_view(j) for j in svc().jobs.history(g.owner, session_id)])


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
