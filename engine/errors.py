"""Errors raised by the engine.

    EngineError
    ├── RequestError            a request field has a value the engine cannot run
    ├── CheckpointError         a checkpoint file is missing or its keys do not match the model
    ├── BackendUnavailableError an attention backend or kernel was asked for but is not installed
    └── ModelMemoryError        a model does not fit in the VRAM budget, or CUDA ran out of memory

Every message names the thing the user has to fix: the field and its allowed values, the file
and its keys, the backend and how to install it, the model and the budget.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence


class EngineError(Exception):
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
