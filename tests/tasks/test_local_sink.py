"""LocalSink on a real file system: file modes, concurrent writers in real processes, temp-file cleanup, list."""

from __future__ import annotations

import multiprocessing
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tasks.upload import (
    PARTIAL_GRACE_SECONDS,
    LocalSink,
    UploadConflictError,
    _partial_name,
    _pid_running,
)

ROUNDS = 50


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _temp_files(root: Path) -> list[str]:
    return sorted(p.name for p in root.rglob("*.partial"))


# ---------------------------------------------------------------------------------------------
# File modes
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def umask() -> Iterator[Any]:
    """Set the process umask for one test; the old one comes back afterwards."""
    old = os.umask(0o022)
    try:
        yield os.umask
    finally:
        os.umask(old)


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)],
                         ids=["umask022", "umask077", "umask002"])
def test_new_and_replaced_files_get_the_umask_mode(tmp_path, umask, mask, mode):
    umask(mask)
    sink = LocalSink(tmp_path / "store")
    sink.put(_write(tmp_path / "a.mp4", b"video"), "ab/a.mp4")
    sink.put(_write(tmp_path / "r1.json", b"{}"), "ab/a.json")
    sink.put(_write(tmp_path / "r2.json", b'{"v": 2}'), "ab/a.json", overwrite=True)

    assert _mode(tmp_path / "store" / "ab" / "a.mp4") == mode == 0o666 & ~mask
    assert _mode(tmp_path / "store" / "ab" / "a.json") == mode
    assert _temp_files(tmp_path / "store") == []


# ---------------------------------------------------------------------------------------------
# Concurrent writers: real processes, one barrier per round
# ---------------------------------------------------------------------------------------------

def _put_rounds(root: str, source: str, overwrite: bool, rounds: int, barrier: Any, results: Any) -> None:
    """Runs in a spawned process: put `source` as race/<i>.bin once per round, all writers released together."""
    sink = LocalSink(Path(root))
    outcomes = []
    for i in range(rounds):
        barrier.wait()
        try:
            result = sink.put(Path(source), f"race/{i}.bin", overwrite=overwrite)
            outcomes.append("skipped" if result.skipped else "wrote")
        except UploadConflictError:
            outcomes.append("conflict")
        except Exception as exc:  # noqa: BLE001 - reported to the test, which fails on it
            outcomes.append(f"{type(exc).__name__}: {exc}")
    results.put((source, outcomes))


def _race(root: Path, sources: list[Path], *, overwrite: bool = False) -> dict[Path, list[str]]:
    """Each source put by its own spawned process, ROUNDS times; {source: outcome per round}."""
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(len(sources), timeout=60), ctx.Queue()
    procs = [ctx.Process(target=_put_rounds, args=(str(root), str(src), overwrite, ROUNDS, barrier, results))
             for src in sources]
    for proc in procs:
        proc.start()
    try:
        outcomes = dict(results.get(timeout=120) for _ in procs)
    finally:
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
    assert all(proc.exitcode == 0 for proc in procs)
    return {Path(src): rounds for src, rounds in outcomes.items()}


def test_concurrent_writers_of_the_same_bytes_never_conflict_and_one_writes(tmp_path):
    data = os.urandom(200_000)
    sources = [_write(tmp_path / "a.bin", data), _write(tmp_path / "b.bin", data)]

    outcomes = _race(tmp_path / "store", sources)

    # Every round: exactly one process wrote, the other found the same bytes and skipped.
    for i, per_round in enumerate(zip(*outcomes.values())):
        assert sorted(per_round) == ["skipped", "wrote"], f"round {i}: {per_round}"
        assert (tmp_path / "store" / "race" / f"{i}.bin").read_bytes() == data
    assert _temp_files(tmp_path / "store") == []


def test_concurrent_writers_of_different_bytes_one_wins_the_other_conflicts(tmp_path):
    data = {tmp_path / "a.bin": os.urandom(200_000), tmp_path / "b.bin": os.urandom(200_000)}
    for path, content in data.items():
        _write(path, content)

    outcomes = _race(tmp_path / "store", list(data))

    for i in range(ROUNDS):
        per_round = {src: rounds[i] for src, rounds in outcomes.items()}
        assert sorted(per_round.values()) == ["conflict", "wrote"], f"round {i}: {per_round}"
        [winner] = [src for src, outcome in per_round.items() if outcome == "wrote"]
        assert (tmp_path / "store" / "race" / f"{i}.bin").read_bytes() == data[winner]
    assert _temp_files(tmp_path / "store") == []


def test_concurrent_overwrites_replace_whole_files(tmp_path):
    data = {tmp_path / "a.json": b"a" * 100_000, tmp_path / "b.json": b"b" * 150_000}
    for path, content in data.items():
        _write(path, content)

    outcomes = _race(tmp_path / "store", list(data), overwrite=True)

    assert all(outcome == "wrote" for rounds in outcomes.values() for outcome in rounds)
    for i in range(ROUNDS):   # one writer's bytes, whole: never a mix, never a partial file
        assert (tmp_path / "store" / "race" / f"{i}.bin").read_bytes() in data.values()
    assert _temp_files(tmp_path / "store") == []


# ---------------------------------------------------------------------------------------------
# Temp files left by killed runs
# ---------------------------------------------------------------------------------------------

def _killed_writer(target: Path, source: Path) -> int:
    """A real process that writes `target`'s temp file and is SIGKILLed before renaming it; its pid."""
    code = ("import os, signal, sys; from pathlib import Path; from tasks.upload import _write_partial; "
            "_write_partial(Path(sys.argv[1]), Path(sys.argv[2])); print(os.getpid(), flush=True); "
            "os.kill(os.getpid(), signal.SIGKILL)")
    proc = subprocess.run([sys.executable, "-c", code, str(source), str(target)],
                          cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    return int(proc.stdout)


@pytest.fixture
def live_pid() -> Iterator[int]:
    """The pid of a process that keeps running during the test."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        yield proc.pid
    finally:
        proc.kill()
        proc.wait(timeout=10)


def _age(path: Path, seconds: float) -> Path:
    then = time.time() - seconds
    os.utime(path, (then, then))
    return path


def test_a_killed_writers_temp_file_is_removed_by_the_next_sink(tmp_path, live_pid):
    root = tmp_path / "store"
    source = _write(tmp_path / "clip.mp4", os.urandom(50_000))
    _write(root / "ab" / "other.bin", b"x")
    dead_pid = _killed_writer(root / "ab" / "clip.mp4", source)
    [left] = _temp_files(root)
    assert f".{dead_pid}@" in left and not _pid_running(dead_pid)
    live = _write(root / "ab" / _partial_name("live.mp4", pid=live_pid), b"being written")
    mine = _write(root / _partial_name("mine.mp4"), b"this process")

    sink = LocalSink(root)

    assert sorted(_temp_files(root)) == sorted([live.name, mine.name])
    assert sink.put(source, "ab/clip.mp4").skipped is False
    assert (root / "ab" / "clip.mp4").read_bytes() == source.read_bytes()
    assert (root / "ab" / "other.bin").read_bytes() == b"x"


def test_temp_files_without_a_local_pid_are_removed_after_the_grace_period(tmp_path, live_pid):
    root = tmp_path / "store"
    sink = LocalSink(root)
    old = PARTIAL_GRACE_SECONDS + 60
    stale = [
        _age(_write(root / _partial_name("a.mp4", pid=4242, host="other-host"), b"x"), old),
        _age(_write(root / "d" / ".b.mp4.k2x_9qzt.partial", b"x"), old),          # tempfile.mkstemp's name
        _age(_write(root / _partial_name("c.mp4", pid=live_pid), b"x"), old),      # pid reused after a restart
    ]
    kept = [
        _write(root / _partial_name("a.mp4", pid=4242, host="other-host"), b"x"),  # may still be writing
        _write(root / "d" / ".b.mp4.q81mzz0a.partial", b"x"),
        _age(_write(root / ".notes.partial", b"mine"), old),                       # not a temp file name
        _age(_write(root / "w" / "row-1.partial.mp4", b"x"), old),                 # tasks/postprocess's, not ours
    ]

    removed = sink.remove_stale_partials()

    assert sorted(removed) == sorted(stale)
    assert all(path.exists() for path in kept) and not any(path.exists() for path in stale)
    assert LocalSink(root).remove_stale_partials() == []     # nothing more: kept files stay kept


def test_a_sink_on_a_missing_folder_starts_clean(tmp_path):
    sink = LocalSink(tmp_path / "not-yet")
    assert sink.remove_stale_partials() == [] and sink.list() == []
    assert not (tmp_path / "not-yet").exists()


# ---------------------------------------------------------------------------------------------
# list
# ---------------------------------------------------------------------------------------------

KEYS = ["runs/2024-06-01/metrics.parquet", "runs/2024-06-02/metrics.parquet", "runs/2024-06-02/manifest.csv",
        "runs-old/metrics.parquet", "videos/ab/x.mp4", "top.json"]


def test_list_returns_sorted_sink_relative_keys_under_a_prefix(tmp_path, live_pid):
    root = tmp_path / "store"
    sink = LocalSink(root)
    for key in KEYS:
        sink.put(_write(tmp_path / "src" / key, key.encode()), key)
    _write(root / "runs" / "2024-06-02" / _partial_name("metrics.parquet", pid=live_pid), b"half")

    assert sink.list() == sorted(KEYS)
    assert sink.list("runs/") == ["runs/2024-06-01/metrics.parquet", "runs/2024-06-02/manifest.csv",
                                  "runs/2024-06-02/metrics.parquet"]
    assert sink.list("runs") == sorted(sink.list("runs/") + ["runs-old/metrics.parquet"])   # a string prefix
    assert sink.list("runs/2024-06-02/m") == ["runs/2024-06-02/manifest.csv", "runs/2024-06-02/metrics.parquet"]
    assert sink.list("/videos//ab/") == ["videos/ab/x.mp4"]
    assert sink.list("nothing/") == [] and sink.list("top") == ["top.json"]
    with pytest.raises(ValueError, match="invalid object key"):
        sink.list("../")
