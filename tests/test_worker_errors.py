"""worker/errors.py: a failed job's {code, message} names no server path (answers and webhooks carry it)."""

import pytest

from storage.blobs import StorageError
from worker.errors import classify_error


@pytest.mark.parametrize("exc,kept", [
    (FileNotFoundError(2, "No such file or directory", "/srv/t2v/data/work/ref00001.mp4"), "ref00001.mp4"),
    (RuntimeError("could not open /home/op/t2v/data/work/ref00001.input for reading"), "ref00001.input"),
    (StorageError("cannot write /var/lib/t2v/data/videos/videos/ref00001.mp4: disk full"), "ref00001.mp4"),
    (ValueError("bad tensor from /opt/t2v/models/HunyuanVideo/vae/config.json; see https://example.com/a/b"),
     "https://example.com/a/b"),
])
def test_a_failed_jobs_message_keeps_file_names_but_no_server_path(exc, kept):
    code, message = classify_error(exc)
    assert code in ("generation_error", "storage_error")
    assert kept in message and "/srv" not in message and "/home" not in message and "/var" not in message
    assert "/opt" not in message and "/data/" not in message, message
