"""WebDataset shards: writing them, recording them in a journal and a manifest, streaming them per rank.

Layout of a shard directory:
    train-000000.tar …  val-000000.tar …   each sample = <key>.json (the record) + its images: <key>.jpg, and
                                           for products with several, <key>.2.jpg, <key>.3.jpg … (image k is
                                           the prompt's <|image_k|>; webdataset splits member names at the
                                           first dot, so a sample's fields are json, jpg, 2.jpg, 3.jpg …)
    manifest.json                          schema version, per-shard count/bytes/sha256, totals, source
    rejects.jsonl                          every row that did not become a sample and every image a sample
                                           lost, with the reason
    _progress/                             journal: header.json + one <shard>.json per finished shard
                                           (what makes prepare resumable)

Shards are planned by prepare (a fixed number of catalog rows each, see data/plan.py) and each is written
whole by the task that fetched its images, under a temporary name renamed when complete; the task then
records the shard in the journal. A shard holds fewer samples than planned when rows are rejected, and no
file at all when every row is; the manifest lists only shards with samples, with their true counts.

Streaming policy (`ShardStream`): for epoch e, the split's shards are shuffled with (seed, e) and laid
end to end into one global sample order of N samples. Rank r of W reads the contiguous range
[r·N//W, (r+1)·N//W): every sample is read by exactly one rank per epoch — nothing dropped, nothing
duplicated — even when W does not divide the number of shards and shards hold different numbers of samples;
ranks differ by at most one sample. After a world-size change the rest of an epoch is split anew
(data/position.py). Training counts optimizer steps, not epochs, so the stream simply continues into
epoch e+1 and ranks never wait on each other. Within each shard a bounded buffer shuffles raw (undecoded)
samples with an RNG seeded by (seed, epoch, rank, shard, first sample), so a saved position (epoch,
ordinal) is restored by skipping whole shards by their manifest counts and replaying raw bytes inside one
shard: no image is decoded to fast-forward, and the resumed stream is identical to the uninterrupted one.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import fsspec
import torch
from PIL import Image
from webdataset import TarWriter
from webdataset.tariterators import group_by_keys, tar_file_iterator

from vlmtune.data.position import IntervalSet, share_of
from vlmtune.errors import ShardError
from vlmtune.storage import filesystem, join, open_atomic, sha256_file, write_atomic

MANIFEST = "manifest.json"
REJECTS = "rejects.jsonl"
PROGRESS = "_progress"
SCHEMA_VERSION = 2  # 2: shards planned by catalog rows (counts may fall short of the plan), several images
READABLE_SCHEMAS = (1, 2)  # 1 is 2 with one image per sample
SPLITS = ("train", "val")
TAR_MTIME = 1_704_067_200  # fixed member timestamps make shards byte-identical across runs


class SampleSkipped(Exception):
    """Raised by a decode or transform step for one bad sample; the stream counts it and moves on."""


# ------------------------------------------------------------------------------------------ writing


def split_of(sample_id: str, val_fraction: float, salt: str) -> str:
    """Deterministic train/val assignment from a hash of the id: stable across runs and machines."""
    digest = hashlib.sha256(f"{salt}:{sample_id}".encode()).digest()
    return "val" if int.from_bytes(digest[:8], "big") / 2**64 < val_fraction else "train"


def order_rank(sample_id: str, salt: str) -> int:
    """Samples are planned in this hash order, so every shard is a well-mixed slice of the catalog."""
    return int.from_bytes(hashlib.sha256(f"order:{salt}:{sample_id}".encode()).digest()[:8], "big")


def sample_key(sample_id: str) -> str:
    """A tar-safe, dot-free key for a product id (webdataset splits member names at the first dot)."""
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in sample_id)[:80]
    return f"{safe}_{hashlib.sha1(sample_id.encode()).hexdigest()[:8]}"


def image_member(k: int) -> str:
    """The sample field of image k (1-based): 'jpg' for the first, '2.jpg', '3.jpg' … after it."""
    return "jpg" if k == 1 else f"{k}.jpg"


def sample_images(raw: dict) -> list[bytes]:
    """The JPEG bytes of a raw sample's images, in prompt order."""
    images = []
    while (member := image_member(len(images) + 1)) in raw:
        images.append(raw[member])
    return images


class _Hashing:
    """A write-only file wrapper that counts and hashes what passes through (no second read of the shard)."""

    def __init__(self, fh):
        self.fh, self.sha256, self.bytes = fh, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.bytes += len(data)
        return self.fh.write(data)


@dataclass(frozen=True)
class ShardFile:
    count: int
    images: int
    bytes: int
    sha256: str


def write_shard(url: str, samples: Iterable[tuple[dict, list[bytes]]]) -> ShardFile:
    """Write (metadata, JPEGs) samples, in the order given, as one tar at `url`, atomically; no file when there
    are no samples. The bytes depend on the samples only (fixed member times and owners), so a rerun writes the
    identical file."""
    samples = iter(samples)
    first = next(samples, None)
    if first is None:
        return ShardFile(0, 0, 0, "")
    count = images = 0
    with open_atomic(url) as fh:
        out = _Hashing(fh)
        tar = TarWriter(out, encoder=False, mtime=TAR_MTIME)
        for meta, jpegs in itertools.chain([first], samples):
            sample = {"__key__": sample_key(meta["id"]), "json": json.dumps(meta, ensure_ascii=False).encode()}
            sample.update({image_member(k): jpeg for k, jpeg in enumerate(jpegs, 1)})
            tar.write(sample)
            count, images = count + 1, images + len(jpegs)
        tar.close()
    return ShardFile(count, images, out.bytes, out.sha256.hexdigest())


class Journal:
    """prepare's record of finished shards, so that a rerun does only what is missing.

    `_progress/header.json` names the catalog (fingerprint) and settings (hash) the shards come from;
    `_progress/<shard name>.json` is written by the task that wrote the shard, after the shard itself, and
    holds what the manifest needs (count, bytes, sha256) plus the shard's ids and rejects. A shard counts as
    finished when its entry exists and its file has the recorded size; anything else is planned again.
    """

    def __init__(self, out_dir: str, header: dict):
        self.out_dir = out_dir.rstrip("/")
        self.dir = join(self.out_dir, PROGRESS)
        self.header = header

    def entry_url(self, shard: str) -> str:
        return join(self.dir, f"{shard.removesuffix('.tar')}.json")

    def open(self) -> dict[str, dict]:
        """Entries of the shards earlier runs finished and that are still intact, by shard name; starts a
        fresh journal when there is none, or when none of its shards was finished. Refuses a journal of
        finished shards from a different catalog or config, since continuing it would mix two data sets."""
        fs, root = filesystem(self.out_dir)
        progress = f"{root}/{PROGRESS}"
        fs.makedirs(progress, exist_ok=True)
        if any(fs.exists(f"{progress}/{split}/header.json") for split in SPLITS):
            raise ShardError(f"{self.out_dir} holds shards prepared by an older vlmtune (journal per split); use "
                             "another output directory or delete this one")
        paths = [p for p in fs.glob(f"{progress}/*.json") if not p.endswith("/header.json")]  # [] on a fresh S3 prefix
        previous = json.loads(fs.cat(f"{progress}/header.json")) if fs.exists(f"{progress}/header.json") else None
        if previous != self.header:
            if paths:
                changed = sorted(k for k in self.header if previous.get(k) != self.header[k])
                raise ShardError(
                    f"{self.out_dir} holds shards prepared from a different catalog or config (changed: "
                    f"{', '.join(changed)}); use another output directory or delete this one")
            write_atomic(join(self.dir, "header.json"), json.dumps(self.header))
            return {}
        files = {p["name"].rsplit("/", 1)[1]: p["size"] for p in fs.ls(root, detail=True)}
        finished = {}
        for data in fs.cat(paths).values() if paths else ():
            entry = json.loads(data)
            if entry["count"] == 0 or files.get(entry["shard"]) == entry["bytes"]:
                finished[entry["shard"]] = entry
        return finished

    def record(self, entry: dict) -> None:
        write_atomic(self.entry_url(entry["shard"]), json.dumps(entry, ensure_ascii=False))


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
    if manifest.get("schema_version") not in READABLE_SCHEMAS:
        raise ShardError(f"{shard_dir}/{MANIFEST}: schema_version {manifest.get('schema_version')} "
                         f"(this vlmtune reads {', '.join(map(str, READABLE_SCHEMAS))}); prepare the data again")
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
    """Raw tar members → {'key', 'images' (PIL RGB, prompt order), 'image' (the first), 'meta'}; a bad member
    raises SampleSkipped."""
    key = raw.get("__key__", "?")
    jpegs = sample_images(raw)
    if "json" not in raw or not jpegs:
        raise SampleSkipped(f"{key}: incomplete sample (members: {sorted(k for k in raw if not k.startswith('__'))})")
    try:
        meta = json.loads(raw["json"])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SampleSkipped(f"{key}: bad JSON ({e})") from None
    images = []
    for k, jpeg in enumerate(jpegs, 1):
        try:
            images.append(Image.open(io.BytesIO(jpeg)).convert("RGB"))
        except (OSError, SyntaxError, ValueError) as e:
            raise SampleSkipped(f"{key}: bad image{f' {k}' if len(jpegs) > 1 else ''} ({e})") from None
    return {"key": key, "image": images[0], "images": images, "meta": meta}


class ShardStream(torch.utils.data.IterableDataset):
    """One rank's deterministic stream over a split; see the module docstring and `data/position.py`.

    Yields dicts with `position` = (epoch, ordinal in this rank's reading order of the epoch), `index` = the
    sample's global index in the epoch's order, and either the transformed sample or `skipped` = reason.
    Passing a position back as `start` resumes exactly there. `shares` overrides this rank's share of given
    epochs (after a world-size change). With DataLoader workers, worker w of n decodes the items whose
    ordinal since `start` ≡ w (mod n) and skips the rest as raw bytes; DataLoader's round-robin fetch then
    returns items in the same order as with no workers. When the DataLoader fetches `group` items at a time
    (one batch of `group`), the workers take turns group by group instead.
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
        self.group = 1  # items a DataLoader worker yields in a row (see data/batching.py)
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
                if (count - 1) // self.group % workers != worker:
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
