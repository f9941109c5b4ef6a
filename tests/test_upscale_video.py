"""Upscaling an existing clip: `upscale.py`, `upscale_file`, and POST /upscale_video through the worker."""

import io
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, audio_duration, make_clip, psnr, wait_for
from pipeline.run import Models, upscale_file
from pipeline.video import VideoInputError, inspect_video, probe, read_frames


@pytest.fixture(scope="module")
def upscaler(data_dir, tiny_upscalers):
    from config import Settings

    return Models(Settings.from_env(env={}, upscaler="tiny", data_dir=data_dir)).upscaler


# ---------------------------------------------------------------------------------------- upscale.py

def run_cli(args, data_dir, cwd):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "T2V_DATA_DIR": str(data_dir), "T2V_UPSCALER": "tiny"}
    return subprocess.run([sys.executable, str(ROOT / "upscale.py"), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli_keeps_frames_duration_and_audio(tmp_path, data_dir, tiny_upscalers):
    clip = make_clip(tmp_path / "in.mp4", frames=48, width=64, height=48, fps=24, audio="aac")
    done = run_cli(["--input", clip, "--output", tmp_path / "out_4x.mp4"], data_dir, tmp_path)
    assert done.returncode == 0, done.stderr
    src, out = inspect_video(clip), inspect_video(tmp_path / "out_4x.mp4")
    assert (out.width, out.height) == (4 * src.width, 4 * src.height) == (256, 192)
    assert probe(tmp_path / "out_4x.mp4")["frames"] == src.frames == 48
    assert abs(out.duration_s - src.duration_s) <= 1 / 24
    assert out.audio_codec == "aac"  # stream-copied
    assert abs(audio_duration(tmp_path / "out_4x.mp4") - audio_duration(clip)) <= 0.05
    assert f"wrote {tmp_path / 'out_4x.mp4'}" in done.stdout and "time per stage: upscale" in done.stdout
    assert "frame/s" in done.stderr  # the tqdm bar counts frames


@pytest.mark.parametrize("args, reason", [
    (["--input", "missing.mp4", "--output", "o.mp4"], "--input missing.mp4 is not a file"),
    (["--input", "text.mp4", "--output", "o.mp4"], "not a video that can be decoded"),
    (["--input", "empty.mp4", "--output", "o.mp4"], "not a video that can be decoded"),
    (["--input", "in.mp4", "--output", "in.mp4/o.mp4"], "is not a writable folder"),
    (["--input", "in.mp4", "--output", "o.avi"], "--output must end in .mp4"),
    (["--input", "in.mp4", "--output", "o.mp4", "--upscaler", "nosuch.pth"], "upscaler weights nosuch.pth not found"),
    (["--input", "in.mp4", "--output", "o.mp4", "--outscale", "3"], "invalid choice: 3"),
])
def test_cli_bad_input_exits_2_with_one_line(tmp_path, data_dir, args, reason):
    make_clip(tmp_path / "in.mp4", frames=4, audio=None)
    (tmp_path / "text.mp4").write_text("this is not a video\n")
    (tmp_path / "empty.mp4").write_bytes(b"")
    done = run_cli(args, data_dir, tmp_path)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("upscale.py: error:") and reason in done.stderr
    assert not (tmp_path / "o.mp4").exists()


# ---------------------------------------------------------------------------------------- upscale_file

@pytest.mark.parametrize("name, codec, audio, size, outscale, audio_out", [
    ("clip.mov", "libx264", "pcm_s16le", (64, 48), 4, "aac"),      # PCM cannot go in MP4: re-encoded
    ("clip.webm", "libvpx-vp9", "libopus", (64, 48), 2, "aac"),    # Opus from WebM: re-encoded
    ("clip.mkv", "ffv1", "mp3", (63, 47), 2, "mp3"),               # odd size, lossless; MP3 is copied
    ("clip.gif", "gif", None, (63, 47), 4, None),                 # no audio at all
])
def test_containers_codecs_and_odd_sizes(tmp_path, upscaler, name, codec, audio, size, outscale, audio_out):
    clip = make_clip(tmp_path / name, frames=24, width=size[0], height=size[1], video_codec=codec, audio=audio,
                     rate=48000)
    result = upscale_file(clip, tmp_path / "out.mp4", upscaler, outscale, crf=18)
    src, out = inspect_video(clip), inspect_video(tmp_path / "out.mp4")
    assert (result.width, result.height) == (size[0] * outscale, size[1] * outscale)
    assert (out.width, out.height) == (result.width + result.width % 2, result.height + result.height % 2)
    assert probe(tmp_path / "out.mp4")["frames"] == result.frames == 24
    assert abs(out.fps - src.fps) < 1e-6
    assert out.audio_codec == audio_out
    if audio:
        assert abs(audio_duration(tmp_path / "out.mp4") - audio_duration(clip)) <= 0.05
    assert result.poster_path.read_bytes()[:2] == b"\xff\xd8"


def test_frames_come_out_in_order_and_match_a_direct_upscale(tmp_path, upscaler):
    clip = make_clip(tmp_path / "in.mp4", frames=12, audio=None)
    upscale_file(clip, tmp_path / "out.mp4", upscaler, 4, crf=10)
    source = np.stack(list(read_frames(clip)))
    expected = upscaler.upscale(source)
    got = np.stack(list(read_frames(tmp_path / "out.mp4")))
    assert got.shape == expected.shape == (12, 192, 256, 3)
    # The random-weight net's output is mostly noise, which H.264 cannot keep exactly; but each output
    # frame is still far closer to its own source frame's upscale than to any other frame's.
    scores = np.array([[psnr(g, e) for e in expected] for g in got])
    assert list(scores.argmax(axis=1)) == list(range(12))
    assert scores.diagonal().min() > 18


@pytest.mark.parametrize("faststart", [True, False])
def test_truncated_clip_fails_clearly_and_leaves_nothing(tmp_path, upscaler, faststart):
    data = make_clip(tmp_path / "full.mp4", frames=48, audio=None, faststart=faststart).read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) // 2])
    with pytest.raises(VideoInputError, match="truncated or damaged|not a video that can be decoded"):
        upscale_file(tmp_path / "cut.mp4", tmp_path / "out" / "o.mp4", upscaler, 4, crf=18)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_inspect_refuses_a_header_claiming_100000x100000(tmp_path):
    bomb = tmp_path / "bomb.y4m"
    bomb.write_bytes(b"YUV4MPEG2 W100000 H100000 F24:1 Ip A1:1 C420jpeg\nFRAME\n" + b"\0" * 4096)
    with pytest.raises(VideoInputError):
        inspect_video(bomb, max_side=1920)


def test_inspect_enforces_frame_and_duration_limits(tmp_path):
    clip = make_clip(tmp_path / "in.mp4", frames=48, audio=None)
    with pytest.raises(VideoInputError, match="48 frames; at most 40"):
        inspect_video(clip, max_frames=40)
    with pytest.raises(VideoInputError, match="lasts 2.0s; at most 1.5s"):
        inspect_video(clip, max_duration_s=1.5)
    with pytest.raises(VideoInputError, match="64x48; the longest side allowed is 32"):
        inspect_video(clip, max_side=32)


# ---------------------------------------------------------------------------------------- the API

def upload(client, data: bytes, name="clip.mp4", **fields):
    form = {"video": (io.BytesIO(data), name), **fields}
    return client.post("/upscale_video", data=form, content_type="multipart/form-data")


def wait_done(client, ref):
    return wait_for(lambda: (j := client.get(f"/jobs/{ref}").json)["status"] in ("completed", "failed", "canceled")
                    and j)


def stored_inputs(blobs) -> list[str]:
    return sorted(key for key, _ in blobs.list_keys("inputs/"))


def leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def test_upload_poll_download(make_app, tmp_path):
    app, svc = make_app()
    client = app.test_client()
    data = make_clip(tmp_path / "in.mp4", frames=24, width=48, height=32, audio="aac").read_bytes()
    r = upload(client, data, session_id="my-session", outscale="2", upscaler="tiny")
    assert r.status_code == 200, r.json
    assert set(r.json) == {"session_id", "reference_id", "status", "queue_position"}
    ref = r.json["reference_id"]
    status = wait_for(lambda: (s := client.post("/get_status", json={"session_id": "my-session", "reference_id": ref})
                               .json)["status"] in ("completed", "failed") and s)
    assert status["status"] == "completed", status
    url = client.post(f"/download_video/{ref}", json={"session_id": "my-session"}).json["s3_url"]
    (tmp_path / "got.mp4").write_bytes(client.get(url.removeprefix("http://localhost")).data)
    got = probe(tmp_path / "got.mp4")
    assert (got["width"], got["height"], got["frames"]) == (96, 64, 24)
    job = client.get(f"/jobs/{ref}").json
    assert job["kind"] == "upscale" and job["params"]["filename"] == "clip.mp4" and job["result"]["frames"] == 24
    history = client.post("/history", json={"session_id": "my-session"}).json["history"]
    assert [h["reference_id"] for h in history] == [ref]
    # The worker deletes the input just after it records the outcome.
    wait_for(lambda: stored_inputs(svc.blobs) == [])
    assert leftovers(tmp_path / "data" / "uploads") == leftovers(tmp_path / "data" / "work") == []


def test_keep_inputs_keeps_the_upload(make_app, tmp_path):
    app, svc = make_app(keep_inputs=True)
    client = app.test_client()
    data = make_clip(tmp_path / "in.mp4", frames=8, audio=None).read_bytes()
    r = upload(client, data)
    assert wait_done(client, r.json["reference_id"])["status"] == "completed"
    assert stored_inputs(svc.blobs) == [f"inputs/{r.json['reference_id']}"]
    svc.blobs.get(f"inputs/{r.json['reference_id']}", tmp_path / "kept.video")
    assert (tmp_path / "kept.video").read_bytes() == data


def test_hostile_uploads_get_4xx_or_a_failed_job_and_the_worker_carries_on(make_app, tmp_path):
    app, svc = make_app(max_upload_mb=1)
    client = app.test_client()
    good = make_clip(tmp_path / "in.mp4", frames=16, audio=None, faststart=True).read_bytes()
    rejected = {
        "text file named .mp4": upload(client, b"hello, I am not a video\n" * 10),
        "0-byte file": upload(client, b""),
        "header claims 100000x100000": upload(client, b"YUV4MPEG2 W100000 H100000 F24:1 Ip C420jpeg\nFRAME\n" + b"\0" * 999),
        "over the size limit": upload(client, os.urandom(1024 * 1024 + 100 * 1024)),
        "no file field": client.post("/upscale_video", data={"session_id": "s"}, content_type="multipart/form-data"),
        "JSON, not a form": client.post("/upscale_video", json={"video": "x"}),
        "bad outscale": upload(client, good, outscale="8"),
        "upscaler path": upload(client, good, upscaler="../../etc/passwd"),
        "bad session id": upload(client, good, session_id="$(reboot)"),
    }
    for what, r in rejected.items():
        assert 400 <= r.status_code < 500 and r.is_json and r.json["error"]["message"], what
    assert rejected["over the size limit"].status_code == 413
    assert rejected["text file named .mp4"].json["error"]["code"] == "invalid_video"
    assert svc.jobs.count_queued() == 0, "nothing was queued"
    assert stored_inputs(svc.blobs) == [] and leftovers(tmp_path / "data" / "uploads") == [], "rejected uploads are not kept"

    truncated = upload(client, good[: len(good) // 2])  # its index is intact; its frames are cut off
    assert truncated.status_code == 200
    failed = wait_done(client, truncated.json["reference_id"])
    assert failed["status"] == "failed" and failed["error"]["code"] == "invalid_video"
    assert "truncated or damaged" in failed["error"]["message"]

    after = upload(client, good)
    assert wait_done(client, after.json["reference_id"])["status"] == "completed"
    assert svc.worker.alive
    wait_for(lambda: stored_inputs(svc.blobs) == [])  # deleted just after the outcome is recorded


def test_cancel_a_queued_upload_deletes_it(make_app, tmp_path):
    app, svc = make_app(worker=False)
    client = app.test_client()
    r = upload(client, make_clip(tmp_path / "in.mp4", frames=8, audio=None).read_bytes())
    assert stored_inputs(svc.blobs) == [f"inputs/{r.json['reference_id']}"]
    assert leftovers(tmp_path / "data" / "uploads") == [], "the temporary copy went once the input was stored"
    assert client.post(f"/jobs/{r.json['reference_id']}/cancel").json["status"] == "canceled"
    assert stored_inputs(svc.blobs) == []


def test_worker_sweeps_inputs_whose_job_ended_without_them(make_app, tmp_path):
    from storage.jobs import new_job
    from worker.loop import Worker

    app, svc = make_app(worker=False)
    svc.jobs.create(new_job("lostjob-0001", "s", "local", "upscale", {"outscale": 4, "upscaler": None}))
    claimed = svc.jobs.claim("dead-worker", 0.01)
    svc.jobs.fail(claimed["reference_id"], "dead-worker", "worker_lost", "the worker stopped responding")
    svc.jobs.create(new_job("waiting-0002", "s", "local", "upscale", {"outscale": 4, "upscaler": None}))
    for name in ("lostjob-0001", "waiting-0002", "orphan-0003", "fresh-0004"):
        (tmp_path / "clip").write_bytes(b"clip")
        svc.blobs.put(tmp_path / "clip", f"inputs/{name}")
        if name != "fresh-0004":  # being queued right now: left alone
            os.utime(svc.blobs.local_path(f"inputs/{name}"), (0, 0))  # old enough to sweep

    worker = Worker(svc.settings, svc.jobs, svc.blobs, models=object())
    assert worker.sweep_inputs() == 2
    assert stored_inputs(svc.blobs) == ["inputs/fresh-0004", "inputs/waiting-0002"]


def test_an_unwritable_data_folder_is_a_503_not_a_500(make_app, tmp_path, caplog):
    # Tests run as root, where a read-only mode does not stop writes; so the upload folder's parent is made a
    # regular file instead, and saving fails with an OSError (NotADirectoryError) as on a read-only disk.
    (tmp_path / "not-a-folder").write_text("a file where the data folder should be")
    app, svc = make_app(worker=False, data_dir=tmp_path / "not-a-folder" / "data")
    r = upload(app.test_client(), make_clip(tmp_path / "in.mp4", frames=8, audio=None).read_bytes())
    assert r.status_code == 503 and r.json["error"]["code"] == "storage_unavailable", r.json
    assert svc.jobs.count_queued() == 0 and stored_inputs(svc.blobs) == []
    assert "Traceback" not in caplog.text


def test_a_blob_store_that_cannot_take_the_upload_is_a_503(make_app, tmp_path):
    from storage.blobs import S3BlobStore

    down = S3BlobStore("b", "us-east-1", "test", "test", "http://127.0.0.1:9", attempts=2, backoff_s=0.01)
    app, svc = make_app(worker=False, blobs=down)
    r = upload(app.test_client(), make_clip(tmp_path / "in.mp4", frames=8, audio=None).read_bytes())
    assert r.status_code == 503 and r.json["error"]["code"] == "storage_unavailable", r.json
    assert svc.jobs.count_queued() == 0
    assert leftovers(tmp_path / "data" / "uploads") == []


def test_api_and_worker_on_different_disks_share_only_s3_and_the_job_store(s3_bucket, tmp_path, tiny_models):
    """The cross-node case: the API node and the worker node have their own data folders; the clip
    reaches the worker through S3 (moto over HTTP), and the job through the shared job store."""
    import requests

    from app import create_app
    from config import Settings
    from storage.blobs import S3BlobStore
    from storage.jobs import SqliteJobStore
    from worker.loop import Worker

    endpoint, bucket = s3_bucket
    shared_jobs = tmp_path / "shared" / "jobs.sqlite3"

    def node(name):
        settings = Settings.from_env(env={}, model="tiny", upscaler="tiny", data_dir=tmp_path / name, worker="off",
                                     lease_s=5.0, bucket_name=bucket, s3_endpoint_url=endpoint)
        return settings, SqliteJobStore(shared_jobs), S3BlobStore(bucket, "us-east-1", "test", "test", endpoint)

    api_settings, api_jobs, api_blobs = node("api-node")
    app = create_app(api_settings, jobs=api_jobs, blobs=api_blobs)
    client = app.test_client()
    clip = make_clip(tmp_path / "in.mp4", frames=12, width=48, height=32, audio="aac")
    r = upload(client, clip.read_bytes(), session_id="far", outscale="2")
    assert r.status_code == 200, r.json
    ref = r.json["reference_id"]
    assert stored_inputs(api_blobs) == [f"inputs/{ref}"]

    worker_settings, worker_jobs, worker_blobs = node("gpu-node")
    worker = Worker(worker_settings, worker_jobs, worker_blobs, models=tiny_models, poll_s=0.05).start()
    try:
        done = wait_done(client, ref)
    finally:
        worker.stop(timeout=30)
    assert done["status"] == "completed", done
    url = client.post(f"/download_video/{ref}", json={"session_id": "far"}).json["s3_url"]
    assert url.startswith(endpoint)  # a presigned S3 link: the API node never held the video
    (tmp_path / "got.mp4").write_bytes(requests.get(url, timeout=30).content)
    got = probe(tmp_path / "got.mp4")
    assert (got["width"], got["height"], got["frames"]) == (96, 64, 12)
    assert stored_inputs(api_blobs) == [], "the input is deleted from S3 when the job ends"
    assert leftovers(tmp_path / "api-node" / "uploads") == []
    assert leftovers(tmp_path / "gpu-node" / "work") == []
    assert not (tmp_path / "gpu-node" / "uploads").exists(), "the worker never saw the API node's disk"
