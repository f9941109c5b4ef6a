"""Two model constructions at once in one process (issue 20): a pipeline load holds accelerate's
`init_empty_weights` (process-wide patches of torch.nn) while another thread loads the upscaler. Without the
construction lock (`pipeline.loading`) the upscaler's weights land on the meta device ("Cannot copy out of meta
tensor"). The overlap is forced: the first load waits inside its meta context until the second thread has either
finished or is waiting for the lock."""

import contextlib
import threading

import accelerate
import numpy as np
import torch

from config import Settings
from pipeline import loading
from pipeline.run import Models
from pipeline.upscale import Upscaler


class _ReportingLock:
    """The construction lock, setting `contended` when a thread has to wait for it."""

    def __init__(self, contended: threading.Event):
        self._lock, self._contended = threading.RLock(), contended

    def __enter__(self):
        if not self._lock.acquire(blocking=False):
            self._contended.set()
            self._lock.acquire()

    def __exit__(self, *exc):
        self._lock.release()


def test_an_upscaler_loaded_during_a_pipeline_load_gets_real_weights(data_dir, tiny_model, tiny_upscalers,
                                                                    monkeypatch):
    settled = threading.Event()  # the second thread finished, or waits for the lock
    inside = threading.Event()  # the pipeline load is inside its meta context
    monkeypatch.setattr(loading, "_lock", _ReportingLock(settled))
    real_init_empty_weights = accelerate.init_empty_weights

    @contextlib.contextmanager
    def held_init_empty_weights(*args, **kwargs):
        with real_init_empty_weights(*args, **kwargs):
            if not inside.is_set():
                inside.set()
                assert settled.wait(timeout=120)
            yield

    monkeypatch.setattr(accelerate, "init_empty_weights", held_init_empty_weights)
    original_register_parameter = torch.nn.Module.register_parameter
    models = Models(Settings.from_env(env={}, model="tiny", data_dir=data_dir))
    results, errors = {}, []

    def run(name, load):
        try:
            results[name] = load()
        except Exception as exc:  # reported below, with the thread it came from
            errors.append(f"{name}: {type(exc).__name__}: {exc}")
        finally:
            if name == "upscaler":
                settled.set()

    loader = threading.Thread(target=run, args=("generator", lambda: models.generator_for("hunyuanvideo")))
    loader.start()
    assert inside.wait(timeout=120)
    upscaler = threading.Thread(target=run, args=("upscaler", lambda: Upscaler(tiny_upscalers["compact"])))
    upscaler.start()
    loader.join(timeout=300)
    upscaler.join(timeout=300)

    assert errors == []
    assert torch.nn.Module.register_parameter is original_register_parameter
    weights = [t for t in results["upscaler"].model.model.parameters()]
    assert weights and not any(t.is_meta for t in weights)
    frames = np.random.default_rng(0).integers(0, 256, (1, 8, 8, 3), dtype=np.uint8)
    assert results["upscaler"].upscale(frames).shape == (1, 32, 32, 3)
    pipe = results["generator"].pipe
    assert not any(t.is_meta for c in pipe.components.values() if isinstance(c, torch.nn.Module)
                   for t in c.parameters())
