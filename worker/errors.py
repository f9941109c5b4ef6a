"""A failed job's `{code, message}`: what a user may read, never a traceback."""

from __future__ import annotations

import re

from storage.blobs import StorageError

# An absolute path (not a URL's): its folders go, its file name stays. Answers and webhooks carry the message.
_SERVER_PATH = re.compile(r"(?<![\w.:/~-])/(?:[^\s'\"/:,;]+/)+(?=[^\s'\"/:,;])")


class ModelUnavailable(RuntimeError):
    pass


class InputUnavailable(RuntimeError):
    """An upscale job's uploaded clip could not be fetched from the blob store."""


def classify_error(exc: BaseException) -> tuple[str, str]:
    """(code, message) for a failed job. Messages are short and name no server path (only file names)."""
    code, message = _classify(exc)
    return code, _SERVER_PATH.sub("", message)


def _classify(exc: BaseException) -> tuple[str, str]:
    import torch

    from pipeline.families import EnhancerUnavailable
    from pipeline.generate import MissingWeightsError
    from pipeline.lora import LoraError
    from pipeline.run import EmptySuggestion
    from pipeline.upscale import UpscalerLoadError
    from pipeline.video import VideoInputError

    if isinstance(exc, VideoInputError):
        return "invalid_video", str(exc)
    if isinstance(exc, InputUnavailable):
        return "storage_error", str(exc)
    if isinstance(exc, StorageError):
        return "storage_error", f"{exc}; the video was kept on the worker's disk"
    if isinstance(exc, (ModelUnavailable, MissingWeightsError, UpscalerLoadError, LoraError, EnhancerUnavailable)):
        return "model_error", str(exc)
    if isinstance(exc, EmptySuggestion):
        return "empty_suggestion", str(exc)
    if isinstance(exc, torch.OutOfMemoryError):
        return "out_of_memory", "the GPU ran out of memory; try a smaller size, fewer frames or another T2V_MEMORY preset"
    return "generation_error", f"{type(exc).__name__}: {exc}"[:500]

