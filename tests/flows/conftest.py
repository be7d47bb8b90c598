"""A real Prefect stack for deployment tests, shared by the session:

    prefect server (SQLite, temp PREFECT_HOME)  <-  prefect deploy --all (from a copy of the repo)
    deployments/start-workers.sh: 2 "GPU" workers (CUDA_VISIBLE_DEVICES 0 and 1, CPU) + 1 cpu worker
    ministack behind TLS as the S3 sink (tests/s3server.py), trusted through R2_CA_BUNDLE

Everything runs in subprocesses with an explicit environment; `stack.env` is that environment and
`stack.client()` a Prefect client pointed at the server.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from tests.pose.graphs import write_dwpose_stand_ins  # noqa: E402
from tests.s3server import S3TestServer, run_s3_server  # noqa: E402


@dataclass
class PrefectStack:
    api_url: str
    env: dict[str, str]
    home: Path          # the deployed copy of the repository (TURBO_BATCH_HOME)
    logs: Path
    s3: S3TestServer
    engine_sockets: list[Path] = field(default_factory=list)   # each "GPU"'s engine service

    @contextmanager
    def settings(self) -> Iterator[None]:
        from prefect.settings import PREFECT_API_URL, temporary_settings
        with temporary_settings({PREFECT_API_URL: self.api_url}):
            yield

    def prefect(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
        out = subprocess.run(["prefect", *args], env=self.env, cwd=self.home, capture_output=True,
                             text=True, timeout=timeout)
        if check and out.returncode != 0:
            raise AssertionError(f"prefect {' '.join(args)} exited {out.returncode}:\n"
                                 f"{out.stdout[-4000:]}\n{out.stderr[-4000:]}\n{self.worker_logs()}")
        return out

    def worker_logs(self, tail: int = 3000) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-tail:]}"
                         for p in sorted(self.logs.glob("*.log")))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_healthy(url: str, process: subprocess.Popen, log: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"prefect server exited {process.returncode}: {log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"prefect server not healthy after {timeout} s: {log.read_text()[-3000:]}")


def _stop(process: subprocess.Popen, sig: int = signal.SIGTERM, grace: float = 10) -> None:
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def _kill_pids(pid_file: Path) -> None:
    """SIGKILL the workers start-workers.sh recorded, if any outlived its SIGINT."""
    if not pid_file.exists():
        return
    for line in pid_file.read_text().split():
        try:
            os.kill(int(line), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def _copy_repo(dest: Path) -> Path:
    """A clone-like copy: the files git tracks or would track (no build outputs, no ignored files)."""
    names = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO_ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, names):
        src = REPO_ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


@pytest.fixture(scope="session")
def prefect_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectStack]:
    if shutil.which("prefect") is None or shutil.which("socat") is None:
        pytest.skip("needs the prefect CLI and socat")
    root = tmp_path_factory.mktemp("prefect-stack")
    port = _free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    home = _copy_repo(root / "turbo-batch")
    logs = root / "logs"
    logs.mkdir()
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("PREFECT_", "R2_", "AWS_", "TURBO_", "CUDA_"))}
    server_env = {**base, "PREFECT_HOME": str(root / "prefect-home"),
                  "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_SERVER_UI_ENABLED": "false",
                  "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE": "200",
                  "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_READ_BATCH_SIZE": "200",
                  "PREFECT_SERVER_LOGGING_LEVEL": "WARNING"}
    server_log = logs / "server.out"
    with server_log.open("wb") as out, run_s3_server(root / "s3") as s3:
        server = subprocess.Popen(["prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                  env=server_env, stdout=out, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL)
        workers = None
        try:
            _wait_healthy(api_url, server, server_log)
            env = {**base, "PREFECT_API_URL": api_url, "PREFECT_HOME": str(root / "client-home"),
                   "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_WORKER_QUERY_SECONDS": "1",
                   "PREFECT_WORKER_PREFETCH_SECONDS": "5",
                   # one results folder for shards and the batch flow that reads their metrics
                   "PREFECT_LOCAL_STORAGE_PATH": str(root / "results"),
                   "R2_ENDPOINT_URL": s3.endpoint_url, "R2_ACCESS_KEY_ID": s3.access_key_id,
                   "R2_SECRET_ACCESS_KEY": s3.secret_access_key, "R2_CA_BUNDLE": str(s3.ca_path),
                   "TURBO_EMBED_CACHE": str(root / "text-cache"), "PYTHONUNBUFFERED": "1",
                   # DWPose stand-ins (tests/pose/graphs.py) for dance rows, on every worker
                   "TURBO_POSE_DIR": str(write_dwpose_stand_ins(root / "dwpose"))}
            stack = PrefectStack(api_url=api_url, env=env, home=home, logs=logs, s3=s3,
                                 engine_sockets=[root / "run" / f"ci-engine-{i}.sock" for i in range(2)])
            subprocess.run(["bash", "deployments/create-pools.sh"], env=env, cwd=home, check=True,
                           capture_output=True, timeout=120)
            # TURBO_BATCH_HOME is unset here on purpose: the pull step keeps its placeholder and
            # each worker resolves it from its own environment.
            stack.prefect("deploy", "--all", "--no-prompt")
            workers = subprocess.Popen(
                ["bash", "deployments/start-workers.sh"], cwd=home,
                env={**env, "GPUS": "2", "SHARDS_PER_GPU": "2", "LOG_DIR": str(logs), "WORKER_HOST": "ci",
                     "TURBO_BATCH_HOME": str(home), "RUN_DIR": str(root / "run"),
                     "TORCHINDUCTOR_CACHE_DIR": str(root / "inductor")},
                stdout=(logs / "start-workers.out").open("wb"), stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True)
            _wait_workers_online(stack, {"ci-gpu-0", "ci-gpu-1", "ci-cpu"}, workers)
            yield stack
        finally:
            if workers is not None:
                _stop(workers, signal.SIGINT, grace=20)
                _kill_pids(logs / "workers.pids")
            _stop(server)


def _wait_workers_online(stack: PrefectStack, names: set[str], workers: subprocess.Popen,
                         timeout: float = 120) -> None:
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + timeout
    with stack.settings(), get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            if workers.poll() is not None:
                raise RuntimeError(f"start-workers.sh exited {workers.returncode}\n{stack.worker_logs()}")
            online = {w.name for pool in ("gpu", "cpu") for w in client.read_workers_for_work_pool(pool)
                      if w.status == "ONLINE"}
            if names <= online:
                return
            time.sleep(0.5)
    raise RuntimeError(f"workers {names} not online after {timeout} s\n{stack.worker_logs()}")
