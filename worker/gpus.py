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
        parts = spec.split(",")
        if not all(re.fullmatch(r"[0-9]{1,3}", part.strip()) for part in parts):
            raise ValueError(f"--gpus takes 'all' or GPU indices like 0,1,2,3, got {spec!r}")
        indices = [int(part) for part in parts]
        if len(set(indices)) != len(indices):
            raise ValueError(f"--gpus {spec} names a GPU twice")
        missing = [i for i in indices if i >= len(visible)]
        if missing:
            raise ValueError(f"--gpus {spec}: there is no GPU {missing[0]}; {len(visible)} visible")
        chosen = [visible[i] for i in indices]
    if not chosen:
        raise ValueError("--gpus: no CUDA GPU is visible; use --cpu-workers N to run workers on the CPU")
    return [(f"gpu {gpu}", {"CUDA_VISIBLE_DEVICES": gpu, "CUDA_DEVICE_ID": "0"}) for gpu in chosen]


def cpu_slots(count: int) -> list[tuple[str, dict]]:
    return [(f"cpu {i}", {"CUDA_VISIBLE_DEVICES": "", "CUDA_DEVICE_ID": ""}) for i in range(count)]


