"""Micro-batches for training and its eval: from one rank's shard stream to collated tensors.

The stream decodes and encodes samples (in DataLoader processes when `num_workers` > 0); this module takes
them in order, leaves out the ones the stream had to skip (corrupt member, too long) while counting them,
and remembers `position`, the stream start that resumes right after the last sample taken. A checkpoint
stores that position, so a resumed run sees exactly the samples an uninterrupted one would have seen.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import torch

from vlmtune.data.collate import collate
from vlmtune.data.shards import ShardStream, next_position

log = logging.getLogger(__name__)


class MicroBatches:
    """`next(batches)` → the next collated micro-batch of `batch_size` samples from `stream`."""

    def __init__(self, stream: ShardStream, batch_size: int, pad_id: int, num_workers: int = 0,
                 on_skip: Callable[[str], None] | None = None):
        self.stream, self.batch_size, self.pad_id = stream, batch_size, pad_id
        self.on_skip = on_skip or (lambda reason: log.warning("skipped sample: %s", reason))
        self.per_epoch = stream.samples_per_epoch()
        self.position = stream.start
        self.skipped = 0
        loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=num_workers,
                                             collate_fn=lambda item: item, persistent_workers=num_workers > 0)
        self.items: Iterator[dict] = iter(loader)

    def next_samples(self) -> list[dict]:
        """The next `batch_size` usable samples, uncollated."""
        samples = []
        while len(samples) < self.batch_size:
            item = next(self.items)
            self.position = next_position(item["position"], self.per_epoch)
            if "skipped" in item:
                self.skipped += 1
                self.on_skip(item["skipped"])
            else:
                samples.append(item)
        return samples

    def __iter__(self) -> MicroBatches:
        return self

    def __next__(self) -> dict:
        return collate(self.next_samples(), self.pad_id)
