"""WebDataset shards: writing them resumably, describing them in a manifest, streaming them per rank.

Layout of a shard directory:
    train-000000.tar …  val-000000.tar …   each sample = <key>.jpg + <key>.json (the record)
    manifest.json                          schema version, per-shard count/bytes/sha256, totals, source
    rejects.jsonl                          every row that did not become a sample, with its reason
    _progress/<split>/                     journal: header.json + one NNNNNN.json per finished shard
                                           (what makes prepare resumable)

Streaming policy (`ShardStream`): for epoch e, the split's shards are shuffled with (seed, e) and laid
end to end into one global sample order of N samples. Rank r of W reads the contiguous range
[r·N//W, (r+1)·N//W): every sample is read by exactly one rank per epoch — nothing dropped, nothing
duplicated — even when W does not divide the number of shards; ranks differ by at most one sample.
After a world-size change the rest of an epoch is split anew (data/position.py). Training counts
optimizer steps, not epochs, so the stream simply continues into epoch e+1 and ranks never wait on each
other. Within each shard a bounded buffer shuffles raw (undecoded) samples with an RNG seeded by (seed,
epoch, shard, first sample), so a saved position (epoch, ordinal) is restored by skipping whole shards by
their manifest counts and replaying raw bytes inside one shard: no image is decoded to fast-forward, and
the resumed stream is identical to the uninterrupted one.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import fsspec
import torch
from PIL import Image
from webdataset import ShardWriter
from webdataset.tariterators import group_by_keys, tar_file_iterator

from vlmtune.data.position import IntervalSet, share_of
from vlmtune.errors import ShardError
from vlmtune.storage import join, sha256_file, write_atomic

MANIFEST = "manifest.json"
REJECTS = "rejects.jsonl"
SCHEMA_VERSION = 1
SPLITS = ("train", "val")
TAR_MTIME = 1_704_067_200  # fixed member timestamps make shards byte-identical across runs


class SampleSkipped(Exception):
    """Raised by a decode or transform step for one bad sample; the stream counts it and moves on."""


# ------------------------------------------------------------------------------------------ writing


def split_of(sample_id: str, val_fraction: float, salt: str) -> str:
    """Deterministic train/val assignment from a hash of the id: stable across runs and machines."""
    digest = hashlib.sha256(f"{salt}:{sample_id}".encode()).digest()
    return "val" if int.from_bytes(digest[:8], "big") / 2**64 < val_fraction else "train"


def order_key(sample_id: str, salt: str) -> str:
    """Samples are written in hash order, so every shard is a well-mixed slice of the catalog."""
    return hashlib.sha256(f"order:{salt}:{sample_id}".encode()).hexdigest()


def sample_key(sample_id: str) -> str:
    """A tar-safe, dot-free key for a product id (webdataset splits member names at the first dot)."""
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in sample_id)[:80]
    return f"{safe}_{hashlib.sha1(sample_id.encode()).hexdigest()[:8]}"


class SplitWriter:
    """Writes one split's shards with `webdataset.ShardWriter`, finishing each one atomically.

    Shards are written under a temporary name and renamed when complete, then recorded in the split's
    journal together with the catalog position they cover and the rejects inside that range. A rerun
    reads the journal and continues after the last finished shard, so an interrupted prepare ends with
    exactly the shards an uninterrupted one writes. Each journal entry is its own small file, so recording
    a shard costs the same at shard 5 and shard 5,000, on a local disk or an object store.
    """

    def __init__(self, out_dir: str, split: str, samples_per_shard: int, max_shard_bytes: int,
                 journal: list[dict], header: dict):
        self.out_dir = out_dir.rstrip("/")
        self.split = split
        self.fs, self.root = fsspec.core.url_to_fs(self.out_dir)
        self.fs.makedirs(self.root, exist_ok=True)
        self.local_tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"vlmtune-{os.getpid()}-{split}"
        self.local_tmp.mkdir(parents=True, exist_ok=True)
        self.journal = journal
        self.journal_dir = f"{self.root}/_progress/{split}"
        self.journal_url = f"{self.out_dir}/_progress/{split}"
        self.header = header
        self.pending_ids: list[str] = []
        self.pending_rejects: list[dict] = []
        self.position = journal[-1]["covered"] if journal else 0
        self.aborted = False
        self.writer = ShardWriter(str(self.local_tmp / f"{split}-%06d.tar"), maxcount=samples_per_shard,
                                  maxsize=max_shard_bytes, post=self._finish_shard,
                                  start_shard=sum(1 for e in journal if e["shard"]),
                                  verbose=0, mtime=TAR_MTIME)

    def _finish_shard(self, tmp_name: str) -> None:
        tmp = Path(tmp_name)
        if self.aborted or not self.pending_ids:
            tmp.unlink(missing_ok=True)
            return
        name = tmp.name
        entry = {"shard": name, "count": len(self.pending_ids), "bytes": tmp.stat().st_size,
                 "sha256": sha256_file(tmp), "ids": self.pending_ids, "rejects": self.pending_rejects,
                 "covered": self.position}
        self.fs.put_file(str(tmp), f"{self.root}/{name}.partial")
        self.fs.mv(f"{self.root}/{name}.partial", f"{self.root}/{name}")
        tmp.unlink()
        self._record(entry)
        self.pending_ids, self.pending_rejects = [], []

    def _record(self, entry: dict) -> None:
        if not self.journal:
            self.fs.makedirs(self.journal_dir, exist_ok=True)
            write_atomic(f"{self.journal_url}/header.json", json.dumps(self.header))
        write_atomic(f"{self.journal_url}/{len(self.journal):06d}.json", json.dumps(entry))
        self.journal.append(entry)

    def write(self, record: dict, jpeg: bytes) -> None:
        meta = {k: record[k] for k in ("id", "title", "category", "full_price", "price", "currency")}
        meta["source"] = {"row": record["row"], "image": record["image"]}
        # ShardWriter rolls to the next shard *before* writing when the current one is full, which
        # calls _finish_shard for the previous shard: the sample is only counted after that.
        self.writer.write({"__key__": sample_key(record["id"]), "jpg": jpeg,
                           "json": json.dumps(meta, ensure_ascii=False).encode()})
        self.pending_ids.append(record["id"])
        self.position += 1

    def reject(self, record: dict, reason: str) -> None:
        self.pending_rejects.append({"row": record["row"], "id": record["id"], "stage": "image",
                                     "reason": reason})
        self.position += 1

    def close(self, ok: bool) -> None:
        self.aborted = not ok
        if ok and self.pending_rejects and not self.pending_ids:
            # Rejects with no sample left to carry them into a shard's entry still need recording.
            self._record({"shard": None, "count": 0, "rejects": self.pending_rejects, "covered": self.position})
        self.writer.close()
        for leftover in self.local_tmp.glob("*"):
            leftover.unlink()
        self.local_tmp.rmdir()


def read_journal(out_dir: str, split: str, header: dict) -> list[dict]:
    """Finished shards of a previous run, or [] when starting fresh. Refuses a journal from a different
    catalog or config, since continuing it would mix two data sets."""
    fs, root = fsspec.core.url_to_fs(out_dir.rstrip("/"))
    directory = f"{root}/_progress/{split}"
    if not fs.exists(f"{directory}/header.json"):
        return []
    with fs.open(f"{directory}/header.json", "r") as fh:
        previous = json.load(fh)
    if previous != header:
        changed = sorted(k for k in header if previous.get(k) != header[k])
        raise ShardError(
            f"{out_dir} holds shards prepared from a different catalog or config (changed: {', '.join(changed)}); "
            "use another output directory or delete this one"
        )
    names = sorted(p.rsplit("/", 1)[1] for p in fs.ls(directory, detail=False))
    entries = []
    for name in (n for n in names if n[:6].isdigit() and n.endswith(".json")):
        with fs.open(f"{directory}/{name}", "r") as fh:
            entries.append(json.load(fh))
    for entry in entries:
        if entry["shard"] is not None and not fs.exists(f"{root}/{entry['shard']}"):
            raise ShardError(f"{out_dir}: journal lists {entry['shard']} but the file is missing; delete the "
                             "directory and prepare again")
    return entries


def write_manifest(out_dir: str, manifest: dict) -> None:
    write_atomic(join(out_dir, MANIFEST), json.dumps(manifest, indent=2, ensure_ascii=False))


def write_rejects(out_dir: str, rejects: list[dict]) -> None:
    write_atomic(join(out_dir, REJECTS), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rejects))


# ------------------------------------------------------------------------------------------ reading


@dataclass(frozen=True)
class ShardInfo:
    name: str
    url: str
    count: int
    bytes: int
    sha256: str


def load_manifest(shard_dir: str) -> dict:
    fs, root = fsspec.core.url_to_fs(shard_dir.rstrip("/"))
    path = f"{root}/{MANIFEST}"
    if not fs.exists(path):
        raise ShardError(f"no {MANIFEST} in {shard_dir}: run `python jobs/prepare_data.py` first")
    with fs.open(path, "r") as fh:
        manifest = json.load(fh)
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise ShardError(f"{shard_dir}/{MANIFEST}: schema_version {manifest.get('schema_version')} "
                         f"(this vlmtune reads {SCHEMA_VERSION}); prepare the data again")
    return manifest


def split_shards(shard_dir: str, split: str, manifest: dict | None = None) -> list[ShardInfo]:
    manifest = manifest or load_manifest(shard_dir)
    base = shard_dir.rstrip("/")
    shards = [ShardInfo(s["name"], f"{base}/{s['name']}", s["count"], s["bytes"], s["sha256"])
              for s in manifest["shards"] if s["split"] == split]
    if not shards:
        raise ShardError(f"{shard_dir}: the manifest has no '{split}' shards")
    return shards


def verify_shards(shards: list[ShardInfo], checksum: bool = True) -> None:
    """Fail before training on a missing, resized or (with checksum) altered shard."""
    fs, _ = fsspec.core.url_to_fs(shards[0].url)
    for shard in shards:
        if not fs.exists(shard.url):
            raise ShardError(f"shard {shard.url} listed in the manifest is missing")
        size = fs.size(shard.url)
        if size != shard.bytes:
            raise ShardError(f"shard {shard.url} has {size} bytes, the manifest says {shard.bytes}")
        if checksum and sha256_file(shard.url) != shard.sha256:
            raise ShardError(f"shard {shard.url} does not match its sha256 in the manifest (corrupted copy?)")


def epoch_plan(shards: list[ShardInfo], epoch: int, seed: int, share: IntervalSet,
               shuffle: bool) -> list[tuple[ShardInfo, int, int, int]]:
    """This rank's (shard, first, end, global index of first) segments for one epoch, in reading order."""
    order = list(shards)
    if shuffle:
        random.Random(f"{seed}:{epoch}:shards").shuffle(order)
    plan, offset = [], 0
    for shard in order:
        for lo, hi in share.intervals():
            lo, hi = max(lo, offset), min(hi, offset + shard.count)
            if lo < hi:
                plan.append((shard, lo - offset, hi - offset, lo))
        offset += shard.count
    return plan


def raw_samples(url: str) -> Iterator[dict]:
    with fsspec.open(url, "rb") as fh:
        yield from group_by_keys({**member, "__url__": url} for member in tar_file_iterator(fh))


def _buffered(items: Iterator[dict], size: int, rng: random.Random) -> Iterator[dict]:
    buffer: list[dict] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        i = rng.randrange(size)
        yield buffer[i]
        buffer[i] = item
    rng.shuffle(buffer)
    yield from buffer


def read_metadata(shards: list[ShardInfo]) -> list[dict]:
    """The JSON records of every sample (images are read past, not decoded)."""
    return [json.loads(raw["json"]) for shard in shards for raw in raw_samples(shard.url) if "json" in raw]


def decode_sample(raw: dict) -> dict:
    """Raw tar members → {'key', 'image' (PIL RGB), 'meta'}; a bad member raises SampleSkipped."""
    key = raw.get("__key__", "?")
    if "json" not in raw or "jpg" not in raw:
        raise SampleSkipped(f"{key}: incomplete sample (members: {sorted(k for k in raw if not k.startswith('__'))})")
    try:
        meta = json.loads(raw["json"])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SampleSkipped(f"{key}: bad JSON ({e})") from None
    try:
        image = Image.open(io.BytesIO(raw["jpg"]))
        image = image.convert("RGB")
    except (OSError, SyntaxError, ValueError) as e:
        raise SampleSkipped(f"{key}: bad image ({e})") from None
    return {"key": key, "image": image, "meta": meta}


class ShardStream(torch.utils.data.IterableDataset):
    """One rank's deterministic stream over a split; see the module docstring and `data/position.py`.

    Yields dicts with `position` = (epoch, ordinal in this rank's reading order of the epoch), `index` = the
    sample's global index in the epoch's order, and either the transformed sample or `skipped` = reason.
    Passing a position back as `start` resumes exactly there. `shares` overrides this rank's share of given
    epochs (after a world-size change). With DataLoader workers, worker w of n decodes the items whose
    ordinal since `start` ≡ w (mod n) and skips the rest as raw bytes; DataLoader's round-robin fetch then
    returns items in the same order as with no workers.
    """

    def __init__(self, shards: list[ShardInfo], rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True, shuffle_buffer: int = 64, infinite: bool = True,
                 start: tuple[int, int] = (0, 0), transform: Callable[[dict], dict] | None = None,
                 shares: dict[int, list[tuple[int, int]]] | None = None):
        self.total = sum(s.count for s in shards)
        if world_size > self.total:
            raise ShardError(f"{world_size} ranks but only {self.total} samples in the split")
        self.shards, self.rank, self.world_size, self.seed = shards, rank, world_size, seed
        self.shuffle, self.shuffle_buffer, self.infinite = shuffle, shuffle_buffer, infinite
        self.start = start
        self.transform = transform
        self.shares = shares or {}

    def share(self, epoch: int) -> IntervalSet:
        return share_of(epoch, self.total, self.rank, self.world_size, self.shares)

    def samples_per_epoch(self, epoch: int = 0) -> int:
        return len(self.share(epoch))

    def next_position(self, position: tuple[int, int]) -> tuple[int, int]:
        """The stream start that resumes right after the item at `position`."""
        epoch, ordinal = position
        return (epoch + 1, 0) if ordinal + 1 >= self.samples_per_epoch(epoch) else (epoch, ordinal + 1)

    def _epoch_raw(self, epoch: int, skip: int) -> Iterator[tuple[int, int, dict]]:
        """(ordinal, global index, raw sample) for this rank's epoch, from ordinal `skip` on."""
        ordinal = 0
        for shard, first, end, index in epoch_plan(self.shards, epoch, self.seed, self.share(epoch), self.shuffle):
            n = end - first
            if ordinal + n <= skip:  # fast-forward over whole segments without opening them
                ordinal += n
                continue
            raw = zip(itertools.count(index), itertools.islice(raw_samples(shard.url), first, end))
            if self.shuffle and self.shuffle_buffer > 1:
                rng = random.Random(f"{self.seed}:{epoch}:{self.rank}:{shard.name}:{first}")
                raw = _buffered(raw, self.shuffle_buffer, rng)
            for global_index, sample in raw:
                if ordinal >= skip:
                    yield ordinal, global_index, sample
                ordinal += 1

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        epoch, skip = self.start
        count = 0  # items since `start`: DataLoader asks worker 0 first, whatever the start ordinal
        while True:
            for ordinal, index, raw in self._epoch_raw(epoch, skip):
                count += 1
                if (count - 1) % workers != worker:
                    continue
                item = {"position": (epoch, ordinal), "index": index}
                try:
                    sample = decode_sample(raw)
                    item.update(self.transform(sample) if self.transform else sample)
                except SampleSkipped as e:
                    item["skipped"] = str(e)
                yield item
            if not self.infinite:
                return
            epoch, skip = epoch + 1, 0
