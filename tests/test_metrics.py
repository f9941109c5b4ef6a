"""GET /metrics: Prometheus text from the job store, read at each scrape, so an API process that runs no job
sees the jobs other processes ran; stage timings and GPU peaks as histograms; behind a key when keys are on."""

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.utils import floatToGoString as le

from config import Settings
from conftest import TINY_JOB, wait_for
from storage.jobs import StoreUnavailable, new_job

GiB = 2**30
WAIT_S = 300  # a loaded machine can be slow; nothing here is timed


def scrape(client, **headers) -> dict:
    """{(sample name, sorted labels): value} of one scrape, parsed by prometheus_client's own parser."""
    r = client.get("/metrics", headers=headers)
    assert r.status_code == 200 and r.mimetype == "text/plain", r.data[:200]
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(r.data.decode()) for s in family.samples}


def value(samples: dict, name: str, **labels) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def test_metrics_parse_and_move_as_jobs_run_in_another_process(make_app):
    api, svc = make_app(worker=False)  # this API process runs no job: a worker beside it does
    client = api.test_client()
    before = scrape(client)
    assert value(before, "t2v_queue_depth") == 0 and not [k for k in before if k[0].startswith("t2v_job")]

    refs = [client.post("/generate_video", json={**TINY_JOB, "upscale": False}).json["reference_id"]
            for _ in range(2)]
    queued = scrape(client)
    assert value(queued, "t2v_queue_depth") == 2
    assert value(queued, "t2v_jobs", status="queued", kind="generate", model="hunyuanvideo") == 2

    make_app(jobs=svc.jobs, blobs=svc.blobs)  # the worker, on the same stores
    wait_for(lambda: all(svc.jobs.get(r)["status"] == "completed" for r in refs), timeout=WAIT_S)
    after = scrape(client)
    assert value(after, "t2v_queue_depth") == 0
    assert value(after, "t2v_jobs", status="completed", kind="generate", model="hunyuanvideo") == 2
    assert value(after, "t2v_jobs", status="queued", kind="generate", model="hunyuanvideo") is None
    for stage in ("generate", "encode", "upload", "total"):
        labels = {"kind": "generate", "model": "hunyuanvideo", "stage": stage}
        assert value(after, "t2v_job_stage_seconds_count", **labels) == 2, stage
        assert value(after, "t2v_job_stage_seconds_bucket", le="+Inf", **labels) == 2
        recorded = sum(svc.jobs.get(r)["result"]["timings_s"][stage] for r in refs)
        assert value(after, "t2v_job_stage_seconds_sum", **labels) == pytest.approx(recorded)
        buckets = sorted((float(dict(k[1])["le"]), v) for k, v in after.items()
                         if k[0] == "t2v_job_stage_seconds_bucket" and dict(k[1])["stage"] == stage)
        assert [v for _, v in buckets] == sorted(v for _, v in buckets)  # cumulative
    assert not [k for k in after if k[0].startswith("t2v_job_gpu_peak_bytes")], "CPU jobs record no GPU peak"

    client.delete(f"/jobs/{refs[0]}")
    assert value(scrape(client), "t2v_jobs", status="completed", kind="generate", model="hunyuanvideo") == 1


def test_gpu_peaks_and_stage_timings_fill_the_right_buckets(make_app):
    app, svc = make_app(worker=False)
    for ref, peak, total in (("gpujob01", 3 * GiB, 0.3), ("gpujob02", 20 * GiB, 45.0), ("cpujob01", None, 7.0)):
        svc.jobs.create(new_job(ref, "s", "local", "generate", {"model": "wan2.2-ti2v-5b"}))
        svc.jobs.claim("w1", 30)
        result = {"timings_s": {"total": total, "bogus key!": 1.0, "note": "text"}}
        svc.jobs.complete(ref, "w1", {**result, **({"gpu_peak_bytes": peak} if peak else {})})
    svc.jobs.create(new_job("upscale1", "s", "local", "upscale", {}))
    got = scrape(app.test_client())

    peak = {"model": "wan2.2-ti2v-5b"}
    assert value(got, "t2v_job_gpu_peak_bytes_count", **peak) == 2
    assert value(got, "t2v_job_gpu_peak_bytes_sum", **peak) == 23 * GiB
    assert value(got, "t2v_job_gpu_peak_bytes_bucket", le=le(2 * GiB), **peak) == 0
    assert value(got, "t2v_job_gpu_peak_bytes_bucket", le=le(4 * GiB), **peak) == 1
    assert value(got, "t2v_job_gpu_peak_bytes_bucket", le=le(16 * GiB), **peak) == 1
    assert value(got, "t2v_job_gpu_peak_bytes_bucket", le=le(24 * GiB), **peak) == 2
    total = {"kind": "generate", "model": "wan2.2-ti2v-5b", "stage": "total"}
    assert [value(got, "t2v_job_stage_seconds_bucket", le=le(bound), **total) for bound in (0.25, 0.5, 5, 10, 60)] \
        == [0, 1, 1, 2, 3]
    assert {dict(k[1]).get("stage") for k in got if k[0] == "t2v_job_stage_seconds_count"} == {"total"}
    assert value(got, "t2v_jobs", status="queued", kind="upscale", model="") == 1


def test_metrics_need_a_key_unless_made_public(make_app):
    app, _ = make_app(worker=False, api_keys=("k1",))
    client = app.test_client()
    r = client.get("/metrics")
    assert r.status_code == 401 and r.json["error"]["code"] == "unauthorized"
    assert value(scrape(client, Authorization="Bearer k1"), "t2v_queue_depth") == 0

    public, _ = make_app(worker=False, api_keys=("k1",), metrics_public=True)
    assert value(scrape(public.test_client()), "t2v_queue_depth") == 0
    assert public.test_client().get("/jobs/whatever1").status_code == 401  # only /metrics is opened


def test_openmetrics_by_accept_and_a_store_fault_is_a_503(make_app, monkeypatch):
    app, svc = make_app(worker=False)
    client = app.test_client()
    r = client.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert r.mimetype == "application/openmetrics-text" and r.data.endswith(b"# EOF\n")

    def down():
        raise StoreUnavailable("job database unavailable: test")

    monkeypatch.setattr(svc.jobs, "job_counts", down)
    r = client.get("/metrics")
    assert r.status_code == 503 and r.json["error"]["code"] == "store_unavailable"


def test_the_worker_records_the_gpu_peak_of_a_job_run_on_cuda(make_app, monkeypatch):
    """No GPU here: torch.cuda's peak counters are stood in for, and the job's making; the worker's own code
    (reset before the job, read after, stored in the result) runs as it would on a GPU."""
    import torch

    from worker.loop import Worker

    _, svc = make_app(worker=False)
    calls = []
    monkeypatch.setattr(Settings, "device", property(lambda self: "cuda:0"))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device: calls.append(("reset", device)))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: calls.append(("peak", device)) or 5 * GiB)
    worker = Worker(svc.settings, svc.jobs, svc.blobs, models=object())
    monkeypatch.setattr(worker, "_produce", lambda job, lease: calls.append(("produce", None)) or
                        {"timings_s": {"total": 1.0}})
    svc.jobs.create(new_job("cudajob1", "s", "local", "generate", {"model": "hunyuanvideo"}))
    assert worker.run_once()
    assert calls == [("reset", "cuda:0"), ("produce", None), ("peak", "cuda:0")]
    assert svc.jobs.get("cudajob1")["result"] == {"timings_s": {"total": 1.0}, "gpu_peak_bytes": 5 * GiB}
