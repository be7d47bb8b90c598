"""Workers and the batch's view of them, on the session's real Prefect server (conftest.py).

Each test uses a work pool of its own, so the stack's gpu/cpu workers are never disturbed:
- a worker that stopped no longer counts, although the server still has it ONLINE for a while;
- a batch whose shard pool has no live worker fails at once, naming the pool and start-workers.sh;
- a shard run that no worker takes is cancelled after the pickup timeout (a late worker cannot
  start it), its rows fail with that reason, and the batch goes on;
- start-workers.sh stops its worker on SIGTERM, also when it was started with SIGINT ignored.
The fast checks at the end need no server.
"""

from __future__ import annotations

import csv
import email.utils
import logging
import os
import pickle
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from flows import fanout

REPO_ROOT = Path(__file__).resolve().parents[2]
START_WORKERS = str(REPO_ROOT / "deployments/start-workers.sh")
slow = [pytest.mark.slow, pytest.mark.timeout(180)]


@dataclass
class Pool:
    name: str
    deployment: str        # "gpu-shard/<name>", on this pool
    deployment_id: object


@pytest.fixture
def empty_pool(prefect_stack):
    """A work pool with no worker and a deployment of the gpu-shard flow on it."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    name = f"empty-{uuid.uuid4().hex[:8]}"
    with prefect_stack.settings(), get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name=name, type="process"))
        flow_id = client.create_flow_from_name("gpu-shard")
        dep_id = client.create_deployment(flow_id=flow_id, name=name, work_pool_name=name,
                                          entrypoint="flows/shard.py:gpu_shard")
    yield Pool(name, f"gpu-shard/{name}", dep_id)
    with prefect_stack.settings(), get_client(sync_client=True) as client:
        client.delete_deployment(dep_id)
        client.delete_work_pool(name)


def write_manifest(path: Path, ids: list[str]) -> Path:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "mode", "prompt", "model", "num_frames", "num_steps", "seed"])
        for i, row_id in enumerate(ids):
            w.writerow([row_id, "t2v", f"clip {i}", "tiny-t2v", 9, 2, i])
    return path


def wait_for(probe, timeout: float, poll: float = 0.25, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := probe():
            return result
        time.sleep(poll)
    raise AssertionError(f"{what} not met within {timeout} s")


def flow_runs_of(deployment_id):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    with get_client(sync_client=True) as client:
        return client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])))


@slow[0]
@slow[1]
def test_a_worker_that_stopped_is_not_counted(prefect_stack, empty_pool):
    """The server keeps a silent worker ONLINE until its foreman's next round (every 15 s); the
    count goes by the heartbeats: 3 missed 1-s heartbeats later the worker no longer counts."""
    from prefect.client.orchestration import get_client

    stack, pool = prefect_stack, empty_pool
    worker = subprocess.Popen(
        ["prefect", "worker", "start", "--type", "process", "--pool", pool.name, "--name", f"{pool.name}-w"],
        env={**stack.env, "PREFECT_WORKER_HEARTBEAT_SECONDS": "1"}, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        with stack.settings():
            wait_for(lambda: fanout.pool_worker_count(pool.deployment) == 1, 60, what="worker online")
            worker.kill()             # a host that died: no more heartbeats
            worker.wait(timeout=10)
            with get_client(sync_client=True) as client:
                (w,) = client.read_workers_for_work_pool(pool.name)
            stale_at = w.last_heartbeat_time.timestamp() + 3 * 1 + 0.5
            time.sleep(max(0.0, stale_at - time.time()))
            assert fanout.pool_worker_count(pool.deployment) == 0
            with pytest.raises(fanout.NoLiveWorkersError, match=pool.name):
                fanout.require_live_workers(pool.deployment)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait(timeout=10)


@slow[0]
@slow[1]
def test_batch_fails_at_once_when_the_shard_pool_has_no_live_worker(prefect_stack, empty_pool, tmp_path):
    from flows.batch import batch_flow

    stack, pool = prefect_stack, empty_pool
    manifest = write_manifest(tmp_path / "m.csv", ["nw-0", "nw-1"])
    t0 = time.monotonic()
    with stack.settings():
        state = batch_flow(manifest=str(manifest), sink=str(tmp_path / "out"), launch="deployments",
                           shard_deployment=pool.deployment, return_state=True)
        elapsed = time.monotonic() - t0
        assert state.is_failed()
        error = state.result(raise_on_failure=False)
        assert isinstance(error, fanout.NoLiveWorkersError)
        assert f"work pool '{pool.name}' has no live worker" in state.message
        assert f"GPU_POOL={pool.name} deployments/start-workers.sh" in state.message
        assert flow_runs_of(pool.deployment_id) == []     # no shard was started
    assert elapsed < 30


@slow[0]
@slow[1]
def test_unclaimed_shard_runs_are_cancelled_after_the_pickup_timeout(prefect_stack, empty_pool, tmp_path,
                                                                    caplog):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.responses import SetStateStatus
    from prefect.states import Pending

    from tasks.manifest import read_manifest

    stack, pool = prefect_stack, empty_pool
    rows = read_manifest(write_manifest(tmp_path / "m.csv", ["pk-0", "pk-1", "pk-2"])).rows
    specs = [fanout.ShardSpec(index=0, rows=rows[:2], positions=[0, 1]),
             fanout.ShardSpec(index=1, rows=rows[2:], positions=[2])]
    caplog.set_level(logging.INFO, logger="flows.fanout")
    t0 = time.monotonic()
    with stack.settings():
        results = fanout.run_deployments(pool.deployment, specs, {"sink": str(tmp_path / "out")},
                                         poll_s=0.5, pickup_timeout_s=5, waiting_log_s=1)
        elapsed = time.monotonic() - t0
        runs = flow_runs_of(pool.deployment_id)
        with get_client(sync_client=True) as client:   # a worker that turns up now cannot start them
            late = [client.set_flow_run_state(r.id, Pending()).status for r in runs]

    assert 5 <= elapsed < 40
    assert sorted(r["id"] for r in results) == ["pk-0", "pk-1", "pk-2"]
    for r in results:
        assert r["status"] == "failed" and r["attempts"] == 1
        assert f"no worker of pool '{pool.name}' took its run for 5 s (TURBO_SHARD_PICKUP_TIMEOUT)" in r["error"]
    assert sorted(r.name for r in runs) == ["shard-0-a1", "shard-1-a1"]   # given up, not resubmitted
    assert all(r.state_type == StateType.CANCELLED for r in runs)
    assert late == [SetStateStatus.ABORT] * 2
    assert "still waiting for a worker of pool" in caplog.text


@slow[0]
@slow[1]
def test_batch_gives_up_shards_a_live_worker_never_takes(prefect_stack, empty_pool, tmp_path, monkeypatch):
    """A worker that heartbeats but takes nothing (here a bare heartbeat): the batch starts, the
    pickup timeout from the batch's environment gives its shard up, the batch completes."""
    from prefect.client.orchestration import get_client

    from flows.batch import batch_flow

    stack, pool = prefect_stack, empty_pool
    monkeypatch.setenv("TURBO_SHARD_PICKUP_TIMEOUT", "4")
    manifest = write_manifest(tmp_path / "m.csv", ["gh-0", "gh-1"])
    with stack.settings():
        with get_client(sync_client=True) as client:
            client.send_worker_heartbeat(pool.name, "ghost", heartbeat_interval_seconds=60)
        result = batch_flow(manifest=str(manifest), sink=str(tmp_path / "out"), launch="deployments",
                            shard_deployment=pool.deployment)
        runs = flow_runs_of(pool.deployment_id)
    assert result["failed"] == 2 and result["succeeded"] == 0
    assert all("took its run for 4 s (TURBO_SHARD_PICKUP_TIMEOUT)" in p for p in result["problems"])
    assert [r.state_type.value for r in runs] == ["CANCELLED"]


@slow[0]
@slow[1]
@pytest.mark.parametrize("sigint", ["default", "ignored"])
def test_start_workers_stops_its_worker_on_sigterm(prefect_stack, tmp_path, sigint):
    """`kill` (SIGTERM) stops the script, its worker and the GPU's engine service (nothing naming
    the host is left), also when the script was started with SIGINT ignored (what a
    non-interactive shell does to `start-workers.sh &`)."""
    from prefect.client.orchestration import get_client

    stack = prefect_stack
    pool = f"sigterm-{sigint}-{uuid.uuid4().hex[:6]}"
    env = {**stack.env, "GPUS": "1", "CPU_WORKER": "0", "GPU_POOL": pool, "WORKER_HOST": pool,
           "LOG_DIR": str(tmp_path)}
    argv = ["bash", START_WORKERS] if sigint == "default" else \
        ["bash", "-c", 'trap "" INT; exec bash "$0"', START_WORKERS]
    script = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              stdin=subprocess.DEVNULL, start_new_session=True)
    pids: list[int] = []
    try:
        def online() -> bool:
            with stack.settings(), get_client(sync_client=True) as client:
                try:
                    return any(w.name == f"{pool}-gpu-0" and w.status == "ONLINE"
                               for w in client.read_workers_for_work_pool(pool))
                except Exception:   # the worker has not created its pool yet
                    return False
        wait_for(online, 90, poll=0.5, what="worker online")
        pids = [int(p) for p in (tmp_path / "workers.pids").read_text().split()]
        assert len(pids) == 2                  # the GPU's engine service (its supervisor) and its worker

        script.send_signal(signal.SIGTERM)
        try:
            script.wait(timeout=30)
        except subprocess.TimeoutExpired:
            log = (tmp_path / f"{pool}-gpu-0.log").read_text()
            pytest.fail(f"start-workers.sh still running 30 s after SIGTERM\n{log}")
        assert script.returncode == 0
        wait_for(lambda: not any(_alive(p) for p in pids), 5, what="worker gone")
        assert _processes_naming(pool) == []
    finally:
        _kill_all(script, pids)
        with stack.settings(), get_client(sync_client=True) as client:
            try:
                client.delete_work_pool(pool)
            except Exception:
                pass


def _kill_all(script: subprocess.Popen, pids: list[int]) -> None:
    """Whatever a test left running: start-workers.sh and the workers it started."""
    if script.poll() is None:
        script.kill()
        script.wait(timeout=10)
    for pid in pids:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _processes_naming(text: str) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmdline and _alive(int(proc.name)):
                found.append(int(proc.name))
    return found


# ── fast checks, no server ─────────────────────────────────────────────────────────────────────

def test_start_workers_kills_a_worker_that_ignores_sigint(tmp_path):
    """STOP_TIMEOUT bounds the stop: a worker still running then is SIGKILLed."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "prefect"
    fake.write_text(f"#!{sys.executable}\nimport signal, time\n"
                    "signal.signal(signal.SIGINT, signal.SIG_IGN)\nprint('ready', flush=True)\ntime.sleep(600)\n")
    fake.chmod(0o755)
    logs = tmp_path / "logs"
    script = subprocess.Popen(
        ["bash", START_WORKERS], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
        env={"PATH": f"{bin_dir}:/usr/bin:/bin", "PREFECT_API_URL": "http://127.0.0.1:9/api", "GPUS": "1",
             "CPU_WORKER": "0", "STOP_TIMEOUT": "2", "LOG_DIR": str(logs), "WORKER_HOST": "t"})
    pids: list[int] = []
    try:
        wait_for(lambda: (logs / "t-gpu-0.log").exists() and "ready" in (logs / "t-gpu-0.log").read_text(), 20)
        pids = [int(p) for p in (logs / "workers.pids").read_text().split()]
        t0 = time.monotonic()
        script.send_signal(signal.SIGTERM)
        out, _ = script.communicate(timeout=20)
        assert script.returncode == 0 and time.monotonic() - t0 < 10
        assert "still running after 2 s: SIGKILL" in out
        assert not any(_alive(p) for p in pids)
    finally:
        _kill_all(script, pids)


def test_pickup_timeout_setting():
    assert fanout.pickup_timeout_from_env({}) == 600.0
    assert fanout.pickup_timeout_from_env({"TURBO_SHARD_PICKUP_TIMEOUT": " 5 "}) == 5.0
    for bad in ("0", "-3", "ten", "inf", "nan"):
        with pytest.raises(ValueError, match=f"TURBO_SHARD_PICKUP_TIMEOUT='{bad}': expected a number"):
            fanout.pickup_timeout_from_env({"TURBO_SHARD_PICKUP_TIMEOUT": bad})


def test_start_timeout_setting():
    assert fanout.start_timeout_from_env({}) == 120.0
    assert fanout.start_timeout_from_env({"TURBO_SHARD_START_TIMEOUT": "40"}) == 40.0
    with pytest.raises(ValueError, match="TURBO_SHARD_START_TIMEOUT='0': expected a number"):
        fanout.start_timeout_from_env({"TURBO_SHARD_START_TIMEOUT": "0"})


def test_shards_per_gpu_setting():
    assert fanout.shards_per_gpu_from_env({}) == 1
    assert fanout.shards_per_gpu_from_env({"TURBO_SHARDS_PER_GPU": " 2 "}) == 2
    for bad in ("0", "-1", "two", "1.5"):
        with pytest.raises(ValueError, match=f"TURBO_SHARDS_PER_GPU='{bad}': expected a whole number"):
            fanout.shards_per_gpu_from_env({"TURBO_SHARDS_PER_GPU": bad})


def test_heartbeat_rule_is_three_intervals():
    from datetime import UTC, datetime, timedelta

    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert fanout.heartbeat_is_recent(now - timedelta(seconds=2.9), 1, now)
    assert not fanout.heartbeat_is_recent(now - timedelta(seconds=3.1), 1, now)
    assert fanout.heartbeat_is_recent(now - timedelta(seconds=89), None, now)      # 30 s default
    assert not fanout.heartbeat_is_recent(now - timedelta(seconds=91), None, now)
    assert not fanout.heartbeat_is_recent(None, 10, now)
    # The server's clock (its Date header) unless this host's agrees with it to within 2 s.
    assert fanout._server_time("Sun, 01 Mar 2020 11:33:22 GMT") == datetime(2020, 3, 1, 11, 33, 22, tzinfo=UTC)
    local = datetime.now(UTC)
    assert local <= fanout._server_time(email.utils.format_datetime(local, usegmt=True)) < local + timedelta(seconds=1)
    assert fanout._server_time(None).tzinfo is not None


def test_pickup_clock_gives_up_only_unclaimed_runs():
    pickup = fanout._Pickup(timeout_s=10, log_every_s=1e9, pool="gpu")
    # Queued behind busy workers: never given up, however long.
    assert not any(pickup.observe(0, True, t) for t in range(0, 100, 5))
    # The pool goes idle: the clock starts then, and runs out 10 s later.
    assert not pickup.observe(0, False, 100)
    assert not pickup.observe(0, False, 109)
    # Busy again in between: the clock starts over.
    assert not pickup.observe(0, True, 110)
    assert not pickup.observe(0, False, 111)
    assert not pickup.observe(0, False, 120)
    assert pickup.observe(0, False, 121)
    assert "shard 0 was not picked up: no worker of pool 'gpu' took its run for 10 s" in pickup.error(0)
    pickup.forget(0)
    assert pickup.unclaimed_since == {} and pickup.queued == set()


def test_no_live_workers_error_names_the_pool_and_survives_pickling():
    e = fanout.NoLiveWorkersError("gpu", "gpu-shard/gpu-shard")
    assert "work pool 'gpu' has no live worker" in str(e) and "`deployments/start-workers.sh`" in str(e)
    again = pickle.loads(pickle.dumps(e))
    assert str(again) == str(e) and again.pool == "gpu"
