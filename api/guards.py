"""Who may call, and what a request may carry: hooks that run before (and after) every route.

Host allow-list (DNS rebinding), cross-site refusal and CORS, body types, API keys and signed links,
and the body-size limits per route.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from urllib.parse import urlsplit

from flask import Flask, g, request

from api.service import ApiError, generate_body_limit, signature, svc
from config import Settings

PUBLIC_ENDPOINTS = {"jobs.health", "static", "jobs.index"}  # everything else needs a key when keys are on


SIGNED_ENDPOINTS = {"jobs.job_video", "jobs.job_poster", "events.job_events", "events.job_preview"}


EXPIRES_PATTERN = re.compile(r"[0-9]{1,12}")  # ASCII digits only: "²".isdigit() is True, and int() refuses it


SIG_PATTERN = re.compile(r"[0-9a-f]{64}")


HOST_HEADER = re.compile(r"(?P<name>[a-z0-9.-]+|\[[0-9a-f:.]+\])(?::[0-9]{1,5})?", re.IGNORECASE)


STATE_CHANGING = {"POST", "PUT", "PATCH", "DELETE"}


# The routes that take an image: JSON with a data: URI, or a multipart form with the file.
IMAGE_ROUTES = ("classic.generate_video", "v1.create_video", "jobs.enhance_prompt")
BODY_TYPES = {"classic.upscale_video": ("multipart/form-data",),
              **{route: ("application/json", "multipart/form-data") for route in IMAGE_ROUTES}}


CORS_ALLOW_HEADERS = "Authorization, Content-Type, Idempotency-Key, X-API-Key"


def _check_host():
    """Answer only to the Host names allowed (T2V_ALLOWED_HOSTS), so a page cannot reach a loopback server
    under a name of its own (DNS rebinding)."""
    trusted = svc().settings.trusted_hosts
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
    return bool(origin) and origin.lower() in {o.lower() for o in svc().settings.cors_origins}


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
    if not svc().settings.cors_origins:
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
    """With T2V_API_KEYS set, every route but /health and the page needs a key (or, for a video, poster,
    event stream or preview, a signed link: <video>, <img> and EventSource cannot send a header); /metrics
    too, unless T2V_METRICS_PUBLIC is on. The owner of a job is a hash of the key that made it. A CORS
    preflight (OPTIONS) never carries a key and changes nothing."""
    settings = svc().settings
    keys = settings.api_keys
    public = request.endpoint in PUBLIC_ENDPOINTS or (request.endpoint == "metrics.metrics" and settings.metrics_public)
    if public or request.method == "OPTIONS" or not keys:
        g.owner = "local"
        return None
    if request.endpoint in SIGNED_ENDPOINTS and "sig" in request.args:
        if not _signature_valid():
            raise ApiError(401, "invalid_signature", "this link is invalid or has expired")
        g.owner, g.signed_ref = None, request.view_args["reference_id"]
        return None
    g.owner = key_owner(keys)
    if g.owner is None:
        raise ApiError(401, "unauthorized", "a valid API key is required (Authorization: Bearer <key> or X-API-Key)")
    return None


def key_owner(keys) -> str | None:
    """The owner the request's API key stands for (a hash of the key), or None when it sends no valid one."""
    auth = request.headers.get("Authorization", "")
    key = auth[7:].strip() if auth.lower().startswith("bearer ") else request.headers.get("X-API-Key", "")
    key_bytes = key.encode("utf-8", "surrogatepass")
    if not key or not any(hmac.compare_digest(key_bytes, k.encode()) for k in keys):
        return None
    return "key:" + hashlib.sha256(key_bytes).hexdigest()[:16]


def _signature_valid() -> bool:
    expires, sig = request.args.get("expires", ""), request.args.get("sig", "")
    if not EXPIRES_PATTERN.fullmatch(expires) or not SIG_PATTERN.fullmatch(sig) or int(expires) < time.time():
        return False
    expected = signature(request.endpoint, request.view_args["reference_id"], int(expires))
    return hmac.compare_digest(expected, sig)


def upload_body_limit(settings: Settings) -> int:
    return settings.max_upload_mb * 2**20 + 64 * 1024  # room for the form fields


def largest_body(settings: Settings) -> int:
    """The largest body any route takes. The HTTP server's own cap (app.py) sits above it, so that a body a
    route allows is never refused before the app sees it, and one over a route's cap gets the app's JSON 413."""
    return max(upload_body_limit(settings), generate_body_limit(settings), settings.max_body_kb * 1024)


def _upload_limit():
    """Uploads get their own, larger body limit (T2V_MAX_UPLOAD_MB); JSON bodies keep T2V_MAX_BODY_KB, with
    room for an image on the routes that take one."""
    if request.endpoint == "classic.upscale_video":
        request.max_content_length = upload_body_limit(svc().settings)
    elif request.endpoint in IMAGE_ROUTES:
        request.max_content_length = generate_body_limit(svc().settings)


def install(app: Flask) -> None:
    """The hooks, in the order they must run: a refused Host or site learns nothing about keys."""
    app.before_request(_check_host)
    app.before_request(_refuse_cross_site)
    app.before_request(_check_body_type)
    app.before_request(_authenticate)
    app.before_request(_upload_limit)
    app.after_request(_cors_headers)
