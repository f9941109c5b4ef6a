"""GET /metrics: Prometheus text (or OpenMetrics, by the Accept header), made with prometheus_client.

Every figure is read from the job store when Prometheus scrapes, by a custom collector, not counted in this
process: so it is right whichever process ran the jobs (the worker thread, `python worker.py` on GPU nodes,
several gunicorn processes), and a restart loses nothing. Every API process therefore reports the same
totals: scrape one, or combine API nodes with max(), never sum().

- `t2v_jobs{status,kind,model}`: job records in each status (a gauge: a deleted job leaves it);
- `t2v_jobs_submitted_total{kind,model}` and `t2v_jobs_finished_total{status,kind,model}`: counters the store
  keeps with each submit and each end (on SQLite in the same transaction, by trigger), so they never go down,
  whichever process made the change;
- `t2v_queue_depth`: jobs waiting for a worker;
- `t2v_job_stage_seconds{kind,model,stage}`: the stage timings the worker recorded in each completed job's
  result (generate, upscale or encode, encode_thread, upload, total, ...), as histograms;
- `t2v_job_gpu_peak_bytes{model}`: torch.cuda.max_memory_allocated over each job run on a GPU (CPU jobs
  record none);
- `t2v_workers`: worker records seen in the last 30 s (a worker group counts once, by its rank 0);
- `t2v_worker_groups{state}` and `t2v_worker_group_ranks{state}`: live worker groups, and their ranks, by state
  (`starting`, `ready`, `failed`: its ranks could not start; the reason is on /health);
- `t2v_webhook_deliveries{state}` and `t2v_webhook_failed_attempts_total`: the webhook outbox;
- `t2v_sse_streams_open`: the one figure of this process alone, the event streams it holds open.
The histograms are rebuilt from the completed records at each scrape, one small query each, so a scrape
costs time in proportion to the completed jobs kept. Deleting a completed job takes it out of them, which
Prometheus reads as a counter reset: rate() and increase() over that one scrape interval then over-count.
"""

from __future__ import annotations

import bisect
import re

from flask import Blueprint, Response, request
from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.utils import floatToGoString

from api.events import open_streams
from api.service import svc
from storage.jobs import GROUP_FAILED, GROUP_READY, GROUP_STARTING, QUEUED, WORKER_LIVE_S, JobStore, group_state

bp = Blueprint("metrics", __name__)

STAGE_BUCKETS_S = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200)
GPU_BUCKETS_BYTES = tuple(gib * 2**30 for gib in (1, 2, 4, 8, 12, 16, 24, 32, 40, 48, 64, 80, 96, 128, 192))
STAGE_NAME = re.compile(r"[a-z0-9_]{1,40}")  # the worker's timing keys; anything else in a record is skipped


@bp.get("/metrics")
def metrics():
    registry = CollectorRegistry()
    registry.register(JobStoreCollector(svc().jobs))
    streams = Gauge("t2v_sse_streams_open", "Event streams open in this API process", registry=registry)
    streams.set(open_streams())
    encode, content_type = choose_encoder(request.headers.get("Accept", ""))
    return Response(encode(registry), content_type=content_type)


class JobStoreCollector:
    """The job store's figures as metric families, queried at each `collect()` (one scrape)."""

    def __init__(self, jobs: JobStore):
        self.jobs = jobs

    def collect(self):
        counts = GaugeMetricFamily("t2v_jobs", "Job records by status, kind and model (empty for upscale jobs)",
                                   labels=["status", "kind", "model"])
        queued = 0
        for status, kind, model, count in sorted(self.jobs.job_counts(), key=str):
            counts.add_metric([status, kind, model or ""], count)
            queued += count if status == QUEUED else 0
        yield counts
        yield GaugeMetricFamily("t2v_queue_depth", "Jobs waiting for a worker", value=queued)
        yield from _total_families(self.jobs.job_totals())

        stages: dict[tuple[str, ...], list[float]] = {}
        peaks: dict[tuple[str, ...], list[float]] = {}
        for kind, model, timings, gpu_peak in self.jobs.completed_stats():
            for stage, seconds in timings.items():
                if STAGE_NAME.fullmatch(stage) and isinstance(seconds, (int, float)):
                    stages.setdefault((kind, model or "", stage), []).append(seconds)
            if isinstance(gpu_peak, (int, float)):
                peaks.setdefault((model or "",), []).append(gpu_peak)
        yield _histogram("t2v_job_stage_seconds", "Seconds each stage of a completed job took, as its worker "
                         "recorded them", ["kind", "model", "stage"], stages, STAGE_BUCKETS_S)
        yield _histogram("t2v_job_gpu_peak_bytes", "Peak GPU memory allocated by torch while a job ran, "
                         "jobs run on a GPU only", ["model"], peaks, GPU_BUCKETS_BYTES)
        yield from _webhook_families(self.jobs.webhook_counts())
        yield from _worker_families(self.jobs.live_workers(WORKER_LIVE_S))


def _worker_families(live: list[dict]):
    """The live workers, and the worker groups among them by state: every state is written, 0 included."""
    states = (GROUP_STARTING, GROUP_READY, GROUP_FAILED)
    groups, ranks = dict.fromkeys(states, 0), dict.fromkeys(states, 0)
    for record in live:
        if record.get("group") and group_state(record["group"]) in groups:
            groups[group_state(record["group"])] += 1
            ranks[group_state(record["group"])] += record["group"]["ranks"]
    yield GaugeMetricFamily("t2v_workers", "Workers that reported in the last 30 s (a worker group once)",
                            value=len(live))
    for name, text, figures in (("t2v_worker_groups", "Live worker groups by state", groups),
                                ("t2v_worker_group_ranks", "Ranks of the live worker groups by state", ranks)):
        family = GaugeMetricFamily(name, text, labels=["state"])
        for state in states:
            family.add_metric([state], figures[state])
        yield family


def _total_families(totals):
    """The store's monotonic counters: jobs submitted, and jobs finished by status (deleting a job lowers neither)."""
    submitted = CounterMetricFamily("t2v_jobs_submitted", "Jobs submitted, by kind and model (empty for upscale "
                                    "jobs)", labels=["kind", "model"])
    finished = CounterMetricFamily("t2v_jobs_finished", "Jobs that ended, by status (completed, failed, "
                                   "canceled), kind and model", labels=["status", "kind", "model"])
    for counter, status, kind, model, n in sorted(totals, key=str):
        if counter == "submitted":
            submitted.add_metric([kind, model or ""], n)
        else:
            finished.add_metric([status, kind, model or ""], n)
    yield submitted
    yield finished


def _webhook_families(counts: dict):
    """The outbox's figures: deliveries by state, and every attempt that got no 2xx."""
    deliveries = GaugeMetricFamily("t2v_webhook_deliveries", "Webhook deliveries on record by state "
                                   "(delivered, pending, given_up)", labels=["state"])
    for state in ("delivered", "pending", "given_up"):
        deliveries.add_metric([state], counts[state])
    yield deliveries
    yield CounterMetricFamily("t2v_webhook_failed_attempts", "Webhook delivery attempts that got no 2xx answer",
                              value=counts["failed_attempts"])


def _histogram(name: str, documentation: str, labels: list[str], samples: dict[tuple[str, ...], list[float]],
               bounds: tuple[float, ...]) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, documentation, labels=labels)
    for label_values, values in sorted(samples.items()):
        values = sorted(values)
        buckets = [(floatToGoString(bound), bisect.bisect_right(values, bound)) for bound in bounds]
        family.add_metric(list(label_values), [*buckets, ("+Inf", len(values))], sum_value=sum(values))
    return family
