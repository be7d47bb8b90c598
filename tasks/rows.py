"""A shard's rows through their mode's stages, one metrics row each, whatever happens.

    per row, in the shard's thread:   fetch → identify → completed? ─yes─▶ skipped
                                       [pose] → generate ─▶ frames.npy
    in the pool, behind the next row:  deliver = postprocess → validate → upload (+ record)

Under the sequential expert policy (i2v on a small card) a group of rows is started (generate-
start: up to the expert switch) and parked; when the group is full, or the shard ends, each is
finished (generate-finish) and goes on to its delivery, so each expert comes in once per group.

The flow (flows/shard.py) holds each mode's list of stages and walks the rows; this module runs
them. A failing
stage fails its row and names itself in the error; the shard goes on. Bad input (`InputError`)
is recorded `invalid`, anything else `failed`. Transient errors were already retried by the
stage's task (fetch, the completed-check, upload).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.futures import PrefectFuture

from tasks.deliver import deliver, find_completed
from tasks.errors import InputError, retry_transient
from tasks.fetch import FetchedInputs, FetchSettings, fetch
from tasks.generate import GenerateOutput, generate, generate_finish, generate_start, rows_per_group
from tasks.identity import row_key
from tasks.manifest import ManifestRow
from tasks.metrics import MetricsRow
from tasks.pose import PoseOutput, PoseStage, pose
from tasks.text import shown
from tasks.upload import Sink

if TYPE_CHECKING:
    from engine.family import Engine, LoadSpec
    from service.client import EngineClient, RemoteSpec

__all__ = ["STAGES", "RowRunner", "check_completed"]

# The stages a mode's list (flows/shard.py: MODE_STAGES) may name, in the order they can run.
STAGES = ("fetch", "identify", "pose", "generate", "deliver")

log = logging.getLogger(__name__)

# The skip check reads the row's record from the sink: retried like any other sink read.
check_completed = task(name="completed", task_run_name="completed-{key}",
                       cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[1, 5],
                       retry_condition_fn=retry_transient)(find_completed)


@dataclass
class _Row:
    row: ManifestRow
    metrics: MetricsRow
    work: Path
    spec: LoadSpec | RemoteSpec | None = None
    inputs: FetchedInputs | None = None
    key: str = ""
    generated: GenerateOutput | None = None
    pending: object = None                  # a started, parked row (sequential policy)
    pose: PoseOutput | None = None
    delivery: PrefectFuture[Any] | None = None


@dataclass
class RowRunner:
    engine: Engine | EngineClient              # in-process, or the GPU's engine service
    sink: Sink
    work_root: Path
    fetch_settings: FetchSettings
    stages: Mapping[str, tuple[str, ...]]     # mode -> its stages, from STAGES
    attempt: int = 1
    on_done: Callable[[str, str], None] = lambda row_id, status: None
    overlap: bool = True                      # False: wait for each delivery (CPU generation)
    keep_work: bool = False                   # keep each row's work folder (debugging)
    pose_stage: PoseStage | None = None       # dance rows: the DWPose detector, loaded once
    results: list[MetricsRow] = field(default_factory=list)
    _pending: list[_Row] = field(default_factory=list)
    _parked: list[_Row] = field(default_factory=list)

    def __post_init__(self) -> None:
        unknown = {s for stages in self.stages.values() for s in stages} - set(STAGES)
        if unknown:
            raise ValueError(f"unknown row stage(s) {sorted(unknown)}; known: {', '.join(STAGES)}")

    def run(self, row: ManifestRow, expected_rows: int) -> None:
        """Every stage of the row up to its delivery, which is left running in the pool."""
        # By id: unique in a batch and a safe file name (samples of one row share its number).
        state = _Row(row, MetricsRow.start(row, self.attempt), self.work_root / row.id)
        self._run_stages(state, self.stages[row.mode], expected_rows)

    def _run_stages(self, state: _Row, stages: tuple[str, ...], expected_rows: int) -> None:
        row = state.row
        for stage in stages:
            try:
                done = getattr(self, f"_{stage}")(state, expected_rows)
            except InputError as e:
                log.error("row %s (%s) has a bad input: %s", row.row, shown(row.id), shown(e, 1000))
                self._finish(state, state.metrics.failed(stage, e, status="invalid"))
                return
            except Exception as e:    # this row fails; the shard goes on
                log.error("row %s (%s) failed in %s: %s", row.row, shown(row.id), stage, shown(e, 1000))
                self._finish(state, state.metrics.failed(stage, e))
                return
            if done:
                return
        self._collect(keep=1 if self.overlap and not state.metrics.gpu_is_cpu else 0)

    def not_started(self, row: ManifestRow) -> None:
        """The run was stopped (Ctrl-C, SIGTERM) before this row began."""
        self.results.append(MetricsRow.start(row, self.attempt).failed(
            "interrupted", "not started: the run was stopped before this row"))
        self.on_done(row.id, "failed")

    def finish(self) -> list[MetricsRow]:
        """Finish the parked rows, wait for the deliveries still running; every row's metrics."""
        self._finish_parked()
        self._collect(keep=0)
        return self.results

    # -- stages: each returns True when the row is finished early ---------------------------
    def _fetch(self, s: _Row, _: int) -> bool:
        s.inputs = fetch(s.row, s.work, self.fetch_settings)
        s.metrics.fetched(s.inputs)
        return False

    def _pose(self, s: _Row, _: int) -> bool:
        if self.pose_stage is None:
            raise RuntimeError("this shard has no pose stage configured (PoseSettings)")
        assert s.inputs is not None
        s.pose = pose(s.row, s.work / "pose", s.inputs.files, self.pose_stage, sink=self.sink,
                      digests=s.inputs.digests)
        s.inputs.files.update({k: s.pose.files[k] for k in ("poses", "negative_poses")})
        s.metrics.posed(s.pose)
        for warning in s.pose.warnings:
            log.warning("row %s (%s): %s", s.row.row, shown(s.row.id), warning)
        return False

    def _identify(self, s: _Row, _: int) -> bool:
        s.spec = self.engine.load_spec(s.row.model, s.row.quant_linear, lora=s.row.lora)
        s.key = row_key(s.row, self.engine, s.spec, s.inputs.digests if s.inputs else None)
        record = check_completed(self.sink, s.key)
        if record is None:
            return False
        self._finish(s, s.metrics.skipped(record))
        return True

    def _generate(self, s: _Row, expected_rows: int) -> bool:
        assert s.spec is not None
        inputs = s.inputs.files if s.inputs else None
        group = rows_per_group(self.engine, s.spec, expected_rows)
        if group > 1 or self._parked:
            s.pending = generate_start(s.row, self.engine, s.spec, inputs=inputs)
            self._parked.append(s)
            if len(self._parked) >= group:
                self._finish_parked()
            return True          # the row goes on in _finish_parked
        s.generated = generate(s.row, s.work, self.engine, s.spec, inputs=inputs, expected_rows=expected_rows)
        self._generated(s)
        return False

    def _generated(self, s: _Row) -> None:
        assert s.generated is not None
        s.metrics.generated(s.generated)
        for warning in s.generated.warnings:      # e.g. a prompt truncated to the encoder's length
            log.warning("row %s (%s): %s", s.row.row, shown(s.row.id), warning)

    def _finish_parked(self) -> None:
        """Finish each parked row (each expert moves in once for the group), then its later stages."""
        parked, self._parked = self._parked, []
        for s in parked:
            stages = self.stages[s.row.mode]
            after = stages[stages.index("generate") + 1:]
            self._run_stages(s, ("finish_generate", *after), 0)

    def _finish_generate(self, s: _Row, _: int) -> bool:
        assert s.spec is not None
        s.generated = generate_finish(s.row, s.work, self.engine, s.spec, s.pending)
        s.pending = None
        self._generated(s)
        return False

    def _deliver(self, s: _Row, _: int) -> bool:
        assert s.generated is not None
        fields = s.row.postprocess_fields()
        # ffmpeg only ever gets the fetched files (safe names in the work folder), never URIs.
        fetched = s.inputs.files if s.inputs else {}
        fields.update({c: str(fetched[c]) for c in ("watermark", "audio") if c in fetched})
        if s.pose is not None:
            fields["extras"] = s.pose.extras
        s.delivery = deliver.submit(s.generated.frames_path, fields, s.key, self.sink)
        self._pending.append(s)
        return False

    # -- bookkeeping --------------------------------------------------------------------------
    def _collect(self, keep: int) -> None:
        # At most `keep` deliveries stay running behind the next generation (frames are large).
        while len(self._pending) > keep:
            s = self._pending.pop(0)
            assert s.delivery is not None
            try:
                s.metrics.delivered(s.delivery.result())
            except Exception as e:
                s.metrics.failed("deliver", e)
            self._finish(s, s.metrics)

    def _finish(self, s: _Row, metrics: MetricsRow) -> None:
        if not self.keep_work:
            shutil.rmtree(s.work, ignore_errors=True)
        self.results.append(metrics)
        self.on_done(s.row.id, metrics.status)
