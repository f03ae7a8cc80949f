"""Micro-batches for training and its eval: from one rank's shard stream to model inputs.

The stream decodes and encodes samples (in DataLoader processes when `num_workers` > 0). This module reads
them a *window* at a time and plans the window's micro-batches (`plan_batches`):

    pad      one window = `batch_size` samples = one micro-batch, padded to its longest sample
    length   a window of `lookahead` samples sorted by length, cut into micro-batches that fit the token
             budget once padded (count × longest ≤ max_tokens): little padding, no truncation
    packed   a window packed first-fit-decreasing into rows of at most `max_tokens` tokens, one row per
             micro-batch, samples concatenated with positions restarting at 0 (collate.pack): no padding

Micro-batches of a window go out in a shuffled order (seeded by the window's start), so the loss does not
see lengths in sorted order. Samples on both sides of the model's LongRoPE switch length never share a
micro-batch in length and packed modes: the rotary factors are chosen per micro-batch from its longest
position, so mixing would give short samples the long factors.

`position` (a `DataPosition`, see data/position.py) says where to resume: the window being consumed and how
many of its micro-batches were taken, plus the global indices of everything consumed, for a resume on a
different number of ranks. Skipped samples (corrupt member, too long) are counted, reported and consumed.
"""

from __future__ import annotations

import functools
import logging
import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from vlmtune.config import BatchingConfig
from vlmtune.data.collate import IGNORE_INDEX, collate, pack
from vlmtune.data.position import DataPosition, IntervalSet
from vlmtune.data.shards import ShardStream

log = logging.getLogger(__name__)


@dataclass
class MicroBatch:
    """Model inputs plus what the step metrics need, counted on the host (no device sync)."""

    inputs: dict[str, torch.Tensor]
    ids: list[str]
    epochs: list[int]  # the epoch each sample was read in
    lengths: list[int]  # tokens of each sample
    image_tokens: int  # image-slot tokens among them
    answer_tokens: int  # tokens the loss is computed on
    positions: int  # input positions including padding

    @property
    def tokens(self) -> int:
        return sum(self.lengths)


def plan_batches(lengths: list[int], mode: str, batch_size: int, max_tokens: int | None,
                 long_from: int | None, rng: random.Random) -> list[list[int]]:
    """Indices into a window's samples, one list per micro-batch (see the module docstring)."""
    if mode == "pad":
        return [list(range(i, min(i + batch_size, len(lengths)))) for i in range(0, len(lengths), batch_size)]
    assert max_tokens is not None

    def group(i: int) -> bool:
        return long_from is not None and lengths[i] > long_from

    batches: list[list[int]] = []
    if mode == "length":
        current: list[int] = []
        for i in sorted(range(len(lengths)), key=lambda i: (group(i), lengths[i], i)):
            fits = (len(current) + 1) * lengths[i] <= max_tokens
            if current and (not fits or group(i) != group(current[0])):
                batches.append(current)
                current = []
            current.append(i)
        if current:
            batches.append(current)
    else:  # packed: first fit, longest first
        rows: list[list[int]] = []
        room: list[int] = []
        for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
            for r, row in enumerate(rows):
                if room[r] >= lengths[i] and group(row[0]) == group(i):
                    row.append(i)
                    room[r] -= lengths[i]
                    break
            else:
                rows.append([i])
                room.append(max_tokens - lengths[i])
        batches = rows
    rng.shuffle(batches)
    return batches


PREFETCH_SAMPLES = 16  # at least this many samples in one hand-over block of each DataLoader process together


def _to_block(items: list[dict], batching: BatchingConfig, batch_size: int, window_size: int,
              long_from: int | None) -> tuple[list[dict], torch.Tensor]:
    """In a DataLoader process, for one block of consecutive stream items (whole windows): the items without
    their tensors, and the bytes of all their tensors in one uint8 tensor, a single shared-memory segment to
    hand over; each item keeps (dtype, byte offset, shape) in their place. The tensors are grouped by key,
    and within a key laid out micro-batch by micro-batch as `plan_batches` will group each window in the
    training process, so a micro-batch's pixel values are one slice of the block there (`collate.cat_rows`
    takes it without a copy). Items stay in stream order."""
    usable = [i for i, item in enumerate(items) if "skipped" not in item]
    layout: list[int] = []
    for start in range(0, len(usable), window_size):
        window = usable[start : start + window_size]
        plan = plan_batches([len(items[i]["input_ids"]) for i in window], batching.mode, batch_size,
                            batching.max_tokens, long_from, random.Random(0))  # batch order does not matter here
        layout += [window[i] for batch in plan for i in batch]
    stripped = [{k: v for k, v in item.items() if not torch.is_tensor(v)} for item in items]
    keys = dict.fromkeys(k for i in layout for k, v in items[i].items() if torch.is_tensor(v))
    parts: list[tuple[int, torch.Tensor]] = []
    size = 0
    for key in keys:
        for i in layout:
            value = items[i].get(key)
            if not torch.is_tensor(value):
                continue
            size = -(-size // value.element_size()) * value.element_size()  # aligned for a view as its dtype
            stripped[i][key] = _Slot(value.dtype, size, tuple(value.shape))
            parts.append((size, value))
            size += value.numel() * value.element_size()
    block = torch.empty(size, dtype=torch.uint8)
    for offset, value in parts:
        block[offset : offset + value.numel() * value.element_size()].view(value.dtype).copy_(value.reshape(-1))
    return stripped, block


def _from_block(block: tuple[list[dict], torch.Tensor]) -> list[dict]:
    """In the training process: the items of `_to_block` with views into the block in their tensors' place."""
    items, data = block
    for item in items:
        for key, slot in item.items():
            if isinstance(slot, _Slot):
                nbytes = math.prod(slot.shape) * slot.dtype.itemsize
                item[key] = data[slot.offset : slot.offset + nbytes].view(slot.dtype).view(slot.shape)
    return items


@dataclass(frozen=True)
class _Slot:
    dtype: torch.dtype
    offset: int  # in bytes
    shape: tuple[int, ...]


class MicroBatches:
    """`next(batches)` → the next `MicroBatch` of one rank's stream, resumable from `position`."""

    def __init__(self, stream: ShardStream, batching: BatchingConfig, batch_size: int, pad_id: int,
                 num_workers: int = 0, position: DataPosition | None = None, seed: int = 0,
                 long_from: int | None = None, on_skip: Callable[[str], None] | None = None):
        self.stream, self.batching, self.batch_size, self.pad_id = stream, batching, batch_size, pad_id
        self.seed, self.long_from = seed, long_from
        self.on_skip = on_skip or (lambda reason: log.warning("skipped sample: %s", reason))
        self.window_size = batch_size if batching.mode == "pad" else batching.lookahead
        position = position or DataPosition(window=stream.start)
        self.window_start, self.skip_batches = position.window, position.emitted
        self.consumed = {e: IntervalSet(v) for e, v in position.consumed.items()}
        self.cursor = stream.start  # where the stream continues
        self.skipped = 0
        self.planned: list[list[dict]] = []
        self.emitted = 0
        if num_workers > 0:
            # DataLoader processes send whole windows, PREFETCH_SAMPLES or more in one block of each, with all
            # their tensors in the block (`_to_block`): each shared-memory segment costs the receiver about
            # 1 ms (a file descriptor fetched from the busy sender), so one segment per tensor took ~30 ms of
            # an 8-sample step, about half of a tiny model's step on 2 CPU cores; one per window and dtype
            # still ~4 ms. The processes take turns block by block and decode the next ones while this one
            # trains: two blocks ahead each when a block gathers small windows, one when a window alone is as
            # large (the look-ahead windows of length and packed modes: 64 real-size samples at num_crops 16
            # hold ~1.5 GB of pixels).
            windows = -(-PREFETCH_SAMPLES // (self.window_size * num_workers))
            stream.group = windows * self.window_size
            loader = torch.utils.data.DataLoader(
                stream, batch_size=stream.group, num_workers=num_workers, persistent_workers=True,
                collate_fn=functools.partial(_to_block, batching=batching, batch_size=batch_size,
                                             window_size=self.window_size, long_from=long_from),
                prefetch_factor=2 if windows > 1 else 1)
            self.items: Iterator[dict] = (item for block in loader for item in _from_block(block))
        else:
            self.items = iter(torch.utils.data.DataLoader(stream, batch_size=None, collate_fn=lambda item: item))

    def _consume(self, item: dict) -> None:
        self.consumed.setdefault(item["position"][0], IntervalSet()).add(item["index"])

    def _read_window(self) -> None:
        """Read the next window of usable samples and plan its micro-batches."""
        self.window_start, window = self.cursor, []
        while len(window) < self.window_size:
            item = next(self.items)
            self.cursor = self.stream.next_position(item["position"])
            if "skipped" in item:
                self.skipped += 1
                self._consume(item)
                self.on_skip(item["skipped"])
            else:
                window.append(item)
        rng = random.Random(f"{self.seed}:{self.window_start}")
        plan = plan_batches([len(s["input_ids"]) for s in window], self.batching.mode, self.batch_size,
                            self.batching.max_tokens, self.long_from, rng)
        self.planned = [[window[i] for i in batch] for batch in plan]
        self.emitted = 0

    def next_samples(self) -> list[dict]:
        """The samples of the next micro-batch, uncollated."""
        while not self.planned:
            self._read_window()
            skip, self.skip_batches = self.skip_batches, 0  # resuming inside a window
            self.planned, self.emitted = self.planned[skip:], skip
        samples = self.planned.pop(0)
        self.emitted += 1
        for sample in samples:
            self._consume(sample)
        return samples

    def __iter__(self) -> MicroBatches:
        return self

    def __next__(self) -> MicroBatch:
        samples = self.next_samples()
        packed = self.batching.mode == "packed"
        inputs = pack(samples) if packed else collate(samples, self.pad_id)
        lengths = [len(s["input_ids"]) for s in samples]
        answer = sum(int((s["labels"][1:] != IGNORE_INDEX).sum()) for s in samples) if "labels" in samples[0] else 0
        return MicroBatch(inputs=inputs, ids=[s["id"] for s in samples], epochs=[s["position"][0] for s in samples],
                          lengths=lengths,
                          image_tokens=sum(s["image_tokens"] for s in samples), answer_tokens=answer,
                          positions=inputs["input_ids"].numel())

    def forget_epochs_before(self, epoch: int) -> None:
        """Drop the consumption records of epochs every rank has finished (the caller knows the slowest rank)."""
        self.consumed = {e: s for e, s in self.consumed.items() if e >= epoch}

    @property
    def position(self) -> DataPosition:
        """Where to resume: the current window (or the next one, when this one is used up) and the consumption."""
        inside = bool(self.planned or self.skip_batches)  # in a window (or resumed into one, not read yet)
        window = self.window_start if inside else self.cursor
        shares = {e: v for e, v in self.stream.shares.items() if e >= window[0]}
        consumed = {e: s.intervals() for e, s in self.consumed.items()}
        return DataPosition(window, (self.emitted or self.skip_batches) if inside else 0, shares, consumed)
