"""The GPU benchmarks run only on a lent GPU; their CPU dry runs keep them importable and working
against the current engine API (a broken bench is found here, not on the device)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_engine_bench_dry_run_on_cpu(tmp_path):
    run = subprocess.run([sys.executable, "bench/engine.py", "--device", "cpu", "--shapes", "tiny-480p",
                          "--no-peer", "--no-write", "--no-compile", "--repeats", "1", "--frames", "5",
                          "--tmp", str(tmp_path)],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert "tiny-480p-5f" in run.stdout
    assert all(field in run.stdout for field in ("denoise_fp8_s", "fp8_rel_err", "row_s", "rows_per_gpu_hour"))


def test_i2v_bench_dry_run_on_cpu(tmp_path):
    run = subprocess.run([sys.executable, "bench/i2v.py", "--device", "cpu", "--model", "tiny-i2v",
                          "--no-write", "--no-compile", "--rows", "1", "--frames", "5",
                          "--policies", "resident,swap", "--tmp", str(tmp_path)],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert "resident" in run.stdout and "swap" in run.stdout and "160x96x5" in run.stdout


def test_dance_bench_dry_run_on_cpu(tmp_path):
    run = subprocess.run([sys.executable, "bench/dance.py", "--device", "cpu", "--model", "tiny-dance",
                          "--frames", "5", "--repeats", "1", "--no-write", "--tmp", str(tmp_path)],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert "unipc-4-fast" in run.stdout and "unipc-5-official" in run.stdout
