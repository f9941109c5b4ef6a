"""Blob stores: a local folder, and S3 through moto's server over real HTTP."""

import os
import time

import boto3
import pytest
import requests

from storage.blobs import BlobMissing, LocalBlobStore, S3BlobStore, StorageError


def s3_store(endpoint, bucket, **kw):
    return S3BlobStore(bucket, "us-east-1", "test", "test", endpoint, url_ttl_s=600, **kw)


def test_presigned_url_returns_exactly_the_bytes_uploaded(s3_bucket, tmp_path):
    endpoint, bucket = s3_bucket
    data = os.urandom(300_000)
    (tmp_path / "v.mp4").write_bytes(data)
    store = s3_store(endpoint, bucket)
    assert store.put(tmp_path / "v.mp4", "videos/abcdefgh1234.mp4") == len(data)
    url = store.presigned_url("videos/abcdefgh1234.mp4")
    assert "X-Amz-Expires=600" in url and "X-Amz-Signature=" in url
    response = requests.get(url, timeout=10)
    assert response.status_code == 200 and response.content == data
    assert response.headers["Content-Type"] == "video/mp4"
    assert store.local_path("videos/abcdefgh1234.mp4") is None


def test_large_uploads_are_multipart(s3_bucket, tmp_path):
    endpoint, bucket = s3_bucket
    data = os.urandom(11 * 1024 * 1024)
    (tmp_path / "big.mp4").write_bytes(data)
    s3_store(endpoint, bucket, multipart_mb=5).put(tmp_path / "big.mp4", "videos/bigvideo0001.mp4")
    head = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="test",
                        aws_secret_access_key="test").head_object(Bucket=bucket, Key="videos/bigvideo0001.mp4")
    assert head["ETag"].strip('"').endswith("-3")  # three parts of 5, 5 and 1 MiB
    assert head["ContentLength"] == len(data) and head["ContentType"] == "video/mp4"


def test_upload_failure_retries_then_raises_storage_error(tmp_path, caplog):
    (tmp_path / "v.mp4").write_bytes(b"x" * 100)
    store = S3BlobStore("b", "us-east-1", "AKIATEST", "very-secret-key", "http://127.0.0.1:9", attempts=3,
                        backoff_s=0.01)
    with pytest.raises(StorageError, match="failed after 3 attempts"):
        store.put(tmp_path / "v.mp4", "videos/abcdefgh1234.mp4")
    assert (tmp_path / "v.mp4").exists()  # the local file is kept
    assert caplog.text.count("retrying") == 2 and "very-secret-key" not in caplog.text


def test_local_store_moves_atomically_and_refuses_made_up_keys(tmp_path):
    store = LocalBlobStore(tmp_path / "blobs")
    (tmp_path / "v.mp4").write_bytes(b"video")
    assert store.put(tmp_path / "v.mp4", "videos/abcdefgh1234.mp4") == 5
    assert store.local_path("videos/abcdefgh1234.mp4").read_bytes() == b"video"
    assert not (tmp_path / "v.mp4").exists() and store.presigned_url("videos/abcdefgh1234.mp4") is None
    for bad in ("../escape.mp4", "videos/../../x.mp4", "videos/a;rm -rf.mp4", "videos/abcdefgh\x00.mp4", "/etc/passwd"):
        with pytest.raises(ValueError):
            store.local_path(bad)
    store.delete("videos/abcdefgh1234.mp4")
    assert store.local_path("videos/abcdefgh1234.mp4") is None


@pytest.fixture(params=["local", "s3"])
def any_store(request, tmp_path):
    if request.param == "local":
        return LocalBlobStore(tmp_path / "blobs")
    endpoint, bucket = request.getfixturevalue("s3_bucket")
    return s3_store(endpoint, bucket, attempts=2, backoff_s=0.01)


def test_inputs_go_in_fetch_back_list_and_delete(any_store, tmp_path):
    data = os.urandom(50_000)
    (tmp_path / "clip.video").write_bytes(data)
    assert any_store.put(tmp_path / "clip.video", "inputs/Yq7abcdefgh12") == len(data)
    (tmp_path / "other.mp4").write_bytes(b"video")
    any_store.put(tmp_path / "other.mp4", "videos/Yq7abcdefgh12.mp4")

    listed = dict(any_store.list_keys("inputs/"))
    assert list(listed) == ["inputs/Yq7abcdefgh12"]  # only the inputs, not the videos
    assert abs(listed["inputs/Yq7abcdefgh12"] - time.time()) < 120

    (tmp_path / "work").mkdir()
    assert any_store.get("inputs/Yq7abcdefgh12", tmp_path / "work" / "a.input") == len(data)
    assert (tmp_path / "work" / "a.input").read_bytes() == data
    (tmp_path / "work" / "a.input").unlink()  # the worker's copy goes; the stored input stays
    assert any_store.get("inputs/Yq7abcdefgh12", tmp_path / "work" / "b.input") == len(data)

    any_store.delete("inputs/Yq7abcdefgh12")
    assert dict(any_store.list_keys("inputs/")) == {}
    with pytest.raises(BlobMissing):
        any_store.get("inputs/Yq7abcdefgh12", tmp_path / "work" / "c.input")
    assert not (tmp_path / "work" / "c.input").exists()
    for bad in ("inputs/../x", "inputs/a.mp4", "inputs/", "inputs/short"):
        with pytest.raises(ValueError):
            any_store.get(bad, tmp_path / "work" / "d.input")


def test_s3_faults_while_fetching_listing_or_deleting_are_storage_errors(tmp_path):
    store = S3BlobStore("b", "us-east-1", "AKIATEST", "very-secret-key", "http://127.0.0.1:9", attempts=2,
                        backoff_s=0.01)
    with pytest.raises(StorageError, match="download of inputs/abcdefgh1234 failed after 2 attempts"):
        store.get("inputs/abcdefgh1234", tmp_path / "x.input")
    with pytest.raises(StorageError, match="could not list inputs/"):
        list(store.list_keys("inputs/"))
    with pytest.raises(StorageError, match="could not delete"):
        store.delete("inputs/abcdefgh1234")
    assert not list(tmp_path.iterdir())
