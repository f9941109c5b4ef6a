"""Resource-style routes over the same jobs: one job by id (view, cancel, delete, its video and poster), a prompt's
suggested rewrite (/prompts/enhance), what this server serves (/models, /limits), /health, /openapi.json and the
web page."""

from __future__ import annotations

import logging

from flask import Blueprint, current_app, jsonify, url_for

from api.guards import key_owner
from api.service import (ApiError, accepted, blob_response, check_id, create_enhance_job, idempotent, job_request,
                         job_rules, job_view, new_id, owned_job, remove_job, svc, upscaler_problem)
from openapi import build_spec
from pipeline import models
from pipeline.spec import OUTSCALES, describe
from storage.jobs import CANCELED, TERMINAL, WORKER_LIVE_S, StoreUnavailable
from worker.files import discard_input

log = logging.getLogger("t2v.api")
bp = Blueprint("jobs", __name__)


def enhance_accepted(job: dict):
    """202, with the job to poll in Location: its `result.prompt` is the suggestion once it completes."""
    return accepted(job), 202, {"Location": url_for("jobs.job", reference_id=job["reference_id"])}


@bp.post("/prompts/enhance")
@idempotent(enhance_accepted)
def enhance_prompt():
    """The model's own suggested rewrite of a prompt, as a short job claimed ahead of the queued videos. Nothing
    renders: the user takes, edits or ignores the suggestion, then sends a generate job."""
    body, image = job_request(svc().settings)
    session_id = check_id(body.pop("session_id"), "session_id") if "session_id" in body else new_id()
    return enhance_accepted(create_enhance_job(body, image, session_id))


@bp.get("/jobs/<reference_id>")
def job(reference_id):
    return jsonify(job_view(owned_job(reference_id)))


@bp.post("/jobs/<reference_id>/cancel")
def cancel_job(reference_id):
    job = owned_job(reference_id)
    if job["status"] in TERMINAL:
        raise ApiError(409, "already_finished", f"job {reference_id} is already {job['status']}")
    status = svc().jobs.request_cancel(reference_id)
    if status == CANCELED:
        discard_input(svc().settings, svc().blobs, job)
    return jsonify(reference_id=reference_id, status=status, cancel_requested=True)


@bp.delete("/jobs/<reference_id>")
def delete_job(reference_id):
    """Remove a job for good, its files first (api/service.py's remove_job); a running job is canceled."""
    remove_job(owned_job(reference_id))
    return jsonify(reference_id=reference_id, deleted=True)


@bp.get("/jobs/<reference_id>/video")
def job_video(reference_id):
    return blob_response(owned_job(reference_id), "video_key", "video/mp4")


@bp.get("/jobs/<reference_id>/poster")
def job_poster(reference_id):
    return blob_response(owned_job(reference_id), "poster_key", "image/jpeg")


@bp.get("/")
def index():
    """The web page: plain HTML, CSS and JavaScript that use this same API."""
    return current_app.send_static_file("index.html")


@bp.get("/limits")
def limits():
    """What this server accepts for its default model (a tiny build's small sizes included), so a
    client (the web page) offers nothing it would refuse."""
    s, rules = svc().settings, job_rules()
    model = describe(rules, rules.default_model)
    caps = model["limits"]
    return jsonify(max_prompt_chars=caps["max_prompt_chars"], sizes=model["presets"], max_side=caps["max_side"],
                   max_frames=caps["max_frames"], max_steps=caps["max_steps"],
                   default_steps=model["defaults"]["num_inference_steps"], outscales=list(OUTSCALES),
                   upscale=upscaler_problem() is None, max_upload_mb=s.max_upload_mb, model=model["id"],
                   inputs=model["inputs"], defaults=model["defaults"], max_image_mb=s.max_image_mb)


@bp.get("/models")
def list_models():
    """The models a job may name here, with their inputs, presets, limits and defaults; and the LoRAs.
    `installed`: the weights (or the tiny build) are on this node."""
    rules = job_rules()
    here = models.served_models(svc().settings)
    return jsonify(default=rules.default_model, loras=list(rules.loras),
                   models=[{**describe(rules, model_id), "installed": model_id in here} for model_id in rules.models])


@bp.get("/health")
def health():
    """Open to anyone, for load balancers and probes. With keys on, a request without a valid key sees the states
    and counts but not what names a machine or tells its faults (worker ids, a model's or a group's error)."""
    service = svc()
    worker = service.worker
    keys = service.settings.api_keys
    shown = not keys or key_owner(keys) is not None
    model_error = worker.model_error if worker else None
    body = {"status": "degraded" if model_error else "ok", "store": "ok", "queue_length": None,
            "worker": "off" if worker is None else ("alive" if worker.alive else "dead"),
            "model_loaded": bool(worker and worker.model_loaded), "model_error": model_error if shown else None,
            "workers": None}
    if model_error:  # still a 200: the API serves (job views, videos); its own worker cannot take new jobs
        body["reason"] = f"the worker in this process cannot run jobs: {model_error if shown else HIDDEN}"
    try:
        service.jobs.ping()
        body["queue_length"] = service.jobs.count_queued()
        body["workers"] = [live_worker(w, shown) for w in service.jobs.live_workers(WORKER_LIVE_S)]
    except StoreUnavailable:
        body.update(status="unavailable", store="unavailable")
        return jsonify(body), 503
    return jsonify(body)


HIDDEN = "send an API key to see why"


def live_worker(record: dict, shown: bool = True) -> dict:
    """A worker record as /health shows it (openapi's LiveWorker): what it claims, and a group's ranks, GPUs
    and state; without `shown`, no worker id and no failure reason."""
    view = {key: record.get(key) for key in ("worker_id", "kinds", "models", "gpu_bytes", "group")}
    if not shown:
        view["worker_id"] = None
        group = view["group"]
        if group and group.get("state", "").startswith("failed"):
            view["group"] = {**group, "state": f"failed: {HIDDEN}"}
    return view


@bp.get("/openapi.json")
def openapi():
    return jsonify(build_spec(svc().settings, job_rules()))
