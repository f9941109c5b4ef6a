"""One clip across several processes: diffusers' context parallelism over torch.distributed.

A group is N processes (ranks) joined by one torch.distributed process group: NCCL for CUDA tensors, gloo for
CPU tensors (the CPU path, and the small control messages on CUDA). Every rank loads the same pipeline; `split`
hands each transformer to diffusers' `enable_parallelism` with a `ContextParallelConfig` and a plan (diffusers'
own `_cp_plan`, or `pipeline.cp_plans`), so each rank holds 1/N of the tokens between the embedders and the
output projection and attention exchanges them (Ulysses all-to-all, or ring). Every rank runs the same steps
from the same seed; rank 0 alone decodes, upscales and encodes (`pipeline.run.run_job`).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist

from pipeline import cp_plans

log = logging.getLogger(__name__)

# Backends that both support context parallel and return the log-sum-exp ring attention merges with
# (diffusers 0.42.1, models/attention_dispatch.py; its native SDPA backends refuse return_lse=True).
LSE_BACKENDS = frozenset({"flash", "flash_hub", "flash_varlen_hub", "_flash_3_hub", "_flash_3_varlen_hub",
                          "_native_cudnn", "_native_flash", "sage", "sage_hub"})
DEFAULT_TIMEOUT_S = 300.0  # a collective that waits this long on a dead or hung rank fails instead of hanging


@dataclass(frozen=True)
class Group:
    rank: int
    size: int

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def agreed(self, should_cancel: Callable[[], bool] | None) -> Callable[[], bool]:
        """Rank 0's cancel decision on every rank: each check is one broadcast of one byte from rank 0 (a CPU
        tensor, so gloo carries it, never a GPU sync). Every rank checks at the same points (before each
        transformer block, after each step), so all of them stop at the same block and no collective is left
        waiting. Only rank 0's `should_cancel` is read."""
        local = should_cancel if self.leader else None

        def check() -> bool:
            flag = torch.tensor([bool(local and local())], dtype=torch.uint8)
            dist.broadcast(flag, src=0)
            return bool(flag.item())

        return check


_group: Group | None = None


def current() -> Group | None:
    """This process's group, or None when it runs alone."""
    return _group


def join(rank: int, size: int, init_method: str, device: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> Group:
    """Join the group of `size` ranks at `init_method` (`tcp://host:port` or `file://path`) as `rank`. On CUDA
    each rank drives `cuda:<rank>` (the group's GPUs are the visible ones), and the process group carries CUDA
    tensors on NCCL and CPU tensors on gloo; on the CPU, gloo only."""
    global _group
    # Named per device even on the CPU: diffusers' size exchange (Ulysses/Ring Anything) stays on the CPU only when
    # the backend's name says "cpu"; otherwise it asks `torch.accelerator.current_accelerator()`, which names CUDA
    # on a CUDA build of torch whose CUDA_VISIBLE_DEVICES is empty (the supervisor's CPU workers).
    backend = "cpu:gloo,cuda:nccl" if device.startswith("cuda") else "cpu:gloo"
    if device.startswith("cuda"):
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=size,
                            timeout=timedelta(seconds=timeout_s))
    _group = Group(rank, size)
    return _group


def leave() -> None:
    """Leave the group (the process group is destroyed); the process then runs alone."""
    global _group
    if dist.is_initialized():
        dist.destroy_process_group()
    _group = None


def context_parallel_config(heads: int, size: int, attention_backend: str, masked: bool = False):
    """Ulysses when the heads divide among the ranks; else ring where the backend returns LSE and attention takes
    no mask (ring attention carries none); else Ulysses Anything (uneven heads). Token counts that do not divide
    are handled per call (`_fit_tokens`)."""
    from diffusers import ContextParallelConfig

    if heads % size == 0:
        return ContextParallelConfig(ulysses_degree=size)
    if attention_backend in LSE_BACKENDS and not masked:
        return ContextParallelConfig(ring_degree=size)
    return ContextParallelConfig(ulysses_degree=size, ulysses_anything=True)


def split(transformer, group: Group, attention_backend: str, masked: bool) -> str:
    """Split `transformer` across `group`'s ranks; return how, for the log. ValueError when it cannot be."""
    plan = cp_plans.plan_for(transformer)
    name = type(transformer).__name__
    if plan is None:
        raise ValueError(f"{name} has no context-parallel plan")
    if masked and name in cp_plans.NEEDS_NO_MASK:
        raise ValueError(f"{name} splits only without an attention mask (T2V_MASK_FREE=1)")
    config = context_parallel_config(transformer.config.num_attention_heads, group.size, attention_backend,
                                     masked=name in cp_plans.MASKED)
    if name in cp_plans.PROCESSORS:
        _replace_processors(transformer, cp_plans.PROCESSORS[name])
    if name in cp_plans.SETUP:
        cp_plans.SETUP[name]()
    with _no_accelerator_shim():
        transformer.enable_parallelism(config=config, cp_plan=plan)
    uneven_heads = config.ulysses_anything
    transformer.register_forward_pre_hook(_fit_tokens(config, group.size, uneven_heads, name), with_kwargs=True)
    kind = "ring" if config.ring_degree > 1 else "ulysses"
    return f"{kind} x{group.size}" + (" (uneven heads)" if uneven_heads else "")


def _replace_processors(transformer, processor_class) -> None:
    """Put `processor_class` where its parent class (the transformer's own processor) sits, keeping each one's
    attention backend; other attention layers (the token refiner's) keep theirs."""
    processors = {}
    for layer, processor in transformer.attn_processors.items():
        if type(processor) in processor_class.__bases__:
            backend, processor = processor._attention_backend, processor_class()
            processor._attention_backend = backend
        processors[layer] = processor
    transformer.set_attn_processor(processors)


def _fit_tokens(config, size: int, uneven_heads: bool, name: str):
    """A pre-hook on the transformer that picks, per call, diffusers' even split or its "anything" split
    (Ulysses Anything / Ring Anything) by whether the tokens split this call divide among the ranks. Every
    rank gets the same inputs, so every rank picks the same. The anything split costs one small all-gather
    of the shard sizes per attention call."""
    ring = config.ring_degree > 1

    def before(module, args, kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        counts = [video_tokens(module, hidden.shape)]
        text = [kwargs[arg].shape[1] for arg in cp_plans.TEXT_INPUTS.get(name, ()) if kwargs.get(arg) is not None]
        if text:
            counts.append(sum(text))
        uneven = any(count % size for count in counts)
        config.ring_anything = ring and uneven
        config.ulysses_anything = not ring and (uneven or uneven_heads)
        return None

    return before


def video_tokens(transformer, shape) -> int:
    """Tokens of a (B, C, F, H, W) latent after the transformer's patch embedding; a packed (B, tokens, C)
    latent (LTX-2's) holds them already."""
    if len(shape) == 3:
        return shape[1]
    patch = transformer.config.patch_size
    p_t, p_h, p_w = patch if isinstance(patch, (tuple, list)) else (transformer.config.patch_size_t, patch, patch)
    return (shape[2] // p_t) * (shape[3] // p_h) * (shape[4] // p_w)


@contextlib.contextmanager
def _no_accelerator_shim():
    """diffusers 0.42.1's `_resolve_parallel_config` places the config on `rank % torch.accelerator.device_count()`,
    which divides by zero on a machine without an accelerator (an explicit `mesh=` does not avoid it: the device
    is computed first). Only there, and only for that call, the count reads 1, so the device is `cpu:0`; the CPU
    path uses no other accelerator call. With an accelerator nothing is changed."""
    if torch.accelerator.is_available():
        yield
        return
    count = torch.accelerator.device_count
    torch.accelerator.device_count = lambda: 1
    try:
        yield
    finally:
        torch.accelerator.device_count = count
