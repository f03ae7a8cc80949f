"""Micro-batches from a shard stream: sizes, positions, exact resume, skipped samples (no Ray, no model)."""

from __future__ import annotations

import itertools

import torch

from tests.data.test_shards import make_shards
from vlmtune.data.batching import MicroBatches
from vlmtune.data.shards import ShardStream, split_shards


def encode(sample: dict) -> dict:
    """A stand-in for SampleEncoder: token ids derived from the sample id, one 1x1 'image' per sample."""
    n = int(sample["meta"]["id"][2:])
    ids = torch.arange(3 + n % 4)
    return {"id": sample["meta"]["id"], "input_ids": ids, "labels": ids.clone(),
            "pixel_values": torch.zeros(1, 1, 3, 2, 2), "image_sizes": torch.tensor([[2, 2]])}


def batches(shard_dir, start=(0, 0), num_workers=0, corrupt=False, **kw) -> MicroBatches:
    stream = ShardStream(split_shards(shard_dir, "train"), rank=0, world_size=1, seed=3, shuffle_buffer=4,
                         start=start, transform=encode)
    return MicroBatches(stream, batch_size=3, pad_id=0, num_workers=num_workers, **kw)


def test_batches_have_the_batch_size_and_pad_to_the_longest(tmp_path):
    b = batches(make_shards(tmp_path, [5, 3, 7]))
    batch = next(b)
    assert batch["input_ids"].shape[0] == 3 and batch["pixel_values"].shape[0] == 3
    lengths = batch["attention_mask"].sum(1)
    assert batch["input_ids"].shape[1] == int(lengths.max())
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()


def test_position_resumes_exactly_after_the_last_sample_taken(tmp_path):
    shard_dir = make_shards(tmp_path, [5, 3, 7])
    straight = batches(shard_dir)
    taken = [straight.next_samples() for _ in range(3)]
    position = straight.position
    rest = [[s["id"] for s in straight.next_samples()] for _ in range(6)]  # crosses into epoch 1
    resumed = batches(shard_dir, start=position)
    assert [[s["id"] for s in resumed.next_samples()] for _ in range(6)] == rest
    assert position == (0, 9) and len({s["id"] for batch in taken for s in batch}) == 9


def test_the_stream_continues_into_the_next_epoch(tmp_path):
    b = batches(make_shards(tmp_path, [4, 2]))  # 6 samples: the third batch starts epoch 1
    for _ in range(2):
        b.next_samples()
    assert b.position == (1, 0)
    b.next_samples()
    assert b.position == (1, 3)


def test_dataloader_workers_give_the_same_batches(tmp_path):
    shard_dir = make_shards(tmp_path, [5, 3, 7])
    zero, two = batches(shard_dir), batches(shard_dir, num_workers=2)
    one = [[s["id"] for s in zero.next_samples()] for _ in range(4)]
    assert [[s["id"] for s in two.next_samples()] for _ in range(4)] == one


def test_skipped_samples_are_counted_reported_and_left_out(tmp_path):
    shard_dir = make_shards(tmp_path, [8], corrupt={1: ("jpg", b"not a jpeg"), 4: ("json", b"{")})
    reasons = []
    b = batches(shard_dir, on_skip=reasons.append)
    samples = list(itertools.chain.from_iterable(b.next_samples() for _ in range(2)))  # 6 usable of 8 read
    assert len(samples) == 6 and b.skipped == 2
    assert len(reasons) == 2 and all("bad" in r for r in reasons)
    assert "id0001" not in {s["id"] for s in samples[:4]}
