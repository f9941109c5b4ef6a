"""LoRAs per job: whether a loaded model can take them, loading them into every expert they fit with the
pipeline's own diffusers loader, and unloading them after the job, whatever happened in it."""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Callable

import torch

from pipeline.loading import model_construction
from pipeline.speed import SpeedOptions

log = logging.getLogger(__name__)


class LoraError(ValueError):
    """A job's LoRAs cannot be applied by this loaded model; the message says why."""


def lora_problem(pipe, speed: SpeedOptions) -> str | None:
    """Why this loaded model cannot take LoRAs per job, or None. diffusers adds fp8 layerwise casting to LoRA
    layers only when they are loaded before it (a LoRA loaded after it is cast to fp8 itself and fails), and
    a compiled block recompiles for every new set of LoRAs until Dynamo's recompile limit fails the job."""
    if not hasattr(pipe, "load_lora_weights"):
        return f"diffusers has no LoRA loader for {type(pipe).__name__}"
    if speed.fp8:
        return "LoRAs cannot be added to fp8-stored weights; run this worker with T2V_FP8=0 to use them"
    if speed.compile:
        return "LoRAs cannot be swapped per job in a compiled model; run this worker with T2V_COMPILE=0 to use them"
    return None


@contextlib.contextmanager
def loras_applied(pipe, model_id: str, speed: SpeedOptions, loras: list[tuple[str, Path, float]],
                  place: Callable[[], None]):
    """Load each LoRA (name, .safetensors file, scale) with the pipeline's own diffusers loader for one job,
    into every expert it fits, and always unload them after, on a failure or cancel too, so no job's LoRA
    reaches the next job. The files are read from disk for every job; the time it takes is logged.

    diffusers' `load_lora_adapter` takes the accelerate offload hooks off before it loads and puts them back
    only after a load that worked: the LoRA's keys are checked against the model first, and should a load
    still fail, `place` applies the memory preset again, so no later job runs its transformer off the GPU."""
    if not loras:
        yield
        return
    problem = lora_problem(pipe, speed)
    if problem:
        raise LoraError(f"{model_id}: {problem}")
    started = time.perf_counter()
    adapters = [f"lora{i}" for i in range(len(loras))]  # a LoRA's name may hold a dot; adapter names may not
    hooked = offload_hooked(pipe)
    try:
        for adapter, (name, path, _) in zip(adapters, loras):
            experts = load_lora(pipe, model_id, name, Path(path), adapter)
            log.info("LoRA %s loaded into %s", name, " and ".join(experts))
        pipe.set_adapters(adapters, [scale for _, _, scale in loras])
        log.info("LoRAs %s loaded in %.2f s", ", ".join(f"{n}@{s:g}" for n, _, s in loras),
                 time.perf_counter() - started)
        yield
    finally:
        pipe.unload_lora_weights()
        if hooked - offload_hooked(pipe):
            log.warning("the LoRA loader left %s without its offload hook; applying the memory preset again",
                        ", ".join(sorted(hooked - offload_hooked(pipe))))
            place()


def offload_hooked(pipe) -> set[str]:
    """The components carrying an accelerate offload hook (the `model` and `sequential` presets)."""
    return {name for name, c in pipe.components.items() if hasattr(c, "_hf_hook")}


def load_lora(pipe, model_id: str, name: str, path: Path, adapter: str) -> list[str]:
    """Load one LoRA into each transformer its keys fit (both Wan 2.2 A14B experts: diffusers loads only into
    `transformer` unless told `load_into_transformer_2`); return their names. LoraError names the LoRA."""
    def failed(exc: Exception) -> LoraError:
        detail = str(exc).replace(str(path), path.name)[:300]  # no operator's path in a job record
        return LoraError(f"LoRA {name!r} cannot be loaded into {model_id}: {type(exc).__name__}: {detail}")

    try:
        state = pipe.lora_state_dict(str(path))
    except Exception as exc:  # a damaged file, or one in a format diffusers does not read
        raise failed(exc) from None
    experts = [n for n in ("transformer", "transformer_2") if getattr(pipe, n, None) is not None]
    for expert in experts:
        mismatch = lora_mismatch(state, getattr(pipe, expert))
        if mismatch:
            raise LoraError(f"LoRA {name!r} does not fit {model_id}'s {expert} ({mismatch}); "
                            "it was made for another model")
    for expert in experts:
        try:
            with model_construction():  # peft builds the LoRA layers: not while another load patches torch.nn
                pipe.load_lora_weights(str(path), adapter_name=adapter,
                                       **({"load_into_transformer_2": True} if expert == "transformer_2" else {}))
        except torch.OutOfMemoryError:
            raise
        except Exception as exc:
            raise failed(exc) from None
    return experts


def lora_mismatch(state: dict, transformer) -> str | None:
    """Why a LoRA state dict (diffusers' format, `transformer.<module>.lora_A.weight`) does not fit `transformer`:
    a module it names that the transformer has not, or a shape that differs. None when every key fits."""
    modules = dict(transformer.named_modules())
    for key, tensor in sorted(state.items()):
        if not key.startswith("transformer.") or ".lora" not in key:
            return f"{key} is not a transformer LoRA weight"
        path, _, part = key[len("transformer."):].partition(".lora")
        module = modules.get(path)
        if module is None:
            return f"it has weights for {path}, which the model has not"
        size, side = (tensor.shape[1], "in") if part.startswith("_A.") else (tensor.shape[0], "out")
        expected = getattr(module, f"{side}_features", None)
        if part.startswith(("_A.weight", "_B.weight")) and expected is not None and size != expected:
            return f"{path} takes {expected} {side} features, the LoRA has {size}"
    return None
