"""Finished videos and posters, and uploaded inputs: `LocalBlobStore` (default, a folder) or `S3BlobStore` (boto3).

Keys are made by the server (`videos/<reference_id>.mp4`, `inputs/<reference_id>`, `previews/<reference_id>.webp`,
the id from `secrets`), never from user input, and are checked against a strict pattern before they touch a path
or a bucket. An upload goes in under `inputs/`, so a worker on another machine can fetch it.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Iterator, Protocol

log = logging.getLogger(__name__)

_KEY = re.compile(r"^((videos|posters|spritesheets)/[A-Za-z0-9_-]{8,128}\.(mp4|jpg)|inputs/[A-Za-z0-9_-]{8,128}"
                  r"|previews/[A-Za-z0-9_-]{8,128}\.webp)$")
CONTENT_TYPES = {"mp4": "video/mp4", "jpg": "image/jpeg", "webp": "image/webp"}


class StorageError(RuntimeError):
    """The blob could not be stored or fetched, after retries. The message holds no credentials."""


class BlobMissing(StorageError):
    """No blob is stored under the key (deleted, or never stored)."""


def check_key(key: str) -> str:
    if not _KEY.match(key):
        raise ValueError(f"invalid blob key {key!r}")
    return key


def _content_type(key: str) -> str:
    return CONTENT_TYPES[key.rsplit(".", 1)[1]] if "." in key else "application/octet-stream"  # inputs: no suffix


class BlobStore(Protocol):
    def put(self, local_path: Path, key: str) -> int: ...
    def get(self, key: str, local_path: Path) -> int: ...
    def presigned_url(self, key: str) -> str | None: ...
    def local_path(self, key: str) -> Path | None: ...
    def exists(self, key: str) -> bool: ...
    def delete(self, key: str) -> None: ...
    def list_keys(self, prefix: str) -> Iterator[tuple[str, float]]: ...


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

    def get(self, key: str, local_path: Path) -> int:
        """Place the blob at `local_path`: a hard link where both sit on one disk, else a copy."""
        source, local_path = self._path(key), Path(local_path)
        if not source.is_file():
            raise BlobMissing(f"{key} is not stored")
        try:
            local_path.unlink(missing_ok=True)
            try:
                os.link(source, local_path)
            except OSError:  # another filesystem, or no hard links there
                shutil.copyfile(source, local_path)
        except OSError as exc:
            raise StorageError(f"could not fetch {key}: {exc.strerror or type(exc).__name__}") from None
        return local_path.stat().st_size

    def presigned_url(self, key: str) -> str | None:
        return None  # served by this API at /jobs/<id>/video

    def local_path(self, key: str) -> Path | None:
        path = self._path(key)
        return path if path.is_file() else None

    def exists(self, key: str) -> bool:
        return self.local_path(key) is not None

    def delete(self, key: str) -> None:
        try:
            self._path(key).unlink(missing_ok=True)
        except OSError as exc:
            raise StorageError(f"could not delete {key}: {exc.strerror}") from None

    def list_keys(self, prefix: str) -> Iterator[tuple[str, float]]:
        """(key, modified time) of each blob whose key starts with `prefix` (a folder, like `inputs/`)."""
        folder = self.root / prefix.strip("/")
        for path in folder.iterdir() if folder.is_dir() else ():
            key = f"{prefix.strip('/')}/{path.name}"
            if _KEY.match(key):  # skips the `.name.part` files of a put in progress
                try:
                    yield key, path.stat().st_mtime
                except FileNotFoundError:
                    continue


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
        extra = {"ContentType": _content_type(check_key(key))}
        self._retried("upload", key, lambda: self.client.upload_file(
            str(local_path), self.bucket, key, ExtraArgs=extra, Config=self.transfer))
        return Path(local_path).stat().st_size

    def get(self, key: str, local_path: Path) -> int:
        """Download the blob to `local_path` (boto3 writes a temporary file and renames it when whole)."""
        check_key(key)
        self._retried("download", key, lambda: self.client.download_file(
            self.bucket, key, str(local_path), Config=self.transfer))
        return Path(local_path).stat().st_size

    def _retried(self, what: str, key: str, call) -> None:
        """Run a whole-file transfer, with backoff between attempts; StorageError when every attempt failed."""
        from botocore.exceptions import BotoCoreError, ClientError

        for attempt in range(1, self.attempts + 1):
            try:
                return call()
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey"):
                    raise BlobMissing(f"{key} is not stored") from None
                failure = exc
            except (BotoCoreError, OSError) as exc:
                failure = exc
            if attempt == self.attempts:
                raise StorageError(f"{what} of {key} failed after {attempt} attempts ({type(failure).__name__})") from None
            delay = self.backoff_s * 2 ** (attempt - 1)
            log.warning("%s of %s failed (%s); retrying in %.1fs", what, key, type(failure).__name__, delay)
            time.sleep(delay)

    def presigned_url(self, key: str) -> str | None:
        return self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": check_key(key)}, ExpiresIn=self.url_ttl_s)

    def local_path(self, key: str) -> Path | None:
        return None

    def exists(self, key: str) -> bool:
        """Whether the blob is stored (a HEAD request); StorageError when S3 cannot say."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=check_key(key))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise StorageError(f"could not look up {key} ({type(exc).__name__})") from None
        except BotoCoreError as exc:
            raise StorageError(f"could not look up {key} ({type(exc).__name__})") from None
        return True

    def delete(self, key: str) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.delete_object(Bucket=self.bucket, Key=check_key(key))
        except (BotoCoreError, ClientError) as exc:
            raise StorageError(f"could not delete {key} ({type(exc).__name__})") from None

    def list_keys(self, prefix: str) -> Iterator[tuple[str, float]]:
        """(key, modified time) of each blob whose key starts with `prefix`."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
                for item in page.get("Contents", ()):
                    if _KEY.match(item["Key"]):
                        yield item["Key"], item["LastModified"].timestamp()
        except (BotoCoreError, ClientError) as exc:
            raise StorageError(f"could not list {prefix} ({type(exc).__name__})") from None


def open_blob_store(settings) -> BlobStore:
    """S3 when BUCKET_NAME is set, else a folder under the data directory."""
    if settings.bucket_name:
        return S3BlobStore(settings.bucket_name, settings.region_name, settings.aws_access_key,
                           settings.aws_secret_key, settings.s3_endpoint_url, settings.url_ttl_s)
    return LocalBlobStore(Path(settings.data_dir) / "blobs")
