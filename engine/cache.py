"""A warm model cache, owned by whoever creates it (a worker, the CLI run), never module-global.

Keyed only by what changes the loaded weights (`LoadSpec.cache_key()`: preset, resolved files,
dtype, int8 path and device with its index), it holds models in least-recently-used order and
evicts the oldest until a new one fits the VRAM budget. A model that cannot fit even in an empty
cache raises `ModelMemoryError` naming the model and the budget. Nothing loads at import time.
"""

from __future__ import annotations

import gc
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch

from .errors import ModelMemoryError

__all__ = ["ModelCache", "device_budget_bytes"]

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class _Entry(Generic[T]):
    value: T
    nbytes: int


class ModelCache(Generic[T]):
    def __init__(self, budget_bytes: int | None = None):
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[Hashable, _Entry[T]] = OrderedDict()
        self._lock = threading.Lock()
        self.loads = 0          # how many times a loader ran: model loads per worker in metrics

    def get(self, key: Hashable, load: Callable[[], T], *, nbytes: int, name: str) -> T:
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key].value
            budget = self.budget_bytes
            if budget is not None and nbytes > budget:
                raise ModelMemoryError(
                    f"model {name} needs about {nbytes / 2**30:.1f} GiB but the VRAM budget is "
                    f"{budget / 2**30:.1f} GiB; use a smaller preset, the -quant checkpoint, "
                    f"or raise TURBO_VRAM_BUDGET_GB")
            while budget is not None and self._entries and self.used_bytes + nbytes > budget:
                old_key, _ = self._entries.popitem(last=False)
                log.info("evicting %s to fit %s", old_key, name)
                _free_device_memory()
            value = load()
            self.loads += 1
            self._entries[key] = _Entry(value, nbytes)
            return value

    def peek(self, key: Hashable) -> T | None:
        """The loaded value, or None; neither loads nor counts as a use."""
        with self._lock:
            entry = self._entries.get(key)
            return entry.value if entry is not None else None

    @property
    def used_bytes(self) -> int:
        return sum(e.nbytes for e in self._entries.values())

    def keys(self) -> list[Hashable]:
        return list(self._entries)

    def values(self) -> list[T]:
        return [e.value for e in self._entries.values()]

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
        _free_device_memory()


def _free_device_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def device_budget_bytes(device: torch.device, budget_gb: float | None = None) -> int | None:
    """`budget_gb` when given, else 92 % of that GPU's memory; no budget on the CPU."""
    if budget_gb is not None:
        return int(budget_gb * 2**30)
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory * 0.92)
    return None
