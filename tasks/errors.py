"""turbo-batch's one error tree: the engine's errors and the stages' errors under one root.

    TurboBatchError                       engine/errors.py
    ├── TransientError                    retried with backoff by every stage that retries
    ├── EngineError                       engine/errors.py
    │   ├── RequestError                  a request field the engine cannot run
    │   ├── CheckpointError               a missing checkpoint file, or keys that do not match
    │   ├── BackendUnavailableError       an attention backend or kernel that is not installed
    │   └── ModelMemoryError              over the VRAM budget, or CUDA out of memory after cleanup
    ├── ManifestError
    │   ├── ManifestFileError             the manifest as a whole cannot be read (CLI exit 2)
    │   └── ManifestRowsError             strict=True and some rows are bad
    ├── InputError                        a row's input (image, driving video, audio, watermark)
    │   │                                 is missing, refused or undecodable: names row, column, URI
    │   └── InputTransientError (+TransientError)   the input's server failed or timed out
    ├── PostprocessError                  an ffmpeg command failed
    ├── VideoValidationError              the encoded MP4 failed a check
    ├── NoLiveWorkersError                the shard deployment's pool has no live worker
    ├── SharedStorageError                a multi-host pool, and a manifest, sink or result storage on one host's disk
    ├── EngineUnavailableError (+TransientError)  the GPU's engine service is down or died mid-row
    ├── EngineServiceError (EngineError)  the engine service refused or failed a row (its class, message)
    └── UploadError
        ├── UploadAuthError               credentials refused: never retried
        ├── UploadConflictError           the key holds different bytes
        ├── UploadTransientError (+TransientError)  5xx, 429, timeouts, connection errors
        └── UploadIntegrityError (+TransientError)  the server's checksum differs (corrupted in transit)

Retries are decided by class through `is_transient` (which also looks through `raise … from`
causes): transient errors are retried with backoff, every other error is permanent and fails
its row at once. Messages never include credentials.
"""

from __future__ import annotations

import shlex
from typing import Any

from engine.errors import (
    BackendUnavailableError,
    CheckpointError,
    EngineError,
    ModelMemoryError,
    RequestError,
    TransientError,
    TurboBatchError,
    is_transient,
)

__all__ = ["BackendUnavailableError", "CheckpointError", "EngineError", "EngineServiceError",
           "EngineUnavailableError", "InputError",
           "InputTransientError", "ManifestError", "ManifestFileError", "ManifestRowsError",
           "ModelMemoryError", "NoLiveWorkersError", "PostprocessError", "RequestError", "SharedStorageError",
           "TransientError",
           "TurboBatchError", "UploadAuthError", "UploadConflictError", "UploadError",
           "UploadIntegrityError", "UploadTransientError", "VideoValidationError", "is_transient",
           "retry_transient"]


def retry_transient(task: object, task_run: object, state: object) -> bool:
    """Prefect `retry_condition_fn`: retry only when the task's exception is transient."""
    try:
        state.result()  # type: ignore[attr-defined]
    except Exception as exc:   # the task's own exception, re-raised by result()
        return is_transient(exc)
    return False


# ── the engine service (service/) ─────────────────────────────────────────────────────────────

class EngineUnavailableError(TransientError):
    """The GPU's engine service is not answering on its socket, or died in the middle of a row
    (its supervisor restarts it; the row is retried once on the restarted service)."""


class EngineServiceError(EngineError):
    """The engine service answered a row with an error: `kind` is the class it raised there
    (RequestError, CheckpointError, ModelMemoryError, …), the message is its message."""

    def __init__(self, kind: str, message: str):
        super().__init__(f"{kind}: {message}")
        self.kind, self.message = kind, message

    def __reduce__(self):  # Prefect pickles task exceptions: keep both fields
        return type(self), (self.kind, self.message)


# ── manifest ─────────────────────────────────────────────────────────────────────────────────

class ManifestError(TurboBatchError):
    """The manifest, or its rows, cannot be run."""


# ManifestFileError and ManifestRowsError live beside the reader (tasks/manifest.py) and
# subclass ManifestError; they are re-exported here so the whole tree has one import place.


# ── inputs ───────────────────────────────────────────────────────────────────────────────────

class InputError(TurboBatchError, ValueError):
    """A row's input file is missing, refused, too large, of the wrong kind, or undecodable.

    `reason` is the one-line cause; `row`, `column` and `uri` say where, when known."""

    def __init__(self, reason: str, *, row: int | None = None, column: str | None = None,
                 uri: str | None = None):
        self.reason, self.row, self.column, self.uri = reason, row, column, uri
        super().__init__(self._text())

    def located(self, *, row: int | None = None, column: str | None = None,
                uri: str | None = None) -> InputError:
        """The same error with its place filled in (keeps the class, transient or not)."""
        err = type(self)(self.reason, row=row if row is not None else self.row,
                         column=column or self.column, uri=uri or self.uri)
        err.__cause__ = self.__cause__
        return err

    def _text(self) -> str:
        where = []
        if self.row is not None:
            where.append(f"row {self.row}")
        if self.column:
            where.append(f"column {self.column}")
        if self.uri:
            where.append(self.uri)
        return (", ".join(where) + ": " if where else "") + self.reason

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # keyword arguments survive pickling (process pools, result storage)
        return (_rebuild_input_error, (type(self), self.reason, self.row, self.column, self.uri))


def _rebuild_input_error(cls: type[InputError], reason: str, row: int | None, column: str | None,
                         uri: str | None) -> InputError:
    return cls(reason, row=row, column=column, uri=uri)


class InputTransientError(InputError, TransientError):
    """The input's server answered 5xx, timed out or dropped the connection."""


# ── post-processing and validation ───────────────────────────────────────────────────────────

class PostprocessError(TurboBatchError, RuntimeError):
    """An ffmpeg/ffprobe command failed; carries the argv and the last lines of its stderr."""

    def __init__(self, command: list[str], stderr_tail: str, reason: str = "ffmpeg failed"):
        self.command, self.stderr_tail, self.reason = list(command), stderr_tail, reason
        super().__init__(f"{reason}: {shlex.join(self.command)}\n--- stderr (tail) ---\n{stderr_tail}")

    def __reduce__(self):
        return (type(self), (self.command, self.stderr_tail, self.reason))


class VideoValidationError(TurboBatchError, ValueError):
    def __init__(self, path: object, check: str, reason: str):
        self.path, self.check, self.reason = str(path), check, reason
        super().__init__(f"{path}: video check '{check}' failed: {reason}")

    def __reduce__(self):
        return (type(self), (self.path, self.check, self.reason))


# ── upload ───────────────────────────────────────────────────────────────────────────────────

class UploadError(TurboBatchError, RuntimeError):
    """Base class of every upload failure."""


class UploadAuthError(UploadError):
    """Credentials were refused. Retrying cannot help."""


class UploadConflictError(UploadError):
    """The key already holds an object with different content."""


class UploadTransientError(UploadError, TransientError):
    """The server or network failed in a way a later attempt may not."""


class UploadIntegrityError(UploadError, TransientError):
    """The bytes the server received do not match the checksum we sent (corrupted in transit)."""



# ── workers ──────────────────────────────────────────────────────────────────────────────────

class NoLiveWorkersError(TurboBatchError, RuntimeError):
    """The shard deployment's work pool has no live worker, so its shard runs would never start."""

    def __init__(self, pool: str, deployment: str):
        self.pool, self.deployment = pool, deployment
        start = "deployments/start-workers.sh" if pool == "gpu" else f"GPU_POOL={pool} deployments/start-workers.sh"
        super().__init__(
            f"work pool {pool!r} has no live worker (none sent a heartbeat in its last three "
            f"heartbeat intervals), so the shards of deployment {deployment!r} would never start. "
            f"Start the workers on each GPU host with `{start}` (one per GPU; see deployments/README.md), "
            "then run the batch again.")

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (type(self), (self.pool, self.deployment))


from tasks.manifest_errors import ManifestFileError, ManifestRowsError  # noqa: E402


class SharedStorageError(TurboBatchError, ValueError):
    """The GPU pool spans several hosts, but the batch names a place only one host can see."""

    def __init__(self, hosts: list[str], problems: list[str]):
        self.hosts, self.problems = list(hosts), list(problems)
        super().__init__(
            f"the gpu pool has live workers on {len(hosts)} hosts ({', '.join(hosts)}), which share no disk: "
            + "; ".join(problems) + " (deployments/README.md, \"A second host\")")

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (type(self), (self.hosts, self.problems))
