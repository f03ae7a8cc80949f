"""Data positions across world-size changes: interval sets, and an epoch read by 2 → 1 → 2 ranks covers
every sample exactly once (real shards and streams, no Ray)."""

from __future__ import annotations

from collections import Counter

import pytest

from tests.data.test_batching import MODES, encode
from tests.data.test_shards import make_shards
from vlmtune.data.batching import MicroBatches
from vlmtune.data.position import DataPosition, IntervalSet, redistribute
from vlmtune.data.shards import ShardStream, split_shards


def test_interval_set_merges_and_answers():
    s = IntervalSet([(5, 7), (1, 2)])
    s.add(2)
    s.add_range(7, 9)
    assert s.intervals() == [(1, 3), (5, 9)] and len(s) == 6 and 6 in s and 4 not in s
    assert s.complement(12).intervals() == [(0, 1), (3, 5), (9, 12)]
    assert s.slice(1, 4).intervals() == [(2, 3), (5, 7)]
    s.add_range(0, 12)
    assert s.intervals() == [(0, 12)]


def test_redistribution_splits_what_nobody_consumed():
    old = [DataPosition(window=(0, 4), consumed={0: [(0, 4)]}),   # rank 0 of 2: range [0, 10)
           DataPosition(window=(1, 0), consumed={0: [(10, 20)]})]  # rank 1 finished its range
    new = [redistribute(old, 20, r, 3) for r in range(3)]
    assert [p.shares[0] for p in new] == [[(4, 6)], [(6, 8)], [(8, 10)]]
    assert all(p.window == (0, 0) for p in new)
    assert new[0].consumed[0] == [(0, 4), (10, 20)] and new[1].consumed[0] == []


def ranks(shard_dir, positions: list[DataPosition], mode: str) -> list[MicroBatches]:
    world = len(positions)
    return [MicroBatches(ShardStream(split_shards(shard_dir, "train"), rank, world, seed=1, shuffle_buffer=4,
                                     start=p.window, transform=encode, shares=p.shares),
                         MODES[mode], batch_size=2, pad_id=0, position=p, seed=1)
            for rank, p in enumerate(positions)]


@pytest.mark.parametrize("mode", list(MODES))
def test_an_epoch_across_2_1_2_workers_sees_every_sample_once(tmp_path, mode):
    shard_dir = make_shards(tmp_path, [7, 6, 9, 5])  # 27 samples
    total, seen = 27, Counter()

    def steps(group: list[MicroBatches], n: int) -> None:
        for _ in range(n):
            for b in group:
                batch = next(b)
                seen.update(i for i, e in zip(batch.ids, batch.epochs, strict=True) if e == 0)

    group = ranks(shard_dir, [DataPosition()] * 2, mode)
    steps(group, 3)
    one = ranks(shard_dir, [redistribute([b.position for b in group], total, 0, 1)], mode)
    steps(one, 2)
    group = ranks(shard_dir, [redistribute([b.position for b in one], total, r, 2) for r in range(2)], mode)
    steps(group, 12)  # well into epoch 1
    assert sorted(seen) == sorted(f"id{i:04d}" for i in range(total))
    assert set(seen.values()) == {1}, [k for k, v in seen.items() if v > 1]
