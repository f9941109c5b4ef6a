"""The GPUs a worker may use: one slot per GPU (or N on the CPU) for the supervisor, and a job's GPU memory peak."""

from __future__ import annotations

import os
import re


class GpuPeak:
    """torch.cuda.max_memory_allocated over one job on a CUDA device, for GET /metrics; None on the CPU.
    One worker runs one job at a time on its GPU, so the peak is that job's."""

    def __init__(self, device: str):
        self.device, self.peak_bytes = device, None

    def __enter__(self) -> "GpuPeak":
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self.device.startswith("cuda") and exc_type is None:
            import torch

            self.peak_bytes = int(torch.cuda.max_memory_allocated(self.device))
        return False



def visible_gpus() -> list[str]:
    """The GPUs this process may use: CUDA_VISIBLE_DEVICES's entries when set, else every GPU torch counts."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [gpu.strip() for gpu in visible.split(",") if gpu.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def gpu_slots(spec: str, visible: list[str]) -> list[tuple[str, dict]]:
    """(name, environment) per worker: `all`, or indices into the visible GPUs. Each worker process sees
    only its own GPU (CUDA_VISIBLE_DEVICES), as its device 0 (CUDA_DEVICE_ID)."""
    if spec == "all":
        chosen = visible
    else:
        parts = [part.strip() for part in spec.split(",")]
        if not all(re.fullmatch(r"[0-9]{1,3}(-[0-9]{1,3})?", part) for part in parts):
            raise ValueError(f"--gpus takes 'all' or GPU indices like 0,1,2,3 or 0-7, got {spec!r}")
        indices = [i for part in parts for i in _index_range(part)]
        if len(set(indices)) != len(indices):
            raise ValueError(f"--gpus {spec} names a GPU twice")
        missing = [i for i in indices if i >= len(visible)]
        if missing:
            raise ValueError(f"--gpus {spec}: there is no GPU {missing[0]}; {len(visible)} visible")
        chosen = [visible[i] for i in indices]
    if not chosen:
        raise ValueError("--gpus: no CUDA GPU is visible; use --cpu-workers N to run workers on the CPU")
    return [(f"gpu {gpu}", {"CUDA_VISIBLE_DEVICES": gpu, "CUDA_DEVICE_ID": "0"}) for gpu in chosen]


def _index_range(part: str) -> range:
    first, _, last = part.partition("-")
    return range(int(first), int(last or first) + 1)


def cpu_slots(count: int) -> list[tuple[str, dict]]:
    return [(f"cpu {i}", {"CUDA_VISIBLE_DEVICES": "", "CUDA_DEVICE_ID": ""}) for i in range(count)]


def group_slots(slots: list[tuple[str, dict]], size: int) -> list[tuple[str, dict]]:
    """The slots in groups of `size` (--parallel): one worker group per `size` GPUs, whose process sees those
    GPUs (its rank r drives the r-th); on the CPU, `size` CPU slots per group."""
    if len(slots) % size:
        raise ValueError(f"--parallel {size}: {len(slots)} slot(s) do not split into groups of {size}")
    groups = []
    for first in range(0, len(slots), size):
        members = [env["CUDA_VISIBLE_DEVICES"] for _, env in slots[first:first + size]]
        if members[0]:
            gpus = ",".join(members)
            groups.append((f"gpus {gpus}", {"CUDA_VISIBLE_DEVICES": gpus, "CUDA_DEVICE_ID": "0",
                                            "T2V_PARALLEL": str(size)}))
        else:
            groups.append((f"cpu group {first // size}", {"CUDA_VISIBLE_DEVICES": "", "CUDA_DEVICE_ID": "",
                                                          "T2V_PARALLEL": str(size)}))
    return groups
