"""gunicorn settings for t2v:  gunicorn -c gunicorn.conf.py 'app:create_app()'

One process with threads. The job worker (T2V_WORKER=thread) lives inside that process and owns
the GPU, so a second process would load a second copy of the model onto the same GPU; gunicorn
refuses to start that way. To serve more requests, run API processes with T2V_WORKER=off and
`python worker.py` on the GPU nodes, all sharing MongoDB and S3.

gunicorn's gthread worker reads a request inside a request thread, so a client that stalls mid-request
holds that thread (BENCHMARKS.md: T2V_THREADS stalled clients leave /health unanswered). Put a
proxy that buffers whole requests (nginx) in front of it; `python app.py` (waitress) needs none.
"""

from config import Settings

_settings = Settings.from_env()

bind = f"{_settings.host}:{_settings.port}"
workers = 1
worker_class = "gthread"
threads = _settings.threads
preload_app = False  # the model and the worker thread start inside the serving process, after the fork
timeout = 120  # a busy model must not get the request process killed as "stuck"
graceful_timeout = 30
keepalive = _settings.client_timeout_s  # idle kept-alive connections wait in the poller, not in a thread
accesslog = "-"
# Never log request headers (API keys) or query strings (signed links): the method and path only.
access_log_format = '%(h)s "%(m)s %(U)s" %(s)s %(b)s %(L)ss'


def on_starting(server):
    """Refuse more than one worker process while each process would run its own GPU worker."""
    if server.cfg.workers > 1 and _settings.worker == "thread":
        raise RuntimeError(
            f"t2v: {server.cfg.workers} gunicorn workers with T2V_WORKER=thread would load the model "
            "once per process; use one worker with threads, or set T2V_WORKER=off and run python worker.py"
        )
