"""Shard planning: group rows so each shard loads one model, then balance shards by cost.

A shard is one flow run on one GPU with one warm model, so rows are grouped by what selects the
loaded weights (the model and its int8 file choice). Attention backend and SLA top-k are applied
per request on the loaded model, so rows that differ only in them share a shard. Within a group, rows are
dealt into shards by estimated cost, largest first onto the cheapest shard (LPT), with at most
`max_rows` rows per shard and at least enough shards to keep `gpus` busy. `gpus` counts shard
slots (GPUs × shards each runs at once); past one wave the count is rounded up to whole waves, so
201 rows on 8 slots make 16 shards of 12–13 rows, not 8 of 25 and a ninth that runs alone.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from engine.config import WanConfig

R = TypeVar("R")


@dataclass
class Shard(Generic[R]):
    index: int
    model_key: tuple
    rows: list[R] = field(default_factory=list)
    cost: float = 0.0


def model_key(row) -> tuple:
    """What selects the loaded weights: a dance row's LoRA is merged into them at load."""
    return (row.model, row.quant_linear, getattr(row, "lora", None))


def row_cost(row) -> float:
    """frames × pixels × steps × model size: proportional to GPU seconds, good enough to balance."""
    req = row.request()
    cfg = WanConfig.from_name(row.model)
    w, h = cfg.size(req.resolution, req.aspect_ratio)
    return req.num_frames * w * h * req.num_steps * max(cfg.param_billions, 1e-3)


def plan_shards(rows: Sequence[R], *, gpus: int = 1, max_rows: int = 25,
                key: Callable[[R], tuple] = model_key,
                cost: Callable[[R], float] = row_cost) -> list[Shard[R]]:
    if max_rows < 1:
        raise ValueError("max_rows must be at least 1")
    groups: dict[tuple, list[R]] = {}
    for r in rows:
        groups.setdefault(key(r), []).append(r)
    shards: list[Shard[R]] = []
    total = sum(len(g) for g in groups.values()) or 1
    for k, group in groups.items():
        # Enough shards for the row cap, and a share of the GPUs proportional to the group's size.
        n = max(math.ceil(len(group) / max_rows), min(len(group), round(gpus * len(group) / total) or 1))
        if n > gpus:   # whole waves: every GPU gets as many shards, so none idles while the last one runs
            n = min(len(group), math.ceil(n / gpus) * gpus)
        mine = [Shard[R](index=0, model_key=k) for _ in range(n)]
        heap = [(0.0, i) for i in range(n)]
        costs = {id(r): cost(r) for r in group}
        for r in sorted(group, key=lambda r: costs[id(r)], reverse=True):
            while True:
                c, i = heapq.heappop(heap)
                if len(mine[i].rows) < max_rows:
                    break
            mine[i].rows.append(r)
            mine[i].cost = c + costs[id(r)]
            heapq.heappush(heap, (mine[i].cost, i))
        shards += [s for s in mine if s.rows]
    shards.sort(key=lambda s: s.cost, reverse=True)   # longest first keeps the tail short
    for i, s in enumerate(shards):
        s.index = i
    return shards
