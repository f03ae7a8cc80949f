"""One epoch across a 2 → 1 → 2 change of world size covers every train sample exactly once.

Each phase runs on real gloo ranks with the loop's own position handover: `start_position` (a fresh start, or
the unconsumed rest of the epoch redistributed after a change of world size) and `checkpoint_position` (the
collective that records where each rank stands). The sample ids of every step are logged per rank and
phase; only steps up to each phase's checkpoint count, as after a real restart."""

from __future__ import annotations

from collections import Counter

import pytest

from tests.data.test_batching import MODES, encode
from tests.data.test_shards import make_shards
from tests.gloo import run_ranks
from vlmtune.data.batching import MicroBatches
from vlmtune.data.position import DataPosition
from vlmtune.data.shards import ShardStream, split_shards
from vlmtune.train.checkpoint import LoopState
from vlmtune.train.loop import Data, Worker, checkpoint_position, start_position

COUNTS = [7, 5, 9, 6, 4]  # unequal shards: 31 samples


def _phase(rank: int, world: int, shard_dir: str, mode: str, previous: list[DataPosition] | None,
           steps: int) -> tuple[list[list[tuple[int, str]]], DataPosition]:
    """`steps` steps of 2 micro-batches; the (epoch, id) of every sample per step, and the checkpointed position."""
    import torch

    worker = Worker(rank, world, torch.device("cpu"))
    shards = split_shards(shard_dir, "train")
    state = LoopState(position=None if previous else DataPosition(), previous_positions=previous)
    position = start_position(state, sum(s.count for s in shards), worker)
    stream = ShardStream(shards, rank, world, seed=5, shuffle_buffer=4, start=position.window, transform=encode,
                         shares=position.shares)
    data = Data(MicroBatches(stream, MODES[mode], 3, pad_id=0, position=position, seed=5), None, None)
    log = []
    for _ in range(steps):
        batches = [next(data.train) for _ in range(2)]
        log.append([(e, i) for b in batches for e, i in zip(b.epochs, b.ids, strict=True)])
    return log, checkpoint_position(data, worker)


@pytest.mark.parametrize("mode", ["pad", "packed"])
def test_one_epoch_across_two_one_two_workers_covers_every_sample_once(tmp_path, mode):
    shard_dir = make_shards(tmp_path, COUNTS)
    seen: Counter = Counter()
    previous = None
    for world, steps in ((2, 2), (1, 2), (2, 6)):  # the last phase runs into epoch 1
        results = run_ranks(_phase, world, shard_dir, mode, previous, steps)
        for log, _ in results:
            seen.update(i for step in log for e, i in step if e == 0)
        previous = [position for _, position in results]
    expected = {f"id{i:04d}" for i in range(sum(COUNTS))}
    assert set(seen) == expected, sorted(expected - set(seen))
    assert all(n == 1 for n in seen.values()), {i: n for i, n in seen.items() if n > 1}
