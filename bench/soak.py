"""Soak: queue 200 tiny jobs at once and let one worker run them all.

Through the real app (test client) and the real worker thread, with SQLite and local files in a
temporary folder. Checks that every job completes, in FIFO order, exactly once (one attempt,
one completion each), and compares the process RSS after the first 20 jobs with the RSS after
the last one. The goal: within 10%.

    python bench/soak.py
    python bench/soak.py --jobs 400
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

JOB = {"prompt": "a red fox", "width": 64, "height": 64, "num_frames": 9, "num_inference_steps": 2}


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--baseline", type=int, default=20, help="jobs done when the baseline RSS is read")
    args = parser.parse_args()

    from app import create_app
    from config import Settings
    from storage.blobs import LocalBlobStore
    from storage.jobs import SqliteJobStore
    from worker.loop import Worker

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        settings = Settings.from_env(env={}, model="tiny", upscaler="tiny", data_dir=data, worker="off",
                                     max_queue=args.jobs + 1)
        jobs, blobs = SqliteJobStore(data / "jobs.sqlite3"), LocalBlobStore(data / "blobs")
        client = create_app(settings, jobs=jobs, blobs=blobs).test_client()
        refs = [client.post("/generate_video", json={**JOB, "seed": i, "session_id": "soak"}).json["reference_id"]
                for i in range(args.jobs)]
        print(f"queued {len(refs)} jobs; rss {rss_mb():.0f} MB before the worker starts", flush=True)

        worker = Worker(settings, jobs, blobs, poll_s=0.05).start()
        started, baseline, samples = time.monotonic(), None, []
        while True:
            done = sum(1 for r in refs if jobs.get(r)["status"] in ("completed", "failed", "canceled"))
            if baseline is None and done >= args.baseline:
                baseline = rss_mb()
                print(f"{done} done: rss {baseline:.0f} MB (baseline)", flush=True)
            if done and done % 50 == 0 and (not samples or samples[-1][0] != done):
                samples.append((done, rss_mb()))
                print(f"{done} done: rss {samples[-1][1]:.0f} MB", flush=True)
            if done == len(refs):
                break
            time.sleep(0.2)
        elapsed = time.monotonic() - started
        worker.stop(timeout=30)
        final = rss_mb()
        records = [jobs.get(r) for r in refs]

    statuses = {r["status"] for r in records}
    fifo = [r["reference_id"] for r in sorted(records, key=lambda r: r["started_at"])] == refs
    once = all(r["attempts"] == 1 for r in records)
    growth = (final - baseline) / baseline * 100
    print(f"\n{len(refs)} jobs in {elapsed:.0f} s ({len(refs) / elapsed:.2f} jobs/s); statuses {sorted(statuses)}")
    print(f"FIFO order: {fifo}; each job claimed once: {once}")
    print(f"rss after {args.baseline} jobs {baseline:.0f} MB, after {len(refs)} jobs {final:.0f} MB: {growth:+.1f}%")
    ok = statuses == {"completed"} and fifo and once and abs(growth) <= 10
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
