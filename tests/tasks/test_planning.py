"""Shard planning: one model per shard, LPT balance, and whole waves over the GPU slots."""

from __future__ import annotations

import pytest

from tasks.planning import plan_shards


def _plan(costs: list[float], *, gpus: int, max_rows: int = 25, keys: list[str] | None = None):
    rows = list(range(len(costs)))
    return plan_shards(rows, gpus=gpus, max_rows=max_rows, key=lambda r: (keys[r] if keys else "m",),
                       cost=lambda r: costs[r])


@pytest.mark.parametrize(("rows", "gpus", "sizes"), [
    (200, 8, [25] * 8),                 # one full wave
    (20, 2, [10, 10]),                  # two shards per GPU on one GPU: both slots busy
    (201, 8, [13] * 9 + [12] * 7),      # 9 shards would leave 7 slots idle while the ninth runs
    (5, 8, [1] * 5),                    # fewer rows than slots: a row each
])
def test_shards_fill_whole_waves_of_gpu_slots(rows, gpus, sizes):
    shards = _plan([1.0] * rows, gpus=gpus)
    assert sorted((len(s.rows) for s in shards), reverse=True) == sizes
    assert sorted(r for s in shards for r in s.rows) == list(range(rows))
    assert all(len(s.rows) <= 25 for s in shards)


def test_lpt_keeps_every_shard_within_one_row_of_the_others():
    costs = [float(1 + (i * 7) % 5) for i in range(60)]          # rows of 1-5 units
    shards = _plan(costs, gpus=4, max_rows=25)
    loads = [s.cost for s in shards]
    assert len(shards) == 4 and max(loads) - min(loads) <= max(costs)
    assert [s.index for s in shards] == list(range(4)) and loads == sorted(loads, reverse=True)


def test_rows_of_two_models_never_share_a_shard():
    keys = ["a"] * 30 + ["b"] * 10
    shards = _plan([1.0] * 40, gpus=2, keys=keys)
    assert all(len({keys[r] for r in s.rows}) == 1 for s in shards)
    assert sorted(r for s in shards for r in s.rows) == list(range(40))


def test_max_rows_below_one_is_refused():
    with pytest.raises(ValueError, match="max_rows must be at least 1"):
        _plan([1.0], gpus=1, max_rows=0)
