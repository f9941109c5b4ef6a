"""`python worker.py`: its flags, and one worker in this process or a supervisor of one worker per slot."""

from __future__ import annotations

import logging
import re
import signal

from config import ENV_NAMES, MEMORY_PRESETS, ConfigError, Settings
from pipeline.cli import MODEL_HELP, UPSCALER_HELP
from storage.blobs import StorageError, open_blob_store
from storage.jobs import StoreUnavailable, open_job_store
from webhooks import Dispatcher
from worker.gpus import cpu_slots, gpu_slots, group_slots, visible_gpus
from worker.loop import Worker
from worker.supervisor import Supervisor, tie_to_supervisor

log = logging.getLogger("t2v.worker")

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"

# The settings a worker uses, as flags. Each flag overrides its environment variable; the stores'
# addresses and keys (MONGODB_URI, BUCKET_NAME, AWS_*) come from the environment only.
WORKER_FLAGS = {
    "model": MODEL_HELP,  # as the CLI says it
    "upscaler": UPSCALER_HELP,
    "memory": "GPU memory preset; 'auto' picks from free VRAM",
    "cuda_device_id": "which GPU, an index within CUDA_VISIBLE_DEVICES; unset means 0",
    "data_dir": "SQLite file (without MONGODB_URI), local videos (without BUCKET_NAME), work files",
    "models_dir": "where upscaler release names are looked up",
    "lease_s": "seconds of a running job's lease; an expired lease means its worker died",
    "max_attempts": "tries before a job whose worker died is failed",
    "fp8": "store transformer weights in float8",
    "vae_tiling": "decode the VAE in tiles",
    "fbc_threshold": "First Block Cache threshold, e.g. 0.05; 0 turns it off",
    "attention_backend": "diffusers attention backend, e.g. native, flash_varlen, sage_varlen",
    "compile": "regional torch.compile of the transformer blocks",
    "parallel": "ranks per worker group: each job split across this many GPUs (HunyuanVideo, Wan)",
    "upscale_tile": "upscaler tile size in pixels; 0 = whole frames",
    "upscale_batch": "frames per upscaler batch",
    "crf": "H.264 quality: lower is better and bigger",
    "keep_inputs": "keep uploaded clips in the blob store after their job ends",
}


def build_parser():
    import argparse

    from pipeline.cli import ArgumentParser, setting_flag

    p = ArgumentParser(
        prog="worker.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run t2v workers. Each claims queued jobs from the job store, one at a time, and stores\n"
                    "the videos in the blob store. Without --gpus or --cpu-workers, one worker runs in this process.",
        epilog="The job store and the blob store come from the environment (or .env): MONGODB_URI, BUCKET_NAME,\n"
               "REGION_NAME, AWS_ACCESS_KEY, AWS_SECRET_KEY, T2V_S3_ENDPOINT_URL; without them, SQLite and a folder\n"
               "under --data-dir. Examples:\n"
               "  python worker.py --gpus all           # one worker per GPU of this machine\n"
               "  python worker.py --gpus 0,1           # workers on GPUs 0 and 1 only\n"
               "  python worker.py --gpus all --parallel 4   # one clip on 4 GPUs: a worker group per 4 GPUs\n"
               "  python worker.py --cpu-workers 2      # two workers on the CPU (tiny models, tests)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--gpus", metavar="LIST", help="'all', or GPU indices like 0,1,2,3: one worker process per GPU, "
                                                      "each sees only its own GPU; a worker that dies is restarted")
    group.add_argument("--cpu-workers", type=_positive_int, metavar="N", help="run N worker processes on the CPU")
    for name, text in WORKER_FLAGS.items():  # the CLI's own flag builder: one reading of each setting
        setting_flag(p, name, text, **({"choices": MEMORY_PRESETS} if name == "memory" else {}))
    return p


def _positive_int(raw: str) -> int:
    from argparse import ArgumentTypeError

    if not re.fullmatch(r"[0-9]{1,4}", raw) or int(raw) < 1:
        raise ArgumentTypeError(f"must be a whole number from 1 to 9999, got {raw!r}")
    return int(raw)


def settings_env(overrides: dict) -> dict[str, str]:
    """The flags given, as the environment variables a child worker reads."""
    return {ENV_NAMES[name]: str(value).lower() if isinstance(value, bool) else str(value)
            for name, value in overrides.items()}


def run_worker(settings: Settings) -> int:
    """One worker in this process, until SIGTERM or SIGINT (it stops after its current job); with
    T2V_PARALLEL above 1, a worker group of that many ranks (worker/group.py)."""
    tie_to_supervisor()
    if settings.parallel > 1:
        from worker.group import run_group

        return run_group(settings, LOG_FORMAT)
    try:
        worker = Worker(settings, open_job_store(settings), open_blob_store(settings))
    except (StoreUnavailable, StorageError, OSError) as exc:
        log.error("cannot open the stores: %s", exc)
        return 1

    def stop(signum, frame):
        log.info("stopping after the current job")
        worker._stop.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info("worker %s on %s, model %s", worker.worker_id, settings.device, settings.model)
    dispatcher = Dispatcher(settings, worker.jobs).start() if settings.webhook_secret else None
    try:
        worker.run_forever()
    finally:
        if dispatcher is not None:
            dispatcher.stop(timeout=settings.webhook_timeout_s + 5)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python worker.py`: one worker, or with --gpus/--cpu-workers a supervisor of one worker per slot."""
    parser = build_parser()
    args = parser.parse_args(argv)
    overrides = {name: value for name in WORKER_FLAGS if (value := getattr(args, name)) is not None}
    try:
        settings = Settings.from_env(**overrides)
        slots = (gpu_slots(args.gpus, visible_gpus()) if args.gpus is not None
                 else cpu_slots(args.cpu_workers) if args.cpu_workers else [])
        slots = group_slots(slots, settings.parallel) if slots and settings.parallel > 1 else slots
    except (ConfigError, ValueError) as exc:
        message = str(exc)
        for name in overrides:  # a bad flag is named as the flag, a bad variable as the variable
            message = re.sub(rf"\b{ENV_NAMES[name]}\b", "--" + name.replace("_", "-"), message)  # not T2V_MODELS_DIR
        parser.error(message)
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    if slots:
        return Supervisor(slots, settings_env(overrides)).run()
    return run_worker(settings)

