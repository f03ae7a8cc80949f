"""The per-rank shard stream: coverage, disjointness, exact resume, corrupt members, integrity checks."""

from __future__ import annotations

import io
import itertools
import json
import tarfile
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
    load_manifest,
    raw_samples,
    sha256_file,
    split_shards,
    verify_shards,
    write_shard,
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


def _coloured(colour: tuple[int, int, int], size=(24, 16)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="JPEG")
    return buf.getvalue()


RED, GREEN, BLUE = (220, 20, 20), (20, 200, 20), (20, 20, 220)


def _multi_image_shard(root: Path, second: bytes | None = None) -> str:
    samples = [({"id": "front+back"}, [_coloured(RED), second or _coloured(GREEN, (16, 24))]),
               ({"id": "front only"}, [_coloured(BLUE)])]
    written = write_shard(str(root / "train-000000.tar"), samples)
    manifest = {"schema_version": SCHEMA_VERSION, "shards": [
        {"name": "train-000000.tar", "split": "train", "count": written.count, "bytes": written.bytes,
         "sha256": written.sha256}]}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return str(root)


def test_a_sample_with_several_images_streams_them_in_prompt_order(tmp_path):
    shard_dir = _multi_image_shard(tmp_path)
    with tarfile.open(tmp_path / "train-000000.tar") as tar:
        names = tar.getnames()
    key = names[0].split(".")[0]
    assert sorted(names[:3]) == [f"{key}.2.jpg", f"{key}.jpg", f"{key}.json"]  # webdataset fields: jpg, 2.jpg, json
    items = list(ShardStream(split_shards(shard_dir, "train"), shuffle=False, infinite=False))
    assert [it["meta"]["id"] for it in items] == ["front+back", "front only"]
    two = items[0]["images"]
    assert [im.size for im in two] == [(24, 16), (16, 24)] and items[0]["image"] is two[0]
    assert two[0].getpixel((5, 5))[0] > 150 and two[1].getpixel((5, 5))[1] > 150  # red first, then green
    assert len(items[1]["images"]) == 1


def test_a_bad_second_image_skips_the_sample_and_says_which(tmp_path):
    shard_dir = _multi_image_shard(tmp_path, second=_coloured(GREEN)[:60])
    items = list(ShardStream(split_shards(shard_dir, "train"), shuffle=False, infinite=False))
    assert items[0]["skipped"].startswith("front_back_") and ": bad image 2 (" in items[0]["skipped"]
    assert "skipped" not in items[1]


def test_written_shards_are_byte_identical_and_described_exactly(tmp_path):
    samples = [({"id": str(i), "title": "Tote – crème"}, [_coloured(RED)] * (1 + i % 2)) for i in range(5)]
    first = write_shard(str(tmp_path / "a.tar"), samples)
    second = write_shard(str(tmp_path / "b.tar"), samples)
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()
    assert first == second and (first.count, first.images) == (5, 7)
    assert first.bytes == (tmp_path / "a.tar").stat().st_size and first.sha256 == sha256_file(tmp_path / "a.tar")
    assert [json.loads(r["json"])["id"] for r in raw_samples(str(tmp_path / "a.tar"))] == ["0", "1", "2", "3", "4"]
    assert not list(tmp_path.glob("*.partial"))
    assert write_shard(str(tmp_path / "none.tar"), []).count == 0 and not (tmp_path / "none.tar").exists()


def test_shards_of_the_previous_schema_still_load(shard_dir):
    manifest = json.loads((Path(shard_dir) / "manifest.json").read_text())
    (Path(shard_dir) / "manifest.json").write_text(json.dumps({**manifest, "schema_version": 1}))
    assert len(list(ShardStream(split_shards(shard_dir, "train"), infinite=False))) == 20
    (Path(shard_dir) / "manifest.json").write_text(json.dumps({**manifest, "schema_version": 7}))
    with pytest.raises(ShardError, match="schema_version 7 \\(this vlmtune reads 1, 2\\)"):
        load_manifest(shard_dir)
