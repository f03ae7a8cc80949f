"""Where a rank's training data stands, exactly enough to resume it on the same or a different world size.

Every epoch has one global sample order (the split's shards shuffled with (seed, epoch), laid end to end);
a sample is identified in it by its global index. Each rank reads a *share* of that order: normally the
contiguous, balanced range `rank_range(N, rank, world)`; after the world size changed mid-epoch, a slice of
what no rank had consumed yet (`redistribute`).

A rank's `DataPosition` keeps two views of its progress:
- the replay view, `window` + `emitted`: where the batching window that is being consumed started in the
  rank's reading order, and how many micro-batches were taken from it. Same world size → each rank
  replays its own stream from there and sees exactly the samples it would have seen.
- the accounting view, `consumed`: the global indices of the samples it consumed (used in a batch, or
  skipped as corrupt) per epoch still in progress. World size changed → the union over the old ranks says
  what is left of each epoch, and that rest is split among the new ranks; nothing is read twice or lost.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field


def rank_range(total: int, rank: int, world_size: int) -> tuple[int, int]:
    return rank * total // world_size, (rank + 1) * total // world_size


class IntervalSet:
    """A set of non-negative integers as sorted, disjoint, non-adjacent [start, end) intervals."""

    def __init__(self, intervals: list[tuple[int, int]] | None = None):
        self.starts: list[int] = []
        self.ends: list[int] = []
        for start, end in intervals or []:
            self.add_range(start, end)

    def add_range(self, start: int, end: int) -> None:
        if start >= end:
            return
        i = bisect.bisect_left(self.ends, start)  # first interval that ends at or after `start`
        j = bisect.bisect_right(self.starts, end)  # intervals before j start at or before `end`
        if i < j:
            start, end = min(start, self.starts[i]), max(end, self.ends[j - 1])
        self.starts[i:j], self.ends[i:j] = [start], [end]

    def add(self, value: int) -> None:
        self.add_range(value, value + 1)

    def update(self, other: IntervalSet) -> None:
        for start, end in other.intervals():
            self.add_range(start, end)

    def intervals(self) -> list[tuple[int, int]]:
        return list(zip(self.starts, self.ends, strict=True))

    def __len__(self) -> int:
        return sum(e - s for s, e in zip(self.starts, self.ends, strict=True))

    def __contains__(self, value: int) -> bool:
        i = bisect.bisect_right(self.starts, value) - 1
        return i >= 0 and value < self.ends[i]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, IntervalSet) and self.intervals() == other.intervals()

    def __repr__(self) -> str:
        return f"IntervalSet({self.intervals()})"

    def complement(self, total: int) -> IntervalSet:
        """[0, total) minus this set."""
        rest, cursor = IntervalSet(), 0
        for start, end in self.intervals():
            rest.add_range(cursor, min(start, total))
            cursor = max(cursor, end)
        rest.add_range(cursor, total)
        return rest

    def slice(self, lo: int, hi: int) -> IntervalSet:
        """The members ranked lo..hi-1 in ascending order (the lo-th to the (hi-1)-th smallest)."""
        out, seen = IntervalSet(), 0
        for start, end in self.intervals():
            size = end - start
            a, b = max(lo - seen, 0), min(hi - seen, size)
            if a < b:
                out.add_range(start + a, start + b)
            seen += size
            if seen >= hi:
                break
        return out


@dataclass
class DataPosition:
    """One rank's data position; plain data, so it pickles into a checkpoint's worker file."""

    window: tuple[int, int] = (0, 0)  # (epoch, ordinal in this rank's reading order) where the window starts
    emitted: int = 0  # micro-batches already taken from that window
    shares: dict[int, list[tuple[int, int]]] = field(default_factory=dict)  # explicit shares (redistributed)
    consumed: dict[int, list[tuple[int, int]]] = field(default_factory=dict)  # global indices, epochs in progress


def share_of(epoch: int, total: int, rank: int, world_size: int, shares: dict[int, list]) -> IntervalSet:
    """The global indices this rank reads in `epoch`: an explicit share, or its balanced contiguous range."""
    if epoch in shares:
        return IntervalSet(shares[epoch])
    return IntervalSet([rank_range(total, rank, world_size)])


def redistribute(old: list[DataPosition], total: int, rank: int, world_size: int) -> DataPosition:
    """The position of new rank `rank` of `world_size` after a world-size change.

    For every epoch some old rank was still in, what no old rank consumed is split into balanced contiguous
    slices, one per new rank; later epochs use the plain ranges of the new world size. The new rank starts
    reading at the oldest of those epochs, from the start of its slice.
    """
    epochs = sorted({e for p in old for e in p.consumed} | {p.window[0] for p in old})
    shares: dict[int, list[tuple[int, int]]] = {}
    consumed: dict[int, list[tuple[int, int]]] = {}
    first = None
    for epoch in epochs:
        used = IntervalSet()
        for p in old:
            used.update(IntervalSet(p.consumed.get(epoch, [])))
        left = used.complement(total)
        if not len(left):
            continue
        lo, hi = rank_range(len(left), rank, world_size)
        shares[epoch] = left.slice(lo, hi).intervals()
        # new rank 0 carries the old ranks' consumption, so a second change still accounts for it (once)
        consumed[epoch] = used.intervals() if rank == 0 else []
        first = epoch if first is None else first
    return DataPosition(window=(max(epochs) + 1 if first is None else first, 0), shares=shares, consumed=consumed)

