"""The root of turbo-batch's one error tree, and the engine's errors.

Every error turbo-batch raises on purpose is a `TurboBatchError`. Whether a failure is worth
another attempt is decided by class, never by parsing messages: `TransientError` subclasses are
retried with backoff (a 5xx, a timeout, a connection reset), everything else is permanent (bad
input, refused credentials, a model that does not fit). The whole tree, with the stages' errors,
is drawn in `tasks/errors.py`; the engine's part is:

    TurboBatchError
    ├── TransientError              retry with backoff
    └── EngineError
        ├── RequestError            a request field has a value the engine cannot run
        ├── CheckpointError         a checkpoint file is missing or its keys do not match the model
        ├── BackendUnavailableError an attention backend or kernel was asked for but is not installed
        └── ModelMemoryError        a model does not fit in the VRAM budget, or CUDA ran out of memory

Every message names the thing the user has to fix: the field and its allowed values, the file
and its keys, the backend and how to install it, the model and the budget.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

__all__ = ["BackendUnavailableError", "CheckpointError", "EngineError", "ModelMemoryError",
           "RequestError", "TransientError", "TurboBatchError", "is_transient"]


class TurboBatchError(Exception):
    """Base class of every error turbo-batch raises on purpose."""


class TransientError(TurboBatchError):
    """A failure a later attempt may not see (server error, timeout, dropped connection)."""


def is_transient(exc: BaseException) -> bool:
    """The one retry rule: transient by class, or by a cause that is (errors wrapped on the way up)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, TransientError):
            return True
        if isinstance(current, TurboBatchError):   # our own classification wins over a cause's
            return False
        seen.add(id(current))
        current = current.__cause__
    return False


class EngineError(TurboBatchError):
    """Base class of every error the engine raises on purpose."""


class RequestError(EngineError, ValueError):
    def __init__(self, field: str, value: object, allowed: str):
        self.field, self.value, self.allowed = field, value, allowed
        super().__init__(f"invalid {field}={value!r}: allowed {allowed}")


class CheckpointError(EngineError):
    def __init__(
        self,
        path: object,
        reason: str,
        *,
        missing: Sequence[str] = (),
        unexpected: Sequence[str] = (),
        mismatched: Sequence[str] = (),
    ):
        self.path, self.missing, self.unexpected, self.mismatched = (
            str(path), list(missing), list(unexpected), list(mismatched))
        parts = [f"{path}: {reason}"]
        for label, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                            ("wrong shapes", mismatched)):
            if keys:
                parts.append(f"{label} ({len(keys)}): {_preview(keys)}")
        super().__init__("; ".join(parts))


class BackendUnavailableError(EngineError, RuntimeError):
    pass


class ModelMemoryError(EngineError, MemoryError):
    pass


def _preview(keys: Iterable[str], limit: int = 8) -> str:
    keys = list(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", … and {len(keys) - limit} more" if len(keys) > limit else "")
