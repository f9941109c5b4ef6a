"""Signed webhooks: where a job's webhook may point, and the dispatcher that delivers the outbox.

A job may name a `webhook_url` (and the `webhook_events` it wants). The URL is checked when the job is
submitted and again before every attempt, since a name can resolve elsewhere later (DNS rebinding): http or
https only, no credentials, and every address the host resolves to must be public, unless
T2V_WEBHOOK_ALLOW_PRIVATE is on (cloud metadata addresses stay refused even then). A delivery connects to
the address it checked, never follows a redirect, and is signed the Standard Webhooks way (the
`standardwebhooks` package) with T2V_WEBHOOK_SECRET.

The store writes one outbox row per event with the status change itself (storage/jobs.py). `Dispatcher`
threads, one in the API process and one in each `python worker.py` process, lease due rows, POST them, stop
at the first 2xx, and otherwise try again: after T2V_WEBHOOK_RETRY_S, then each wait twice as long, the last
try at T2V_WEBHOOK_RETRY_WINDOW_S after the event (by default 30 s, then 1, 2, 4, 8, 16 and 32 min, and 2 h
after the event: 9 tries). A row outlives a crash of any process: an unfinished lease runs out and another
dispatcher sends it.
"""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import json
import logging
import os
import secrets
import socket
import ssl
import threading
import time
from datetime import datetime, timezone
from urllib.parse import SplitResult, urlsplit

from standardwebhooks import Webhook

from config import Settings
from storage.jobs import COMPLETED, DELIVERED, GIVEN_UP, PENDING, WEBHOOK_EVENTS, OutboxStore, StoreUnavailable

log = logging.getLogger("t2v.webhooks")

EVENTS = WEBHOOK_EVENTS  # started, completed, failed, canceled
MAX_URL_CHARS = 2048
METADATA_ADDRESSES = {ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")}
FORBIDDEN = ("unspecified", "loopback", "link_local", "multicast", "reserved", "private")  # the most telling first
ALLOW_PRIVATE_HINT = "; T2V_WEBHOOK_ALLOW_PRIVATE=1 allows loopback and private addresses (development, a LAN)"
POLL_S = 1.0  # how often an idle dispatcher looks for due deliveries
PRUNE_EVERY_S = 600.0  # how often a dispatcher deletes the deliveries that ended over T2V_WEBHOOK_KEEP_S ago


class WebhookRefused(ValueError):
    """A webhook URL this server will not call; the message says why and is safe to show."""


# ---------------------------------------------------------------------------------------- where a webhook may point

def check_url(url, allow_private: bool) -> list:
    """The addresses `url` may be delivered to, or WebhookRefused. Resolves its host now."""
    if not isinstance(url, str) or not url or len(url) > MAX_URL_CHARS or not url.isprintable() or " " in url:
        raise WebhookRefused(f"webhook_url must be an http(s) URL of at most {MAX_URL_CHARS} characters")
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise WebhookRefused("webhook_url is not a valid URL") from None
    if parts.scheme not in ("http", "https"):
        raise WebhookRefused("webhook_url must be an http or https URL")
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise WebhookRefused("webhook_url must not carry credentials (user:password@)")
    if not parts.hostname:
        raise WebhookRefused("webhook_url has no host")
    return resolve(parts.hostname, port, allow_private)


def resolve(host: str, port: int, allow_private: bool) -> list:
    """Every address `host` resolves to, each one allowed; else WebhookRefused."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        raise WebhookRefused(f"webhook_url: the host {host} does not resolve") from None
    addresses = []
    for info in infos:
        address = ipaddress.ip_address(info[4][0].split("%", 1)[0])  # an IPv6 zone index is not part of it
        reason = refusal(address, allow_private)
        if reason:
            hint = "" if address in METADATA_ADDRESSES else ALLOW_PRIVATE_HINT
            raise WebhookRefused(f"webhook_url: the host {host} resolves to {reason} address ({address}){hint}")
        if address not in addresses:
            addresses.append(address)
    if not addresses:
        raise WebhookRefused(f"webhook_url: the host {host} does not resolve")
    return addresses


def refusal(address, allow_private: bool) -> str | None:
    """Why a delivery may not go to `address` ("a loopback", ...), or None."""
    if getattr(address, "ipv4_mapped", None):  # ::ffff:127.0.0.1 is 127.0.0.1
        address = address.ipv4_mapped
    if address in METADATA_ADDRESSES:
        return "a cloud metadata"
    if allow_private:
        return None
    for kind in FORBIDDEN:
        if getattr(address, f"is_{kind}"):
            return "an unspecified" if kind == "unspecified" else f"a {kind.replace('_', '-')}"
    return None if address.is_global else "a non-public"


# ---------------------------------------------------------------------------------------- what a delivery carries

def job_view(job: dict, queue_position: int = 0) -> dict:
    """A job as the API shows it (GET /jobs/<id>), built without Flask so a webhook carries the same view.
    Its links are the API's paths, unsigned: a receiver fetches the files with its key."""
    ref = job["reference_id"]
    view = {"session_id": job["session_id"], "kind": job["kind"], "reference_id": ref, "status": job["status"],
            "stage": job["stage"], "progress": job["progress"], "queue_position": queue_position,
            "eta_s": job["eta_s"], "error": job["error"], "params": job["params"], "created_at": job["created_at"],
            "started_at": job["started_at"], "finished_at": job["finished_at"], "result": None, "video_url": None,
            "poster_url": None, "events_url": f"/jobs/{ref}/events"}
    if job["status"] == COMPLETED and job["result"]:
        view["result"] = {k: v for k, v in job["result"].items() if not k.endswith("_key")}
        if job["result"].get("video_key"):  # an enhance job's result is a prompt, with no file
            view["video_url"], view["poster_url"] = f"/jobs/{ref}/video", f"/jobs/{ref}/poster"
    return view


def payload(delivery: dict) -> str:
    """The body, in the Standard Webhooks shape: {"type": "job.<event>", "timestamp", "data": the job view}."""
    at = datetime.fromtimestamp(delivery["created_at"], tz=timezone.utc).isoformat().replace("+00:00", "Z")
    return json.dumps({"type": f"job.{delivery['event']}", "timestamp": at, "data": job_view(delivery["job"])},
                      separators=(",", ":"))


def next_try(delivery: dict, now: float, settings: Settings) -> float | None:
    """When to try again after a failed attempt, or None to give up: the wait doubles from T2V_WEBHOOK_RETRY_S,
    and the last try is T2V_WEBHOOK_RETRY_WINDOW_S after the event."""
    deadline = delivery["created_at"] + settings.webhook_retry_window_s
    if now >= deadline:
        return None
    done = delivery["attempts"] + 1  # this attempt included
    return min(now + settings.webhook_retry_s * 2 ** min(done - 1, 30), deadline)


# ---------------------------------------------------------------------------------------- sending

class _PinnedHTTP(http.client.HTTPConnection):
    """Connects to the address that was checked, whatever the name resolves to now; Host is still the name."""

    def __init__(self, host: str, port: int, address, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self.address = str(address)

    def connect(self):
        self.sock = socket.create_connection((self.address, self.port), self.timeout)


class _PinnedHTTPS(http.client.HTTPSConnection):
    """As _PinnedHTTP, with TLS verified against the name (SNI and the certificate)."""

    def __init__(self, host: str, port: int, address, timeout: float):
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self.address = str(address)

    def connect(self):
        sock = socket.create_connection((self.address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


def post(url: str, body: str, headers: dict, timeout_s: float, allow_private: bool) -> int:
    """POST `body` to `url` and return the status code. The URL is checked again first; a redirect is an
    answer like any other. The whole attempt ends within `timeout_s`, however slowly the receiver answers."""
    parts: SplitResult = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    address = check_url(url, allow_private)[0]
    connection_class = _PinnedHTTPS if parts.scheme == "https" else _PinnedHTTP
    connection = connection_class(parts.hostname, port, address, timeout_s)
    cut = threading.Event()
    deadline = threading.Timer(timeout_s, _cut, args=(connection, cut))  # a timeout per read lets a trickle on
    deadline.start()
    try:
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        connection.request("POST", target, body=body.encode(), headers=headers)
        status = connection.getresponse().status  # the body is not read
    finally:
        deadline.cancel()
        connection.close()
    if cut.is_set():  # what was read before the cut may look like an answer; it is not one
        raise TimeoutError(f"no whole answer within {timeout_s:g} s")
    return status


def _cut(connection: http.client.HTTPConnection, cut: threading.Event) -> None:
    """End an attempt past its deadline: a shut-down socket wakes the read blocked on it."""
    cut.set()
    sock = connection.sock
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


class Dispatcher:
    """Sends due deliveries from the outbox, one at a time, in a thread of this process."""

    def __init__(self, settings: Settings, jobs: OutboxStore, poll_s: float | None = None):
        self.settings = settings
        self.jobs = jobs
        self.poll_s = poll_s or POLL_S
        self.signer = Webhook(settings.webhook_secret)
        self.dispatcher_id = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self.lease_s = 2 * settings.webhook_timeout_s + 5  # an attempt ends well inside its lease
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> "Dispatcher":
        self._thread = threading.Thread(target=self.run_forever, name="t2v-webhooks", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Stop after the attempt under way (at most T2V_WEBHOOK_TIMEOUT_S); its row stays for the next start."""
        self._stop.set()
        if self._thread:
            self._thread.join(timeout)

    def run_forever(self) -> None:
        next_prune = time.monotonic()
        while not self._stop.is_set():
            try:
                if time.monotonic() >= next_prune:
                    next_prune = time.monotonic() + PRUNE_EVERY_S
                    self.prune()
                sent = self.run_once()
            except StoreUnavailable as exc:
                log.warning("job store unavailable (%s); webhook deliveries wait", exc)
                sent = False
            except Exception:  # a bug must not end deliveries for good
                log.exception("webhook dispatcher error")
                sent = False
            if not sent:
                self._stop.wait(self.poll_s)

    def prune(self) -> int:
        """Delete the deliveries that ended more than T2V_WEBHOOK_KEEP_S ago, so the outbox stays bounded."""
        removed = self.jobs.prune_deliveries(finished_before=time.time() - self.settings.webhook_keep_s)
        if removed:
            log.info("pruned %d webhook deliveries that ended over %.0fs ago", removed, self.settings.webhook_keep_s)
        return removed

    def run_once(self) -> bool:
        """Send one due delivery and record the attempt; False when none was due."""
        delivery = self.jobs.claim_delivery(self.dispatcher_id, self.lease_s)
        if delivery is None:
            return False
        status, error = self.attempt(delivery)
        now = time.time()
        host = urlsplit(delivery["url"]).hostname  # logged instead of the URL, whose query may hold a token
        if status is not None and 200 <= status < 300:
            self.jobs.record_attempt(delivery["id"], self.dispatcher_id, DELIVERED, status, None)
            log.info("webhook %s to %s: delivered (HTTP %d)", delivery["id"], host, status)
            return True
        retry_at = next_try(delivery, now, self.settings)
        state = PENDING if retry_at is not None else GIVEN_UP
        self.jobs.record_attempt(delivery["id"], self.dispatcher_id, state, status, error, next_at=retry_at)
        if retry_at is None:
            log.warning("webhook %s to %s: given up after %d attempts over %.0f s; last: %s", delivery["id"], host,
                        delivery["attempts"] + 1, now - delivery["created_at"], error)
        else:
            log.info("webhook %s to %s: attempt %d failed (%s); next in %.1f s", delivery["id"], host,
                     delivery["attempts"] + 1, error, retry_at - now)
        return True

    def attempt(self, delivery: dict) -> tuple[int | None, str | None]:
        """(status code or None, what went wrong or None): one signed POST."""
        body = payload(delivery)
        sent_at = datetime.now(tz=timezone.utc)
        headers = {"Content-Type": "application/json", "User-Agent": "t2v-webhooks",
                   "webhook-id": delivery["id"], "webhook-timestamp": str(int(sent_at.timestamp())),
                   "webhook-signature": self.signer.sign(delivery["id"], sent_at, body)}
        try:
            status = post(delivery["url"], body, headers, self.settings.webhook_timeout_s,
                          self.settings.webhook_allow_private)
        except WebhookRefused as exc:
            return None, str(exc)
        except (OSError, http.client.HTTPException) as exc:  # refused, reset, timed out, TLS, a broken answer
            return None, f"{type(exc).__name__}: {exc}"[:300]
        return status, None if 200 <= status < 300 else f"HTTP {status}"
