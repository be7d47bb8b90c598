"""Two worker hosts that share no disk, simulated on one machine: two groups of processes, each with
its own HOME, PREFECT_HOME, temp, work, log and cache folders and its own copy of the project, both
against one real Prefect server and one TLS S3 server (ministack) used for the sink, the manifest and
Prefect's result storage (a prefect-aws S3Bucket block, deployments/create-result-storage.py).

Each group runs in its own mount namespace in which the other group's whole folder is covered by an
empty tmpfs: a file one "host" wrote is not there for the other's processes, so anything that relied
on a shared disk (a shard's persisted result in a local folder, a local manifest path, a cache)
fails the batch instead of passing by accident.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.flows.conftest import _copy_repo, _free_port, _kill_pids, _stop, _wait_healthy
from tests.s3server import S3TestServer, run_s3_server

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
RESULTS_BLOCK = "turbo-results"


def _can_hide_folders() -> bool:
    probe = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                            "mount -t tmpfs none /mnt && umount /mnt"], capture_output=True)
    return probe.returncode == 0


@dataclass
class Host:
    name: str
    root: Path
    env: dict[str, str]
    workers: subprocess.Popen | None = None

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def completed_shards(self) -> set[str]:
        """The shard runs this host's GPU worker ran to completion (their own log lines, which the
        process worker copies into its log; a worker that lost the race for a run logs none)."""
        log = (self.logs / f"{self.name}-gpu-0.log").read_text(errors="replace")
        return {line.split("Flow run '", 1)[1].split("'", 1)[0] for line in log.splitlines()
                if "Flow run 'shard-" in line and "Finished in state Completed()" in line}


@dataclass
class TwoHosts:
    api_url: str
    s3: S3TestServer
    bucket: str
    hosts: list[Host]

    def prefect(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        a = self.hosts[0]
        out = subprocess.run(["prefect", *args], env=a.env, cwd=a.env["TURBO_BATCH_HOME"], capture_output=True,
                             text=True, timeout=600)
        if check and out.returncode != 0:
            raise AssertionError(f"prefect {' '.join(args)} exited {out.returncode}\n{out.stdout[-3000:]}\n"
                                 f"{out.stderr[-3000:]}\n{self.logs()}")
        return out

    def logs(self) -> str:
        return "\n".join(f"--- {p}\n{p.read_text(errors='replace')[-2500:]}"
                         for h in self.hosts for p in sorted(h.logs.glob("*.log")))


@pytest.fixture(scope="module")
def two_hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TwoHosts]:
    if shutil.which("prefect") is None or shutil.which("unshare") is None:
        pytest.skip("needs the prefect CLI and unshare")
    if not _can_hide_folders():
        pytest.skip("needs mount namespaces (unshare -m) to give each simulated host its own disk")
    pytest.importorskip("prefect_aws")
    root = tmp_path_factory.mktemp("two-hosts")
    port = _free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "R2_", "AWS_", "TURBO_", "CUDA_"))}
    server_log = root / "server.log"
    with server_log.open("wb") as out, run_s3_server(root / "s3") as s3:
        server = subprocess.Popen(["prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                  env={**base, "PREFECT_HOME": str(root / "server-home"),
                                       "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                                       "PREFECT_SERVER_UI_ENABLED": "false",
                                       "PREFECT_SERVER_LOGGING_LEVEL": "WARNING"},
                                  stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        stack: TwoHosts | None = None
        try:
            _wait_healthy(api_url, server, server_log)
            bucket = s3.create_bucket()
            hosts = []
            for name in ("host-a", "host-b"):
                home = root / name
                for sub in ("home", "prefect-home", "tmp", "logs", "run", "cache", "results"):
                    (home / sub).mkdir(parents=True)
                checkout = _copy_repo(home / "turbo-batch")
                env = {**base, "HOME": str(home / "home"), "TMPDIR": str(home / "tmp"),
                       "PREFECT_API_URL": api_url, "PREFECT_HOME": str(home / "prefect-home"),
                       "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_WORKER_QUERY_SECONDS": "1",
                       "PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK": f"s3-bucket/{RESULTS_BLOCK}",
                       # where local results would go: a folder of this host only (must stay unused)
                       "PREFECT_LOCAL_STORAGE_PATH": str(home / "results"),
                       "R2_ENDPOINT_URL": s3.endpoint_url, "R2_ACCESS_KEY_ID": s3.access_key_id,
                       "R2_SECRET_ACCESS_KEY": s3.secret_access_key, "R2_CA_BUNDLE": str(s3.ca_path),
                       "TURBO_EMBED_CACHE": str(home / "cache" / "text"), "PYTHONUNBUFFERED": "1",
                       "TURBO_BATCH_HOME": str(checkout), "WORKER_HOST": name, "LOG_DIR": str(home / "logs"),
                       "RUN_DIR": str(home / "run"), "TORCHINDUCTOR_CACHE_DIR": str(home / "cache" / "inductor"),
                       # a shard run claimed by a host that then died stays Pending: resubmitted after this
                       "TURBO_SHARD_START_TIMEOUT": "40"}
                hosts.append(Host(name, home, env))
            stack = TwoHosts(api_url, s3, bucket, hosts)
            a = hosts[0]
            # ZOMBIE_AFTER_S: the automation's window, short here (heartbeats come every 30 s)
            deploy_env = {**{k: v for k, v in a.env.items() if k != "TURBO_BATCH_HOME"}, "ZOMBIE_AFTER_S": "45"}
            for command in (["bash", "deployments/create-pools.sh"], ["prefect", "deploy", "--all", "--no-prompt"],
                            ["python", "deployments/create-result-storage.py", f"s3://{bucket}/prefect-results",
                             "--name", RESULTS_BLOCK, "--region", "us-east-1"]):
                done = subprocess.run(command, env=deploy_env, cwd=a.env["TURBO_BATCH_HOME"], capture_output=True,
                                      text=True, timeout=300)
                assert done.returncode == 0, f"{command}: {done.stdout[-2000:]}\n{done.stderr[-2000:]}"
            for host, other, extra in ((hosts[0], hosts[1], {"GPUS": "1", "CPU_WORKER": "1", "SHARDS_PER_GPU": "2"}),
                                       (hosts[1], hosts[0], {"GPUS": "1", "CPU_WORKER": "0", "SHARDS_PER_GPU": "2"})):
                # The other host's folder is an empty tmpfs in this host's mount namespace.
                host.workers = subprocess.Popen(
                    ["unshare", "-m", "--propagation", "private", "sh", "-c",
                     'mount -t tmpfs none "$HIDE" && exec bash deployments/start-workers.sh'],
                    env={**host.env, **extra, "HIDE": str(other.root)}, cwd=host.env["TURBO_BATCH_HOME"],
                    stdout=(host.logs / "start-workers.out").open("wb"), stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL, start_new_session=True)
            _wait_online(stack, {"host-a-gpu-0", "host-b-gpu-0", "host-a-cpu"})
            yield stack
        finally:
            for host in (stack.hosts if stack else []):
                if host.workers is not None:
                    _stop(host.workers, signal.SIGINT, grace=20)
                    _kill_pids(host.logs / "workers.pids")
            _stop(server)


def _wait_online(stack: TwoHosts, names: set[str], timeout: float = 180) -> None:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    deadline = time.monotonic() + timeout
    with temporary_settings({PREFECT_API_URL: stack.api_url}), get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            for h in stack.hosts:
                if h.workers is not None and h.workers.poll() is not None:
                    raise RuntimeError(f"{h.name}'s start-workers.sh exited {h.workers.returncode}\n{stack.logs()}")
            online = {w.name for pool in ("gpu", "cpu") for w in client.read_workers_for_work_pool(pool)
                      if w.status == "ONLINE"}
            if names <= online:
                return
            time.sleep(0.5)
    raise RuntimeError(f"workers {names} not online after {timeout} s\n{stack.logs()}")


def _put_manifest(stack: TwoHosts, key: str, rows: int, *, tag: str = "two", frames: int = 5, seed: int = 40,
                  bucket: str | None = None) -> str:
    bucket = bucket or stack.bucket
    text = io.StringIO()
    w = csv.writer(text)
    w.writerow(["id", "mode", "prompt", "model", "num_frames", "num_steps", "seed"])
    for i in range(rows):
        w.writerow([f"{tag}-{i}", "t2v", f"{tag} clip {i}", "tiny-t2v", frames, 2, seed + i])
    stack.s3.client().put_object(Bucket=bucket, Key=key, Body=text.getvalue().encode())
    return f"s3://{bucket}/{key}"


def test_each_hosts_processes_cannot_see_the_other_hosts_folders(two_hosts):
    """The isolation the other tests rely on, seen through each worker's own mount namespace."""
    a, b = two_hosts.hosts
    for host, other in ((a, b), (b, a)):
        pid = int((host.logs / "workers.pids").read_text().split()[0])
        mine = Path(f"/proc/{pid}/root") / host.env["TURBO_BATCH_HOME"].lstrip("/") / "pyproject.toml"
        theirs = Path(f"/proc/{pid}/root") / other.env["TURBO_BATCH_HOME"].lstrip("/") / "pyproject.toml"
        assert mine.is_file() and not theirs.exists()


def test_a_batch_over_two_hosts_with_no_shared_disk_runs_each_row_once(two_hosts, tmp_path):
    stack = two_hosts
    manifest = _put_manifest(stack, "manifests/eight.csv", 8)
    sink = f"s3://{stack.bucket}/videos"
    stack.prefect("deployment", "run", "batch/batch", "--param", f"manifest={manifest}", "--param", f"sink={sink}",
                  "--param", "max_rows_per_shard=2", "--watch", "--watch-timeout", "600")

    from tests.shards import latest_metrics
    df = latest_metrics(sink, client=stack.s3.client())
    assert sorted(df["id"].to_list()) == [f"two-{i}" for i in range(8)]
    assert df["status"].to_list() == ["succeeded"] * 8, df.select("id", "status", "error")
    # Every output once: the S3 server counts the PUTs per key.
    client = stack.s3.client()
    keys = Counter(o["Key"] for page in client.get_paginator("list_objects_v2").paginate(
        Bucket=stack.bucket, Prefix="videos/") for o in page.get("Contents", []))
    mp4s = [k for k in keys if k.endswith(".mp4")]
    assert len(mp4s) == 8
    # Both hosts ran shards, each its own (the shard runs' lines in each GPU worker's log).
    ran = {h.name: h.completed_shards() for h in stack.hosts}
    assert all(ran.values()) and not ran["host-a"] & ran["host-b"], ran
    assert ran["host-a"] | ran["host-b"] == {f"shard-{i}-a1" for i in range(4)}, ran
    # The shards' results went to the S3 block, never to a host's local results folder.
    local_results = [p for h in stack.hosts for p in (h.root / "results").rglob("*")]
    assert not local_results, local_results
    results = [o["Key"] for o in client.list_objects_v2(Bucket=stack.bucket, Prefix="prefect-results/")
               .get("Contents", [])]
    assert results


def test_a_local_manifest_on_a_pool_of_two_hosts_is_refused_before_any_shard(two_hosts, tmp_path):
    stack = two_hosts
    local = stack.hosts[0].root / "tmp" / "local.csv"
    local.write_text("id,mode,prompt,model\nx,t2v,a local row,tiny-t2v\n")
    before = [h.completed_shards() for h in stack.hosts]
    out = stack.prefect("deployment", "run", "batch/batch", "--param", f"manifest={local}",
                        "--param", f"sink=s3://{stack.bucket}/refused", "--watch", "--watch-timeout", "300",
                        check=False)
    assert out.returncode != 0
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings
    with temporary_settings({PREFECT_API_URL: stack.api_url}), get_client(sync_client=True) as client:
        runs = [r for r in client.read_flow_runs() if (r.parameters or {}).get("manifest") == str(local)]
    assert len(runs) == 1 and runs[0].state_type.value == "FAILED"
    message = runs[0].state.message or ""
    assert "2 hosts (host-a, host-b)" in message and "is a local path" in message, message
    assert [h.completed_shards() for h in stack.hosts] == before          # no shard started


def _processes_of(host: Host) -> list[int]:
    """Every process of one simulated host: its environment names that host's checkout."""
    mark = f"TURBO_BATCH_HOME={host.env['TURBO_BATCH_HOME']}".encode()
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                if mark in (proc / "environ").read_bytes().split(b"\0"):
                    pids.append(int(proc.name))
            except OSError:
                continue
    return pids


# Last in the module: host B does not come back.
def test_a_host_that_dies_mid_batch_has_its_shard_redone_on_the_other_host(two_hosts):
    """SIGKILL of every process of host B (its workers, its shard, its engine service) while it runs a
    shard: the missing heartbeats mark that run Crashed (deployments/create-zombie-automation.py), the
    batch resubmits it, host A runs it, and no output is uploaded twice. Host B runs two shards at
    once and may have claimed a third it never started: that run stays Pending until the batch's
    start timeout cancels and resubmits it."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings
    stack = two_hosts
    a, b = stack.hosts
    client = stack.s3.client()
    bucket = stack.s3.create_bucket()
    client.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    manifest = _put_manifest(stack, "m.csv", 8, tag="die", frames=17, seed=70, bucket=bucket)
    sink = f"s3://{bucket}/videos"
    run = subprocess.Popen(["prefect", "deployment", "run", "batch/batch", "--param", f"manifest={manifest}",
                            "--param", f"sink={sink}", "--param", "max_rows_per_shard=4", "--param", "gpus=2",
                            "--watch", "--watch-timeout", "700"],
                           env=a.env, cwd=a.env["TURBO_BATCH_HOME"], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)

    def running_on_b():
        with temporary_settings({PREFECT_API_URL: stack.api_url}), get_client(sync_client=True) as api:
            runs = [r for r in api.read_flow_runs() if (r.parameters or {}).get("sink") == sink
                    and r.name.startswith("shard-") and r.state_type.value == "RUNNING" and r.infrastructure_pid]
        # Running for a few seconds: its process has sent its first heartbeat (the automation tracks a
        # run from its first heartbeat on; a host that dies before that is the documented gap).
        now = time.time()
        return [r for r in runs if int(r.infrastructure_pid) in _processes_of(b)
                and r.start_time is not None and now - r.start_time.timestamp() > 5]

    try:
        deadline = time.monotonic() + 240
        while not (victims := running_on_b()):
            assert time.monotonic() < deadline and run.poll() is None, "host B never ran a shard"
            time.sleep(0.2)
        for pid in _processes_of(b):
            os.kill(pid, signal.SIGKILL)
        out, _ = run.communicate(timeout=800)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 0, out[-4000:] + stack.logs()
    killed = victims[0].name                                   # shard-K-a1
    with temporary_settings({PREFECT_API_URL: stack.api_url}), get_client(sync_client=True) as api:
        runs = {r.name: r for r in api.read_flow_runs() if (r.parameters or {}).get("sink") == sink}
    assert runs[killed].state_type.value == "CRASHED"
    again = killed.replace("-a1", "-a2")
    assert runs[again].state_type.value == "COMPLETED" and again in a.completed_shards()

    from tests.shards import latest_metrics
    df = latest_metrics(sink, client=client)
    assert sorted(df["id"].to_list()) == [f"die-{i}" for i in range(8)]
    assert set(df["status"].to_list()) <= {"succeeded", "skipped"}, df.select("id", "status", "error")
    from tests.flows.test_deployments import versions_per_key
    outputs = {k: n for k, n in versions_per_key(stack, bucket, "videos/").items() if not k.startswith("videos/runs/")}
    assert len([k for k in outputs if k.endswith(".mp4")]) == 8 and set(outputs.values()) == {1}, outputs
