"""Local multi-GPU runs: one worker process per "GPU" (CPU here, pinned by CUDA_VISIBLE_DEVICES),
and the CLI's own Prefect API server; every child dies with the CLI.

The CLI runs in a subprocess, as a user runs it. The queue test runs the real worker module on a
stand-in shard function from this file (`fake_shard`), so it needs no model and no Prefect API.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def write_manifest(path: Path, n: int) -> Path:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "mode", "prompt", "model", "num_frames", "num_steps", "seed"])
        for i in range(n):
            w.writerow([f"r{i}", "t2v", f"prompt number {i}", "tiny-t2v", "5", "1", str(i)])
    return path


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "flows.cli", *args]


def cli_env(tmp: Path) -> dict[str, str]:
    """No API server given (the CLI starts its own), no GPU pinning; temp files (the queue) in tmp."""
    tmp.mkdir(exist_ok=True)
    return {**{k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "CUDA_VISIBLE_DEVICES")},
            "TMPDIR": str(tmp)}


def children(pid: int) -> dict[int, str]:
    """Live (not zombie) processes whose parent is pid: {pid: command line}."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if int(ppid) == pid and state != "Z":
            found[int(entry.name)] = cmdline
    return found


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


# -- the CLI ------------------------------------------------------------------------------------
def test_gpus_2_runs_shards_on_two_pinned_workers(tmp_path):

    manifest = write_manifest(tmp_path / "m.csv", 4)
    out = tmp_path / "out"
    run = subprocess.run(cli("run", str(manifest), "--out", str(out), "--gpus", "2",
                             "--max-rows-per-shard", "1"),
                         cwd=REPO, text=True, capture_output=True, timeout=300,
                         env=cli_env(tmp_path / "tmp"))
    assert run.returncode == 0, run.stderr[-3000:]
    assert not list((tmp_path / "tmp").glob("turbo-queue-*")), "the queue folder is removed"
    from tests.shards import latest_metrics
    df = latest_metrics(out)
    assert sorted(df["id"]) == ["r0", "r1", "r2", "r3"]
    assert set(df["status"]) == {"succeeded"}
    assert set(df["gpu"]) == {"cpu (CUDA_VISIBLE_DEVICES=0)", "cpu (CUDA_VISIBLE_DEVICES=1)"}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_sigkill_of_the_cli_takes_server_and_workers_with_it(tmp_path):
    manifest = write_manifest(tmp_path / "m.csv", 4)
    proc = subprocess.Popen(cli("run", str(manifest), "--out", str(tmp_path / "out"), "--gpus", "2",
                                "--max-rows-per-shard", "1", "--no-progress"),
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=cli_env(tmp_path / "tmp"))
    try:
        deadline = time.monotonic() + 120
        kids: dict[int, str] = {}
        while time.monotonic() < deadline and proc.poll() is None:
            kids = children(proc.pid)
            servers = [p for p, c in kids.items() if "uvicorn" in c]
            workers = [p for p, c in kids.items() if "flows.local_worker" in c]
            if len(servers) == 1 and len(workers) == 2:
                break
            time.sleep(0.2)
        else:
            pytest.fail(f"no server and two workers under the CLI (exit {proc.poll()}): {kids}")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(alive(p) for p in kids):
            time.sleep(0.1)
        survivors = {p: c for p, c in kids.items() if alive(p)}
        assert not survivors, f"outlived the SIGKILLed CLI: {survivors}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# -- the queue ----------------------------------------------------------------------------------
def new_engine(checkpoints_dir: str | None = None) -> dict:
    """Stand-in for flows.shard.new_engine: the worker makes one and passes it to every shard."""
    return {"made_ns": time.monotonic_ns(), "checkpoints_dir": checkpoints_dir}


def fake_shard(rows: list[int], shard: int, engine: dict | None = None, **_: object) -> list[dict]:
    """Stand-in shard flow, run inside the worker processes: dies on the shards FAKE_SHARD_DIE names."""
    from flows import progress

    die = os.environ.get("FAKE_SHARD_DIE", "")
    if die == "all" or str(shard) in die.split(","):
        os._exit(3)
    out = []
    for position in rows:                # rows travel as positions in the run's manifest
        row_id = f"r{position}"
        progress.row_done(row_id, "succeeded")
        out.append({"id": row_id, "status": "succeeded", "gpu": os.environ["CUDA_VISIBLE_DEVICES"],
                    "engine": engine})
    return out


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", ""])
    p.wait()
    return p.pid


def specs(n: int) -> list:
    from flows.fanout import ShardSpec
    from tasks.manifest import ManifestRow

    return [ShardSpec(index=i, rows=[ManifestRow(row=i + 1, id=f"r{i}", mode="t2v", prompt="p",
                                                 model="tiny-t2v", num_frames=5)], positions=[i])
            for i in range(n)]


def run_fake(n_shards: int, monkeypatch, tmp_path, die: str) -> tuple[dict[str, dict], list]:
    from flows.local_worker import run_workers

    monkeypatch.setenv("FAKE_SHARD_DIE", die)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))   # where the queue folder goes
    stale = tmp_path / "turbo-queue-stale"                   # left by a SIGKILLed run
    stale.mkdir()
    (stale / "owner.pid").write_text(str(dead_pid()))
    seen: list[tuple[str, str]] = []
    rows = run_workers(specs(n_shards), {"sink": str(tmp_path / "out"), "checkpoints_dir": "ckpt"}, 2,
                       entrypoint=f"{__file__}:fake_shard",
                       on_row=lambda row_id, status: seen.append((row_id, status)))
    assert not list(tmp_path.glob("turbo-queue-*")), "the queue folder and the stale one are removed"
    return {r["id"]: r for r in rows}, seen


def test_a_dead_worker_fails_its_shard_and_the_others_finish(monkeypatch, tmp_path):
    by_id, seen = run_fake(5, monkeypatch, tmp_path, die="1")
    assert sorted(by_id) == ["r0", "r1", "r2", "r3", "r4"]
    dead = by_id.pop("r1")
    assert dead["status"] == "failed" and dead["attempts"] == 1
    assert "shard 1" in dead["error"] and "exited with status 3" in dead["error"]
    assert {r["status"] for r in by_id.values()} == {"succeeded"}
    assert sorted(seen) == [("r0", "succeeded"), ("r1", "failed"), ("r2", "succeeded"),
                            ("r3", "succeeded"), ("r4", "succeeded")]
    # One engine per worker for all its shards, made with the batch's settings.
    engines: dict[str, set[int]] = {}
    for r in by_id.values():
        assert r["engine"]["checkpoints_dir"] == "ckpt"
        engines.setdefault(r["gpu"], set()).add(r["engine"]["made_ns"])
    assert set(engines) <= {"0", "1"} and all(len(made) == 1 for made in engines.values())


def test_when_every_worker_dies_the_rest_fail_with_their_exit_status(monkeypatch, tmp_path):
    by_id, seen = run_fake(4, monkeypatch, tmp_path, die="all")
    assert {r["status"] for r in by_id.values()} == {"failed"}
    errors = sorted(r["error"] for r in by_id.values())
    assert sum("exited with status 3 while running it" in e for e in errors) == 2
    assert sum("no worker left to run it (exit status of each: gpu-0 3, gpu-1 3)" in e
               for e in errors) == 2
    assert sorted(seen) == [(f"r{i}", "failed") for i in range(4)]


def test_worker_devices_follow_this_process_visible_devices(monkeypatch):
    from flows.local_worker import worker_devices

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert worker_devices(3) == ["0", "1", "2"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
    assert worker_devices(2) == ["4", "6"]


def test_a_given_api_url_is_used_and_no_server_is_started(monkeypatch):
    from flows import local_server

    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    monkeypatch.setattr(local_server, "_ServerProcess", None)   # would fail if one were started
    with local_server.local_api_server() as url:
        assert url == "http://127.0.0.1:9/api"
