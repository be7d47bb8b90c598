"""The engine service, for real: a supervised `service.server` process on a Unix socket, the client
a shard uses, the tiny preset on the CPU. No Prefect server here (tests/flows/test_deployments.py
runs the services under start-workers.sh)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from engine.requests import T2VRequest
from service.client import EngineClient
from tasks.errors import EngineServiceError, EngineUnavailableError, is_transient

REPO = Path(__file__).resolve().parents[2]
ROW = T2VRequest(prompt="a red kite over the sea", num_frames=5, num_steps=2, seed=4)


@pytest.fixture
def service(tmp_path: Path) -> Iterator[tuple[EngineClient, subprocess.Popen, Path]]:
    socket = tmp_path / "engine.sock"
    log = tmp_path / "supervisor.log"
    env = {**os.environ, "TURBO_EMBED_CACHE": str(tmp_path / "text"), "PYTHONUNBUFFERED": "1"}
    env.pop("TURBO_ENGINE_SOCKET", None)
    with log.open("wb") as out:
        supervisor = subprocess.Popen([sys.executable, "-m", "service.supervise", "--socket", str(socket),
                                       "--stop-timeout", "10"], cwd=REPO, env=env, stdout=out,
                                      stderr=subprocess.STDOUT, start_new_session=True)
    client = EngineClient(socket, wait_s=60)
    try:
        client.wait_ready()
        yield client, supervisor, log
    finally:
        supervisor.send_signal(signal.SIGTERM)
        try:
            supervisor.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(supervisor.pid, signal.SIGKILL)


def test_rows_run_warm_and_frames_come_back_through_the_work_folder(service, tmp_path):
    client, _, _ = service
    first_pid = client.health()["pid"]
    spec = client.load_spec("tiny-t2v")
    assert client.model_identity(spec).startswith("tiny-t2v/")
    a = client.generate(spec, ROW, tmp_path / "row-a")
    b = client.generate(spec, ROW, tmp_path / "row-b")
    assert a.frames_path == tmp_path / "row-a" / "frames.npy" and a.frames_path.is_file()
    assert a.model_load_s > 0 and b.model_load_s == 0            # loaded once, warm afterwards
    assert a.service_s > 0 and b.queue_wait_s >= 0 and a.gpu.startswith("cpu")
    assert np.array_equal(np.load(a.frames_path), np.load(b.frames_path))   # same seed, same video
    health = client.health()
    assert health["pid"] == first_pid and health["loaded"] == ["tiny-t2v"] and health["model_loads"] == 1
    assert health["rows_done"] == 2 and health["busy"] is False
    assert 0 < health["busy_s"] <= health["uptime_s"]
    assert health["last_work_start"] <= health["last_work_end"] <= time.time()


def test_two_shards_rows_at_once_queue_for_the_gpu_one_at_a_time(service, tmp_path):
    """Two shards per GPU (start-workers.sh) send rows at the same time: the service runs them one
    after the other, the second's wait is its queue time, and the busy seconds add up."""
    from concurrent.futures import ThreadPoolExecutor
    client, _, _ = service
    spec = client.load_spec("tiny-t2v")
    client.generate(spec, ROW, tmp_path / "warm")
    before = client.health()["busy_s"]
    with ThreadPoolExecutor(2) as pool:
        a, b = pool.map(lambda name: client.generate(spec, ROW, tmp_path / name), ["a", "b"])
    first, second = sorted((a, b), key=lambda r: r.queue_wait_s)
    assert second.queue_wait_s >= 0.5 * first.service_s     # it waited for the other row's GPU work
    busy = client.health()["busy_s"] - before
    assert busy == pytest.approx(a.service_s + b.service_s, rel=0.05, abs=0.05)


def test_a_service_compiles_for_its_lifetime_not_for_one_shard():
    """A shard sends at most max_rows_per_shard as its expected rows; a service compiles on the
    first row whatever the shard's size, unless the host's settings say otherwise."""
    from engine.wan_pipeline import WanPipelineBase
    from service.server import service_settings
    assert service_settings({}, None).compile_min_rows == 1
    assert service_settings({"TURBO_COMPILE_MIN_ROWS": "50"}, None).compile_min_rows == 50
    assert service_settings({"TURBO_COMPILE": "0"}, None).compile == "0"

    class OnCuda(WanPipelineBase):      # the decision alone: no model, a CUDA device
        def __init__(self, settings):
            self.settings, self.compiled = settings, False
            self.device = type("Device", (), {"type": "cuda"})()
            self.config = type("Config", (), {"param_billions": 1.3})()
    assert OnCuda(service_settings({}, None)).wants_compile(expected_rows=25)
    assert not OnCuda(service_settings({"TURBO_COMPILE": "0"}, None)).wants_compile(expected_rows=25)
    from engine.settings import EngineSettings
    assert not OnCuda(EngineSettings.from_env({})).wants_compile(expected_rows=25)   # in a shard: 30 rows


def test_refusals_name_the_engine_error_and_are_not_transient(service, tmp_path):
    client, _, _ = service
    with pytest.raises(EngineServiceError, match=r"RequestError: invalid model='no-such-model'") as bad:
        client.generate(client.load_spec("no-such-model"), ROW, tmp_path / "row")
    assert bad.value.kind == "RequestError" and not is_transient(bad.value)
    elsewhere = EngineClient(client.socket, checkpoints_dir=str(tmp_path / "other-checkpoints"))
    with pytest.raises(EngineServiceError, match="restart it with CHECKPOINTS_DIR"):
        elsewhere.generate(elsewhere.load_spec("tiny-t2v"), ROW, tmp_path / "row")
    with pytest.raises(EngineServiceError, match="num_steps"):
        client.generate(client.load_spec("tiny-t2v"), T2VRequest(prompt="x", num_steps=9), tmp_path / "row")
    assert client.health()["status"] == "ok"                    # the service survives them all


def test_a_killed_service_is_restarted_and_the_row_it_ran_fails_transiently(service, tmp_path):
    client, _, log = service
    spec = client.load_spec("tiny-t2v")
    client.generate(spec, ROW, tmp_path / "warm")
    pid = client.health()["pid"]
    long_row = T2VRequest(prompt="a long one", num_frames=17, num_steps=4, seed=1)
    import threading
    errors: list[BaseException] = []

    def run() -> None:
        try:
            client.generate(spec, long_row, tmp_path / "killed")
        except BaseException as e:          # noqa: BLE001  (the test reads it below)
            errors.append(e)

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 30
    while not client.health()["busy"] and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    thread.join(60)
    assert errors and isinstance(errors[0], EngineUnavailableError) and is_transient(errors[0])
    again = client.generate(spec, ROW, tmp_path / "after")        # waits for the restarted service
    health = client.health()
    assert health["pid"] != pid and again.model_load_s > 0 and again.frames_path.is_file()
    assert f"pid {pid} exited with -9" in log.read_text()


def test_a_service_that_stays_down_is_a_bounded_wait(tmp_path):
    client = EngineClient(tmp_path / "nobody.sock", wait_s=1.0)
    t0 = time.monotonic()
    with pytest.raises(EngineUnavailableError, match="not answering after 1 s"):
        client.wait_ready()
    assert time.monotonic() - t0 < 5


def test_a_shard_that_talks_to_a_service_never_imports_torch():
    code = ("import sys, flows.shard, tasks.rows, tasks.generate, service.client; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_the_cli_runs_on_a_running_service_and_finds_it_warm_the_second_time(service, tmp_path):
    import polars as pl

    from tests.cli import turbo_batch
    client, _, _ = service
    manifest = tmp_path / "m.csv"
    manifest.write_text("id,mode,prompt,model,num_frames,num_steps,seed\n"
                        "one,t2v,a boat at dawn,tiny-t2v,5,2,1\ntwo,t2v,a boat at dusk,tiny-t2v,5,2,2\n")
    pid = client.health()["pid"]
    loads = []
    for out in ("first", "second"):
        done = turbo_batch("run", str(manifest), "--out", str(tmp_path / out), "--engine-socket", str(client.socket),
                           "--no-progress", env={"TURBO_ENGINE_SOCKET": ""})
        assert done.returncode == 0, done.stderr[-3000:]
        df = pl.read_parquet(next((tmp_path / out).glob("runs/*/metrics.parquet")))
        assert df["status"].to_list() == ["succeeded"] * 2
        loads.append(df["model_load_s"].to_list())
    assert loads[0][0] > 0 and loads[1] == [0.0, 0.0]          # the second run loaded nothing
    health = client.health()
    assert health["pid"] == pid and health["rows_done"] == 4 and health["model_loads"] == 1


def test_the_row_that_paid_for_the_load_reports_it_in_process_and_on_a_service(service, tmp_path, monkeypatch):
    """The shard loads the model while planning its first row (rows per group), before generate:
    that row still carries the load time, the others 0, on both engines."""
    from tasks.manifest import ManifestRow
    from tests.shards import run_shard
    rows = [ManifestRow(row=i, id=f"r{i}", mode="t2v", prompt=f"prompt {i}", model="tiny-t2v", num_frames=5,
                        num_steps=1, seed=i) for i in range(3)]
    monkeypatch.delenv("TURBO_ENGINE_SOCKET", raising=False)
    local = run_shard(rows, sink=str(tmp_path / "local"))
    monkeypatch.setenv("TURBO_ENGINE_SOCKET", str(service[0].socket))
    remote = run_shard(rows, sink=str(tmp_path / "remote"))
    for metrics in (local, remote):
        assert [m["status"] for m in metrics] == ["succeeded"] * 3, [m["error"] for m in metrics]
        loads = [m["model_load_s"] for m in metrics]
        assert loads[0] > 0 and loads[1:] == [0.0, 0.0], loads


def test_a_warm_services_planning_call_does_not_queue_behind_the_other_shards_row(tmp_path, monkeypatch):
    """Two shards per GPU: while one row holds the GPU, the other shard's per-row planning call
    (rows per group) is answered at once when the model is warm, so that shard's row is already
    waiting when the GPU frees up. Cold, the call loads the model and queues for the GPU."""
    import threading

    from engine.family import Engine
    from engine.settings import EngineSettings
    from service.client import RemoteSpec
    from service.server import EngineService
    monkeypatch.setenv("TURBO_EMBED_CACHE", str(tmp_path / "text"))
    service = EngineService(Engine(EngineSettings.from_env(os.environ)), checkpoints_dir=None, random_weights=False)
    spec = RemoteSpec("tiny-t2v").to_json()

    def group_while_the_gpu_is_held(wait_s: float) -> bool:
        answers: list[dict] = []
        with service.gpu_lock:                      # the other shard's row on the GPU
            t = threading.Thread(target=lambda: answers.append(service.group({"spec": spec, "expected_rows": 3})))
            t.start()
            t.join(wait_s)
            answered = not t.is_alive()
        t.join(60)
        assert answers == [{"rows_per_group": 1}]
        return answered

    assert not group_while_the_gpu_is_held(0.5)     # cold: it waits for the GPU (it loads there)
    assert group_while_the_gpu_is_held(30)          # warm: answered while the GPU is busy
