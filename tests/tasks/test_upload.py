"""Upload sinks against a real loopback S3 server (ministack, signature-checked, over TLS) and a tmp dir."""

from __future__ import annotations

import base64
import hashlib
import io
import logging
import os
import ssl
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import botocore.retries.standard
import pytest
from botocore.awsrequest import AWSResponse
from botocore.response import StreamingBody
from botocore.stub import Stubber

from tasks.upload import (
    MAX_PRESIGN_SECONDS,
    LocalSink,
    S3Sink,
    Secret,
    UploadAuthError,
    UploadConflictError,
    UploadError,
    UploadIntegrityError,
    UploadTransientError,
    is_retryable,
    make_s3_client,
    r2_credentials,
    sink_from_uri,
)
from tests.faultproxy import Action, Drop, FaultProxy, ProxyRequest, Stall, Status, Truncate
from tests.s3server import S3TestServer, run_s3_server

MiB = 1024 * 1024


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _count_requests(client: Any, operation: str = "*") -> list[str]:
    """Record every HTTP attempt the client sends (one entry per attempt, retries included)."""
    sent: list[str] = []
    client.meta.events.register(f"before-send.s3.{operation}",
                                lambda request, **_: sent.append(f"{request.method} {request.url}"))
    return sent


class _Raw:
    def __init__(self, body: bytes):
        self._body = body

    def stream(self, **_: Any) -> Any:
        yield self._body


def _inject_503(client: Any, operation: str, failures: int | None) -> list[int]:
    """Answer the first `failures` attempts of `operation` with a 503 (None: every attempt)."""
    attempts: list[int] = []

    def fake_send(request: Any, **_: Any) -> AWSResponse | None:
        attempts.append(1)
        if failures is None or len(attempts) <= failures:
            body = b"<Error><Code>ServiceUnavailable</Code><Message>injected</Message></Error>"
            return AWSResponse(request.url, 503, {"Content-Type": "application/xml"}, _Raw(body))
        return None  # let the real request through

    client.meta.events.register(f"before-send.s3.{operation}", fake_send)
    return attempts


# ---------------------------------------------------------------------------------------------
# S3Sink against ministack
# ---------------------------------------------------------------------------------------------

def test_put_then_head_matches_local_bytes(s3_server, s3_bucket, tmp_path):
    data = os.urandom(50_000)
    local = _write(tmp_path / "clip.mp4", data)
    result = S3Sink(s3_bucket, "videos", s3_server.client()).put(local, "ab/clip.mp4", "video/mp4")

    assert (result.key, result.uri) == ("videos/ab/clip.mp4", f"s3://{s3_bucket}/videos/ab/clip.mp4")
    assert result.sha256 == hashlib.sha256(data).hexdigest() and result.bytes == len(data)
    assert not result.skipped
    client = s3_server.client()
    head = client.head_object(Bucket=s3_bucket, Key=result.key)
    assert head["ContentType"] == "video/mp4"
    assert head["CacheControl"] == "public, max-age=31536000, immutable"
    assert head["Metadata"] == {"sha256": hashlib.sha256(data).hexdigest()}
    assert client.get_object(Bucket=s3_bucket, Key=result.key)["Body"].read() == data


def test_second_put_is_skipped_after_head(s3_server, s3_bucket, tmp_path):
    local = _write(tmp_path / "a.bin", b"same bytes" * 100)
    client = s3_server.client()
    sink = S3Sink(s3_bucket, "", client)
    sink.put(local, "a.bin")
    sent = _count_requests(client)

    again = sink.put(local, "a.bin")

    assert again.skipped
    assert [s.split()[0] for s in sent] == ["HEAD"]


def test_concurrent_writer_412_with_same_bytes_is_skipped(s3_server, s3_bucket, tmp_path):
    local = _write(tmp_path / "a.bin", b"racing" * 1000)
    client = s3_server.client()
    sink = S3Sink(s3_bucket, "", client)
    sink.put(local, "a.bin")
    sent = _count_requests(client)

    # Skip the pre-check so the conditional PUT itself meets the existing object (a lost race).
    again = sink.put(local, "a.bin", skip_if_present=False)

    assert again.skipped
    assert [s.split()[0] for s in sent] == ["PUT", "HEAD"]


def test_412_with_different_bytes_is_a_conflict_and_keeps_the_original(s3_server, s3_bucket, tmp_path):
    client = s3_server.client()
    sink = S3Sink(s3_bucket, "", client)
    sink.put(_write(tmp_path / "first.bin", b"first"), "k.bin")

    with pytest.raises(UploadConflictError, match="different content"):
        sink.put(_write(tmp_path / "second.bin", b"second!"), "k.bin", skip_if_present=False)
    assert client.get_object(Bucket=s3_bucket, Key="k.bin")["Body"].read() == b"first"


def test_overwrite_replaces_different_content(s3_server, s3_bucket, tmp_path):
    client = s3_server.client()
    sink = S3Sink(s3_bucket, "m", client)
    sink.put(_write(tmp_path / "v1.json", b'{"v": 1}'), "rec.json", cache_control="no-cache")
    result = sink.put(_write(tmp_path / "v2.json", b'{"v": 2}'), "rec.json", cache_control="no-cache",
                      overwrite=True)
    assert not result.skipped
    assert sink.read_bytes("rec.json") == b'{"v": 2}'
    assert sink.verify("rec.json", 8, hashlib.sha256(b'{"v": 2}').hexdigest())
    assert not sink.verify("rec.json", 8, hashlib.sha256(b'{"v": 1}').hexdigest())
    assert not sink.verify("missing.json", 8, result.sha256)
    assert sink.read_bytes("missing.json", missing_ok=True) is None


def test_tampered_checksum_surfaces_as_integrity_error(s3_server, s3_bucket, tmp_path):
    client = s3_server.client()
    wrong = base64.b64encode(hashlib.sha256(b"something else").digest()).decode()

    def tamper(params: dict[str, Any], **_: Any) -> None:
        params["ChecksumSHA256"] = wrong

    client.meta.events.register("before-parameter-build.s3.PutObject", tamper)
    with pytest.raises(UploadIntegrityError, match="BadDigest"):
        S3Sink(s3_bucket, "", client).put(_write(tmp_path / "x.bin", b"payload"), "x.bin")
    with pytest.raises(client.exceptions.ClientError, match="404"):
        client.head_object(Bucket=s3_bucket, Key="x.bin")


def test_multipart_upload_roundtrip_and_conditional_complete(s3_server, s3_bucket, tmp_path):
    data = os.urandom(11 * MiB + 123)  # 3 parts of 5 MiB, the last one shorter
    local = _write(tmp_path / "big.bin", data)
    client = s3_server.client()
    sink = S3Sink(s3_bucket, "p", client, multipart_threshold=5 * MiB, part_size=5 * MiB)
    sent = _count_requests(client)

    result = sink.put(local, "big.bin", "video/mp4")

    assert not result.skipped
    assert sum("uploadId=" in s and s.startswith("PUT") for s in sent) == 3
    head = client.head_object(Bucket=s3_bucket, Key="p/big.bin")
    assert head["ETag"].strip('"').endswith("-3")
    assert head["Metadata"]["sha256"] == hashlib.sha256(data).hexdigest()
    assert head["ContentType"] == "video/mp4"
    assert client.get_object(Bucket=s3_bucket, Key="p/big.bin")["Body"].read() == data
    # A second multipart write meets If-None-Match on complete -> 412 -> same sha256 -> skipped.
    assert sink.put(local, "big.bin", skip_if_present=False).skipped
    assert client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []


def test_presigned_get_returns_the_bytes(s3_server, s3_bucket, tmp_path):
    data = b"presigned content " * 50
    sink = S3Sink(s3_bucket, "v", s3_server.client(), presign_expires=600)
    result = sink.put(_write(tmp_path / "p.mp4", data), "p.mp4")

    assert result.presigned_url is not None and result.presigned_url.startswith("https://")
    context = ssl.create_default_context(cafile=str(s3_server.ca_path))
    with urllib.request.urlopen(result.presigned_url, context=context) as response:
        assert response.read() == data
    tampered = result.presigned_url[:-4] + "0000"
    with pytest.raises(urllib.error.HTTPError, match="403"):
        urllib.request.urlopen(tampered, context=context)


def test_presign_expiry_is_capped_at_seven_days(s3_server, s3_bucket):
    sink = S3Sink(s3_bucket, "", s3_server.client())
    assert "X-Amz-Expires=604800" in sink.presign("k", MAX_PRESIGN_SECONDS)
    with pytest.raises(ValueError, match="7 days"):
        sink.presign("k", MAX_PRESIGN_SECONDS + 1)
    with pytest.raises(ValueError, match="7 days"):
        S3Sink(s3_bucket, "", s3_server.client(), presign_expires=30 * 86400)


@pytest.mark.parametrize("skip_if_present", [True, False])
def test_wrong_secret_is_one_clear_auth_error_without_retries(s3_server, s3_bucket, tmp_path, caplog,
                                                              skip_if_present):
    secret = "wrong-secret-do-not-leak-9f3a"
    client = s3_server.client(secret_access_key=secret)
    sent = _count_requests(client)
    caplog.set_level(logging.DEBUG)

    with pytest.raises(UploadAuthError) as info:
        S3Sink(s3_bucket, "", client).put(_write(tmp_path / "a.bin", b"x"), "a.bin",
                                          skip_if_present=skip_if_present)

    # HEAD first by default; either way exactly one request reaches the server (403 is not retried).
    assert [s.split()[0] for s in sent] == (["HEAD"] if skip_if_present else ["PUT"])
    message = str(info.value)
    assert s3_bucket in message and "R2_ACCESS_KEY_ID/R2_SECRET_ACCESS_KEY" in message
    assert not is_retryable(info.value)
    assert secret not in message and secret not in repr(info.value)
    assert secret not in caplog.text


@pytest.fixture
def no_backoff(monkeypatch):
    """Keep retry tests fast: same retry decisions, no sleeping between attempts."""
    monkeypatch.setattr(botocore.retries.standard.ExponentialBackoff, "delay_amount", lambda self, context: 0)


def test_transient_503s_are_retried_then_succeed(s3_server, s3_bucket, tmp_path, no_backoff):
    client = s3_server.client(max_attempts=5)
    attempts = _inject_503(client, "PutObject", failures=2)

    result = S3Sink(s3_bucket, "", client).put(_write(tmp_path / "a.bin", b"eventually"), "a.bin")

    assert not result.skipped and len(attempts) == 3
    assert client.get_object(Bucket=s3_bucket, Key="a.bin")["Body"].read() == b"eventually"


def test_transient_503s_that_never_stop_end_in_a_retryable_error(s3_server, s3_bucket, tmp_path, no_backoff):
    client = s3_server.client(max_attempts=3)
    attempts = _inject_503(client, "PutObject", failures=None)

    with pytest.raises(UploadTransientError, match="503") as info:
        S3Sink(s3_bucket, "", client).put(_write(tmp_path / "a.bin", b"never"), "a.bin")
    assert len(attempts) == 3
    assert is_retryable(info.value)


# ---------------------------------------------------------------------------------------------
# list, and reads that fail (a fault-injecting proxy between TLS and ministack)
# ---------------------------------------------------------------------------------------------

LIST_KEYS = ["runs/2024-06-01/metrics.parquet", "runs/2024-06-02/metrics.parquet", "runs/2024-06-02/manifest.csv",
             "runs-old/metrics.parquet", "videos/ab/x.mp4", "top.json"]


def _put_keys(sink: Any, tmp_path: Path, keys: list[str]) -> None:
    for i, key in enumerate(keys):
        sink.put(_write(tmp_path / f"src-{i}", key.encode()), key)


def test_s3_list_pages_through_the_keys_under_a_prefix(s3_server, s3_bucket, tmp_path):
    client = s3_server.client()
    sink = S3Sink(s3_bucket, "out", client)
    _put_keys(sink, tmp_path, LIST_KEYS)
    for outside in ("out-other/runs/x", "runs/not-in-the-sink", "outruns/y"):   # around the sink's prefix
        client.put_object(Bucket=s3_bucket, Key=outside, Body=b"x")
    client.meta.events.register("before-parameter-build.s3.ListObjectsV2",
                                lambda params, **_: params.update(MaxKeys=2))   # 2 keys a page
    sent = _count_requests(client, "ListObjectsV2")

    assert sink.list() == sorted(LIST_KEYS)
    assert len(sent) == 3
    assert sink.list("runs/") == ["runs/2024-06-01/metrics.parquet", "runs/2024-06-02/manifest.csv",
                                  "runs/2024-06-02/metrics.parquet"]
    assert sink.list("runs") == sorted(sink.list("runs/") + ["runs-old/metrics.parquet"])
    assert sink.list("/runs//2024-06-02/") == ["runs/2024-06-02/manifest.csv", "runs/2024-06-02/metrics.parquet"]
    assert sink.list("nothing/") == []
    assert S3Sink(s3_bucket, "", client).list("runs/") == ["runs/not-in-the-sink"]
    with pytest.raises(ValueError, match="invalid object key"):
        sink.list("runs/../")


def test_s3_and_local_sinks_list_alike(s3_server, s3_bucket, tmp_path):
    s3 = S3Sink(s3_bucket, "p", s3_server.client())
    local = LocalSink(tmp_path / "store")
    for sink in (s3, local):
        _put_keys(sink, tmp_path, LIST_KEYS)
    for prefix in ["", "runs/", "runs", "runs/2024-06-02/m", "videos/ab/", "videos/ab/x.mp4", "t", "none/"]:
        assert s3.list(prefix) == local.list(prefix), prefix


def test_list_with_refused_credentials_is_an_auth_error(s3_server, s3_bucket):
    with pytest.raises(UploadAuthError, match="R2_ACCESS_KEY_ID"):
        S3Sink(s3_bucket, "", s3_server.client(secret_access_key="wrong-secret")).list()


def test_a_missing_bucket_is_an_error_not_a_missing_key(s3_server):
    sink = S3Sink("no-such-bucket-4c1d", "", s3_server.client())
    with pytest.raises(UploadError, match="NoSuchBucket") as info:
        sink.read_bytes("k.json", missing_ok=True)
    assert not is_retryable(info.value)
    with pytest.raises(UploadError, match="NoSuchBucket"):
        sink.list()


def test_a_body_shorter_than_its_content_length_is_transient(s3_server):
    client = s3_server.client()
    with Stubber(client) as stub:   # a body stream that ends early without raising
        stub.add_response("get_object", {"Body": StreamingBody(io.BytesIO(b"0123456789"), 10), "ContentLength": 100},
                          {"Bucket": "b", "Key": "p/k.json"})
        with pytest.raises(UploadTransientError, match="10 of 100 bytes") as info:
            S3Sink("b", "p", client).read_bytes("k.json", missing_ok=True)
    assert is_retryable(info.value)


@pytest.fixture(scope="module")
def s3_faults(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3TestServer]:
    with run_s3_server(tmp_path_factory.mktemp("s3readfaults"), faults=True) as server:
        yield server


@pytest.fixture
def proxy(s3_faults: S3TestServer) -> Iterator[FaultProxy]:
    assert s3_faults.faults is not None
    s3_faults.faults.clear()
    yield s3_faults.faults
    s3_faults.faults.clear()


READ_CALLS: dict[str, tuple[str, Callable[[S3Sink, Any], Any]]] = {
    "read_bytes": ("GET", lambda sink, put: sink.read_bytes("a/x.bin")),
    "read_bytes_missing_ok": ("GET", lambda sink, put: sink.read_bytes("a/x.bin", missing_ok=True)),
    "verify": ("HEAD", lambda sink, put: sink.verify("a/x.bin", put.bytes, put.sha256)),
    "list": ("GET", lambda sink, put: sink.list("a/")),
}
READ_FAULTS: list[Action] = [Status(500), Status(503), Drop(), Truncate(0), Truncate(10), Stall(1.5)]


@pytest.fixture(scope="module")
def read_bucket(s3_faults: S3TestServer, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Any]:
    """One bucket holding p/a/x.bin for every read test (reads change nothing); (bucket, UploadResult)."""
    bucket = s3_faults.create_bucket()
    source = _write(tmp_path_factory.mktemp("reads") / "x.bin", bytes(range(256)) * 4)
    return bucket, S3Sink(bucket, "p", s3_faults.client()).put(source, "a/x.bin")


@pytest.mark.parametrize("action", READ_FAULTS, ids=lambda a: a.name)
@pytest.mark.parametrize("call", READ_CALLS, ids=str)
def test_failed_reads_are_transient_and_succeed_on_retry(s3_faults, proxy, read_bucket, call, action):
    method, read = READ_CALLS[call]
    bucket, put = read_bucket
    read_timeout = 0.75 if isinstance(action, Stall) else 60
    sink = S3Sink(bucket, "p", s3_faults.client(max_attempts=1, read_timeout=read_timeout))
    expected = read(sink, put)
    assert expected   # the bytes, True, ["a/x.bin"]
    proxy.add_rule(match=lambda req: req.method == method, action=action, times=1)

    with pytest.raises(UploadTransientError) as info:
        read(sink, put)

    assert is_retryable(info.value) and f"s3://{sink.bucket}/p/a" in str(info.value)
    assert read(sink, put) == expected   # the next attempt gets the whole answer
    # A stalled request is logged once it is forwarded: wait, so it cannot land in the next test's log.
    _wait_for(lambda: action.name in [r.action for r in proxy.requests if r.method == method])


def _wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def test_a_cut_second_page_fails_the_listing(s3_faults, proxy, tmp_path):
    client = s3_faults.client(max_attempts=1)
    sink = S3Sink(s3_faults.create_bucket(), "", client)
    _put_keys(sink, tmp_path, LIST_KEYS)
    client.meta.events.register("before-parameter-build.s3.ListObjectsV2",
                                lambda params, **_: params.update(MaxKeys=2))

    def second_page(req: ProxyRequest) -> bool:
        return req.method == "GET" and "continuation-token=" in req.path

    proxy.add_rule(match=second_page, action=Truncate(10), times=1)
    with pytest.raises(UploadTransientError):   # never a silently short list
        sink.list()
    assert sink.list() == sorted(LIST_KEYS)


def test_missing_key_is_none_but_a_cut_body_is_an_error(s3_faults, proxy, tmp_path):
    sink = S3Sink(s3_faults.create_bucket(), "", s3_faults.client(max_attempts=1))
    sink.put(_write(tmp_path / "r.json", b'{"outputs": {}}' * 100), "r.json")

    assert sink.read_bytes("absent.json", missing_ok=True) is None
    proxy.add_rule(match=lambda req: req.method == "GET", action=Status(404), times=1)   # NoSuchKey
    assert sink.read_bytes("r.json", missing_ok=True) is None
    proxy.add_rule(match=lambda req: req.method == "GET", action=Truncate(10), times=1)
    with pytest.raises(UploadTransientError):
        sink.read_bytes("r.json", missing_ok=True)
    assert sink.read_bytes("r.json", missing_ok=True) == b'{"outputs": {}}' * 100


# ---------------------------------------------------------------------------------------------
# Credentials, client config, sink selection (no server needed)
# ---------------------------------------------------------------------------------------------

def test_secret_repr_hides_the_value():
    secret = Secret("super-secret-value")
    creds = r2_credentials({"R2_ACCOUNT_ID": "acc", "R2_ACCESS_KEY_ID": "AK",
                            "R2_SECRET_ACCESS_KEY": "super-secret-value"})
    for text in (repr(secret), str(secret), repr(creds), f"{creds}"):
        assert "super-secret-value" not in text
    assert creds.secret_access_key.get() == "super-secret-value"


def test_missing_credentials_name_the_variables():
    with pytest.raises(Exception, match="R2_SECRET_ACCESS_KEY"):
        r2_credentials({"R2_ACCOUNT_ID": "acc", "R2_ACCESS_KEY_ID": "AK"})


def test_make_s3_client_builds_the_r2_endpoint_and_config():
    client = make_s3_client(account_id="abc123", access_key_id="AK", secret_access_key="SK")
    assert client.meta.endpoint_url == "https://abc123.r2.cloudflarestorage.com"
    assert client.meta.region_name == "auto"
    config = client.meta.config
    assert config.request_checksum_calculation == "when_required"
    assert config.response_checksum_validation == "when_required"
    assert config.s3["addressing_style"] == "path"
    assert config.retries == {"mode": "standard", "total_max_attempts": 5}  # 5 requests at most


def test_sink_from_uri(tmp_path, s3_server):
    local = sink_from_uri(str(tmp_path / "out"))
    assert isinstance(local, LocalSink) and local.root == tmp_path / "out"
    assert isinstance(sink_from_uri(f"file://{tmp_path}"), LocalSink)
    s3 = sink_from_uri("s3://my-bucket/some/prefix/", client=s3_server.client())
    assert isinstance(s3, S3Sink) and (s3.bucket, s3.prefix) == ("my-bucket", "some/prefix")
    assert s3.full_key("x.mp4") == "some/prefix/x.mp4"
    with pytest.raises(ValueError, match="no bucket"):
        sink_from_uri("s3:///prefix")


# ---------------------------------------------------------------------------------------------
# LocalSink
# ---------------------------------------------------------------------------------------------

def test_local_sink_copies_and_skips_identical(tmp_path):
    data = os.urandom(10_000)
    local = _write(tmp_path / "clip.mp4", data)
    sink = LocalSink(tmp_path / "store")

    first = sink.put(local, "ab/clip.mp4", "video/mp4")
    target = tmp_path / "store" / "ab" / "clip.mp4"
    assert target.read_bytes() == data and not first.skipped
    assert first.sha256 == hashlib.sha256(data).hexdigest() and first.uri == target.as_uri()
    mtime = target.stat().st_mtime_ns

    second = sink.put(local, "ab/clip.mp4")
    assert second.skipped and target.stat().st_mtime_ns == mtime
    assert sorted(p.name for p in target.parent.iterdir()) == ["clip.mp4"]  # no temp files left


def test_local_sink_conflicts_on_different_content_unless_overwrite(tmp_path):
    sink = LocalSink(tmp_path / "store")
    sink.put(_write(tmp_path / "a", b"old"), "k.bin")
    with pytest.raises(UploadConflictError, match="overwrite=True"):
        sink.put(_write(tmp_path / "b", b"new!"), "k.bin")
    assert (tmp_path / "store" / "k.bin").read_bytes() == b"old"
    result = sink.put(tmp_path / "b", "k.bin", overwrite=True)
    assert not result.skipped and (tmp_path / "store" / "k.bin").read_bytes() == b"new!"


def test_local_sink_read_bytes_and_verify(tmp_path):
    sink = LocalSink(tmp_path / "store")
    result = sink.put(_write(tmp_path / "a", b"abc"), "d/k.bin")
    assert sink.read_bytes("d/k.bin") == b"abc"
    assert sink.read_bytes("d/none.bin", missing_ok=True) is None
    with pytest.raises(FileNotFoundError):
        sink.read_bytes("d/none.bin")
    assert sink.verify("d/k.bin", 3, hashlib.sha256(b"abc").hexdigest()) and result.bytes == 3
    assert not sink.verify("d/k.bin", 3, hashlib.sha256(b"abd").hexdigest())
    assert not sink.verify("d/none.bin", 3, result.sha256)


def test_local_sink_rejects_escaping_keys(tmp_path):
    with pytest.raises(ValueError, match="invalid object key"):
        LocalSink(tmp_path).put(_write(tmp_path / "a", b"x"), "../escape.bin")


def test_credentials_from_prefect_secret_block(monkeypatch):
    import prefect.blocks.system

    class FakeBlock:
        def get(self) -> dict[str, str]:
            return {"R2_ACCOUNT_ID": "acc", "R2_ACCESS_KEY_ID": "AK", "R2_SECRET_ACCESS_KEY": "from-block"}

    loaded: list[str] = []
    monkeypatch.setattr(prefect.blocks.system.Secret, "load",
                        classmethod(lambda cls, name: loaded.append(name) or FakeBlock()))
    creds = r2_credentials({"R2_SECRET_BLOCK": "r2-prod"})
    assert loaded == ["r2-prod"]
    assert (creds.account_id, creds.access_key_id, creds.secret_access_key.get()) == ("acc", "AK", "from-block")
    assert "from-block" not in repr(creds)
