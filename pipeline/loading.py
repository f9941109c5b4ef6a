"""One process-wide lock around every model construction: a pipeline load, an upscaler load, a tiny build, a LoRA
load (issue 20).

diffusers' `ModelMixin.from_pretrained` builds each model under accelerate's `init_empty_weights`, which swaps
`torch.nn.Module.register_parameter` for one that puts every new parameter on the meta device, and under
`no_init_weights`, which swaps the `torch.nn.init` functions for no-ops. Both are class and module attributes:
process-wide, not per thread. A module built in another thread meanwhile gets meta parameters ("Cannot copy out
of meta tensor" when it is moved or loaded); and two loads that overlap restore each other's patches in the wrong
order, leaving `register_parameter` patched for good, so every later module in the process is built on meta.
transformers' own meta context (`torch.device("meta")`) is a thread-local torch function mode and needs no lock.
"""

from __future__ import annotations

import contextlib
import threading

_lock = threading.RLock()  # re-entrant: a tiny build runs inside the generator load that needs it


@contextlib.contextmanager
def model_construction():
    """Hold the process-wide construction lock; also a decorator (`@model_construction()`)."""
    with _lock:
        yield
