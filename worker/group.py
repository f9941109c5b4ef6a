"""A worker group: N ranks that run each job together, one clip split across N GPUs (pipeline/parallel.py).

`python worker.py --gpus 0-7 --parallel 4` makes two groups; the supervisor starts one `python worker.py` per
group (T2V_PARALLEL=4, CUDA_VISIBLE_DEVICES naming its GPUs), and that process starts the ranks with
torch.multiprocessing's `spawn`. Rank 0 is an ordinary `Worker`: it claims a job, holds its lease, reports progress
and previews, and stores the video. Just before a generation job runs it hands the job (its parameters, with seed
and LoRAs, and the input image) to the other ranks with `broadcast_object_list`, on a gloo group of its own that
has no deadline (the other ranks wait there between jobs); then every rank calls `run_job`. An enhance job (a
prompt suggestion) runs on rank 0 alone, but first the others load its model too, so every rank holds the same
model, as the collectives of a split model's next load and job need.

Faults: `spawn` ends the group when any rank dies (it terminates the others), so the process exits and the
supervisor starts the whole group again; rank 0's lease lapses and the job is queued again as for any lost worker.
A rank that hangs inside a step makes the others' next collective fail after T2V_GROUP_TIMEOUT_S: rank 0
then exits without touching the job, with the same outcome. Ranks that cannot start (no rendezvous, NCCL or gloo
init fails) fail the group before rank 0 claims anything; this process logs why once, shows it in the group's
worker record (`failed: <why>`, on /health) and starts them again later.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import signal
import socket
import tempfile
import threading
import time
from dataclasses import replace
from datetime import timedelta
from functools import partial
from pathlib import Path

import torch.distributed as dist
import torch.multiprocessing as mp

from storage.jobs import (GROUP_FAILED, GROUP_READY, GROUP_STARTING, WORKER_REPORT_EVERY_S, StoreUnavailable,
                          group_facts)
from worker.loop import Worker

log = logging.getLogger("t2v.worker")

HANDOFF_TIMEOUT = timedelta(days=365)  # ranks 1..N-1 wait for the next job for as long as rank 0 takes to find one
START_RETRY_FIRST_S, START_RETRY_MAX_S = 5.0, 300.0  # ranks that could not start are tried again after these


def run_group(settings, log_format: str) -> int:
    """Start the group's ranks and wait for them. SIGTERM or SIGINT stops rank 0 after its current job, and
    then the others. Ranks that cannot start (no rendezvous, NCCL or gloo init fails) are started again here,
    later and later, with the reason logged once and shown in the group's worker record, so the supervisor's
    restarts do not repeat it. Returns 0 after a stop, 1 when a started rank failed or died (the supervisor
    restarts us)."""
    context = mp.get_context("spawn")
    stop, ready = context.Event(), context.Event()

    def stopping():
        log.info("worker group: stopping after the current job")
        stop.set()

    def on_signal(signum, frame):
        # Not here: the Event's lock (and logging's) may be held by the very code this signal interrupted.
        threading.Thread(target=stopping, name="t2v-group-stop", daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        record = _GroupRecord(settings)
    except (StoreUnavailable, OSError) as exc:
        log.error("cannot open the job store: %s", exc)
        return 1
    log.info("worker group %s of %d ranks on %s", record.worker_id, settings.parallel, settings.device.split(":")[0])
    failure, retry_s = None, 0.0
    try:
        record.report(GROUP_STARTING)
        while not stop.is_set():
            shown = (GROUP_FAILED, failure) if failure else (GROUP_STARTING, None)
            outcome = _spawn(settings, record.worker_id, stop, ready, log_format, partial(record.report, *shown))
            if outcome is None:
                return 0
            if ready.is_set():
                log.error("worker group: %s; the group stops", outcome)
                return 1
            retry_s = min(retry_s * 2 or START_RETRY_FIRST_S, START_RETRY_MAX_S)
            if outcome != failure:
                log.error("worker group: its ranks could not start (%s); it claims no job, and tries again in "
                          "%.0fs, then less often", outcome, retry_s)
            failure = outcome
            record.wait_failed(failure, retry_s, stop)
        return 0
    finally:
        record.remove()


def _spawn(settings, worker_id: str, stop, ready, log_format: str, keep_live) -> str | None:
    """One start of the group's ranks, until they end. None after a stop, else why the group ended. Until
    rank 0 reports the group ready, `keep_live()` renews the group's record every few seconds (a rendezvous
    may wait up to T2V_GROUP_TIMEOUT_S for a missing rank)."""
    with tempfile.TemporaryDirectory(prefix="t2v-group-") as folder:
        init = (Path(folder) / "rendezvous").as_uri()  # a fresh file per start: a FileStore is used once
        try:
            ranks = mp.spawn(_rank_main, args=(settings, init, worker_id, stop, ready, log_format),
                             nprocs=settings.parallel, join=False)
            while not ranks.join(timeout=WORKER_REPORT_EVERY_S):
                if ready.is_set():
                    continue
                if stop.is_set():  # stopped while the ranks still start: no job is running, nothing to wait for
                    for process in ranks.processes:
                        process.terminate()
                    with contextlib.suppress(mp.ProcessException):  # they end by our SIGTERM
                        ranks.join()
                    return None
                keep_live()
        except mp.ProcessRaisedException as exc:
            # Not which rank: whichever fails first varies, and the reason is logged again only when it changes.
            return f"a rank failed: {str(exc).strip().splitlines()[-1]}"
        except mp.ProcessExitedException as exc:
            return f"rank {exc.error_index} (pid {exc.error_pid}) exited with {exc.signal_name or exc.exit_code}"
    return None


def group_gpus(settings) -> list[str]:
    """The group's GPUs as the supervisor gave them (CUDA_VISIBLE_DEVICES); none on the CPU."""
    if not settings.device.startswith("cuda"):
        return []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    return visible.split(",") if visible else [str(i) for i in range(settings.parallel)]


class _GroupRecord:
    """The group's worker record while its ranks are not running: `starting`, or `failed: <why>`, and no job
    kind, so the API shows the group and nothing is claimed. Rank 0 writes `ready` under the same id."""

    def __init__(self, settings):
        from storage.jobs import open_job_store

        self.settings = settings
        self.worker_id = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}-group"
        self.jobs = open_job_store(settings)

    def report(self, state: str, reason: str | None = None) -> None:
        facts = group_facts(self.settings.parallel, group_gpus(self.settings), state, reason)
        try:
            self.jobs.worker_seen(self.worker_id, (), (), group=facts)
        except StoreUnavailable as exc:
            log.debug("worker group record not written: %s", exc)

    def wait_failed(self, reason: str, seconds: float, stop) -> None:
        """Show the failure, kept live, until the next start is due or the group is stopped."""
        deadline = time.monotonic() + seconds
        while not stop.is_set() and (left := deadline - time.monotonic()) > 0:
            self.report(GROUP_FAILED, reason)
            stop.wait(min(left, WORKER_REPORT_EVERY_S))

    def remove(self) -> None:
        """Remove the record (rank 0's too, should it have died without a word) and close this store."""
        try:
            self.jobs.worker_stopped(self.worker_id)
        except StoreUnavailable as exc:
            log.debug("worker group record not removed: %s", exc)
        finally:
            self.jobs.close()


def _rank_main(rank: int, settings, init: str, worker_id: str, stop, ready, log_format: str) -> None:
    from pipeline import parallel

    logging.basicConfig(level=logging.INFO, format=log_format)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the group's process decides when to stop (`stop`)
    if settings.device.startswith("cuda"):
        settings = replace(settings, cuda_device_id=rank)  # the group's GPUs are this process's visible ones
    log.info("worker group: rank %d of %d (pid %d) on %s", rank, settings.parallel, os.getpid(), settings.device)
    parallel.join(rank, settings.parallel, init, settings.device, timeout_s=settings.group_timeout_s)
    handoff = dist.new_group(backend="gloo", timeout=HANDOFF_TIMEOUT)
    try:
        if rank == 0:
            ready.set()  # every rank has joined: a failure from now on is the group's, not its start's
            _lead(settings, handoff, stop, worker_id)
        else:
            _follow(settings, handoff)
    finally:
        parallel.leave()


class GroupLeader(Worker):
    """Rank 0: a Worker that hands each generation job to the group's other ranks before running its share."""

    def __init__(self, *args, handoff=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.handoff = handoff

    def before_generation(self, spec, image) -> None:
        dist.broadcast_object_list([("generate", spec.to_dict(), image)], src=0, group=self.handoff)

    def before_enhance(self, model: str) -> None:
        dist.broadcast_object_list([("load", model)], src=0, group=self.handoff)

    def group_record(self) -> dict:
        return group_facts(self.settings.parallel, group_gpus(self.settings), GROUP_READY)

    def stop_followers(self) -> None:
        dist.broadcast_object_list([None], src=0, group=self.handoff)

    def _produce(self, job: dict, lease) -> dict:
        """A collective that fails means another rank died or hung mid-job: the job is not this job's fault, so
        it is left to its lease (queued again when it lapses) and this process exits, ending the group."""
        try:
            return super()._produce(job, lease)
        except Exception as exc:
            if not _from_a_collective(exc):
                raise
            log.error("job %s: the worker group broke (%s: %s); left to its lease", job["reference_id"],
                      type(exc).__name__, str(exc).splitlines()[0][:200])
            os._exit(1)


def _from_a_collective(exc: BaseException) -> bool:
    """Whether `exc` came out of torch.distributed (a gloo read error is a plain RuntimeError, so the type
    alone does not say)."""
    if isinstance(exc, dist.DistError):
        return True
    tb = exc.__traceback__
    while tb is not None:
        if f"torch{os.sep}distributed{os.sep}" in tb.tb_frame.f_code.co_filename:
            return True
        tb = tb.tb_next
    return False


def _lead(settings, handoff, stop, worker_id: str) -> None:
    from storage.blobs import open_blob_store
    from storage.jobs import open_job_store
    from webhooks import Dispatcher

    worker = GroupLeader(settings, open_job_store(settings), open_blob_store(settings), worker_id=worker_id,
                         handoff=handoff)
    worker._stop = stop  # set by the group's process on SIGTERM
    dispatcher = Dispatcher(settings, worker.jobs).start() if settings.webhook_secret else None
    try:
        worker.run_forever()
    finally:
        worker.stop_followers()
        if dispatcher is not None:
            dispatcher.stop(timeout=settings.webhook_timeout_s + 5)


def _follow(settings, handoff) -> None:
    """Ranks 1..N-1: load the model rank 0 loads, then run each job rank 0 hands over, until it says stop."""
    from pipeline.generate import JobCanceled
    from pipeline.run import Models, run_job
    from pipeline.spec import JobParams

    models = Models(settings)
    try:
        models.generator  # rank 0 loads the configured model at start: the same collectives, in the same order
    except Exception as exc:
        log.error("rank %d: could not load the model: %s", dist.get_rank(), exc)
    work = Path(settings.data_dir) / "work" / f"rank{dist.get_rank()}.mp4"  # never written: rank 0 encodes
    while True:
        message = [None]
        dist.broadcast_object_list(message, src=0, group=handoff)
        if message[0] is None:
            return
        if message[0][0] == "load":  # rank 0 enhances a prompt with this model: hold the same one
            try:
                models.generator_for(message[0][1])
            except Exception as exc:  # rank 0 fails the same load, and says so on the job
                log.error("rank %d: could not load %s: %s", dist.get_rank(), message[0][1], exc)
            continue
        _, params, image = message[0]
        spec = JobParams(**params)
        try:
            run_job(spec, settings, models=models, output=work, model=spec.model, image=image)
        except JobCanceled:
            continue
