"""Micro-batches from a shard stream in every batching mode: sizes, budgets, packing layout, positions,
exact resume and the consumption record (no Ray, no model)."""

from __future__ import annotations

import random

import pytest
import torch

from tests.data.test_shards import make_shards
from vlmtune.config import BatchingConfig
from vlmtune.data.batching import MicroBatches, plan_batches
from vlmtune.data.position import DataPosition
from vlmtune.data.shards import ShardStream, split_shards

MODES = {"pad": BatchingConfig(), "length": BatchingConfig(mode="length", max_tokens=24, lookahead=8),
         "packed": BatchingConfig(mode="packed", max_tokens=24, lookahead=8)}


def encode(sample: dict) -> dict:
    """A stand-in for SampleEncoder: 3–12 tokens depending on the id, 2 of them image slots, a 2-token answer.
    Pixel values of 12 bytes: the int64 tensors after them in a hand-over block need aligning."""
    n = int(sample["meta"]["id"][2:])
    ids = torch.arange(3 + n * 7 % 10)
    labels = torch.full_like(ids, -100)
    labels[-2:] = ids[-2:]
    return {"id": sample["meta"]["id"], "input_ids": ids, "labels": labels, "image_tokens": 2,
            "pixel_values": torch.full((1, 1, 3, 1, 1), float(n)), "image_sizes": torch.tensor([[2, 2]])}


def batches(shard_dir, mode="pad", position=None, num_workers=0, **kw) -> MicroBatches:
    position = position or DataPosition()
    stream = ShardStream(split_shards(shard_dir, "train"), rank=0, world_size=1, seed=3, shuffle_buffer=4,
                         start=position.window, transform=encode, shares=position.shares)
    return MicroBatches(stream, MODES[mode], batch_size=3, pad_id=0, num_workers=num_workers, position=position,
                        seed=3, **kw)


@pytest.fixture
def shard_dir(tmp_path):
    return make_shards(tmp_path, [5, 3, 7])  # 15 samples


def test_pad_batches_have_the_batch_size_and_pad_to_the_longest(shard_dir):
    batch = next(batches(shard_dir))
    assert batch.inputs["input_ids"].shape == (3, max(batch.lengths)) and len(batch.ids) == 3
    padding = torch.arange(max(batch.lengths)) >= torch.tensor(batch.lengths)[:, None]
    assert "attention_mask" not in batch.inputs and (batch.inputs["labels"][padding] == -100).all()
    assert batch.answer_tokens == 6 and batch.image_tokens == 6 and batch.positions == 3 * max(batch.lengths)


def test_length_batches_fit_the_budget_once_padded(shard_dir):
    b = batches(shard_dir, "length")
    for _ in range(10):
        batch = next(b)
        assert len(batch.ids) * max(batch.lengths) <= 24 and batch.positions == len(batch.ids) * max(batch.lengths)


def test_packed_rows_restart_positions_and_carry_no_padding(shard_dir):
    b = batches(shard_dir, "packed")
    for _ in range(10):
        batch = next(b)
        row = batch.inputs
        assert "attention_mask" not in row and row["input_ids"].shape == (1, sum(batch.lengths)) <= (1, 24)
        starts = (row["position_ids"][0] == 0).nonzero().flatten().tolist()
        assert len(starts) == len(batch.ids) and batch.positions == batch.tokens
        assert (row["labels"][0, starts] == -100).all()  # no position learns to predict the next sample


def test_every_sample_once_per_window_and_less_padding_than_pad_mode(shard_dir):
    def padding(mode):
        b = batches(shard_dir, mode)
        got = [next(b) for _ in range(12)]
        return got, 1 - sum(x.tokens for x in got) / sum(x.positions for x in got)

    for mode in MODES:
        got, share = padding(mode)
        ids = [i for x in got for i in x.ids]
        first_epoch = ids[:15]
        if mode != "pad":
            assert sorted(first_epoch[:8]) == sorted(set(first_epoch[:8]))  # a window: no sample twice
        assert share <= padding("pad")[1]
    assert padding("packed")[1] == 0


def test_long_and_short_samples_never_share_a_micro_batch():
    lengths = [3, 30, 4, 31, 5, 6]
    for mode in ("length", "packed"):
        plan = plan_batches(lengths, mode, batch_size=3, max_tokens=64, long_from=20, rng=random.Random(0))
        assert sorted(i for b in plan for i in b) == list(range(6))
        assert all(len({lengths[i] > 20 for i in b}) == 1 for b in plan), plan


@pytest.mark.parametrize("mode", list(MODES))
def test_resume_from_any_position_gives_the_same_batches(shard_dir, mode):
    straight = batches(shard_dir, mode)
    for k in range(1, 9):  # several windows and an epoch boundary
        position = straight.position
        rest = [next(straight).ids for _ in range(4)]
        resumed = batches(shard_dir, mode, position=position)
        assert [next(resumed).ids for _ in range(4)] == rest, f"{mode}: resume after batch {k}"
        straight = batches(shard_dir, mode, position=position)  # continue from the same place
        for _ in range(k):
            next(straight)


def test_consumption_is_every_sample_taken_and_nothing_else(shard_dir):
    b = batches(shard_dir, "length")
    taken = [i for _ in range(3) for i in next(b).ids]
    consumed = b.position.consumed[0]
    indices = [i for lo, hi in consumed for i in range(lo, hi)]
    assert len(indices) == len(taken) < 15  # the rest of the window is not consumed yet


def test_dataloader_workers_give_the_same_batches(shard_dir):
    zero, two = batches(shard_dir, "length"), batches(shard_dir, "length", num_workers=2)
    assert [next(zero).ids for _ in range(5)] == [next(two).ids for _ in range(5)]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("num_workers", [1, 2])
def test_samples_handed_over_in_blocks_arrive_whole_and_in_order(shard_dir, mode, num_workers):
    """DataLoader processes send whole windows at a time (several of pad mode's small ones), all tensors in
    one block laid out micro-batch by micro-batch: across several blocks and workers the micro-batches are
    the same, tensor for tensor, and their pixel values are taken from the shared block without a copy."""
    zero, other = batches(shard_dir, mode), batches(shard_dir, mode, num_workers=num_workers)
    for _ in range(12):  # blocks from each worker in turn, into the second epoch
        a, b = next(zero), next(other)
        assert a.ids == b.ids and a.lengths == b.lengths and a.inputs.keys() == b.inputs.keys()
        assert all(torch.equal(a.inputs[k], b.inputs[k]) for k in a.inputs if torch.is_tensor(a.inputs[k]))
        assert b.inputs["pixel_values"].is_shared() and not a.inputs["pixel_values"].is_shared()


def test_after_a_skipped_sample_the_blocks_no_longer_match_the_windows_and_batches_are_still_right(tmp_path):
    shard_dir = make_shards(tmp_path, [8, 7], corrupt={1: ("jpg", b"not a jpeg")})
    for mode in MODES:
        zero, one = batches(shard_dir, mode), batches(shard_dir, mode, num_workers=1)
        for _ in range(8):
            a, b = next(zero), next(one)
            assert a.ids == b.ids and torch.equal(a.inputs["pixel_values"], b.inputs["pixel_values"])


def test_skipped_samples_are_counted_reported_and_consumed(tmp_path):
    shard_dir = make_shards(tmp_path, [8], corrupt={1: ("jpg", b"not a jpeg"), 4: ("json", b"{")})
    reasons = []
    b = batches(shard_dir, on_skip=reasons.append)
    ids = [i for _ in range(2) for i in next(b).ids]  # 6 usable of the 8 read
    assert len(ids) == 6 and b.skipped == 2 and len(reasons) == 2 and all("bad" in r for r in reasons)
    assert b.position.consumed == {0: [(0, 8)]}
