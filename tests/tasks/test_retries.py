"""Upload retries through Prefect's real retry path, with faults injected between TLS and ministack.

    boto3 (one attempt) --https--> socat --> FaultProxy --> ministack

Botocore's own retries are turned off (`max_attempts=1`), so every retry seen here is a Prefect
task retry of `tasks.deliver.upload_outputs`, decided by `tasks.errors.retry_transient`.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.client.schemas.objects import TaskRun
from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

from tasks.deliver import upload_outputs
from tasks.errors import (
    CheckpointError,
    InputError,
    InputTransientError,
    ModelMemoryError,
    RequestError,
    TurboBatchError,
    UploadAuthError,
    UploadIntegrityError,
    UploadTransientError,
    is_transient,
    retry_transient,
)
from tasks.upload import S3Sink, file_sha256
from tests.faultproxy import CorruptBody, Drop, FaultProxy, ProxyRequest, Stall, Status, Truncate
from tests.s3server import S3TestServer, run_s3_server

KEY = "row-7"


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3TestServer]:
    with run_s3_server(tmp_path_factory.mktemp("s3faults"), faults=True) as server:
        yield server


@pytest.fixture(scope="module", autouse=True)
def no_flow_heartbeats() -> Iterator[None]:
    """Flow-run heartbeats (crash detection for deployments) cost up to 1 s at the end of each flow."""
    with temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield


@pytest.fixture
def proxy(s3: S3TestServer) -> Iterator[FaultProxy]:
    assert s3.faults is not None
    s3.faults.clear()
    yield s3.faults
    s3.faults.clear()


@pytest.fixture
def outputs(tmp_path: Path) -> list[Path]:
    video, poster = tmp_path / "x.mp4", tmp_path / "x.jpg"
    video.write_bytes(b"\x00\x00\x00\x18ftypisom tiny video")
    poster.write_bytes(b"\xff\xd8\xff\xe0 tiny poster")
    return [video, poster]


def is_mp4_put(req: ProxyRequest) -> bool:
    return req.method == "PUT" and req.path.endswith(f"/{KEY}.mp4")


def run_upload(sink: S3Sink, files: list[Path]) -> tuple[Any, TaskRun]:
    """Run the real upload task (no retry delay) in a flow; its final state and task run."""
    upload = upload_outputs.with_options(retry_delay_seconds=0)

    @flow(name="upload-retries")
    def upload_flow() -> tuple[dict, int]:
        return upload({f.suffix: f for f in files}, KEY, sink, {"key": KEY})

    state = upload_flow(return_state=True)
    return state, _task_run(state.state_details.flow_run_id)


def _task_run(flow_run_id: Any, timeout: float = 10.0) -> TaskRun:
    """The flow's one task run as the API recorded it (state events land asynchronously)."""
    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            if len(runs) == 1 and runs[0].state is not None and runs[0].state.is_final():
                return runs[0]
            if time.monotonic() > deadline:
                raise AssertionError(f"task run of flow run {flow_run_id} not final after {timeout} s: {runs}")
            time.sleep(0.1)


def assert_stored_once(s3: S3TestServer, sink: S3Sink, files: list[Path]) -> None:
    """Exactly the outputs and the record are in the bucket, each output with the local sha256."""
    client = s3.client()
    keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket=sink.bucket)["Contents"])
    assert keys == sorted([f"{KEY}.jpg", f"{KEY}.json", f"{KEY}.mp4"])
    for f in files:
        sha256 = file_sha256(f)
        obj = client.get_object(Bucket=sink.bucket, Key=f"{KEY}{f.suffix}")
        assert obj["Metadata"]["sha256"] == sha256
        assert hashlib.sha256(obj["Body"].read()).hexdigest() == sha256


def mp4_puts(proxy: FaultProxy) -> list[tuple[str | None, int | None]]:
    return [(r.action, r.status) for r in proxy.requests if r.method == "PUT" and r.path.endswith(".mp4")]


# ---------------------------------------------------------------------------------------------
# Prefect retries over real faults
# ---------------------------------------------------------------------------------------------

def test_503_on_first_put_is_retried_once_by_prefect(s3, proxy, outputs):
    sink = S3Sink(s3.create_bucket(), "", s3.client(max_attempts=1))
    proxy.add_rule(match=is_mp4_put, action=Status(503), times=1)

    state, task_run = run_upload(sink, outputs)

    assert state.is_completed(), state.message
    assert task_run.run_count == 2
    assert mp4_puts(proxy) == [("Status(503)", 503), (None, 200)]
    results, written = state.result()
    assert written == 3 and not results[".mp4"].skipped
    assert_stored_once(s3, sink, outputs)


def test_refused_credentials_fail_after_one_run_without_the_secret(s3, proxy, outputs, caplog):
    secret = "wrong-secret-never-shown-5c1e"
    sink = S3Sink(s3.create_bucket(), "", s3.client(secret_access_key=secret, max_attempts=1))
    caplog.set_level(logging.DEBUG)

    state, task_run = run_upload(sink, outputs)

    assert state.is_failed()
    error = state.result(raise_on_failure=False)
    assert isinstance(error, UploadAuthError) and not is_transient(error)
    assert task_run.run_count == 1 and task_run.state.is_failed()
    assert [(r.method, r.status) for r in proxy.requests if KEY in r.path] == [("HEAD", 403)]  # no retry
    for text in (str(error), repr(error), state.message or "", task_run.state.message or "", caplog.text):
        assert secret not in text


@pytest.mark.parametrize("action", [Drop(), Truncate(0), Stall(2)], ids=lambda a: a.name)
def test_lost_response_on_first_put_is_retried_and_succeeds(s3, proxy, outputs, action):
    read_timeout = 0.75 if isinstance(action, Stall) else 60
    sink = S3Sink(s3.create_bucket(), "", s3.client(max_attempts=1, read_timeout=read_timeout))
    proxy.add_rule(match=is_mp4_put, action=action, times=1)

    state, task_run = run_upload(sink, outputs)

    assert state.is_completed(), state.message
    assert task_run.run_count == 2
    results, _ = state.result()
    if isinstance(action, Drop):         # never reached the server: the retry writes it
        assert mp4_puts(proxy) == [("Drop()", None), (None, 200)] and not results[".mp4"].skipped
    elif isinstance(action, Truncate):   # written, answer lost: the retry's HEAD finds it
        assert mp4_puts(proxy) == [("Truncate(0)", 200)] and results[".mp4"].skipped
    else:   # timed out; the stalled PUT and the retry's both arrive, If-None-Match lets one write
        _wait_for(lambda: len(mp4_puts(proxy)) == 2)
        assert sorted(status for _, status in mp4_puts(proxy)) == [200, 412]
    assert_stored_once(s3, sink, outputs)


def test_corrupted_body_is_an_integrity_error_retried_then_stored(s3, proxy, outputs, caplog):
    sink = S3Sink(s3.create_bucket(), "", s3.client(max_attempts=1))
    proxy.add_rule(match=is_mp4_put, action=CorruptBody(), times=1)
    caplog.set_level(logging.INFO, logger="prefect")

    state, task_run = run_upload(sink, outputs)

    assert state.is_completed(), state.message
    assert task_run.run_count == 2
    assert mp4_puts(proxy) == [("CorruptBody()", 400), (None, 200)]
    [retry_log] = [r.getMessage() for r in caplog.records if "Retry 1/2" in r.getMessage()]
    assert "UploadIntegrityError" in retry_log and "BadDigest" in retry_log
    assert_stored_once(s3, sink, outputs)


def test_corruption_that_never_stops_exhausts_the_retries(s3, proxy, outputs):
    sink = S3Sink(s3.create_bucket(), "", s3.client(max_attempts=1))
    proxy.add_rule(match=is_mp4_put, action=CorruptBody(), times=None)

    state, task_run = run_upload(sink, outputs)

    assert state.is_failed()
    assert isinstance(state.result(raise_on_failure=False), UploadIntegrityError)
    assert task_run.run_count == 3                      # the first run and both retries
    assert mp4_puts(proxy) == [("CorruptBody()", 400)] * 3


def _wait_for(condition: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


# ---------------------------------------------------------------------------------------------
# The proxy itself
# ---------------------------------------------------------------------------------------------

def test_proxy_forwards_byte_exact_and_truncates_a_download(s3, proxy, tmp_path):
    bucket = s3.create_bucket()
    sink = S3Sink(bucket, "p", s3.client(max_attempts=1))
    data = bytes(range(256)) * 40
    connections = proxy.connections
    sink.put(_write(tmp_path / "blob.bin", data), "blob.bin")
    assert sink.read_bytes("blob.bin") == data
    assert proxy.connections == connections + 1      # HEAD, PUT, GET over one kept-alive connection

    proxy.add_rule(match=lambda req: req.method == "GET", action=Truncate(100), times=1)
    with pytest.raises(UploadTransientError, match="network error"):
        sink.read_bytes("blob.bin")
    assert sink.read_bytes("blob.bin") == data
    assert [r.action for r in proxy.requests if r.method == "GET"] == [None, "Truncate(100)", None]


def test_proxy_random_faults_are_deterministic_by_seed(s3, proxy):
    bucket = s3.create_bucket()
    client = s3.client(max_attempts=1)

    def faults_seen(seed: int) -> list[str | None]:
        proxy.clear()
        proxy.fault_random(fraction=0.5, actions=[Status(500), Status(503)], seed=seed)
        for _ in range(12):
            try:
                client.head_bucket(Bucket=bucket)
            except Exception:  # noqa: BLE001 - the faults are the point
                pass
        return [r.action for r in proxy.requests]

    first = faults_seen(seed=3)
    assert faults_seen(seed=3) == first
    assert {"Status(500)", "Status(503)"} <= set(first) and None in first
    assert faults_seen(seed=4) != first


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# ---------------------------------------------------------------------------------------------
# The retry rule over the error tree
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("error, transient", [
    (InputTransientError("the image server answered 503"), True),
    (UploadTransientError("503"), True),
    (UploadIntegrityError("BadDigest"), True),
    (UploadAuthError("403"), False),
    (InputError("not an image"), False),
    (RequestError("num_frames", 7, "4n+1"), False),
    (CheckpointError("w.safetensors", "missing"), False),
    (ModelMemoryError("over budget"), False),
    (RuntimeError("plain"), False),
], ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else str(v))
def test_is_transient_by_class(error, transient):
    assert is_transient(error) is transient


def test_is_transient_looks_through_causes_but_our_own_class_wins():
    def raised(error: BaseException, cause: BaseException) -> BaseException:
        try:
            raise error from cause
        except BaseException as e:  # noqa: BLE001
            return e

    assert is_transient(raised(RuntimeError("wrapped on the way up"), UploadTransientError("503")))
    assert is_transient(raised(RuntimeError("twice"), raised(ValueError("once"), InputTransientError("t"))))
    assert not is_transient(raised(UploadAuthError("refused"), UploadTransientError("503")))
    assert not is_transient(raised(TurboBatchError("permanent"), InputTransientError("timeout")))


def test_retry_transient_reads_the_state_exception():
    assert upload_outputs.retry_condition_fn is retry_transient and upload_outputs.retries == 2

    class FailedState:
        def __init__(self, error: BaseException | None):
            self.error = error

        def result(self) -> None:
            if self.error is not None:
                raise self.error

    assert retry_transient(None, None, FailedState(UploadTransientError("503")))
    assert not retry_transient(None, None, FailedState(UploadAuthError("403")))
    assert not retry_transient(None, None, FailedState(None))
