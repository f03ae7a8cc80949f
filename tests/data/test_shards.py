"""The per-rank shard stream: coverage, disjointness, exact resume, corrupt members, integrity checks."""

from __future__ import annotations

import io
import itertools
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from webdataset import TarWriter

from vlmtune.data import shards as shards_mod
from vlmtune.data.shards import (
    SCHEMA_VERSION,
    ShardError,
    ShardStream,
    sha256_file,
    split_shards,
    verify_shards,
)


def _jpeg(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (i * 7 % 256, 0, 0)).save(buf, format="JPEG")
    return buf.getvalue()


def make_shards(root: Path, counts: list[int], split: str = "train", corrupt: dict | None = None) -> str:
    """Write shards with the given sample counts and a manifest; `corrupt` maps sample index → (member, bytes)."""
    corrupt = corrupt or {}
    entries, i = [], 0
    for s, count in enumerate(counts):
        name = f"{split}-{s:06d}.tar"
        with TarWriter(str(root / name)) as tar:
            for _ in range(count):
                sample = {"__key__": f"id{i:04d}", "jpg": _jpeg(i), "json": json.dumps({"id": f"id{i:04d}"}).encode()}
                if i in corrupt:
                    member, data = corrupt[i]
                    sample[member] = data
                tar.write(sample)
                i += 1
        entries.append({"name": name, "split": split, "count": count, "bytes": (root / name).stat().st_size,
                        "sha256": sha256_file(root / name)})
    (root / "manifest.json").write_text(json.dumps({"schema_version": SCHEMA_VERSION, "shards": entries}))
    return str(root)


def ids(items) -> list[str]:
    return [it["meta"]["id"] for it in items]


@pytest.fixture
def shard_dir(tmp_path):
    return make_shards(tmp_path, [5, 3, 7, 1, 4])  # 20 samples in 5 uneven shards


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 6])
def test_every_sample_exactly_once_per_epoch_across_ranks(shard_dir, world_size):
    shards = split_shards(shard_dir, "train")
    orders = []
    for epoch in (0, 1):
        seen = []
        sizes = []
        for rank in range(world_size):
            stream = ShardStream(shards, rank, world_size, seed=5, shuffle_buffer=3, infinite=False,
                                 start=(epoch, 0))
            got = ids(iter(stream))
            assert len(got) == stream.samples_per_epoch()
            sizes.append(len(got))
            seen += got
        assert sorted(seen) == [f"id{i:04d}" for i in range(20)]  # covered, no duplicates
        assert max(sizes) - min(sizes) <= 1
        orders.append(seen)
    assert orders[0] != orders[1], "each epoch must use a different order"


def test_same_seed_same_stream_other_seed_other_stream(shard_dir):
    shards = split_shards(shard_dir, "train")
    take = lambda seed: ids(itertools.islice(iter(ShardStream(shards, 0, 2, seed=seed)), 25))  # noqa: E731
    assert take(1) == take(1)
    assert take(1) != take(2)


def test_resume_from_any_position_reproduces_the_stream(shard_dir):
    shards = split_shards(shard_dir, "train")
    stream = ShardStream(shards, rank=1, world_size=3, seed=0, shuffle_buffer=4)
    full = list(itertools.islice(iter(stream), 40))  # crosses several epoch boundaries (7 per epoch)
    for k in range(1, 40):
        start = stream.next_position(full[k - 1]["position"])
        resumed = ShardStream(shards, rank=1, world_size=3, seed=0, shuffle_buffer=4, start=start)
        tail = list(itertools.islice(iter(resumed), 40 - k))
        assert ids(tail) == ids(full[k:]), f"resume after item {k}"
        assert [t["position"] for t in tail] == [f["position"] for f in full[k:]]


def test_fast_forward_decodes_no_images(shard_dir, monkeypatch):
    decoded = []
    real = shards_mod.decode_sample
    monkeypatch.setattr(shards_mod, "decode_sample", lambda raw: decoded.append(raw["__key__"]) or real(raw))
    shards = split_shards(shard_dir, "train")
    resumed = ShardStream(shards, rank=0, world_size=1, seed=0, shuffle_buffer=4, start=(2, 13))
    got = list(itertools.islice(iter(resumed), 3))
    assert len(decoded) == 3 and ids(got) == decoded


def test_dataloader_workers_keep_the_order(shard_dir):
    shards = split_shards(shard_dir, "train")
    make = lambda: ShardStream(shards, rank=0, world_size=2, seed=3, shuffle_buffer=2, start=(0, 3))  # noqa: E731
    single = list(itertools.islice(iter(make()), 23))
    loader = torch.utils.data.DataLoader(make(), batch_size=None, num_workers=2, collate_fn=lambda x: x)
    multi = list(itertools.islice(iter(loader), 23))
    assert ids(multi) == ids(single)
    assert [m["position"] for m in multi] == [s["position"] for s in single]


def test_corrupt_members_are_skipped_and_reported(tmp_path):
    shard_dir = make_shards(tmp_path, [4, 4], corrupt={1: ("jpg", _jpeg(1)[:40]), 6: ("json", b"{oops")})
    items = list(iter(ShardStream(split_shards(shard_dir, "train"), shuffle=False, infinite=False)))
    assert len(items) == 8
    skipped = {i: it["skipped"] for i, it in enumerate(items) if "skipped" in it}
    assert set(skipped) == {1, 6}
    assert skipped[1].startswith("id0001: bad image")
    assert skipped[6].startswith("id0006: bad JSON")
    assert all(isinstance(it["image"], Image.Image) for it in items if "skipped" not in it)


def test_transform_runs_per_sample_and_can_skip(shard_dir):
    def transform(sample):
        if sample["meta"]["id"] == "id0002":
            raise shards_mod.SampleSkipped("too long")
        return {"id": sample["meta"]["id"], "width": sample["image"].width}

    items = list(iter(ShardStream(split_shards(shard_dir, "train"), shuffle=False, infinite=False,
                                  transform=transform)))
    assert items[2]["skipped"] == "too long"
    assert items[0] == {"position": (0, 0), "index": 0, "id": "id0000", "width": 16}


def test_integrity_checks(shard_dir):
    shards = split_shards(shard_dir, "train")
    verify_shards(shards)
    path = Path(shards[1].url)
    data = bytearray(path.read_bytes())
    data[600] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError, match="does not match its sha256"):
        verify_shards(shards)
    verify_shards(shards, checksum=False)
    path.write_bytes(bytes(data[:-512]))
    with pytest.raises(ShardError, match="has 19968 bytes, the manifest says 20480"):
        verify_shards(shards, checksum=False)
    path.unlink()
    with pytest.raises(ShardError, match=r"train-000001\.tar listed in the manifest is missing"):
        verify_shards(shards, checksum=False)


def test_clear_errors_for_unusable_inputs(shard_dir, tmp_path):
    with pytest.raises(ShardError, match=r"no manifest\.json"):
        split_shards(str(tmp_path / "empty"), "train")
    with pytest.raises(ShardError, match="no 'val' shards"):
        split_shards(shard_dir, "val")
    with pytest.raises(ShardError, match="25 ranks but only 20 samples"):
        ShardStream(split_shards(shard_dir, "train"), rank=0, world_size=25)
