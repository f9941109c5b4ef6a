"""OpenAI's Videos API over the same jobs: `POST /v1/videos`, `GET /v1/videos/<id>`, its `/content`, the list
and `DELETE`, so OpenAI's clients (the `openai` SDK among them) drive this server. A second face, not a second
implementation: a /v1 video is a generate job like any other (/jobs/<id> shows it), made, owned, served and
deleted through api/service.py.

How the shapes map (docs/DESIGN.md, "OpenAI-compatible /v1/videos"):
- `id` is the reference_id; `model` a registry id (GET /models), the server's default when absent;
- `seconds` becomes `num_frames` at the model's fps, rounded to the nearest count its frame rule allows
  (4k+1); the video's `seconds` is then the clip's real length (97 frames at 24 fps: "4.042");
- `size` "WxH" is the size of the MP4: /v1 jobs are not upscaled;
- `input_reference`, the first frame for image-to-video: a file or a data: URI (multipart), or in JSON a
  data: URI or `{"image_url": <data: URI>}`; never a URL, never a `file_id`;
- status: processing is `in_progress`; a canceled job is `failed` with error code `canceled`, as the
  Videos API has no canceled state.
"""

from __future__ import annotations

import math
import re

from flask import Blueprint, g, jsonify, request

from api.service import (ApiError, blob_response, check_id, create_generate_job, form_fields, idempotent,
                         image_bytes, job_rules, json_body, media_url, new_id, owned_job, printable, remove_job,
                         spritesheet_response, svc)
from pipeline.spec import DEFAULT_FPS, model_rules
from storage.jobs import CANCELED, COMPLETED, FAILED, PROCESSING, QUEUED, TERMINAL, job_model

bp = Blueprint("v1", __name__, url_prefix="/v1")

FIELDS = ("prompt", "model", "seconds", "size", "input_reference", "webhook_url", "webhook_events")
PASSED_ON = ("prompt", "model", "webhook_url", "webhook_events")  # to the job as they are
# JobParams' fields under the names a /v1 client sent, for error messages.
FIELD_NAMES = {"image": "input_reference", "width": "size (width)", "height": "size (height)", "num_frames": "seconds"}
SIZE = re.compile(r"(?P<width>[0-9]{1,5})x(?P<height>[0-9]{1,5})")
SECONDS = re.compile(r"[0-9]{1,6}(\.[0-9]{1,6})?")
STATUSES = {QUEUED: "queued", PROCESSING: "in_progress", COMPLETED: "completed", FAILED: "failed",
            CANCELED: "failed"}
CANCELED_ERROR = {"code": "canceled", "message": "the job was canceled before it finished"}
VARIANTS = ("video", "thumbnail", "spritesheet")
DEFAULT_LIMIT, MAX_LIMIT = 20, 100
VIDEO_KIND = "generate"  # a /v1 video is a job of this kind (is_video)
ABSENT = object()


@bp.post("/videos")
@idempotent(lambda job: video_response(job))
def create_video():
    fields, image = _create_request()
    body = {"upscale": False, **{name: fields[name] for name in PASSED_ON if name in fields}}
    if "size" in fields:
        body["width"], body["height"] = _size(fields["size"])
    if "seconds" in fields:
        seconds = _seconds(fields["seconds"])
        rules = job_rules()
        model_id = fields.get("model", rules.default_model)
        if isinstance(model_id, str) and model_id in rules.models:  # else the validation names the model's fault
            body["num_frames"] = frames_for(seconds, fields["seconds"], model_rules(rules, model_id))
    return video_response(create_generate_job(body, image, new_id(), FIELD_NAMES))


@bp.get("/videos")
def list_videos():
    """The caller's videos, newest first (`order=asc`: oldest first), `limit` at a time, after the id `after`."""
    limit = _limit(request.args.get("limit"))
    order = request.args.get("order", "desc")
    if order not in ("asc", "desc"):
        raise ApiError(400, "invalid_parameter", "order must be asc or desc")
    after = request.args.get("after")
    if after is not None:
        check_id(after, "after")
        cursor = svc().jobs.get(after)
        if cursor is not None and not (cursor["owner"] == g.owner and is_video(cursor)):
            raise ApiError(404, "not_found", f"after: there is no video {after} for this caller")
    try:
        jobs = svc().jobs.list_jobs(g.owner, kind=VIDEO_KIND, after=after, limit=limit + 1,
                                    oldest_first=order == "asc")
    except KeyError:
        raise ApiError(404, "not_found", f"after: there is no video {after} for this caller") from None
    data = [video_object(job) for job in jobs[:limit]]
    return jsonify(object="list", data=data, first_id=data[0]["id"] if data else None,
                   last_id=data[-1]["id"] if data else None, has_more=len(jobs) > limit)


@bp.get("/videos/<reference_id>")
def retrieve_video(reference_id):
    return video_response(owned_video(reference_id))


@bp.delete("/videos/<reference_id>")
def delete_video(reference_id):
    """Remove the video's files and record; a queued or running job is canceled first."""
    remove_job(owned_video(reference_id))
    return jsonify(id=reference_id, object="video.deleted", deleted=True)


@bp.get("/videos/<reference_id>/content")
def video_content(reference_id):
    """The MP4 (`variant=video`, the default), the poster (`thumbnail`) or a grid of frames (`spritesheet`)."""
    variant = request.args.get("variant", "video")
    if variant not in VARIANTS:
        raise ApiError(400, "invalid_parameter", f"variant must be one of {', '.join(VARIANTS)}")
    job = owned_video(reference_id)
    if variant == "video":
        return blob_response(job, "video_key", "video/mp4")
    if variant == "thumbnail":
        return blob_response(job, "poster_key", "image/jpeg")
    return spritesheet_response(job)


def video_response(job: dict):
    """A video object; one not finished yet says when to look again (`openai-poll-after-ms`, which the SDK's
    `poll()` waits), so a client polls about five times over the job's estimated time, 1 to 10 s apart."""
    response = jsonify(video_object(job))
    if job["status"] not in TERMINAL:
        eta_ms = (job["eta_s"] or 0) * 1000
        response.headers["openai-poll-after-ms"] = str(int(min(max(eta_ms / 5, 1000), 10000)))
    return response


def video_object(job: dict) -> dict:
    """A generate job as the Videos API's `video` object. Size and length are the MP4's once it exists.
    A record from before the model registry has no `model` (storage's job_model names it) and may lack `fps`."""
    params, result = job["params"], job["result"] or {}
    width, height = result.get("width", params["width"]), result.get("height", params["height"])
    frames, fps = result.get("frames", params["num_frames"]), result.get("fps", params.get("fps", DEFAULT_FPS))
    status = job["status"]
    return {
        "id": job["reference_id"], "object": "video", "status": STATUSES[status],
        "progress": 100 if status == COMPLETED else min(99, int(job["progress"] * 100)),
        "created_at": int(job["created_at"]),
        "completed_at": int(job["finished_at"]) if status in TERMINAL and job["finished_at"] else None,
        "model": job_model(job), "prompt": params["prompt"], "seconds": f"{round(frames / fps, 3):g}",
        "size": f"{width}x{height}", "error": CANCELED_ERROR if status == CANCELED else job["error"],
        "events_url": media_url("events.video_events", job["reference_id"]),  # a t2v extension, for EventSource
    }


def frames_for(seconds: float, given, rules) -> int:
    """The frame count nearest `seconds` at the model's fps that its frame rule allows (k * multiple + 1);
    a 400 naming the model when that is more than it takes here."""
    entry = rules.entry
    k = max(0, math.floor((seconds * entry.fps - 1) / entry.frame_multiple + 0.5))
    frames = k * entry.frame_multiple + 1
    if frames > rules.max_frames:
        raise ApiError(400, "invalid_parameter",
                       f"{entry.id}: seconds {printable(str(given))[:20]} is {frames} frames at {entry.fps} fps; "
                       f"it takes at most {rules.max_frames} frames ({rules.max_frames / entry.fps:.3g} s) here")
    return frames


def is_video(job: dict) -> bool:
    """The one rule for what a /v1 video is: a generate job. An upscale job is none, on every /v1 route."""
    return job["kind"] == VIDEO_KIND


def owned_video(reference_id: str) -> dict:
    """A video of the caller's; any other job is no video of this API (404, as for anyone else's)."""
    job = owned_job(reference_id)
    if not is_video(job):
        raise ApiError(404, "not_found", f"no video {reference_id} for this caller")
    return job


def _create_request() -> tuple[dict, bytes | None]:
    """The create fields and the image, from JSON or from a multipart form (what the SDK sends)."""
    settings = svc().settings
    if request.mimetype != "multipart/form-data":
        fields = json_body()
        reference = fields.pop("input_reference", ABSENT)  # null is refused as an image, not read as absent
    else:
        fields = form_fields("input_reference")
        reference = fields.pop("input_reference", ABSENT)  # a data: URI as text
        if "input_reference" in request.files:
            if reference is not ABSENT:
                raise ApiError(400, "invalid_parameter", "input_reference: is given more than once")
            reference = request.files["input_reference"]
    unknown = [name for name in fields if name not in FIELDS]
    if unknown:
        raise ApiError(400, "invalid_parameter", f"{printable(unknown[0])}: is not a known parameter "
                                                 f"(send {', '.join(FIELDS)})")
    return fields, None if reference is ABSENT else image_bytes(_reference_image(reference), settings,
                                                                 "input_reference")


def _reference_image(reference):
    """The image of `input_reference`: a file, a data: URI, or `{"image_url": <data: URI>}`."""
    if isinstance(reference, dict):
        if "file_id" in reference:
            raise ApiError(400, "invalid_image", "input_reference: file_id is not supported: this server keeps "
                                                 "no files; send the image itself (a file or a data: URI)")
        if set(reference) != {"image_url"}:
            raise ApiError(400, "invalid_image", "input_reference: must be an image file, a data: URI, "
                                                 "or {\"image_url\": <data: URI>}")
        return reference["image_url"]
    return reference


def _size(value) -> tuple[int, int]:
    match = SIZE.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        raise ApiError(400, "invalid_parameter", "size: must be WIDTHxHEIGHT in pixels, like 1280x720")
    return int(match["width"]), int(match["height"])


def _seconds(value) -> float:
    """Seconds as the SDK sends them (a string, "4") or as a JSON number."""
    if isinstance(value, str) and SECONDS.fullmatch(value):
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1e6:
        raise ApiError(400, "invalid_parameter", "seconds: must be a positive number of seconds, like \"4\"")
    return float(value)


def _limit(raw: str | None) -> int:
    if raw is None:
        return DEFAULT_LIMIT
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 4 and 1 <= int(raw) <= MAX_LIMIT):
        raise ApiError(400, "invalid_parameter", f"limit must be a whole number from 1 to {MAX_LIMIT}")
    return int(raw)
