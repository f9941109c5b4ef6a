"""Workers on nodes with different models share one queue: each claims only the jobs for models installed on its
node, and a queued job that no live worker takes says why in /get_status.

Each "node" here is a models folder holding one tiny build under its Hub folder name, as download.py lays out
real weights; the nodes share one SQLite job store and one blob store, as `python worker.py` nodes do."""

import dataclasses

import pytest

from config import Settings
from conftest import TINY_JOB, wait_for
from pipeline import models, tiny
from pipeline.spec import JobParams, Rules
from storage.blobs import LocalBlobStore
from storage.jobs import COMPLETED, QUEUED, SqliteJobStore, new_job
from worker.loop import Worker

WAN, HUNYUAN = "wan2.2-ti2v-5b", "hunyuanvideo"
JOB = {**TINY_JOB, "num_frames": 5, "upscale": False}


@pytest.fixture
def node(data_dir, tmp_path):
    """node(model_id) -> the Settings of a worker node whose models folder holds only that model (a tiny build)."""
    def make(model_id: str) -> Settings:
        models_dir = tmp_path / f"node-{model_id}" / "models"
        models_dir.mkdir(parents=True)
        (models_dir / models.MODELS[model_id].folder_name).symlink_to(tiny.tiny_model_dir(data_dir, model_id))
        return Settings.from_env(env={}, model=model_id, models_dir=models_dir, upscaler="none", worker="off",
                                 data_dir=tmp_path / f"node-{model_id}" / "data", lease_s=30.0)
    return make


@pytest.fixture
def shared(tmp_path):
    """The job store and blob store every node reaches."""
    return SqliteJobStore(tmp_path / "shared" / "jobs.sqlite3"), LocalBlobStore(tmp_path / "shared" / "blobs")


@pytest.fixture
def start():
    """start(settings, jobs, blobs) -> a running Worker, stopped after the test."""
    running = []

    def make(settings, jobs, blobs):
        worker = Worker(settings, jobs, blobs, poll_s=0.05).start()
        running.append(worker)
        return worker

    yield make
    for worker in running:
        worker.stop(timeout=120)


def queue(jobs, ref: str, model: str | None) -> dict:
    """A complete generation job for `model`; None stores it without one, as jobs were before models."""
    params = JobParams.from_dict({**JOB, "model": model or HUNYUAN}, Rules(tiny=True)).to_dict()
    if model is None:
        del params["model"]
    return jobs.create(new_job(ref, "s", "o", "generate", params))


def ended(jobs, refs) -> list[dict] | None:
    """The jobs, once every one has ended."""
    got = [jobs.get(ref) for ref in refs]
    return got if all(j["status"] in ("completed", "failed", "canceled") for j in got) else None


def test_each_node_claims_only_jobs_for_its_own_models(node, shared, start):
    jobs, blobs = shared
    wan_node, hunyuan_node = node(WAN), node(HUNYUAN)
    assert Worker(wan_node, jobs, blobs).served == (WAN,) and Worker(hunyuan_node, jobs, blobs).served == (HUNYUAN,)
    wanted = {"wan00001": WAN, "hun00002": HUNYUAN, "old00003": None, "wan00004": WAN}
    for ref, model in wanted.items():
        queue(jobs, ref, model)
    wan_worker = start(wan_node, jobs, blobs)
    wan_jobs = wait_for(lambda: ended(jobs, ["wan00001", "wan00004"]), timeout=600)
    assert [j["worker_id"] for j in wan_jobs] == [wan_worker.worker_id] * 2
    assert [jobs.get(r)["status"] for r in ("hun00002", "old00003")] == [QUEUED] * 2, "not the Wan node's to take"
    # Models load one at a time in one process (diffusers' meta-device loading patches torch globally); the
    # second node starts once the first has loaded, and both then serve the queue side by side.
    hunyuan_worker = start(hunyuan_node, jobs, blobs)
    queue(jobs, "wan00005", WAN)
    done = wait_for(lambda: ended(jobs, [*wanted, "wan00005"]), timeout=600)
    assert [j["status"] for j in done] == [COMPLETED] * 5, [j["error"] for j in done]
    takers = {j["reference_id"]: j["worker_id"] for j in done}
    assert takers == {"wan00001": wan_worker.worker_id, "hun00002": hunyuan_worker.worker_id,
                      "old00003": hunyuan_worker.worker_id, "wan00004": wan_worker.worker_id,
                      "wan00005": wan_worker.worker_id}
    assert all(j["result"]["frames"] == 5 and j["attempts"] == 1 for j in done)
    assert wan_worker.models.resident.endswith(WAN) and hunyuan_worker.models.resident.endswith(HUNYUAN)
    seen = {w["worker_id"]: w["models"] for w in jobs.live_workers(60)}
    assert seen == {wan_worker.worker_id: [WAN], hunyuan_worker.worker_id: [HUNYUAN]}


def test_a_stopped_worker_removes_its_record(node, shared):
    jobs, blobs = shared
    worker = Worker(node(HUNYUAN), jobs, blobs, poll_s=0.05).start()
    wait_for(lambda: jobs.live_workers(60), timeout=120)
    worker.stop(timeout=120)
    assert not worker.alive and jobs.live_workers(60) == []


def get_status(client, sub: dict) -> dict:
    r = client.post("/get_status", json={"session_id": sub["session_id"], "reference_id": sub["reference_id"]})
    assert r.status_code == 200, r.json
    return r.json


def test_a_queued_job_no_live_worker_takes_says_why_in_get_status(node, shared, start, tmp_path):
    """An API node without the worker (T2V_WORKER=off) queues any registry model; /get_status tells why it waits."""
    from app import create_app

    jobs, blobs = shared
    api = Settings.from_env(env={}, model="tiny", upscaler="none", worker="off", data_dir=tmp_path / "api")
    client = create_app(api, jobs=jobs, blobs=blobs).test_client()
    r = client.post("/generate_video", json={**JOB, "model": WAN})
    assert r.status_code == 200, r.json
    sub = r.json
    status = get_status(client, sub)
    assert status["status"] == QUEUED and status["stage"] == "waiting for a worker: none has reported in the last 30 s"
    assert set(status) == {"reference_id", "status", "stage", "progress", "queue_position", "eta_s", "error"}
    hunyuan_worker = start(node(HUNYUAN), jobs, blobs)
    wait_for(lambda: jobs.live_workers(60), timeout=120)
    status = get_status(client, sub)
    assert status["status"] == QUEUED and status["stage"] == f"waiting for a worker that serves {WAN}"
    assert client.get(f"/jobs/{sub['reference_id']}").json["stage"] == status["stage"]
    other = client.post("/generate_video", json={**JOB, "model": HUNYUAN}).json  # this one a live worker takes
    done = wait_for(lambda: (s := get_status(client, other))["status"] == COMPLETED and s, timeout=600)
    assert done["stage"] == COMPLETED and jobs.get(other["reference_id"])["worker_id"] == hunyuan_worker.worker_id
    assert get_status(client, sub)["stage"] == f"waiting for a worker that serves {WAN}"
    start(node(WAN), jobs, blobs)  # a node with the model joins: the job runs there
    assert wait_for(lambda: (s := get_status(client, sub))["status"] == COMPLETED and s, timeout=600)["error"] is None


def test_an_api_node_running_the_worker_refuses_a_model_it_lacks(node, shared, tmp_path):
    """T2V_WORKER=thread: the worker in this process is the one that would run the job, so a model it does not
    serve is refused at submission with a 400 naming it, and nothing is queued."""
    from app import create_app

    jobs, blobs = shared
    settings = dataclasses.replace(node(HUNYUAN), worker="thread")
    app = create_app(settings, jobs=jobs, blobs=blobs)
    worker = app.extensions["t2v"].worker
    try:
        assert worker is not None and worker.served == (HUNYUAN,)
        r = app.test_client().post("/generate_video", json={**JOB, "model": WAN})
        assert r.status_code == 400 and r.json["error"]["code"] == "invalid_parameter", r.json
        assert r.json["error"]["message"].startswith(f"model: {WAN} is not installed on this server "
                                                     f"(it serves: {HUNYUAN})")
        assert jobs.count_queued() == 0
    finally:
        worker.stop(timeout=120)
