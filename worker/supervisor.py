"""One worker process per slot (a GPU, or the CPU), restarted when it dies: `python worker.py --gpus all`."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("t2v.worker")
WORKER_SCRIPT = Path(__file__).resolve().parent.parent / "worker.py"  # each child is a `python worker.py`


RESTART_FIRST_S, RESTART_MAX_S = 1.0, 60.0
RAN_WELL_S = 60.0  # a worker that ran this long before it died starts the backoff over


@dataclass
class _Child:
    name: str
    env: dict
    proc: subprocess.Popen | None = None
    started: float = 0.0
    quick_exits: int = 0
    start_at: float = 0.0


class Supervisor:
    """One worker process per slot (a GPU, or the CPU). A worker that dies is started again after a delay
    that doubles while it keeps dying young. SIGTERM or SIGINT stops every worker after its current job;
    a second signal kills them."""

    def __init__(self, slots: list[tuple[str, dict]], env: dict[str, str], poll_s: float = 0.2):
        self.children = [_Child(name, {**os.environ, **env, **slot_env}) for name, slot_env in slots]
        self.poll_s = poll_s
        self.stopping = threading.Event()

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        log.info("supervisor: %d worker(s): %s", len(self.children), ", ".join(c.name for c in self.children))
        while not self.stopping.is_set():
            now = time.monotonic()
            for child in self.children:
                if child.proc is None and now >= child.start_at:
                    self._start(child)
                elif child.proc is not None and child.proc.poll() is not None:
                    self._schedule_restart(child, now)
            self.stopping.wait(self.poll_s)
        return self._stop_all()

    def _start(self, child: _Child) -> None:
        child.proc = subprocess.Popen([sys.executable, str(WORKER_SCRIPT)], env=child.env)
        child.started = time.monotonic()
        log.info("supervisor: %s: worker started (pid %d)", child.name, child.proc.pid)

    def _schedule_restart(self, child: _Child, now: float) -> None:
        ran = now - child.started
        child.quick_exits = 0 if ran >= RAN_WELL_S else child.quick_exits + 1
        delay = min(RESTART_FIRST_S * 2 ** max(child.quick_exits - 1, 0), RESTART_MAX_S)
        log.warning("supervisor: %s: worker pid %d exited with code %s after %.0fs; restarting in %.0fs",
                    child.name, child.proc.pid, child.proc.returncode, ran, delay)
        child.proc, child.start_at = None, now + delay

    def _live(self) -> list[subprocess.Popen]:
        return [c.proc for c in self.children if c.proc is not None and c.proc.poll() is None]

    def _on_signal(self, signum, frame) -> None:
        if self.stopping.is_set():
            log.warning("supervisor: second signal; killing the workers")
            for proc in self._live():
                proc.kill()
        self.stopping.set()

    def _stop_all(self) -> int:
        live = self._live()
        log.info("supervisor: stopping %d worker(s) after their current job", len(live))
        for proc in live:
            proc.terminate()
        for proc in live:
            proc.wait()
        log.info("supervisor: all workers stopped")
        return 0


