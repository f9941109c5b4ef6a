"""`python worker.py`: its flags, one worker process per GPU (or N on the CPU) under a supervisor that
restarts a dead one, the upscaler check at start, and the sweep of what dead workers left behind."""

import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from conftest import ROOT, TINY_JOB, wait_for
from config import Settings
from storage.jobs import new_job
from storage.sqlite import SqliteJobStore
from worker.cli import WORKER_FLAGS
from worker.gpus import cpu_slots, gpu_slots, group_slots
from worker.loop import Worker

# About a second each on a quiet machine: longer than a worker's poll (0.5 s).
FAST_JOB = {**TINY_JOB, "width": 96, "height": 96, "num_frames": 17, "num_inference_steps": 6, "seed": 1}


def run_worker_py(*args, cwd, env=None, timeout=120):
    env = {k: v for k, v in {**os.environ, **(env or {})}.items() if not k.startswith("T2V_") or k in (env or {})}
    return subprocess.run([sys.executable, str(ROOT / "worker.py"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def queue(jobs, n, prefix):
    from pipeline.spec import JobParams

    params = JobParams.from_dict(FAST_JOB).to_dict()
    refs = [f"{prefix}-{i:04d}" for i in range(n)]
    for ref in refs:
        jobs.create(new_job(ref, "s", "local", "generate", params))
    return refs


# ---------------------------------------------------------------------------------------- flags

def test_help_exits_0_without_touching_the_data_folder_or_the_queue(tmp_path):
    jobs = SqliteJobStore(tmp_path / "shared" / "jobs.sqlite3")
    queue(jobs, 1, "waiting")
    before = sorted(p.name for p in (tmp_path / "shared").iterdir())
    proc = run_worker_py("--help", cwd=tmp_path, env={"T2V_DATA_DIR": str(tmp_path / "shared")})
    assert proc.returncode == 0 and proc.stderr == ""
    for text in ("--gpus", "--cpu-workers", "--model", "$T2V_MODEL", "--data-dir", "$T2V_DATA_DIR",
                 "$CUDA_DEVICE_ID", "--lease-s", "MONGODB_URI", "BUCKET_NAME"):
        assert text in proc.stdout, text
    help_text = " ".join(proc.stdout.split())
    assert help_text.count("default:") == len(WORKER_FLAGS), "each default is shown once"
    assert "default: None" not in help_text and "($T2V_DATA_DIR; default: ./data)" in help_text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shared"], "no ./data was made"
    assert sorted(p.name for p in (tmp_path / "shared").iterdir()) == before
    assert jobs.get("waiting-0000")["status"] == "queued", "nothing was claimed"


@pytest.mark.parametrize("args, reason", [
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--cpu-workers", "0"], "argument --cpu-workers: must be a whole number from 1 to 9999, got '0'"),
    (["--cpu-workers", "²"], "argument --cpu-workers: must be a whole number"),
    (["--gpus", "0,x"], "--gpus takes 'all' or GPU indices like 0,1,2,3 or 0-7, got '0,x'"),
    (["--cpu-workers", "3", "--parallel", "2"], "--parallel 2: 3 slot(s) do not split into groups of 2"),
    (["--parallel", "0"], "--parallel must be at least 1, got 0"),
    (["--gpus", "0", "--cpu-workers", "2"], "not allowed with argument"),
    (["--memory", "lots"], "argument --memory: invalid choice: 'lots'"),
    (["--lease-s", "0"], "--lease-s must be positive, got 0.0"),
    (["--crf", "99"], "--crf must be between 0 and 51, got 99"),
])
def test_a_bad_flag_exits_2_with_one_line(tmp_path, args, reason):
    proc = run_worker_py(*args, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("worker.py: error:") and reason in proc.stderr
    assert not list(tmp_path.iterdir()), "nothing was made"


def test_gpus_pins_one_worker_to_each_gpu():
    assert gpu_slots("all", ["0", "1", "2", "3"]) == [
        (f"gpu {i}", {"CUDA_VISIBLE_DEVICES": str(i), "CUDA_DEVICE_ID": "0"}) for i in range(4)]
    # Indices count within the GPUs this process may see (an outer CUDA_VISIBLE_DEVICES=4,5,6,7).
    assert [env["CUDA_VISIBLE_DEVICES"] for _, env in gpu_slots("1,3", ["4", "5", "6", "7"])] == ["5", "7"]
    for spec, visible, reason in (("all", [], "no CUDA GPU is visible"), ("0", [], "there is no GPU 0"),
                                  ("4", ["0", "1", "2", "3"], "there is no GPU 4; 4 visible"),
                                  ("0,0", ["0", "1"], "names a GPU twice"), ("", ["0"], "GPU indices like")):
        with pytest.raises(ValueError, match=reason):
            gpu_slots(spec, visible)


def test_parallel_makes_one_group_per_n_gpus_each_seeing_its_own():
    """--gpus 0-3 --parallel 2: two groups; each group's process sees its 2 GPUs (rank r drives the r-th)."""
    assert [env["CUDA_VISIBLE_DEVICES"] for _, env in gpu_slots("0-3", ["0", "1", "2", "3"])] == ["0", "1", "2", "3"]
    assert group_slots(gpu_slots("0-3", ["4", "5", "6", "7"]), 2) == [
        ("gpus 4,5", {"CUDA_VISIBLE_DEVICES": "4,5", "CUDA_DEVICE_ID": "0", "T2V_PARALLEL": "2"}),
        ("gpus 6,7", {"CUDA_VISIBLE_DEVICES": "6,7", "CUDA_DEVICE_ID": "0", "T2V_PARALLEL": "2"})]
    assert group_slots(cpu_slots(2), 2) == [
        ("cpu group 0", {"CUDA_VISIBLE_DEVICES": "", "CUDA_DEVICE_ID": "", "T2V_PARALLEL": "2"})]


# ---------------------------------------------------------------------------------------- processes

def start_supervisor(data_dir: Path, log, *args):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "T2V_MODEL": "tiny", "T2V_UPSCALER": "tiny",
           "T2V_DATA_DIR": str(data_dir), "T2V_LEASE_S": "3"}
    return subprocess.Popen([sys.executable, str(ROOT / "worker.py"), *args], cwd=data_dir, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


def stop_group(proc, timeout=120):
    """SIGTERM the supervisor and wait; if it hangs, kill its whole process group (its workers too)."""
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return proc.wait()


def started_pids(log_path: Path) -> list[int]:
    return [int(m) for m in re.findall(r"worker started \(pid (\d+)\)", log_path.read_text())]


def ready_pids(log_path: Path) -> list[int]:
    return [int(m) for m in re.findall(r"\[(\d+)\]: worker \S+: ready for jobs", log_path.read_text())]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_two_cpu_workers_share_the_queue_restart_when_killed_and_stop_on_sigterm(tmp_path, data_dir, tiny_model,
                                                                              tiny_upscalers):
    os.symlink(data_dir / "tiny", tmp_path / "tiny")  # the session's tiny models
    jobs = SqliteJobStore(tmp_path / "jobs.sqlite3")
    log_path = tmp_path / "workers.log"
    with open(log_path, "ab") as log:
        supervisor = start_supervisor(tmp_path, log, "--cpu-workers", "2")
        try:
            wait_for(lambda: len(ready_pids(log_path)) == 2, timeout=300, every=0.2)
            assert sorted(ready_pids(log_path)) == sorted(started_pids(log_path))

            # Two jobs run at once, each on its own worker. Each job takes longer than a worker's poll,
            # so both idle workers have claimed one before the first ends.
            refs = queue(jobs, 2, "first")

            def two_running():
                running = [j for j in map(jobs.get, refs) if j["status"] == "processing"]
                return len({j["worker_id"] for j in running}) == 2

            wait_for(two_running, timeout=120, every=0.02)
            wait_for(lambda: all(jobs.get(r)["status"] == "completed" for r in refs), timeout=300, every=0.2)
            done = [jobs.get(r) for r in refs]
            assert [j["attempts"] for j in done] == [1] * len(refs), "no job was run twice"
            assert {int(j["worker_id"].rsplit("-", 2)[1]) for j in done} == set(started_pids(log_path))
            completions = Counter(re.findall(r"job (\S+): completed in", log_path.read_text()))
            assert completions == Counter({r: 1 for r in refs})

            # kill -9 a worker: the supervisor starts another in its place.
            first = started_pids(log_path)
            os.kill(first[0], signal.SIGKILL)
            wait_for(lambda: len(ready_pids(log_path)) == 3, timeout=300, every=0.2)
            assert log_path.read_text().count("exited with code -9") == 1
            replacement = started_pids(log_path)[2]
            assert replacement not in first and ready_pids(log_path)[2] == replacement and pid_alive(first[1])
        finally:
            returncode = stop_group(supervisor)
    assert returncode == 0
    assert not any(pid_alive(pid) for pid in started_pids(log_path)), "every worker stopped with the supervisor"
    assert "all workers stopped" in log_path.read_text() and "Traceback" not in log_path.read_text()


def gone(pid: int) -> bool:
    """Exited: no such process, or a zombie that nobody has reaped yet (its parent is gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):
        return True


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")
def test_workers_end_when_their_supervisor_is_killed_with_kill_9(tmp_path, data_dir, tiny_model, tiny_upscalers):
    os.symlink(data_dir / "tiny", tmp_path / "tiny")
    log_path = tmp_path / "workers.log"
    with open(log_path, "ab") as log:
        supervisor = start_supervisor(tmp_path, log, "--cpu-workers", "2")
        try:
            wait_for(lambda: len(ready_pids(log_path)) == 2, timeout=300, every=0.2)
            children = started_pids(log_path)
            os.kill(supervisor.pid, signal.SIGKILL)
            supervisor.wait()
            wait_for(lambda: all(gone(pid) for pid in children), timeout=60, every=0.1)
        finally:
            try:
                os.killpg(supervisor.pid, signal.SIGKILL)  # whatever is left of the group, whatever happened
            except ProcessLookupError:
                pass


# ---------------------------------------------------------------------------------------- at start

def test_a_broken_upscaler_is_reported_at_start(tmp_path, data_dir, tiny_model, caplog):
    from app import create_app
    from storage.blobs import LocalBlobStore

    (tmp_path / "corrupt.pth").write_bytes(b"\x80\x02 not a checkpoint" * 50)
    settings = Settings.from_env(env={}, model="tiny", upscaler=str(tmp_path / "corrupt.pth"), data_dir=data_dir,
                                 worker="off")
    jobs, blobs = SqliteJobStore(tmp_path / "jobs.sqlite3"), LocalBlobStore(tmp_path / "blobs")
    caplog.set_level(logging.ERROR, logger="t2v.worker")
    worker = Worker(settings, jobs, blobs, poll_s=0.05).start()
    try:
        client = create_app(settings, jobs=jobs, blobs=blobs, worker=worker).test_client()
        health = wait_for(lambda: (h := client.get("/health").json)["model_loaded"] and h, timeout=120)
    finally:
        worker.stop(timeout=30)
    assert f"upscaler weights {tmp_path / 'corrupt.pth'} could not be read" in health["model_error"]
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "corrupt.pth" in errors[0]


def test_worker_start_sweeps_what_dead_workers_left(tmp_path, tiny_models):
    from storage.blobs import LocalBlobStore

    settings = Settings.from_env(env={}, model="tiny", upscaler="tiny", data_dir=tmp_path, lease_s=5.0)
    jobs, blobs = SqliteJobStore(tmp_path / "jobs.sqlite3"), LocalBlobStore(tmp_path / "blobs")
    jobs.create(new_job("running-0001", "s", "local", "generate", {}))
    jobs.claim("live-worker", 600)  # another worker runs it now
    jobs.create(new_job("unstored-0002", "s", "local", "generate", {}))
    jobs.fail(jobs.claim("w", 600)["reference_id"], "w", "storage_error", "the video was kept on the worker's disk")
    jobs.create(new_job("lost-0000", "s", "local", "generate", {}))
    jobs.fail(jobs.claim("dead", 600)["reference_id"], "dead", "worker_lost", "the worker stopped responding")
    work, uploads = tmp_path / "work", tmp_path / "uploads"
    work.mkdir()
    uploads.mkdir()
    old = {work / ".lost-0000.mp4.part", work / "lost-0000.jpg", work / "gone-0003.input",
           uploads / "crashed-0004.video"}
    kept = {work / ".running-0001.mp4.part", work / "unstored-0002.mp4", work / "fresh-0005.jpg"}
    for path in old | kept:
        path.write_bytes(b"partial")
        if path.name != "fresh-0005.jpg":
            os.utime(path, (time.time() - 7200, time.time() - 7200))
    recent_upload = uploads / "checking-0006.video"  # an API process may be checking it right now
    recent_upload.write_bytes(b"clip")
    os.utime(recent_upload, (time.time() - 600, time.time() - 600))

    worker = Worker(settings, jobs, blobs, models=tiny_models, poll_s=0.05).start()
    try:
        wait_for(lambda: not any(p.exists() for p in old), timeout=60)
    finally:
        worker.stop(timeout=30)
    assert all(p.exists() for p in kept | {recent_upload})
