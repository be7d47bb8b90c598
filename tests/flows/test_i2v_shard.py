"""i2v rows through the shard the pools run (in-process, real Prefect tasks, ffmpeg, a local sink):
the memory policies give the same videos, and the sequential policy moves each expert once per
group of rows (the load counts are in the metrics)."""

from __future__ import annotations

import dataclasses
from collections import defaultdict

import pytest
from PIL import Image

from flows.shard import new_engine
from tasks.manifest import ManifestRow
from tasks.planning import plan_shards
from tests.shards import run_shard


def _rows(tmp_path, n: int) -> list[dict]:
    rows = []
    for i in range(n):
        image = tmp_path / f"img{i}.png"
        Image.new("RGB", (300, 200), (40 * i, 120, 200)).save(image)
        rows.append(dataclasses.asdict(ManifestRow(
            row=i + 1, id=f"i{i}", mode="i2v", prompt=f"clip {i}", model="tiny-i2v", image=str(image),
            num_frames=5, num_steps=4, seed=i, sigma_max=200.0, resolution="720p")))
    return rows


@pytest.mark.timeout(600)
def test_sequential_moves_each_expert_once_per_group_and_changes_no_video(tmp_path, monkeypatch):
    rows = _rows(tmp_path, 5)
    resident = run_shard(rows, sink=str(tmp_path / "resident"), engine=new_engine())
    assert [m["status"] for m in resident] == ["succeeded"] * 5, [m["error"] for m in resident]
    assert {m["expert_policy"] for m in resident} == {"resident"}
    assert (resident[0]["width"], resident[0]["height"]) == (144, 96)    # 3:2 at the tiny 720p area

    monkeypatch.setenv("TURBO_EXPERT_POLICY", "sequential")
    monkeypatch.setenv("TURBO_EXPERT_GROUP_ROWS", "2")
    sequential = run_shard(rows, sink=str(tmp_path / "sequential"), engine=new_engine())
    assert [m["status"] for m in sequential] == ["succeeded"] * 5, [m["error"] for m in sequential]
    assert {m["expert_policy"] for m in sequential} == {"sequential"}
    loads: dict[int, int] = defaultdict(int)
    members: dict[int, list[str]] = defaultdict(list)
    for m in sequential:
        loads[m["expert_group"]] += m["expert_loads"]
        members[m["expert_group"]].append(m["id"])
    assert sorted(members.values()) == [["i0", "i1"], ["i2", "i3"], ["i4"]]
    # The first group finds the high expert loaded at build; later groups bring both in once.
    assert [loads[g] for g in sorted(loads)] == [1, 2, 2]
    # Pausing rows between their two phases changes nothing in the encoded videos.
    assert [m["sha256"] for m in sequential] == [m["sha256"] for m in resident]


def test_i2v_and_t2v_rows_never_share_a_shard(tmp_path):
    i2v = [ManifestRow(**r) for r in _rows(tmp_path, 3)]
    t2v = [ManifestRow(row=10 + i, id=f"t{i}", mode="t2v", prompt="x", model="tiny-t2v", num_frames=5)
           for i in range(3)]
    for gpus in (1, 2, 4):
        shards = plan_shards(i2v + t2v, gpus=gpus)
        assert all(len({r.model for r in s.rows}) == 1 for s in shards)
        assert sorted(r.id for s in shards for r in s.rows) == sorted(r.id for r in i2v + t2v)
