"""Worker groups on /health and /metrics, read from the job store; a group whose ranks cannot start says why once
and claims nothing; a hung rank ends its group on the collective timeout (T2V_GROUP_TIMEOUT_S)."""

import os
import signal
import subprocess
import sys

import jsonschema

from conftest import ROOT, wait_for
from test_crash import environment
from test_serving import free_port


def test_health_and_metrics_show_the_live_workers_and_groups_by_state(make_app):
    from storage.jobs import group_facts

    app, service = make_app(worker=False)
    client = app.test_client()
    assert client.get("/health").json["workers"] == []
    service.jobs.worker_seen("alone", ("generate", "upscale"), ["hunyuanvideo"], 24 * 2**30)
    service.jobs.worker_seen("g-ready", ("generate",), ["wan2.2-ti2v-5b"], 80 * 2**30,
                             group=group_facts(4, ["0", "1", "2", "3"], "ready"))
    service.jobs.worker_seen("g-failed", (), [], group=group_facts(2, ["4", "5"], "failed", "rank 1 failed: no NCCL"))
    health = client.get("/health")
    assert health.status_code == 200 and health.json["status"] == "ok" and health.json["queue_length"] == 0
    assert health.json["workers"] == [
        {"worker_id": "alone", "kinds": ["generate", "upscale"], "models": ["hunyuanvideo"], "gpu_bytes": 24 * 2**30,
         "group": None},
        {"worker_id": "g-failed", "kinds": [], "models": [], "gpu_bytes": None,
         "group": {"ranks": 2, "gpus": ["4", "5"], "state": "failed: rank 1 failed: no NCCL"}},
        {"worker_id": "g-ready", "kinds": ["generate"], "models": ["wan2.2-ti2v-5b"], "gpu_bytes": 80 * 2**30,
         "group": {"ranks": 4, "gpus": ["0", "1", "2", "3"], "state": "ready"}}]
    text = client.get("/metrics").get_data(as_text=True)
    for line in ("t2v_workers 3.0", 't2v_worker_groups{state="ready"} 1.0', 't2v_worker_groups{state="failed"} 1.0',
                 't2v_worker_groups{state="starting"} 0.0', 't2v_worker_group_ranks{state="ready"} 4.0',
                 't2v_worker_group_ranks{state="failed"} 2.0'):
        assert line in text.splitlines(), line
    components = client.get("/openapi.json").json["components"]
    validator = jsonschema.Draft202012Validator({"$ref": "#/components/schemas/Health", "components": components})
    validator.validate(health.json)  # the declared Health schema, workers and groups included
    assert set(components["schemas"]["LiveWorker"]["required"]) == set(health.json["workers"][0])
    bad = {**health.json, "workers": [{**health.json["workers"][1], "group": {"ranks": 2, "gpus": [], "state": "?"}}]}
    assert not validator.is_valid(bad), "the schema checks a group's state"


def test_with_keys_on_health_shows_a_stranger_the_states_but_no_worker_ids_or_faults(make_app):
    from storage.jobs import group_facts

    app, service = make_app(worker=False, api_keys=("k1",))
    client = app.test_client()
    service.jobs.worker_seen("host-a-4242", ("generate",), ["hunyuanvideo"], 80 * 2**30)
    service.jobs.worker_seen("host-b-77-group", (), [], group=group_facts(2, ["4", "5"], "failed",
                                                                          "rank 1 failed: gloo at 10.0.0.7:29500"))
    stranger, keyed = client.get("/health"), client.get("/health", headers={"Authorization": "Bearer k1"})
    assert stranger.status_code == keyed.status_code == 200
    assert [w["worker_id"] for w in stranger.json["workers"]] == [None, None]
    assert [w["worker_id"] for w in keyed.json["workers"]] == ["host-a-4242", "host-b-77-group"]
    assert stranger.json["workers"][1]["group"] == {"ranks": 2, "gpus": ["4", "5"],
                                                    "state": "failed: send an API key to see why"}
    assert b"host-" not in stranger.data and b"10.0.0.7" not in stranger.data and b"10.0.0.7" in keyed.data
    components = client.get("/openapi.json", headers={"Authorization": "Bearer k1"}).json["components"]
    jsonschema.Draft202012Validator({"$ref": "#/components/schemas/Health", "components": components}).validate(
        stranger.json)


def test_a_group_whose_ranks_cannot_start_says_why_once_on_health_and_claims_nothing(tmp_path, data_dir, tiny_model):
    """gloo cannot start on a network interface that does not exist (GLOO_SOCKET_IFNAME, read by each rank):
    the group's process tries again, logs the reason once, and its record says it, with no job kind."""
    from storage.jobs import new_job
    from storage.sqlite import SqliteJobStore

    os.symlink(data_dir / "tiny", tmp_path / "tiny")
    jobs = SqliteJobStore(tmp_path / "jobs.sqlite3")
    jobs.create(new_job("queued01", "s", "o", "generate", {"prompt": "a cat", "model": "tiny"}))
    log_path = tmp_path / "worker.log"
    env = {**environment(tmp_path, free_port()), "T2V_PARALLEL": "2", "GLOO_SOCKET_IFNAME": "t2v-nosuch0"}
    with open(log_path, "ab") as log:
        group = subprocess.Popen([sys.executable, str(ROOT / "worker.py")], cwd=tmp_path, env=env, stdout=log,
                                 stderr=subprocess.STDOUT)
    try:
        [record] = wait_for(lambda: [w for w in jobs.live_workers(30) if w["group"]
                                     and w["group"]["state"].startswith("failed")], timeout=120, every=0.2)
        assert record["kinds"] == [] and record["group"]["ranks"] == 2 and record["group"]["gpus"] == []
        assert "t2v-nosuch0" in record["group"]["state"], record["group"]["state"]
        # the second start (5 s later) fails the same way: torch ends its ranks again, the reason is not repeated
        wait_for(lambda: log_path.read_text().count("Terminating process") >= 2, timeout=120, every=0.2)
        text = log_path.read_text()
        assert text.count("its ranks could not start") == 1, text
        assert "Traceback" not in text
        assert jobs.get("queued01")["status"] == "queued" and jobs.get("queued01")["attempts"] == 0
    finally:
        group.send_signal(signal.SIGTERM)
        group.wait(60)
    assert group.returncode == 0
    assert jobs.live_workers(30) == [], "the group's record is removed when it stops"


def test_a_hung_rank_ends_the_group_on_the_collective_timeout_and_the_job_goes_back_through_its_lease(
        tmp_path, data_dir, tiny_model, tiny_upscalers):
    """SIGSTOP of rank 1 mid-job: rank 0's next collective fails after T2V_GROUP_TIMEOUT_S, rank 0 exits leaving the
    job alone, torch's spawn kills the stopped rank (SIGTERM waits on a stopped process; SIGKILL 30 s later) and the
    group's process exits 1 for the supervisor to restart; the job's lease lapses and it is queued again."""
    import re

    from conftest import TINY_JOB
    from storage.jobs import new_job
    from storage.sqlite import SqliteJobStore
    from test_crash import pid_alive

    os.symlink(data_dir / "tiny", tmp_path / "tiny")
    jobs = SqliteJobStore(tmp_path / "jobs.sqlite3")
    job = jobs.create(new_job("hung0001", "s", "o", "generate", {**TINY_JOB, "num_inference_steps": 40, "seed": 2}))
    log_path = tmp_path / "worker.log"
    env = {**environment(tmp_path, free_port()), "T2V_PARALLEL": "2", "T2V_GROUP_TIMEOUT_S": "3"}
    with open(log_path, "ab") as log:
        group = subprocess.Popen([sys.executable, str(ROOT / "worker.py")], cwd=tmp_path, env=env, stdout=log,
                                 stderr=subprocess.STDOUT)
    follower = None
    try:
        wait_for(lambda: (jobs.get(job["reference_id"])["progress"] or 0) > 0.05, timeout=300, every=0.05)
        [follower] = [int(p) for p in re.findall(r"rank 1 of 2 \(pid (\d+)\)", log_path.read_text())]
        os.kill(follower, signal.SIGSTOP)
        assert group.wait(120) == 1, "the group's process ends when a rank hangs"
    finally:
        if group.poll() is None:
            group.kill()
            group.wait()
        if follower and pid_alive(follower):
            os.kill(follower, signal.SIGKILL)
    text = log_path.read_text()
    assert re.search(r"job hung0001: the worker group broke \(.*\); left to its lease", text), text[-3000:]
    assert not pid_alive(follower), "the hung rank outlived its group"
    assert jobs.get("hung0001")["status"] == "processing", "the job is left to its lease, not failed"
    jobs.requeue_expired(3)  # as the next worker does: the lease (T2V_LEASE_S=2) ran out while rank 1 hung
    assert jobs.get("hung0001")["status"] == "queued" and jobs.get("hung0001")["attempts"] == 1


def test_a_group_names_the_gpus_the_supervisor_gave_it(monkeypatch):
    from types import SimpleNamespace

    from worker.group import group_gpus

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")  # the supervisor's second group of 4
    assert group_gpus(SimpleNamespace(device="cuda:0", parallel=4)) == ["4", "5", "6", "7"]
    assert group_gpus(SimpleNamespace(device="cpu", parallel=2)) == []
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")  # started by hand: the first N GPUs
    assert group_gpus(SimpleNamespace(device="cuda:0", parallel=2)) == ["0", "1"]
