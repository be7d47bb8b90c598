"""Local multi-GPU runs: one worker process per GPU, fed shards through a folder queue.

The parent (`run_workers`, called by `fanout.run_local` with several GPUs) writes every shard's
parameters into the queue, starts one `python -m flows.local_worker` per GPU pinned with
`CUDA_VISIBLE_DEVICES`, and collects what they write back:

    <queue>/todo/shard-00003.json              a shard's flow parameters, not taken yet
    <queue>/claimed/<worker>/shard-00003.json  taken by <worker> (atomic os.rename from todo/)
    <queue>/done/shard-00003.json              {"rows": [...]} or {"error": "..."} (temp + rename)
    <queue>/progress.jsonl                     {"id": ..., "status": ...} per finished row
    <queue>/owner.pid                          the parent; a later run removes the folder once
                                               that process is gone (after a SIGKILL)

A worker builds one warm-model cache for its whole life and runs each shard it claims with the
shard flow the pools use (default `flows.shard:gpu_shard`), as a top-level flow run on the
parent's Prefect API. It exits when todo/ is empty. A worker that dies fails the shards it had
claimed (their rows come back as failed rows naming its exit status); shards nobody claimed are
run by the workers still alive, or failed with every worker's exit status if none is left.
Workers are tied to the parent (`flows.local_server.start_tied_child`: the kernel kills them
when the parent dies, on Linux) and stopped when `run_workers` returns or is interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flows import interrupt

log = logging.getLogger(__name__)

DEFAULT_ENTRYPOINT = "flows.shard:gpu_shard"
QUEUE_PREFIX = "turbo-queue-"
POLL_S = 0.2


# -- the queue folder, shared by both sides -----------------------------------------------------
class ShardQueue:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.todo, self.claimed, self.done = (self.root / d for d in ("todo", "claimed", "done"))
        self.progress = self.root / "progress.jsonl"

    def create(self) -> ShardQueue:
        for d in (self.todo, self.claimed, self.done):
            d.mkdir(parents=True, exist_ok=True)
        self.progress.touch()
        (self.root / "owner.pid").write_text(str(os.getpid()))
        return self

    # parent side
    def put(self, name: str, params: dict[str, Any]) -> None:
        _write_atomic(self.todo / name, params)

    def done_names(self) -> set[str]:
        return {p.name for p in self.done.glob("*.json")}

    def outcome(self, name: str) -> dict[str, Any]:
        return json.loads((self.done / name).read_text())

    def claimed_by(self, worker: str) -> set[str]:
        return {p.name for p in (self.claimed / worker).glob("*.json")}

    def todo_names(self) -> set[str]:
        return {p.name for p in self.todo.glob("*.json")}

    # worker side
    def claim(self, worker: str) -> Path | None:
        """Take the first shard left in todo/ (None when empty); several workers may race."""
        mine = self.claimed / worker
        mine.mkdir(parents=True, exist_ok=True)
        for name in sorted(os.listdir(self.todo)):
            if not name.endswith(".json"):
                continue
            try:
                os.rename(self.todo / name, mine / name)
            except FileNotFoundError:   # another worker took it first
                continue
            return mine / name
        return None

    def finish(self, claimed: Path, outcome: dict[str, Any]) -> None:
        _write_atomic(self.done / claimed.name, outcome)
        claimed.unlink()


def _write_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, default=str))
    os.replace(tmp, path)


class ProgressWriter:
    """A flows.progress listener that appends one JSON line per finished row (one write each)."""

    def __init__(self, path: Path):
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def __call__(self, row_id: str, status: str) -> None:
        os.write(self._fd, (json.dumps({"id": row_id, "status": status}) + "\n").encode())

    def close(self) -> None:
        os.close(self._fd)


class ProgressReader:
    """Reads the complete lines appended to progress.jsonl since the last call."""

    def __init__(self, path: Path):
        self.path, self.offset = path, 0

    def new_rows(self) -> list[tuple[str, str]]:
        with self.path.open("rb") as f:
            f.seek(self.offset)
            data = f.read()
        end = data.rfind(b"\n") + 1      # a line still being written waits for the next call
        self.offset += end
        return [(d["id"], d["status"]) for d in map(json.loads, data[:end].splitlines()) if d]


# -- parent side --------------------------------------------------------------------------------
@dataclass
class _Worker:
    name: str
    visible: str          # its CUDA_VISIBLE_DEVICES
    proc: subprocess.Popen
    exit: int | None = None

    def describe(self) -> str:
        return f"worker {self.name} (CUDA_VISIBLE_DEVICES={self.visible})"

    def how_it_ended(self) -> str:
        assert self.exit is not None
        if self.exit < 0:
            name = signal.Signals(-self.exit).name if -self.exit in signal.valid_signals() else -self.exit
            hint = " (the kernel's OOM killer, or a kill -9)" if self.exit == -signal.SIGKILL else ""
            return f"was killed by {name}{hint}"
        return f"exited with status {self.exit}"


def run_workers(specs: list, common: dict[str, Any], n_workers: int, *,
                entrypoint: str = DEFAULT_ENTRYPOINT, api_url: str | None = None,
                on_row: Callable[[str, str], None] | None = None,
                poll_s: float = POLL_S) -> list[dict]:
    """Run `specs` (fanout.ShardSpec) on n_workers worker processes; their metrics rows, in order.

    api_url: the Prefect API the workers' flow runs report to (default: inherit the
    environment). on_row(row_id, status) is called here for every row a worker finishes
    (default flows.progress.row_done, which drives the CLI's progress bar).
    """
    if on_row is None:
        from flows import progress
        on_row = progress.row_done
    if not specs:
        return []
    _remove_stale_queues()
    queue = ShardQueue(Path(tempfile.mkdtemp(prefix=QUEUE_PREFIX))).create()
    workers: list[_Worker] = []
    try:
        by_name = {}
        for spec in specs:
            name = f"shard-{spec.index:05d}.json"
            queue.put(name, spec.parameters(common, attempt=1))
            by_name[name] = spec
        for i in range(min(n_workers, len(specs))):
            workers.append(_start_worker(queue, i, entrypoint, api_url))
        results = _collect(queue, by_name, workers, on_row, poll_s)
        return [row for name in by_name for row in results[name]]
    finally:   # normally all have exited; on an error or Ctrl-C here, stop them together
        from flows.local_server import stop_child
        for w in workers:
            if w.proc.poll() is None:
                w.proc.terminate()
        for w in workers:
            stop_child(w.proc)
        shutil.rmtree(queue.root, ignore_errors=True)


def _remove_stale_queues() -> None:
    """Queue folders left by a parent that was killed (SIGKILL leaves no chance to clean up)."""
    for folder in Path(tempfile.gettempdir()).glob(QUEUE_PREFIX + "*"):
        try:
            owner = int((folder / "owner.pid").read_text())
            os.kill(owner, 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except (OSError, ValueError):    # not ours to judge (no pid file yet, other user)
            continue


def worker_devices(n: int) -> list[str]:
    """CUDA_VISIBLE_DEVICES of each worker: the i-th of this process's visible devices if it
    has a list (wrapping around when asked for more workers than devices), else i."""
    visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return [visible[i % len(visible)] if visible else str(i) for i in range(n)]


def _start_worker(queue: ShardQueue, index: int, entrypoint: str, api_url: str | None) -> _Worker:
    from flows.local_server import start_tied_child

    name = f"gpu-{index}"
    visible = worker_devices(index + 1)[index]
    package_root = str(Path(__file__).resolve().parents[1])   # `-m flows.local_worker` from any cwd
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": visible,
           "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    if api_url:
        env["PREFECT_API_URL"] = api_url
    # Its stdout goes to our stderr: logs and tracebacks show as the in-process path's do, and
    # our stdout stays the CLI's own.
    proc = start_tied_child([sys.executable, "-m", "flows.local_worker", "--queue", str(queue.root),
                             "--name", name, "--entrypoint", entrypoint],
                            env=env, stdin=subprocess.DEVNULL, stdout=_stderr_fd())
    return _Worker(name, visible, proc)


def _stderr_fd() -> int | None:
    try:
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):   # a stderr without a file: inherit stdout
        return None


def _collect(queue: ShardQueue, by_name: dict[str, Any], workers: list[_Worker],
             on_row: Callable[[str, str], None], poll_s: float) -> dict[str, list[dict]]:
    results: dict[str, list[dict]] = {}
    reported: set[str] = set()
    reader = ProgressReader(queue.progress)

    def pass_on_progress() -> None:
        for row_id, status in reader.new_rows():
            reported.add(row_id)
            on_row(row_id, status)

    def take_done() -> None:
        for name in queue.done_names() - results.keys():
            spec, outcome = by_name[name], queue.outcome(name)
            if "error" in outcome:     # the shard flow raised: as in the in-process path
                fail(name, f"shard {spec.index} failed: {outcome['error']}")
            else:
                results[name] = outcome["rows"]

    def fail(name: str, error: str) -> None:
        spec = by_name[name]
        log.error("%s", error)
        results[name] = spec.failed_rows(error, 1)
        for r in spec.rows:
            if r.id not in reported:
                reported.add(r.id)
                on_row(r.id, "failed")

    forwarded = False
    while len(results) < len(by_name):
        pass_on_progress()
        take_done()
        if interrupt.requested() and not forwarded:
            # Ctrl-C here: shards nobody took are not started; the workers (own sessions, so the
            # terminal's signal does not reach them) finish their running rows and stop.
            forwarded = True
            for name in sorted(queue.todo_names()):
                try:
                    (queue.todo / name).unlink()
                except FileNotFoundError:   # a worker took it just now
                    continue
                results[name] = by_name[name].not_started_rows()
            for w in workers:
                if w.proc.poll() is None:
                    w.proc.send_signal(signal.SIGINT)
        for w in workers:
            if w.exit is None and w.proc.poll() is not None:
                w.exit = w.proc.returncode
                pass_on_progress()
                take_done()       # what it finished before it exited still counts
                for name in sorted(queue.claimed_by(w.name) - results.keys()):
                    fail(name, f"shard {by_name[name].index}: {w.describe()} {w.how_it_ended()} "
                               "while running it")
        if all(w.exit is not None for w in workers):
            take_done()
            codes = ", ".join(f"{w.name} {w.exit}" for w in workers)
            for name in sorted(by_name.keys() - results.keys()):
                fail(name, f"shard {by_name[name].index}: no worker left to run it "
                           f"(exit status of each: {codes})")
            break
        time.sleep(poll_s)
    pass_on_progress()
    return results


def entrypoint_of(shard_flow: Callable[..., Any]) -> str:
    """"module:name" for a module-level flow or function, checked to import back to it."""
    fn = getattr(shard_flow, "fn", shard_flow)
    module, name = getattr(fn, "__module__", None), getattr(fn, "__name__", None)
    if module and name and module != "__main__":
        try:
            found = getattr(importlib.import_module(module), name, None)
        except ImportError:
            found = None
        if found is shard_flow or getattr(found, "fn", None) is fn:
            return f"{module}:{name}"
    raise ValueError(f"{shard_flow!r} cannot be run in a worker process: it must be a flow or "
                     "function defined at the top level of an importable module")


# -- worker side --------------------------------------------------------------------------------
def load_entrypoint(entrypoint: str) -> Callable[..., Any]:
    """'package.module:name' or 'path/to/file.py:name' (Prefect's entrypoint form)."""
    target, _, name = entrypoint.rpartition(":")
    if not target or not name:
        raise ValueError(f"entrypoint {entrypoint!r}: expected module:function or file.py:function")
    if target.endswith(".py"):
        spec = importlib.util.spec_from_file_location(Path(target).stem, target)
        if spec is None or spec.loader is None:
            raise ValueError(f"entrypoint {entrypoint!r}: cannot load {target}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(target)
    return getattr(module, name)


class WarmModels:
    """The Engine a worker keeps for its whole life and passes to every shard it runs.

    Made on the first shard by the shard flow module's `new_engine(checkpoints_dir,
    random_weights)` (one batch, one setting). A flow without an `engine` parameter, or whose
    module has no `new_engine`, gets nothing extra and loads its own models.
    """

    def __init__(self, shard_flow: Callable[..., Any]):
        fn = getattr(shard_flow, "fn", shard_flow)
        self._accepts = inspect.signature(fn).parameters
        self._factory = getattr(inspect.getmodule(fn), "new_engine", None)
        self._kwargs: dict[str, Any] | None = None

    def kwargs(self, shard_params: dict[str, Any]) -> dict[str, Any]:
        if self._kwargs is None:     # a factory that raises fails this shard; the next retries
            made: dict[str, Any] = {}
            if "engine" in self._accepts and "engine" not in shard_params and callable(self._factory):
                takes = inspect.signature(self._factory).parameters
                made["engine"] = self._factory(**{k: v for k, v in shard_params.items() if k in takes})
            self._kwargs = made
        return self._kwargs


def serve(queue: ShardQueue, worker: str, shard_flow: Callable[..., Any]) -> int:
    """Run shards from the queue until it is empty; returns how many this worker ran."""
    from flows import progress

    warm = WarmModels(shard_flow)        # made once, for every shard this process runs
    writer = ProgressWriter(queue.progress)
    unsubscribe = progress.subscribe(writer)
    ran = 0
    try:
        while not interrupt.requested() and (claimed := queue.claim(worker)) is not None:
            params = json.loads(claimed.read_text())
            run = shard_flow
            if hasattr(run, "with_options"):     # a Prefect flow: name its run after the shard
                run = run.with_options(flow_run_name=f"shard-{params.get('shard')}-{worker}")
            try:
                outcome: dict[str, Any] = {"rows": run(**params, **warm.kwargs(params))}
            except Exception as e:   # a shard-level failure fails its rows, not the worker
                log.debug("shard %s failed on %s", params.get("shard"), worker, exc_info=True)
                outcome = {"error": str(e)}
            queue.finish(claimed, outcome)
            ran += 1
    finally:
        unsubscribe()
        writer.close()
    return ran


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flows.local_worker",
                                description="Run shards from a turbo-batch queue folder until it is empty.")
    p.add_argument("--queue", required=True, help="queue folder (todo/, claimed/, done/)")
    p.add_argument("--name", required=True, help="this worker's name (its claimed/ subfolder)")
    p.add_argument("--entrypoint", default=DEFAULT_ENTRYPOINT,
                   help=f"shard flow, module:function or file.py:function (default {DEFAULT_ENTRYPOINT})")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format=f"%(levelname)s {args.name} %(name)s: %(message)s")
    interrupt.arm()        # SIGINT from the parent: finish the running rows, claim no more
    serve(ShardQueue(Path(args.queue)), args.name, load_entrypoint(args.entrypoint))
    return 0


if __name__ == "__main__":
    sys.exit(main())
