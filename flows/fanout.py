"""Fan shards out and collect their metrics rows.

Local: each shard is a subflow in this process; with several GPUs, one worker process per GPU
(flows/local_worker.py, pinned with CUDA_VISIBLE_DEVICES, one warm model each) takes shards from
a queue folder and runs them as flow runs on this process's Prefect API.

Deployments: each shard is a flow run of the gpu-shard deployment, created with
`run_deployment(timeout=0, idempotency_key=…)`, a few at a time (SQLite answered 503 past about 16
concurrent creations), then awaited. A shard that ends Crashed (SIGKILL, OOM killer, segfault:
Prefect applies no retries then) or Failed is resubmitted with the next attempt number; rows it
had finished are found complete in the sink and come back as skipped, so nothing is uploaded twice.
Only live workers count (a heartbeat within 3 heartbeat intervals, as the server judges ONLINE):
with none on the shard deployment's pool the batch fails at once (`require_live_workers`). A shard
run that no worker takes for `pickup_timeout_s` while nothing runs on its pool, or with no live
worker there, is cancelled and its rows fail; the batch goes on.
"""

from __future__ import annotations

import asyncio
import contextvars
import email.utils
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from tasks.errors import NoLiveWorkersError, SharedStorageError

log = logging.getLogger(__name__)
CREATE_CONCURRENCY = 4
PICKUP_TIMEOUT_ENV = "TURBO_SHARD_PICKUP_TIMEOUT"
DEFAULT_PICKUP_TIMEOUT_S = 600.0
SHARDS_PER_GPU_ENV = "TURBO_SHARDS_PER_GPU"
START_TIMEOUT_ENV = "TURBO_SHARD_START_TIMEOUT"
DEFAULT_START_TIMEOUT_S = 120.0
WAITING_LOG_S = 60.0       # a line about shards still waiting for a worker, at most this often
# How Prefect 3.9.1's server tells a live worker (server/schemas/responses.py, services/foreman.py):
# its last heartbeat is at most 3 of its heartbeat intervals old (30 s if it sent no interval).
HEARTBEAT_MULTIPLE = 3
DEFAULT_HEARTBEAT_S = 30




@dataclass
class ShardSpec:
    index: int
    rows: list            # ManifestRow
    positions: list[int]  # the rows' places in the batch's saved manifest (tasks/runs.py)

    def parameters(self, common: dict[str, Any], attempt: int) -> dict[str, Any]:
        # Rows travel by reference: the manifest's sink key is in `common`, here only positions.
        return {"rows": self.positions, "shard": self.index, "attempt": attempt, **common}

    def failed_rows(self, error: str, attempts: int) -> list[dict]:
        """Every row of a shard that never returned (crashed, refused, its worker died)."""
        from tasks.metrics import MetricsRow
        return [MetricsRow.start(r, attempts).failed("shard", error).as_dict() for r in self.rows]

    def not_started_rows(self) -> list[dict]:
        from tasks.metrics import MetricsRow
        return [MetricsRow.start(r, 1).failed("interrupted", "not started: the run was stopped before this row")
                .as_dict() for r in self.rows]


def local_gpu_count() -> int:
    try:
        import torch
        return torch.cuda.device_count()
    except ImportError:
        return 0


def pickup_timeout_from_env(env: Mapping[str, str]) -> float:
    """TURBO_SHARD_PICKUP_TIMEOUT: seconds a shard run may wait unclaimed (default 600); the batch
    flow reads it once and passes it to `run_deployments`."""
    return _seconds(env, PICKUP_TIMEOUT_ENV, DEFAULT_PICKUP_TIMEOUT_S)


def start_timeout_from_env(env: Mapping[str, str]) -> float:
    """TURBO_SHARD_START_TIMEOUT: seconds a shard run may stay Pending, claimed by a worker that has
    not started its process (default 120; a start takes seconds). Longer, the worker or its host is
    gone (a run that never ran sends no heartbeat for the zombie automation): the batch cancels the
    run and submits the shard again."""
    return _seconds(env, START_TIMEOUT_ENV, DEFAULT_START_TIMEOUT_S)


def _seconds(env: Mapping[str, str], name: str, default: float) -> float:
    raw = (env.get(name) or "").strip()
    if not raw:
        return default
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if not (seconds > 0 and math.isfinite(seconds)):
        raise ValueError(f"{name}={raw!r}: expected a number of seconds above 0")
    return seconds


def shards_per_gpu_from_env(env: Mapping[str, str]) -> int:
    """TURBO_SHARDS_PER_GPU: shards each GPU worker runs at once (start-workers.sh exports its
    SHARDS_PER_GPU: 3 with engine services, whose GPU lock queues their rows; 1 without). The batch
    plans at least that many shards per live worker; unset: 1."""
    raw = (env.get(SHARDS_PER_GPU_ENV) or "").strip()
    if not raw:
        return 1
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"{SHARDS_PER_GPU_ENV}={raw!r}: expected a whole number of shards, 1 or more")
    return int(raw)


def pool_worker_count(deployment: str) -> int:
    """Live workers of the deployment's work pool: one per GPU, so shards to plan for (0 if unknown)."""
    try:
        return int(_run_coro(_live_worker_count(deployment))[1])
    except Exception as e:   # planning still works with one shard per max_rows
        log.warning("could not count the workers of %s's pool: %s", deployment, e)
        return 0


def require_live_workers(deployment: str) -> int:
    """`pool_worker_count`, raising NoLiveWorkersError when the pool has no live worker.

    0 when the API cannot tell (the batch then plans for one GPU, and the pickup timeout still
    bounds the wait) or when the deployment has no work pool."""
    try:
        pool, n = _run_coro(_live_worker_count(deployment))
    except Exception as e:
        log.warning("could not count the workers of %s's pool: %s", deployment, e)
        return 0
    if pool is not None and n == 0:
        raise NoLiveWorkersError(pool, deployment)
    return int(n)


def worker_host(name: str) -> str:
    """The host of a worker named by start-workers.sh (`<host>-gpu-N`, `<host>-cpu`); other names
    are their own host."""
    for marker in ("-gpu-", "-cpu"):
        head, sep, tail = name.rpartition(marker)
        if sep and head and (marker == "-cpu" and tail == "" or tail.isdigit()):
            return head
    return name


def live_worker_hosts(deployment: str) -> list[str]:
    """The hosts with a live worker on the deployment's pool ([] when the API cannot tell)."""
    try:
        _, workers = _run_coro(_live_pool_workers(deployment))
        return sorted({worker_host(w.name) for w in workers})
    except Exception as e:
        log.warning("could not list the hosts of %s's pool: %s", deployment, e)
        return []


def require_shared_storage(hosts: list[str], manifest: str, sink: str, env: Mapping[str, str]) -> None:
    """On a pool that spans hosts, every place a shard reads or writes must be reachable from all
    of them: the manifest and the sink under s3://, results in a storage block, not a local folder."""
    if len(hosts) < 2:
        return
    problems = []
    if not str(manifest).startswith("s3://"):
        problems.append(f"the manifest {manifest!r} is a local path: put it under s3:// (e.g. the sink's bucket)")
    if not str(sink).startswith("s3://"):
        problems.append(f"the sink {sink!r} is a local folder: use an s3:// sink")
    if not env.get("PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK"):
        problems.append("PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK is not set, so each shard's results would stay "
                        "on its own host: create the block with deployments/create-result-storage.py and set it "
                        "on every host")
    if problems:
        raise SharedStorageError(hosts, problems)


def heartbeat_is_recent(last: datetime | None, interval_s: int | None, now: datetime) -> bool:
    """The server's rule for ONLINE: the last heartbeat is at most HEARTBEAT_MULTIPLE intervals old."""
    if last is None:
        return False
    return (now - last).total_seconds() <= HEARTBEAT_MULTIPLE * (interval_s or DEFAULT_HEARTBEAT_S)


async def _live_pool_workers(deployment: str) -> tuple[str | None, list[Any]]:
    """The deployment's work pool and its live workers (None, [] without a pool)."""
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        dep = await client.read_deployment_by_name(deployment)
        if dep.work_pool_name is None:
            return None, []
        return dep.work_pool_name, await _live_workers(client, dep.work_pool_name)


async def _live_worker_count(deployment: str) -> tuple[str | None, int]:
    pool, workers = await _live_pool_workers(deployment)
    return pool, len(workers)


async def _live_workers(client: Any, pool: str) -> list[Any]:
    """The workers of `pool` that are alive now.

    The server's ONLINE is a stored status that its foreman service resets only on its next round
    (every 15 s) after a worker missed its heartbeats, so a worker that stopped is still listed
    ONLINE for a while. Here a worker counts only while its last heartbeat is recent, measured on
    the server's clock (the response's Date header): a skewed clock on this host changes nothing.
    """
    from prefect.client.schemas.filters import WorkerFilter, WorkerFilterStatus
    from prefect.client.schemas.objects import Worker

    online = WorkerFilter(status=WorkerFilterStatus(any_=["ONLINE"]))
    response = await client.request("POST", "/work_pools/{work_pool_name}/workers/filter",
                                    path_params={"work_pool_name": pool},
                                    json={"workers": online.model_dump(mode="json", exclude_unset=True)})
    response.raise_for_status()
    now = _server_time(response.headers.get("date"))
    return [w for w in Worker.model_validate_list(response.json())
            if heartbeat_is_recent(w.last_heartbeat_time, w.heartbeat_interval_seconds, now)]


def _server_time(date_header: str | None) -> datetime:
    """The server's clock from its Date header (whole seconds); this host's clock, finer, where the
    two agree, or where there is no header."""
    local = datetime.now(UTC)
    try:
        server = email.utils.parsedate_to_datetime(date_header or "")
    except (TypeError, ValueError):
        return local
    server = server if server.tzinfo is not None else server.replace(tzinfo=UTC)
    return local if timedelta(0) <= local - server < timedelta(seconds=2) else server


def run_local(shard_flow: Callable[..., list[dict]], specs: list[ShardSpec], common: dict,
              n_gpus: int, *, engine: Any = None) -> list[dict]:
    """Run the shards on this machine.

    n_gpus <= 1: one after the other as subflows in this process (`engine`, if given, is the
    warm engine passed to each). More: on one worker process per GPU (flows/local_worker.py),
    each pinned with CUDA_VISIBLE_DEVICES, keeping its own warm models for all the shards it
    runs, and reporting to this process's Prefect API.
    """
    if n_gpus <= 1:
        extra = {} if engine is None else {"engine": engine}
        results: list[dict] = []
        from flows import interrupt
        for spec in specs:
            if interrupt.requested():     # Ctrl-C: no new shard starts
                results += spec.not_started_rows()
                continue
            results += _run_one_local(shard_flow, spec, common, **extra)
        return results
    from flows import local_worker
    return local_worker.run_workers(specs, common, n_gpus,
                                    entrypoint=local_worker.entrypoint_of(shard_flow),
                                    api_url=current_api_url())


def current_api_url() -> str:
    """The Prefect API this process reports to, for child processes to use the same one
    (with Prefect's ephemeral API, the URL of the server it started)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return str(PREFECT_API_URL.value())
    with get_client(sync_client=True) as client:
        return str(client.api_url).rstrip("/")


def _run_one_local(shard_flow: Callable[..., list[dict]], spec: ShardSpec, common: dict,
                   **extra: Any) -> list[dict]:
    try:
        return shard_flow(**spec.parameters(common, attempt=1), **extra)
    except Exception as e:  # a shard-level failure (sink down, …) fails its rows, not the batch
        log.error("shard %d failed: %s", spec.index, e)
        return spec.failed_rows(f"shard {spec.index} failed: {e}", 1)


# A shard run's state is read every POLL_S (the batch ends at most that long after its last
# shard; 2 s cost a second a batch on average); its finished rows, a heavier query, every ROWS_COUNT_S.
POLL_S = 1.0
ROWS_COUNT_S = 5.0


def run_deployments(deployment: str, specs: list[ShardSpec], common: dict, *,
                    max_attempts: int = 3, poll_s: float = POLL_S,
                    pickup_timeout_s: float = DEFAULT_PICKUP_TIMEOUT_S,
                    start_timeout_s: float = DEFAULT_START_TIMEOUT_S,
                    waiting_log_s: float = WAITING_LOG_S) -> list[dict]:
    """Run every shard as a flow run of `deployment` and return all their metrics rows.

    `pickup_timeout_s`: a shard run that waits this long unclaimed (see `_Pickup`) is cancelled and
    its rows fail; `start_timeout_s`: a run Pending this long (claimed, never started) is cancelled
    and the shard submitted again; `waiting_log_s`: how often a line names the shards still waiting
    for a worker."""
    return _run_coro(_run_deployments(deployment, specs, common, max_attempts, poll_s,
                                      _Pickup(pickup_timeout_s, waiting_log_s, refresh_s=max(poll_s, 5.0),
                                              start_timeout_s=start_timeout_s)))


def _in_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
        return True
    except RuntimeError:
        return False


def _run_coro(coro: Any) -> Any:
    """Run a coroutine to completion from sync code, in a fresh thread if a loop already runs here."""
    return asyncio.run(coro) if not _in_event_loop() else _run_in_thread(coro)


def _run_in_thread(coro: Any) -> Any:
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = asyncio.run(coro)
        except BaseException as e:  # re-raised in the caller's thread
            box["error"] = e

    # Carry the flow-run context (batch run id, artifact owner) into the thread.
    t = threading.Thread(target=contextvars.copy_context().run, args=(target,))
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


async def _run_deployments(deployment: str, specs: list[ShardSpec], common: dict,
                           max_attempts: int, poll_s: float, pickup: _Pickup) -> list[dict]:
    from prefect.client.orchestration import get_client
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    batch_id = str(ctx.flow_run.id) if ctx and ctx.flow_run else f"adhoc-{time.time_ns()}"
    async with get_client() as client:
        pickup.pool = (await client.read_deployment_by_name(deployment)).work_pool_name
    progress = await _Progress.create(sum(len(s.rows) for s in specs))
    results: list[dict] = []
    sem = asyncio.Semaphore(CREATE_CONCURRENCY)

    async def one_shard(spec: ShardSpec) -> None:
        for attempt in range(1, max_attempts + 1):
            flow_run = await _submit(deployment, spec, common, attempt, batch_id, sem)
            try:
                state = await _wait(flow_run.id, poll_s, on_poll=lambda n: progress.shard_rows(spec.index, n),
                                    pickup=pickup, shard=spec.index)
            except _NotPickedUp as e:   # no worker for it: another attempt would wait the same way
                _logger().error("%s", e)
                results.extend(spec.failed_rows(str(e), attempt))
                await progress.shard_rows(spec.index, len(spec.rows))
                return
            if state.is_completed():
                rows = await state.aresult()
                results.extend(rows)
                await progress.shard_rows(spec.index, len(spec.rows))
                return
            _logger().warning("shard %d attempt %d ended %s: %s", spec.index, attempt, state.type.value,
                              state.message)
            last = f"shard {spec.index} ended {state.type.value} {attempt} time(s): {state.message}"
        results.extend(spec.failed_rows(last, max_attempts))
        await progress.shard_rows(spec.index, len(spec.rows))

    await asyncio.gather(*(one_shard(s) for s in specs))
    return results


async def _submit(deployment: str, spec: ShardSpec, common: dict, attempt: int, batch_id: str,
                  sem: asyncio.Semaphore):
    # The a-prefixed API: the plain names dispatch on the caller's flow, and batch_flow is sync.
    from prefect.deployments.flow_runs import arun_deployment

    async with sem:   # bounded concurrent creations: SQLite locks up past ~16
        return await arun_deployment(
            deployment, parameters=spec.parameters(common, attempt), timeout=0,
            idempotency_key=f"{batch_id}:shard-{spec.index}:attempt-{attempt}",
            flow_run_name=f"shard-{spec.index}-a{attempt}")


async def _wait(flow_run_id, poll_s: float, on_poll: Callable[[int], Any] | None = None, *,
                pickup: _Pickup | None = None, shard: int = 0):
    """Poll until the run is final; between polls, pass on how many of its rows have finished.

    While the run waits for a worker, `pickup` keeps its clock; when that runs out the run is
    cancelled and _NotPickedUp raised (unless a worker took it in the meantime). A run Pending
    past `pickup.start_timeout_s` is cancelled and its Cancelled state returned: the caller
    submits the shard again."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType

    pending_since: float | None = None
    next_count = 0.0
    async with get_client() as client:
        try:
            while True:
                run = await client.read_flow_run(flow_run_id)
                state = run.state
                if state is not None and state.is_final():
                    return state
                pending_since = (pending_since or time.monotonic()) if run.state_type == StateType.PENDING else None
                if (pickup is not None and pending_since is not None
                        and time.monotonic() - pending_since >= pickup.start_timeout_s):
                    message = (f"shard {shard}: claimed by a worker but not started within "
                               f"{pickup.start_timeout_s:g} s ({START_TIMEOUT_ENV}); its worker or host is "
                               "gone, so the run was cancelled and the shard is submitted again")
                    if await _cancel_unclaimed(client, flow_run_id, message):
                        _logger().warning("%s", message)
                        return (await client.read_flow_run(flow_run_id)).state
                if pickup is not None and state is not None and state.type.value in _WAITING:
                    busy = await pickup.pool_busy(client)
                    if pickup.observe(shard, busy, time.monotonic()):
                        message = pickup.error(shard)
                        if await _cancel_unclaimed(client, flow_run_id, message):
                            raise _NotPickedUp(message)
                else:
                    if pickup is not None:
                        pickup.forget(shard)
                    if on_poll is not None and time.monotonic() >= next_count:
                        await on_poll(await _rows_finished(client, flow_run_id))
                        next_count = time.monotonic() + ROWS_COUNT_S
                await asyncio.sleep(poll_s)
        finally:
            if pickup is not None:
                pickup.forget(shard)


_WAITING = ("SCHEDULED", "PENDING")   # created, not started: no worker has it running yet


class _NotPickedUp(Exception):
    """A shard run no worker took within the pickup timeout (it has been cancelled)."""


class _Pickup:
    """Shard runs that wait for a worker: when one is given up, and a line about them now and then.

    A run that is Scheduled or Pending is *queued* while its pool is busy (a live worker and a run
    of the pool in progress): it starts when a worker is free, however long that takes. Otherwise
    (no live worker, or nothing runs and still no worker takes it) it is *unclaimed*, and after
    `timeout_s` unclaimed in a row it is given up. The pool is read at most every `refresh_s`, for
    all the batch's shards at once; a deployment without a work pool never gives a run up.
    """

    def __init__(self, timeout_s: float, log_every_s: float = WAITING_LOG_S, refresh_s: float = 5.0,
                 pool: str | None = None, start_timeout_s: float = DEFAULT_START_TIMEOUT_S):
        self.timeout_s, self.log_every_s, self.refresh_s, self.pool = timeout_s, log_every_s, refresh_s, pool
        self.start_timeout_s = start_timeout_s
        self.unclaimed_since: dict[int, float] = {}   # shard -> when its clock started (monotonic)
        self.queued: set[int] = set()
        self._busy, self._read_at = True, -math.inf
        self._logged_at = time.monotonic()
        self._lock = asyncio.Lock()

    async def pool_busy(self, client: Any) -> bool:
        if self.pool is None:
            return True
        async with self._lock:
            if time.monotonic() - self._read_at >= self.refresh_s:
                try:
                    self._busy = await _pool_busy(client, self.pool)
                except Exception as e:   # an API hiccup (SQLite 503) gives nothing up
                    log.debug("could not read pool %s: %s", self.pool, e)
                    self._busy = True
                self._read_at = time.monotonic()
            return self._busy

    def observe(self, shard: int, busy: bool, now: float) -> bool:
        """Shard `shard`'s run still waits (its pool `busy` or not); True once it is to be given up."""
        if busy:
            self.unclaimed_since.pop(shard, None)
            self.queued.add(shard)
        else:
            self.queued.discard(shard)
            self.unclaimed_since.setdefault(shard, now)
        self._report(now)
        return shard in self.unclaimed_since and now - self.unclaimed_since[shard] >= self.timeout_s

    def forget(self, shard: int) -> None:
        """The shard's run started, ended or was given up."""
        self.unclaimed_since.pop(shard, None)
        self.queued.discard(shard)

    def error(self, shard: int) -> str:
        return (f"shard {shard} was not picked up: no worker of pool {self.pool!r} took its run for "
                f"{self.timeout_s:g} s ({PICKUP_TIMEOUT_ENV}), so the run was cancelled. Start the "
                "pool's workers (deployments/start-workers.sh) and run the batch again.")

    def _report(self, now: float) -> None:
        if now - self._logged_at < self.log_every_s or not (self.unclaimed_since or self.queued):
            return
        self._logged_at = now
        if self.unclaimed_since:
            waited = now - min(self.unclaimed_since.values())
            _logger().warning(
                "shard(s) %s still waiting for a worker of pool %r, up to %.0f s with no live worker or "
                "none taking them; given up after %g s unclaimed (%s)", _names(self.unclaimed_since),
                self.pool, waited, self.timeout_s, PICKUP_TIMEOUT_ENV)
        if self.queued:
            _logger().info("shard(s) %s still waiting for a worker of pool %r: queued behind the runs "
                           "in progress there", _names(self.queued), self.pool)


def _names(shards: Any) -> str:
    return ", ".join(str(i) for i in sorted(shards))


async def _pool_busy(client: Any, pool: str) -> bool:
    """A live worker, and a flow run of the pool in progress: a run still waiting is queued behind it."""
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
        WorkPoolFilter,
        WorkPoolFilterName,
    )
    from prefect.client.schemas.objects import StateType

    if not await _live_workers(client, pool):
        return False
    in_progress = await client.count_flow_runs(
        work_pool_filter=WorkPoolFilter(name=WorkPoolFilterName(any_=[pool])),
        flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(
            any_=[StateType.RUNNING, StateType.CANCELLING]))))
    return bool(in_progress > 0)


async def _cancel_unclaimed(client: Any, flow_run_id: Any, message: str) -> bool:
    """Cancel a run no worker has started, so one that turns up later does not run it (the server
    refuses Pending after Cancelled). False if a worker started it in the meantime."""
    from prefect.states import Cancelled

    run = await client.read_flow_run(flow_run_id)
    if run.state is None or run.state.type.value not in _WAITING:
        return False
    await client.set_flow_run_state(flow_run_id, Cancelled(message=message))
    run = await client.read_flow_run(flow_run_id)
    return bool(run.state is not None and run.state.is_cancelled())


def _logger() -> Any:
    """The batch run's logger (its lines show in the run's Prefect logs), or this module's outside a run."""
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        return get_run_logger()
    except MissingContextError:
        return log


async def _rows_finished(client: Any, flow_run_id: Any) -> int:
    """Rows of a running shard that are done: deliver task runs that ended, generate runs that failed.

    Rows the shard skips (already in the sink) run no task and are counted when the shard ends.
    """
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        TaskRunFilter,
        TaskRunFilterState,
        TaskRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    try:
        runs = await client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
            task_run_filter=TaskRunFilter(state=TaskRunFilterState(type=TaskRunFilterStateType(
                any_=[StateType.COMPLETED, StateType.FAILED, StateType.CRASHED]))))
    except Exception:   # progress is best effort; the wait goes on
        return 0
    return sum(1 for r in runs if r.name.startswith("deliver-")
               or (r.name.startswith("generate-") and r.state_type != StateType.COMPLETED))


class _Progress:
    """A Prefect progress artifact on the batch run: rows finished over all shards."""

    def __init__(self, total: int, artifact_id: Any):
        self.total, self.artifact_id = total, artifact_id
        self.per_shard: dict[int, int] = {}
        self.reported = -1

    @classmethod
    async def create(cls, total: int) -> _Progress:
        from prefect.artifacts import acreate_progress_artifact
        try:
            aid = await acreate_progress_artifact(progress=0.0, key="batch-progress",
                                                  description=f"rows finished of {total}")
        except Exception:   # outside a flow run there is nothing to attach it to
            aid = None
        return cls(total, aid)

    @property
    def done(self) -> int:
        return sum(self.per_shard.values())

    async def shard_rows(self, shard: int, finished: int) -> None:
        """Shard `shard` has finished `finished` rows (never goes back: a resubmitted shard
        starts its count over, but the rows it finished before stay finished)."""
        from prefect.artifacts import aupdate_progress_artifact
        self.per_shard[shard] = max(self.per_shard.get(shard, 0), finished)
        if self.artifact_id is not None and self.done != self.reported:
            self.reported = self.done
            await aupdate_progress_artifact(self.artifact_id,
                                            progress=100.0 * self.done / max(self.total, 1))
