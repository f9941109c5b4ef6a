"""The OpenAPI 3.1 description of the API, served at /openapi.json. A test keeps it true to the routes."""

from __future__ import annotations

from pipeline import models
from pipeline.spec import PROMPT_PATTERN, EnhanceParams, Rules, job_fields, request_schema

ID = {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,128}$"}
ERROR = {"$ref": "#/components/schemas/Error"}
IMAGE_URI = {"type": "string", "pattern": r"^data:image/[A-Za-z0-9.+-]{1,64};base64,[A-Za-z0-9+/]*={0,2}$",
             "description": "the first frame: a PNG, JPEG or WebP as a data: URI (data:image/png;base64,...)"}
STATUSES = ["queued", "processing", "completed", "failed", "canceled"]
ACCEPTED = {"type": "object", "required": ["session_id", "reference_id", "status", "queue_position"],
            "properties": {"session_id": ID, "reference_id": ID, "status": {"enum": STATUSES},
                           "queue_position": {"type": "integer", "minimum": 0}}}
IDEMPOTENCY_PARAM = {"name": "Idempotency-Key", "in": "header", "required": False,
                     "schema": {"type": "string", "pattern": "^[\\x21-\\x7e]{1,255}$"},
                     "description": "the same key and request within 24 h answer the job the first one made; "
                                    "the key with another request is a 409"}
WEBHOOK_FIELDS = {
    "webhook_url": {"type": "string", "maxLength": 2048,
                    "description": "http(s) URL to POST job events to, signed the Standard Webhooks way"},
    "webhook_events": {"description": "events to send (default all): a list, or comma-separated in a form",
                       "oneOf": [{"type": "array", "items": {"enum": ["started", "completed", "failed", "canceled"]}},
                                 {"type": "string"}]}}


def _errors(*codes: int) -> dict:
    return {str(c): {"description": "error", "content": {"application/json": {"schema": ERROR}}} for c in codes}


def _json(schema: dict) -> dict:
    return {"content": {"application/json": {"schema": schema}}}


def _ok(schema: dict, *errors: int) -> dict:
    return {"200": {"description": "OK", **_json(schema)}, **_errors(*errors)}


def _generate_schemas(rules: Rules, webhooks: bool) -> tuple[dict, dict]:
    """The JSON body of /generate_video, generated from `pipeline.spec` (one object schema per model), plus the
    component schemas it refers to. The API adds `session_id`, `image` (a data: URI) for image models, and
    the webhook fields when this server sends webhooks."""
    schema = request_schema(rules, ref_template="#/components/schemas/{model}")  # a new dict on each call
    components = schema.pop("$defs", {})
    for job in (*components.values(), schema):
        model_id = job.get("properties", {}).get("model", {}).get("const")
        if model_id is None:
            continue
        job["properties"]["session_id"] = ID
        if webhooks:
            job["properties"].update(WEBHOOK_FIELDS)
        inputs = models.MODELS[model_id].inputs
        if inputs != "text":
            job["properties"]["image"] = IMAGE_URI
        if inputs == "image":
            job["required"].append("image")
    return schema, components


PATH_PARAM = {"name": "reference_id", "in": "path", "required": True, "schema": ID}
# A signed link from a job view, for tags that cannot send a key (<video>, <img>).
SIGNED_PARAMS = [{"name": "expires", "in": "query", "required": False, "schema": {"type": "string"}},
                 {"name": "sig", "in": "query", "required": False, "schema": {"type": "string"}}]
LAST_EVENT_ID = {"name": "Last-Event-ID", "in": "header", "required": False,
                 "schema": {"type": "string", "pattern": "^[0-9]{1,12}$"}}


def build_spec(settings, rules: Rules) -> dict:
    """The spec, with the limits and models this server accepts: one builder per face of the API."""
    webhooks = WEBHOOK_FIELDS if settings.webhook_secret else {}
    generate_json, job_schemas = _generate_schemas(rules, bool(webhooks))
    return {
        "openapi": "3.1.0",
        "info": {"title": "t2v", "version": "1.0.0",
                 "description": "Text-to-video with HunyuanVideo and Real-ESRGAN. When the server has API keys, "
                                "every route but /health needs one."},
        "security": [{"bearer": []}, {"apiKey": []}],
        "paths": {**_classic_paths(settings, generate_json, webhooks), **_jobs_paths(settings, rules, webhooks),
                  **_events_paths(),
                  **_v1_paths(settings, rules, PATH_PARAM), **_metrics_paths()},
        "components": _components(job_schemas),
    }


def _components(job_schemas: dict) -> dict:
    """The shared schemas (beside the generated JobParams ones) and the two ways to send a key."""
    return {
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"},
                            "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"}},
        "schemas": {
            "Error": {"type": "object", "required": ["error"], "properties": {"error": {
                "type": "object", "required": ["code", "message"],
                "properties": {"code": {"type": "string"}, "message": {"type": "string"}}}}},
            "Status": {"type": "object",
                       "required": ["reference_id", "status", "stage", "progress", "queue_position", "eta_s", "error"],
                       "properties": {
                           "reference_id": ID, "status": {"enum": STATUSES}, "stage": {"type": ["string", "null"]},
                           "progress": {"type": "number", "minimum": 0, "maximum": 1},
                           "queue_position": {"type": "integer", "minimum": 0},
                           "eta_s": {"type": ["number", "null"]},
                           "error": {"type": ["object", "null"], "properties": {
                               "code": {"type": "string"}, "message": {"type": "string"}}}}},
            "Job": {"allOf": [{"$ref": "#/components/schemas/Status"}, {"type": "object", "properties": {
                "session_id": ID, "kind": {"enum": ["generate", "upscale", "enhance"]}, "params": {"type": "object"},
                "created_at": {"type": "number"}, "started_at": {"type": ["number", "null"]},
                "finished_at": {"type": ["number", "null"]}, "result": {"type": ["object", "null"]},
                "video_url": {"type": ["string", "null"]}, "poster_url": {"type": ["string", "null"]},
                "events_url": {"type": "string"}}}]},
            **job_schemas,
            "Model": {"type": "object", "required": ["id", "inputs", "installed", "presets", "limits", "defaults"],
                      "properties": {"id": {"type": "string"}, "inputs": {"enum": ["text", "image", "both"]},
                                     "installed": {"type": "boolean"}, "tiny": {"type": "boolean"},
                                     "lora": {"type": "boolean"}, "audio": {"type": "boolean"},
                                     "prompt_enhancer": {"type": "boolean",
                                                         "description": "POST /prompts/enhance takes it"},
                                     "size_from_image": {"type": "boolean"},
                                     "presets": {"type": "array"}, "limits": {"type": "object"},
                                     "defaults": {"type": "object"},
                                     "speed": {"type": "object", "description": "the speed options the model "
                                               "can take (T2V_CACHE values, mask-free attention, regional "
                                               "compile, fp8 storage and the share of weights it covers)",
                                               "properties": {"cache": {"type": "array",
                                                                        "items": {"enum": ["fbc", "magcache"]}},
                                                              "mask_free": {"type": "boolean"},
                                                              "compile": {"type": "boolean"},
                                                              "fp8": {"type": "boolean"},
                                                              "fp8_share": {"type": ["number", "null"]},
                                                              "attention_backend": {
                                                                  "type": ["string", "null"],
                                                                  "description": "the backend this model gets from "
                                                                  "T2V_ATTENTION_BACKEND (a mask-capable one where it "
                                                                  "passes a mask); null: none named"}}}}},
            "Video": VIDEO,
            "Health": {"type": "object", "required": ["status", "store", "worker", "model_loaded", "queue_length"],
                       "properties": {"status": {"enum": ["ok", "degraded", "unavailable"]},
                                      "reason": {"type": "string", "description": "why it is degraded"},
                                      "store": {"type": "string"},
                                      "worker": {"enum": ["alive", "dead", "off"]},
                                      "model_loaded": {"type": "boolean"},
                                      "model_error": {"type": ["string", "null"]},
                                      "queue_length": {"type": ["integer", "null"]},
                                      "workers": {"type": ["array", "null"], "items": {"$ref": "#/components/schemas/"
                                                                                              "LiveWorker"},
                                                  "description": "workers that reported in the last 30 s (null: "
                                                                 "the store is unavailable)"}}},
            "LiveWorker": {"type": "object", "required": ["worker_id", "kinds", "models", "gpu_bytes", "group"],
                           "properties": {"worker_id": {"type": ["string", "null"],
                                                        "description": "null: hidden from a request without a "
                                                                       "key while keys are on"},
                                          "kinds": {"type": "array", "items": {"type": "string"},
                                                    "description": "the job kinds it claims now (none: it claims "
                                                                   "nothing)"},
                                          "models": {"type": "array", "items": {"type": "string"}},
                                          "gpu_bytes": {"type": ["integer", "null"]},
                                          "group": {"oneOf": [{"type": "null"}, {"$ref": "#/components/schemas/"
                                                                                         "WorkerGroup"}],
                                                    "description": "null: one process; else a worker group's rank 0"}}},
            "WorkerGroup": {"type": "object", "required": ["ranks", "gpus", "state"],
                            "properties": {"ranks": {"type": "integer", "minimum": 2},
                                           "gpus": {"type": "array", "items": {"type": "string"},
                                                    "description": "CUDA_VISIBLE_DEVICES indices; empty on the CPU"},
                                           "state": {"type": "string", "pattern": "^(starting|ready|failed: .+)$",
                                                     "description": "failed: why its ranks could not start (it "
                                                                    "claims nothing and tries again)"}}},
        },
    }


def _classic_paths(settings, generate_json: dict, webhooks: dict) -> dict:
    """Blueprint `classic`: the original routes."""
    ref_param = PATH_PARAM
    generate_form = {
        "type": "object", "required": ["image", "prompt"], "additionalProperties": False,
        "properties": {
            "image": {"type": "string", "contentMediaType": "application/octet-stream",
                      "description": f"a PNG, JPEG or WebP: at most {settings.max_image_mb} MB and "
                                     f"{settings.max_image_pixels} pixels"},
            **{name: {"type": "string", "description": "as in the JSON body, as text"}
               for name in job_fields()},
            "session_id": ID, **webhooks}}
    accepted = ACCEPTED
    session_body = {"type": "object", "required": ["session_id"], "properties": {"session_id": ID}}
    return {
        "/generate_video": {"post": {
            "summary": "Queue a video job: text to video, or image to video (the image as a data: URI in JSON, "
                       "or as the multipart file `image`)",
            "parameters": [IDEMPOTENCY_PARAM],
            "requestBody": {"required": True, "content": {
                "application/json": {"schema": generate_json},
                "multipart/form-data": {"schema": generate_form}}},
            "responses": _ok(accepted, 400, 401, 409, 413, 415, 429, 503)}},
        "/upscale_video": {"post": {
            "summary": "Queue an upscale of an uploaded clip (same queue, status and history as generation)",
            "parameters": [IDEMPOTENCY_PARAM],
            "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
                "type": "object", "required": ["video"],
                "properties": {
                    "video": {"type": "string", "contentMediaType": "application/octet-stream",
                              "description": f"the clip: at most {settings.max_upload_mb} MB, "
                                             f"{settings.max_upload_side} px on the long side, "
                                             f"{settings.max_upload_frames} frames and {settings.max_upload_s:g} s"},
                    "session_id": ID,
                    "outscale": {"type": "string", "enum": ["2", "4"], "default": "4"},
                    "upscaler": {"type": "string", "description": "a Real-ESRGAN release name installed here"},
                    **webhooks}}}}},
            "responses": _ok(accepted, 400, 401, 409, 413, 429, 503)}},
        "/get_status": {"post": {
            "summary": "Status of one job",
            "requestBody": {"required": True, **_json({"type": "object", "required": ["session_id", "reference_id"],
                                                       "properties": {"session_id": ID, "reference_id": ID}})},
            "responses": _ok({"$ref": "#/components/schemas/Status"}, 400, 401, 404, 413, 503)}},
        "/download_video/{reference_id}": {"post": {
            "summary": "A URL for the finished video (presigned on S3)", "parameters": [ref_param],
            "requestBody": {"required": True, **_json(session_body)},
            "responses": _ok({"type": "object", "required": ["s3_url"], "properties": {"s3_url": {"type": "string"}}},
                             400, 401, 404, 409, 413, 503)}},
        "/history": {"post": {
            "summary": "A session's jobs, newest first", "requestBody": {"required": True, **_json(session_body)},
            "responses": _ok({"type": "object", "required": ["session_id", "history"],
                              "properties": {"session_id": ID, "history": {
                                  "type": "array", "items": {"$ref": "#/components/schemas/Job"}}}},
                             400, 401, 413, 503)}},
    }


def _enhance_request(settings, rules: Rules, webhooks: dict) -> tuple[dict, dict]:
    """The JSON body and the multipart form of /prompts/enhance, from `EnhanceParams`: `model` one of the models
    served here with an enhancer (required unless the default model has one), plus the image and the API's fields."""
    enhancing = [m for m in rules.models if models.MODELS[m].prompt_enhancer]
    if not enhancing:
        return {"not": {}}, {"not": {}}  # no model here suggests prompts: no request is valid
    body = EnhanceParams.model_json_schema()
    body["properties"]["prompt"]["maxLength"] = rules.limits.max_prompt_chars
    body["properties"]["model"] = {"enum": enhancing, "description": body["properties"]["model"]["description"]}
    body["properties"].update(image=IMAGE_URI, session_id=ID, **webhooks)
    body["required"] = ["prompt"] if rules.default_model in enhancing else ["prompt", "model"]
    form = {"type": "object", "required": ["image", *body["required"]], "additionalProperties": False,
            "properties": {"image": {"type": "string", "contentMediaType": "application/octet-stream",
                                     "description": f"the video's first frame: a PNG, JPEG or WebP, at most "
                                                    f"{settings.max_image_mb} MB"},
                           **{name: {"type": "string", "description": "as in the JSON body, as text"}
                              for name in ("prompt", "model", "seed")},
                           "session_id": ID, **webhooks}}
    return body, form


def _jobs_paths(settings, rules: Rules, webhooks: dict) -> dict:
    """Blueprint `jobs`: /jobs/<id>, /prompts/enhance, the page, /limits, /models, /health and this document."""
    ref_param, signed_params = PATH_PARAM, SIGNED_PARAMS
    enhance_json, enhance_form = _enhance_request(settings, rules, webhooks)
    return {
        "/prompts/enhance": {"post": {
            "summary": "Queue a prompt's suggested rewrite by the model's own enhancer (LTX-2), claimed ahead of "
                       "the queued videos; the job's result.prompt is the suggestion, and nothing renders",
            "parameters": [IDEMPOTENCY_PARAM],
            "requestBody": {"required": True, "content": {"application/json": {"schema": enhance_json},
                                                          "multipart/form-data": {"schema": enhance_form}}},
            "responses": {"202": {"description": "queued (or, under a replayed Idempotency-Key, the job it made); "
                                                 "poll the job in Location",
                                  "headers": {"Location": {"schema": {"type": "string"}}}, **_json(ACCEPTED)},
                          **_errors(400, 401, 409, 413, 415, 429, 503)}}},
        "/jobs/{reference_id}": {
            "get": {
                "summary": "One job in full", "parameters": [ref_param],
                "responses": _ok({"$ref": "#/components/schemas/Job"}, 400, 401, 404, 503)},
            "delete": {
                "summary": "Delete a job: its record, video, poster and uploaded clip (a running job is canceled)",
                "parameters": [ref_param],
                "responses": _ok({"type": "object", "required": ["reference_id", "deleted"],
                                  "properties": {"reference_id": ID, "deleted": {"const": True}}},
                                 400, 401, 403, 404, 415, 503)}},
        "/jobs/{reference_id}/cancel": {"post": {
            "summary": "Cancel a queued or running job", "parameters": [ref_param],
            "responses": _ok({"type": "object", "required": ["reference_id", "status"],
                              "properties": {"reference_id": ID, "status": {"enum": STATUSES},
                                             "cancel_requested": {"type": "boolean"}}},
                             400, 401, 404, 409, 503)}},
        "/jobs/{reference_id}/video": {"get": {
            "summary": "The MP4 (local storage: streamed with Range support; S3: a redirect)",
            "parameters": [ref_param, *signed_params],
            "responses": {"200": {"description": "the video", "content": {"video/mp4": {}}},
                          "206": {"description": "a byte range", "content": {"video/mp4": {}}},
                          "302": {"description": "redirect to a presigned URL"},
                          **_errors(400, 401, 404, 409, 416, 503)}}},
        "/jobs/{reference_id}/poster": {"get": {
            "summary": "The poster image", "parameters": [ref_param, *signed_params],
            "responses": {"200": {"description": "JPEG", "content": {"image/jpeg": {}}},
                          "302": {"description": "redirect to a presigned URL"},
                          **_errors(400, 401, 404, 409, 503)}}},
        "/": {"get": {
            "summary": "The web page", "security": [],
            "responses": {"200": {"description": "HTML", "content": {"text/html": {}}}}}},
        "/limits": {"get": {
            "summary": "What this server accepts: sizes, frames, steps, prompt length, upscale",
            "responses": _ok({"type": "object", "required": ["max_prompt_chars", "sizes", "max_frames", "max_steps"],
                              "properties": {
                                  "max_prompt_chars": {"type": "integer"}, "max_side": {"type": "integer"},
                                  "sizes": {"type": "array", "items": {
                                      "type": "object", "required": ["label", "width", "height"],
                                      "properties": {"label": {"type": "string"}, "width": {"type": "integer"},
                                                     "height": {"type": "integer"}}}},
                                  "max_frames": {"type": "integer"}, "max_steps": {"type": "integer"},
                                  "default_steps": {"type": "integer"},
                                  "outscales": {"type": "array", "items": {"type": "integer"}},
                                  "upscale": {"type": "boolean"}, "max_upload_mb": {"type": "integer"},
                                  "model": {"type": "string"}, "inputs": {"enum": ["text", "image", "both"]},
                                  "defaults": {"type": "object"}, "max_image_mb": {"type": "integer"}}},
                             401)}},
        "/models": {"get": {
            "summary": "The models this server accepts (inputs, presets, limits, defaults) and its LoRAs",
            "responses": _ok({"type": "object", "required": ["default", "models", "loras"], "properties": {
                "default": {"type": "string"},
                "models": {"type": "array", "items": {"$ref": "#/components/schemas/Model"}},
                "loras": {"type": "array", "items": {"type": "string"}}}}, 401)}},
        "/health": {"get": {
            "summary": "Liveness: store, worker, model, queue", "security": [],
            "responses": {"200": {"description": "healthy", **_json({"$ref": "#/components/schemas/Health"})},
                          "503": {"description": "store unavailable",
                                  **_json({"$ref": "#/components/schemas/Health"})}}}},
        "/openapi.json": {"get": {
            "summary": "This document",
            "responses": {"200": {"description": "OpenAPI 3.1", **_json({"type": "object"})}}}},
    }


def _events_paths() -> dict:
    """Blueprint `events`: the live event streams and the latest preview."""
    ref_param, signed_params, last_event_id = PATH_PARAM, SIGNED_PARAMS, LAST_EVENT_ID
    return {
        "/jobs/{reference_id}/events": {"get": {
            "summary": "Live progress as server-sent events: progress, stage, preview (each with id: <seq>), "
                       "queued (a queued job's place), then completed, failed or canceled (the job view); "
                       "resume with the Last-Event-ID header",
            "parameters": [ref_param, *signed_params, last_event_id],
            "responses": {"200": {"description": "an event stream", "content": {"text/event-stream": {}}},
                          **_errors(400, 401, 404, 429, 503)}}},
        "/v1/videos/{reference_id}/events": {"get": {
            "summary": "The same event stream as /jobs/{reference_id}/events, for a video of /v1/videos",
            "parameters": [ref_param, last_event_id],
            "responses": {"200": {"description": "an event stream", "content": {"text/event-stream": {}}},
                          **_errors(400, 401, 404, 429, 503)}}},
        "/jobs/{reference_id}/preview": {"get": {
            "summary": "The latest preview of a job's latents while it denoises: an animated WebP, at most "
                       "256 px on the long side", "parameters": [ref_param, *signed_params],
            "responses": {"200": {"description": "WebP", "content": {"image/webp": {}}},
                          "302": {"description": "redirect to a presigned URL"},
                          **_errors(400, 401, 404, 503)}}},
    }


def _metrics_paths() -> dict:
    """Blueprint `metrics`."""
    return {
        "/metrics": {"get": {
            "summary": "Prometheus metrics, read from the job store at each scrape (with keys on, a key is "
                       "needed unless T2V_METRICS_PUBLIC is set)",
            "responses": {"200": {"description": "Prometheus text (OpenMetrics by Accept)",
                                  "content": {"text/plain": {}, "application/openmetrics-text": {}}},
                          **_errors(401, 503)}}},
    }




# ---------------------------------------------------------------------------------------- /v1/videos

VIDEO = {
    "type": "object", "description": "a generate job in the shape of OpenAI's Videos API",
    "required": ["id", "object", "status", "progress", "created_at", "completed_at", "model", "seconds", "size",
                 "error"],
    "properties": {
        "id": ID, "object": {"const": "video"}, "status": {"enum": ["queued", "in_progress", "completed", "failed"]},
        "progress": {"type": "integer", "minimum": 0, "maximum": 100}, "created_at": {"type": "integer"},
        "completed_at": {"type": ["integer", "null"]}, "model": {"type": "string"}, "prompt": {"type": "string"},
        "seconds": {"type": "string", "description": "the clip's length: its frames over its fps"},
        "size": {"type": "string", "pattern": "^[0-9]+x[0-9]+$"},
        "error": {"type": ["object", "null"], "required": ["code", "message"], "properties": {
            "code": {"type": "string"}, "message": {"type": "string"}}},
        "events_url": {"type": "string", "description": "a t2v extension: the video's live event stream, "
                                                       "signed when keys are on (for EventSource)"}}}
V1_SIZE = {"type": "string", "pattern": "^[0-9]{1,5}x[0-9]{1,5}$",
           "description": "WIDTHxHEIGHT of the MP4, within the model's size rules (GET /models); not upscaled"}
V1_SECONDS = {"description": "becomes the nearest frame count the model's frame rule allows, at its fps",
              "anyOf": [{"type": "string", "pattern": r"^[0-9]{1,6}(\.[0-9]{1,6})?$"},
                        {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1_000_000}]}


def _v1_paths(settings, rules: Rules, ref_param: dict) -> dict:
    """OpenAI's Videos API shape over the same jobs (api/v1.py)."""
    video = _ok({"$ref": "#/components/schemas/Video"}, 400, 401, 404, 503)
    prompt = {"type": "string", "minLength": 1, "maxLength": rules.limits.max_prompt_chars, "pattern": PROMPT_PATTERN}
    model = {"enum": list(rules.models)} if rules.models else {"type": "string"}
    create_json = {
        "type": "object", "required": ["prompt"], "additionalProperties": False,
        "properties": {"prompt": prompt, "model": {**model, "description": "a model id; the server's default if absent"},
                       "seconds": V1_SECONDS, "size": V1_SIZE,
                       "input_reference": {"anyOf": [IMAGE_URI, {
                           "type": "object", "required": ["image_url"], "additionalProperties": False,
                           "properties": {"image_url": IMAGE_URI}}]}}}
    create_form = {
        "type": "object", "required": ["prompt"], "additionalProperties": False,
        "properties": {"prompt": prompt, "model": {"type": "string"}, "seconds": V1_SECONDS["anyOf"][0],
                       "size": V1_SIZE,
                       "input_reference": {"type": "string", "contentMediaType": "application/octet-stream",
                                           "description": f"the first frame: a PNG, JPEG or WebP of at most "
                                                          f"{settings.max_image_mb} MB"}}}
    listing = {"type": "object", "required": ["object", "data", "first_id", "last_id", "has_more"], "properties": {
        "object": {"const": "list"}, "data": {"type": "array", "items": {"$ref": "#/components/schemas/Video"}},
        "first_id": {"type": ["string", "null"]}, "last_id": {"type": ["string", "null"]},
        "has_more": {"type": "boolean"}}}
    return {
        "/v1/videos": {
            "post": {
                "summary": "Create a video (OpenAI's Videos API): prompt, model, seconds, size, input_reference",
                "requestBody": {"required": True, "content": {"application/json": {"schema": create_json},
                                                              "multipart/form-data": {"schema": create_form}}},
                "responses": _ok({"$ref": "#/components/schemas/Video"}, 400, 401, 413, 415, 429, 503)},
            "get": {
                "summary": "The caller's videos, newest first (order=asc: oldest first)",
                "parameters": [
                    {"name": "after", "in": "query", "required": False, "schema": ID,
                     "description": "the last id of the page before"},
                    {"name": "limit", "in": "query", "required": False,
                     "schema": {"type": "integer", "minimum": 1, "maximum": 100, "default": 20}},
                    {"name": "order", "in": "query", "required": False,
                     "schema": {"enum": ["asc", "desc"], "default": "desc"}}],
                "responses": _ok(listing, 400, 401, 404, 503)}},
        "/v1/videos/{reference_id}": {
            "get": {"summary": "One video", "parameters": [ref_param], "responses": video},
            "delete": {
                "summary": "Delete a video: its files and record (a queued or running one is canceled first)",
                "parameters": [ref_param],
                "responses": _ok({"type": "object", "required": ["id", "object", "deleted"], "properties": {
                    "id": ID, "object": {"const": "video.deleted"}, "deleted": {"const": True}}},
                    400, 401, 403, 404, 415, 503)}},
        "/v1/videos/{reference_id}/content": {"get": {
            "summary": "The MP4 (variant=video), the poster (thumbnail) or a JPEG grid of frames (spritesheet)",
            "parameters": [ref_param, {"name": "variant", "in": "query", "required": False,
                                       "schema": {"enum": ["video", "thumbnail", "spritesheet"], "default": "video"}}],
            "responses": {"200": {"description": "the file",
                                  "content": {"video/mp4": {}, "image/jpeg": {}}},
                          "206": {"description": "a byte range", "content": {"video/mp4": {}}},
                          "302": {"description": "redirect to a presigned URL"},
                          **_errors(400, 401, 404, 409, 416, 503)}}},
    }
