"""Two model constructions at once in one process (issue 20): a pipeline load holds accelerate's
`init_empty_weights` (process-wide patches of torch.nn) while another thread loads the upscaler, builds a tiny
model or loads a LoRA. Without the construction lock (`pipeline.loading`) the second one's weights land on the meta
device ("Cannot copy out of meta tensor"). The overlap is forced: the first load waits inside its meta context
until the second thread has either finished or is waiting for the lock."""

import contextlib
import threading

import accelerate
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from config import Settings
from pipeline import loading, tiny
from pipeline.generate import VideoGenerator
from pipeline.run import Models
from pipeline.upscale import Upscaler
from test_lora import make_lora


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


def lora_load(data_dir, folder):
    """A Wan generator loaded now, and the load of a LoRA into it to run later: its LoRA layers' weights."""
    wan = VideoGenerator("tiny:wan2.2-ti2v-5b", data_dir)
    files = [("style", make_lora("wan2.2-ti2v-5b", data_dir, folder, "style"), 1.0)]

    def load():
        with wan.loras_applied(files):
            return [t for name, t in wan.pipe.transformer.named_parameters() if "lora_" in name]

    return load


def upscaler_weights(upscaler: Upscaler) -> list[torch.Tensor]:
    frames = np.random.default_rng(0).integers(0, 256, (1, 8, 8, 3), dtype=np.uint8)
    assert upscaler.upscale(frames).shape == (1, 32, 32, 3)
    return list(upscaler.model.model.parameters())


def tiny_build_weights(folder) -> list[torch.Tensor]:
    return list(load_file(folder / "transformer" / "diffusion_pytorch_model.safetensors").values())


def second_construction(second: str, data_dir, tmp_path, upscalers) -> tuple:
    """(the construction the second thread runs, what gives its weights from its result), set up beforehand."""
    if second == "upscaler":
        return lambda: Upscaler(upscalers["compact"]), upscaler_weights
    if second == "tiny build":
        return lambda: tiny.build_tiny_wan(tmp_path / "wan", "2.1-t2v"), tiny_build_weights
    return lora_load(data_dir, tmp_path), list


@pytest.mark.parametrize("second", ["upscaler", "tiny build", "LoRA load"])
def test_a_model_built_during_a_pipeline_load_gets_real_weights(data_dir, tiny_model, tiny_upscalers, tmp_path,
                                                                monkeypatch, second):
    build, weights_of = second_construction(second, data_dir, tmp_path, tiny_upscalers)
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
            if name == "second":
                settled.set()

    loader = threading.Thread(target=run, args=("generator", lambda: models.generator_for("hunyuanvideo")))
    loader.start()
    assert inside.wait(timeout=120)
    builder = threading.Thread(target=run, args=("second", build))
    builder.start()
    loader.join(timeout=300)
    builder.join(timeout=300)

    assert errors == []
    assert torch.nn.Module.register_parameter is original_register_parameter
    weights = weights_of(results["second"])
    assert weights and not any(t.is_meta for t in weights)
    assert torch.cat([t.float().flatten() for t in weights]).std() > 0  # initialised, not skipped
    pipe = results["generator"].pipe
    assert not any(t.is_meta for c in pipe.components.values() if isinstance(c, torch.nn.Module)
                   for t in c.parameters())
