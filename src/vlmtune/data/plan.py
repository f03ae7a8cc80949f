"""The shard plan: which catalog records go into which shard, decided before any image is fetched.

The driver streams the catalog once (data/catalog.py), assigns every record to train or val by a hash of
its id, orders each split by another hash of the id, and cuts it into shards of `samples_per_shard` catalog
rows. The plan is therefore a function of the catalog and the config alone: whichever task writes a shard,
on whichever node, after however many interruptions, it writes the same rows in the same order.

Memory: the plan keeps each record as one compact JSON string (~300 bytes for a typical row) plus an 8-byte
sort key; the catalog's full rows live only for the chunk being read, and no image is ever in the driver. A
1,000,000-row catalog plans in well under 1.5 GB (bench/prepare.py --plan-rows measures it).
"""

from __future__ import annotations

import hashlib
import json
from array import array
from dataclasses import dataclass, field

import numpy as np

from vlmtune.config import DataConfig
from vlmtune.data.catalog import Reject, stream_catalog
from vlmtune.data.shards import SPLITS, order_rank, split_of
from vlmtune.errors import CatalogError


@dataclass(frozen=True)
class PlannedShard:
    split: str
    index: int
    records: tuple[str, ...]  # JSON records, in id-hash order

    @property
    def name(self) -> str:
        return f"{self.split}-{self.index:06d}.tar"


@dataclass
class Plan:
    shards: list[PlannedShard]
    rejects: list[dict] = field(default_factory=list)  # catalog-stage rejects, in row order
    fingerprint: str = ""  # changes whenever the records change; guards resuming into another catalog
    rows: int = 0  # catalog rows read
    records: int = 0  # rows planned into shards


class _SplitOrder:
    """One split's records with their hash-order keys, sorted once the catalog is read."""

    def __init__(self) -> None:
        self.keys = array("Q")
        self.records: list[str] = []

    def add(self, key: int, record: str) -> None:
        self.keys.append(key)
        self.records.append(record)

    def ordered(self) -> list[str]:
        order = np.argsort(np.frombuffer(self.keys, dtype=np.uint64), kind="stable") if self.keys else []
        return [self.records[i] for i in order]


def plan_shards(cfg: DataConfig) -> Plan:
    """Stream the catalog into a plan of shards per split (train shards first, then val)."""
    salt, per_shard = cfg.shards.split_salt, cfg.shards.samples_per_shard
    splits = {split: _SplitOrder() for split in SPLITS}
    plan = Plan(shards=[])
    digest = hashlib.sha256()
    for chunk in stream_catalog(cfg.catalog, "labels", cfg.images.max_per_product):
        plan.rows += len(chunk)
        for item in chunk:
            if isinstance(item, Reject):
                plan.rejects.append(item.to_dict())
                continue
            text = json.dumps(item, sort_keys=True, ensure_ascii=False)
            digest.update(text.encode())
            splits[split_of(item["id"], cfg.shards.val_fraction, salt)].add(order_rank(item["id"], salt), text)
            plan.records += 1
    if not plan.records:
        raise CatalogError(f"{cfg.catalog.source}: no usable rows ({len(plan.rejects)} rejected); first reasons: "
                           + "; ".join(r["reason"] for r in plan.rejects[:3]))
    plan.fingerprint = digest.hexdigest()[:16]
    for split, order in splits.items():
        records = order.ordered()
        plan.shards += [PlannedShard(split, i // per_shard, tuple(records[i : i + per_shard]))
                        for i in range(0, len(records), per_shard)]
    return plan
