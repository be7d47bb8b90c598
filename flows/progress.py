"""Row-progress hooks for in-process runs (the CLI's progress bar listens here).

Deployed shards run in other processes; there the batch flow's progress artifact is the view.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

_listeners: list[Callable[[str, str], None]] = []
_lock = threading.Lock()


def subscribe(listener: Callable[[str, str], None]) -> Callable[[], None]:
    """Call listener(row_id, status) whenever a row finishes; returns an unsubscribe function."""
    with _lock:
        _listeners.append(listener)
    return lambda: _listeners.remove(listener)


def row_done(row_id: str, status: str) -> None:
    with _lock:
        listeners = list(_listeners)
    for listener in listeners:
        listener(row_id, status)
