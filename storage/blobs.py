"""Finished videos and posters: `LocalBlobStore` (default, a folder) or `S3BlobStore` (boto3).

Keys are made by the server (`videos/<reference_id>.mp4`, from `secrets`), never from user input,
and are checked against a strict pattern before they touch a path or a bucket.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Protocol

log = logging.getLogger(__name__)

# Videos and posters; `inputs/<reference_id>`: a job's checked input image, kept as it was sent.
_KEY = re.compile(r"^((videos|posters)/[A-Za-z0-9_-]{8,128}\.(mp4|jpg)|inputs/[A-Za-z0-9_-]{8,128})$")
CONTENT_TYPES = {"mp4": "video/mp4", "jpg": "image/jpeg"}


class StorageError(RuntimeError):
    """The blob could not be stored or fetched, after retries. The message holds no credentials."""


def check_key(key: str) -> str:
    if not _KEY.match(key):
        raise ValueError(f"invalid blob key {key!r}")
    return key


class BlobStore(Protocol):
    def put(self, local_path: Path, key: str) -> int: ...
    def presigned_url(self, key: str) -> str | None: ...
    def local_path(self, key: str) -> Path | None: ...
    def delete(self, key: str) -> None: ...


class LocalBlobStore:
    """Blobs in a folder under the data directory; the API streams them itself."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def put(self, local_path: Path, key: str) -> int:
        """Move (or copy across filesystems) `local_path` into place atomically; return its size."""
        final = self._path(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f".{final.name}.part")
        try:
            shutil.move(str(local_path), tmp)
            os.replace(tmp, final)
        except OSError as exc:
            raise StorageError(f"could not store {key}: {exc.strerror}") from None
        return final.stat().st_size

    def presigned_url(self, key: str) -> str | None:
        return None  # served by this API at /jobs/<id>/video

    def local_path(self, key: str) -> Path | None:
        path = self._path(key)
        return path if path.is_file() else None

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)


class S3BlobStore:
    """Blobs in an S3 (or S3-compatible) bucket: multipart uploads with retries, presigned GET URLs."""

    def __init__(self, bucket: str, region: str | None = None, access_key: str | None = None,
                 secret_key: str | None = None, endpoint_url: str | None = None, url_ttl_s: int = 3600,
                 attempts: int = 4, backoff_s: float = 0.5, multipart_mb: int = 8):
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        self.bucket = bucket
        self.url_ttl_s = url_ttl_s
        self.attempts = attempts
        self.backoff_s = backoff_s
        self.client = boto3.client(
            "s3", region_name=region, aws_access_key_id=access_key, aws_secret_access_key=secret_key,
            endpoint_url=endpoint_url,
            config=Config(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=5, read_timeout=30,
                          signature_version="s3v4"),
        )
        chunk = multipart_mb * 1024 * 1024
        self.transfer = TransferConfig(multipart_threshold=chunk, multipart_chunksize=chunk)

    def put(self, local_path: Path, key: str) -> int:
        """Upload with backoff between whole-file retries; raise StorageError when every attempt failed."""
        from botocore.exceptions import BotoCoreError, ClientError

        check_key(key)
        extra = {"ContentType": CONTENT_TYPES.get(key.rsplit(".", 1)[-1], "application/octet-stream")}
        for attempt in range(1, self.attempts + 1):
            try:
                self.client.upload_file(str(local_path), self.bucket, key, ExtraArgs=extra, Config=self.transfer)
                return Path(local_path).stat().st_size
            except (BotoCoreError, ClientError, OSError) as exc:
                if attempt == self.attempts:
                    raise StorageError(f"upload of {key} failed after {attempt} attempts ({type(exc).__name__})") from None
                delay = self.backoff_s * 2 ** (attempt - 1)
                log.warning("upload of %s failed (%s); retrying in %.1fs", key, type(exc).__name__, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")

    def presigned_url(self, key: str) -> str | None:
        return self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": check_key(key)}, ExpiresIn=self.url_ttl_s)

    def local_path(self, key: str) -> Path | None:
        return None

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=check_key(key))


def open_blob_store(settings) -> BlobStore:
    """S3 when BUCKET_NAME is set, else a folder under the data directory."""
    if settings.bucket_name:
        return S3BlobStore(settings.bucket_name, settings.region_name, settings.aws_access_key,
                           settings.aws_secret_key, settings.s3_endpoint_url, settings.url_ttl_s)
    return LocalBlobStore(Path(settings.data_dir) / "blobs")
