"""A worker group: N ranks that run each job together, one clip split across N GPUs (pipeline/parallel.py).

`python worker.py --gpus 0-7 --parallel 4` makes two groups; the supervisor starts one `python worker.py` per
group (T2V_PARALLEL=4, CUDA_VISIBLE_DEVICES naming its GPUs), and that process starts the ranks with
torch.multiprocessing's `spawn`. Rank 0 is an ordinary `Worker`: it claims a job, holds its lease, reports progress
and previews, and stores the video. Just before a generation job runs it hands the job (its parameters, with seed
and LoRAs, and the input image) to the other ranks with `broadcast_object_list`, on a gloo group of its own that
has no deadline (the other ranks wait there between jobs); then every rank calls `run_job`.

Faults: `spawn` ends the group when any rank dies (it terminates the others), so the process exits and the
supervisor starts the whole group again; rank 0's lease lapses and the job is queued again as for any lost worker.
A rank that hangs inside a step makes the others' next collective fail after `parallel.DEFAULT_TIMEOUT_S`: rank 0
then exits without touching the job, with the same outcome. A rank that cannot start (no rendezvous, a bad GPU)
fails the group before rank 0 claims anything.
"""

from __future__ import annotations

import logging
import os
import signal
import tempfile
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist
import torch.multiprocessing as mp

from worker.loop import Worker

log = logging.getLogger("t2v.worker")

HANDOFF_TIMEOUT = timedelta(days=365)  # ranks 1..N-1 wait for the next job for as long as rank 0 takes to find one


def run_group(settings, log_format: str) -> int:
    """Start the group's ranks and wait for them. SIGTERM or SIGINT stops rank 0 after its current job, and
    then the others. Returns 0 after such a stop, 1 when a rank failed or died (the supervisor restarts us)."""
    stop = mp.get_context("spawn").Event()

    def on_signal(signum, frame):
        log.info("worker group: stopping after the current job")
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    with tempfile.TemporaryDirectory(prefix="t2v-group-") as folder:
        init = (Path(folder) / "rendezvous").as_uri()
        log.info("worker group of %d ranks on %s", settings.parallel, settings.device.split(":")[0])
        try:
            mp.spawn(_rank_main, args=(settings, init, stop, log_format), nprocs=settings.parallel, join=True)
        except mp.ProcessRaisedException as exc:
            reason = str(exc).strip().splitlines()[-1]
            log.error("worker group: rank %d failed (%s); the group stops", exc.error_index, reason)
            return 1
        except mp.ProcessExitedException as exc:
            log.error("worker group: rank %d (pid %d) exited with %s; the group stops", exc.error_index,
                      exc.error_pid, exc.signal_name or exc.exit_code)
            return 1
    return 0


def _rank_main(rank: int, settings, init: str, stop, log_format: str) -> None:
    from pipeline import parallel

    logging.basicConfig(level=logging.INFO, format=log_format)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the group's process decides when to stop (`stop`)
    if settings.device.startswith("cuda"):
        settings = replace(settings, cuda_device_id=rank)  # the group's GPUs are this process's visible ones
    log.info("worker group: rank %d of %d (pid %d) on %s", rank, settings.parallel, os.getpid(), settings.device)
    parallel.join(rank, settings.parallel, init, settings.device)
    handoff = dist.new_group(backend="gloo", timeout=HANDOFF_TIMEOUT)
    try:
        if rank == 0:
            _lead(settings, handoff, stop)
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
        dist.broadcast_object_list([(spec.to_dict(), image)], src=0, group=self.handoff)

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


def _lead(settings, handoff, stop) -> None:
    from storage.blobs import open_blob_store
    from storage.jobs import open_job_store
    from webhooks import Dispatcher

    worker = GroupLeader(settings, open_job_store(settings), open_blob_store(settings), handoff=handoff)
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
        params, image = message[0]
        spec = JobParams(**params)
        try:
            run_job(spec, settings, models=models, output=work, model=spec.model, image=image)
        except JobCanceled:
            continue
