"""A worker whose model failed to load claims no generation job: it waits, tries the load again now and
then, still takes upscale jobs with its working upscaler, and /health says why."""

import io
import logging

from conftest import TINY_JOB, make_clip, wait_for
from config import Settings
from storage.blobs import LocalBlobStore
from pipeline.spec import JobParams
from storage.jobs import COMPLETED, QUEUED, SqliteJobStore, new_job


def test_a_broken_worker_leaves_generation_jobs_to_a_healthy_one(tmp_path, tiny_models, monkeypatch, caplog):
    import worker.loop as worker_module
    from app import create_app
    from worker.loop import Worker

    monkeypatch.setattr(worker_module, "LOAD_RETRY_FIRST_S", 0.05)  # retries within the test, not minutes apart
    caplog.set_level(logging.DEBUG, logger="t2v.worker")
    broken_model = tmp_path / "broken-model"
    broken_model.mkdir()
    (broken_model / "model_index.json").write_text("{ this is not JSON")
    jobs, blobs = SqliteJobStore(tmp_path / "jobs.sqlite3"), LocalBlobStore(tmp_path / "blobs")

    def settings(name, model):
        return Settings.from_env(env={}, model=model, upscaler="tiny", data_dir=tmp_path / name, worker="off",
                                 lease_s=5.0)

    api = create_app(settings("api", "tiny"), jobs=jobs, blobs=blobs).test_client()  # queues jobs, runs none
    generate = [api.post("/generate_video", json={**TINY_JOB, "upscale": False, "seed": i}).json["reference_id"]
                for i in range(3)]
    clip = make_clip(tmp_path / "in.mp4", frames=8, width=32, height=32, audio=None).read_bytes()
    upscale = api.post("/upscale_video", data={"video": (io.BytesIO(clip), "in.mp4"), "outscale": "2"},
                       content_type="multipart/form-data").json["reference_id"]

    broken = Worker(settings("broken", str(broken_model)), jobs, blobs, worker_id="broken", poll_s=0.02).start()
    healthy = None
    try:
        # Alone with the queue, the broken worker skips the older generation jobs and takes the upscale job.
        assert wait_for(lambda: jobs.get(upscale)["status"] == COMPLETED, timeout=120)
        assert jobs.get(upscale)["worker_id"] == "broken"
        retries = lambda: [r for r in caplog.records if "still does not load" in r.getMessage()]  # noqa: E731
        wait_for(lambda: len(retries()) >= 2, timeout=60)
        assert [jobs.get(ref)["status"] for ref in generate] == [QUEUED] * 3

        health = create_app(settings("broken", str(broken_model)), jobs=jobs, blobs=blobs,
                            worker=broken).test_client().get("/health").json
        assert health["model_loaded"] is False and health["worker"] == "alive"
        assert "model_index.json" in health["model_error"]

        healthy = Worker(settings("healthy", "tiny"), jobs, blobs, models=tiny_models, worker_id="healthy",
                         poll_s=0.05).start()
        wait_for(lambda: all(jobs.get(ref)["status"] == COMPLETED for ref in generate), timeout=300)
    finally:
        broken.stop(timeout=30)
        if healthy:
            healthy.stop(timeout=30)
    assert [jobs.get(ref)["worker_id"] for ref in generate] == ["healthy"] * 3
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "could not load the model" in errors[0], "the reason is logged once"


def test_a_model_that_loads_later_is_picked_up_by_the_retry(tmp_path, tiny_model, monkeypatch):
    import shutil

    import worker.loop as worker_module
    from worker.loop import Worker

    monkeypatch.setattr(worker_module, "LOAD_RETRY_FIRST_S", 0.05)
    model = tmp_path / "model"  # not there yet: the operator is still copying it
    settings = Settings.from_env(env={}, model=str(model), upscaler="tiny", data_dir=tmp_path / "data",
                                 worker="off", lease_s=5.0)
    jobs, blobs = SqliteJobStore(tmp_path / "jobs.sqlite3"), LocalBlobStore(tmp_path / "blobs")
    jobs.create(new_job("late-0001", "s", "local", "generate",
                        JobParams.from_dict({**TINY_JOB, "upscale": False, "seed": 1}).to_dict()))
    worker = Worker(settings, jobs, blobs, worker_id="patient", poll_s=0.02).start()
    try:
        wait_for(lambda: worker.load_error, timeout=60)
        assert str(model) in worker.load_error and jobs.get("late-0001")["status"] == QUEUED
        shutil.copytree(tiny_model, model)
        done = wait_for(lambda: (job := jobs.get("late-0001"))["status"] == COMPLETED and job, timeout=300)
    finally:
        worker.stop(timeout=30)
    assert done["worker_id"] == "patient" and worker.load_error is None and worker.model_loaded
