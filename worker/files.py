"""Where a job's files live: the upload being checked on the API node, and the blob keys of its input and preview."""

from __future__ import annotations

import logging
from pathlib import Path

from config import Settings
from storage.blobs import BlobStore, StorageError

log = logging.getLogger("t2v.worker")


def upload_path(settings: Settings, reference_id: str) -> Path:
    """Where the API checks an uploaded clip before it goes to the blob store. The name is the
    server-made reference id, never the client's."""
    return Path(settings.data_dir) / "uploads" / f"{reference_id}.video"


def input_key(reference_id: str) -> str:
    """The blob key of a job's input (an upscale job's clip, an image-to-video job's image); workers on any
    node fetch it from there."""
    return f"inputs/{reference_id}"


def preview_key(reference_id: str) -> str:
    """The blob key of a job's latest preview (an animated WebP), overwritten as denoising goes on."""
    return f"previews/{reference_id}.webp"


def discard_input(settings: Settings, blobs: BlobStore, job: dict) -> None:
    """Delete a job's input (clip or image) once the job has ended, unless T2V_KEEP_INPUTS is on.
    A storage fault is only logged: the worker's sweep deletes the input later."""
    if settings.keep_inputs or (job["kind"] != "upscale" and not job["params"].get("image_key")):
        return
    try:
        blobs.delete(input_key(job["reference_id"]))
    except StorageError as exc:
        log.warning("job %s: its input was not deleted (%s); a later sweep will", job["reference_id"], exc)

