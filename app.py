"""The t2v REST API: `create_app(settings=None)` builds Flask over one blueprint per face of the API
(api/classic.py: the original routes; api/jobs.py: /jobs, /models, /health, the page; api/v1.py: OpenAI's
/v1/videos; api/events.py: live events and previews; api/metrics.py: /metrics), all calling one service layer
(api/service.py), behind the request guards of api/guards.py.

    python app.py                                   # waitress on 127.0.0.1:7866, SQLite, local files, thread worker
    gunicorn -c gunicorn.conf.py 'app:create_app()' # the same app under gunicorn (one process, threads)
"""

from __future__ import annotations

import argparse
import logging
import secrets
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path

import waitress
from flask import Flask, jsonify, request
from werkzeug.exceptions import HTTPException

from api import classic, events, guards, jobs as job_routes, metrics, v1
from api.service import ApiError, Service, svc
from config import ENV_NAMES, WORKER_MODES, Settings, settings_or_exit
from pipeline.cli import ArgumentParser
from storage.blobs import BlobStore, open_blob_store
from storage.jobs import JobStore, StoreUnavailable, open_job_store
from webhooks import Dispatcher
from worker.loop import Worker

log = logging.getLogger("t2v.api")


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
    if settings.webhook_secret:  # without it no job has a webhook (400), so there is nothing to send
        app.extensions["t2v_webhooks"] = Dispatcher(settings, jobs).start()
    _register_errors(app)
    guards.install(app)
    app.register_blueprint(classic.bp)
    app.register_blueprint(job_routes.bp)
    app.register_blueprint(v1.bp)
    app.register_blueprint(events.bp)
    app.register_blueprint(metrics.bp)
    return app


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
            settings = svc().settings
            limit = {"classic.upscale_video": f"{settings.max_upload_mb} MB",
                     "classic.generate_video": f"{settings.max_body_kb} KB with an image of {settings.max_image_mb} MB",
                     "v1.create_video": f"{settings.max_body_kb} KB with an image of {settings.max_image_mb} MB",
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
    signal.signal(signal.SIGTERM, _stop)
    log.info("t2v on http://%s:%d (waitress, %d threads; model %s)",
             settings.host, settings.port, settings.threads, settings.model)
    try:
        server.run()
    finally:
        if "t2v_webhooks" in app.extensions:
            app.extensions["t2v_webhooks"].stop(timeout=settings.webhook_timeout_s + 5)
    return 0


def _stop(signum, frame):
    """SIGTERM: open event streams end now (their clients resume with Last-Event-ID, here after a restart or on
    another node), so waitress's shutdown does not wait on them; server.run() stops on SystemExit."""
    events.closing.set()
    sys.exit(0)


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
