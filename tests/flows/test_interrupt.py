"""Ctrl-C and SIGTERM of a local run, with real signals to the real CLI process.

The first signal stops starting rows: the running ones finish and are recorded `succeeded`,
the rest `failed` as interrupted, metrics are written, the exit status is 130, and nothing is
left behind: no Prefect server, no worker, no work folder.
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

from tests.shards import latest_metrics

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def _manifest(path: Path, n: int) -> Path:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "mode", "prompt", "model", "num_frames", "num_steps", "seed", "resolution"])
        for i in range(n):
            w.writerow([f"int-{i}", "t2v", f"interrupted prompt {i}", "tiny-t2v", 17, 2, i, "480p"])
    return path


def _children(pid: int) -> set[int]:
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found |= {int(c) for c in (task / "children").read_text().split()}
        except OSError:
            continue
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_first_signal_finishes_running_rows_writes_metrics_and_exits_130(tmp_path, sig):
    out, tmp = tmp_path / "out", tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp), "PYTHONUNBUFFERED": "1"}
    env.pop("PREFECT_API_URL", None)
    cli = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", str(_manifest(tmp_path / "m.csv", 12)),
                            "--out", str(out), "--no-progress", "--max-rows-per-shard", "12"],
                           cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not list(out.glob("*.json")):              # the first row's record: a row finished
            assert cli.poll() is None, cli.communicate()
            assert time.monotonic() < deadline, "no row finished in time"
            time.sleep(0.1)
        children = _children(cli.pid)
        assert children                                  # the CLI's own Prefect API server
        t0 = time.monotonic()
        cli.send_signal(sig)
        stdout, stderr = cli.communicate(timeout=60)
        stopped_s = time.monotonic() - t0
    finally:
        if cli.poll() is None:
            cli.kill()
    assert cli.returncode == 130, stderr[-3000:]
    assert stopped_s < 30, stopped_s
    assert "finishing the rows running now" in stderr

    df = latest_metrics(out)
    statuses = dict(zip(df["id"].to_list(), df["status"].to_list()))
    assert len(statuses) == 12
    done = [i for i, s in statuses.items() if s == "succeeded"]
    rest = df.filter(df["status"] != "succeeded")
    assert 1 <= len(done) < 12
    assert set(rest["status"]) == {"failed"} and all("interrupted" in e for e in rest["error"])
    assert len(list(out.glob("*.mp4"))) == len(done)       # every finished row is in the sink

    time.sleep(1)
    assert not [p for p in children if _alive(p)], "a child outlived the CLI"
    assert not list(tmp.glob("turbo-shard*")), "a work folder was left behind"
