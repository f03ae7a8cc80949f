"""prepare end to end: real Ray Data tasks, a real HTTP server, real tar shards."""

from __future__ import annotations

import csv
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from tests.data.conftest import jpeg_bytes
from vlmtune.config import CatalogConfig, DataConfig, ImageConfig, ShardConfig, load_config
from vlmtune.data.plan import plan_shards
from vlmtune.data.prepare import prepare
from vlmtune.data.sample import generate_sample_catalog
from vlmtune.data.shards import (
    Journal,
    ShardError,
    ShardStream,
    load_manifest,
    order_rank,
    sha256_file,
    split_of,
    split_shards,
    write_shard,
)
from vlmtune.launch.ray import preflight

REPO = Path(__file__).resolve().parents[2]
HEADER = ["product_code", "title", "category1_code", "category2_code", "category3_code", "full_price", "price",
          "currency_code", "imageurl"]


def write_catalog(path: Path, rows: list[list]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(HEADER)
        writer.writerows(rows)
    return path


def shard_members(path: Path) -> list[str]:
    with tarfile.open(path) as tar:
        return tar.getnames()


@pytest.mark.slow
def test_mixed_catalog_every_row_is_a_sample_or_a_recorded_reject(ray_local, server, tmp_path):
    local = tmp_path / "local.jpg"
    local.write_bytes(server.files["good.jpg"])
    u = server.url
    rows = [
        [1, "Good Tote", "Women", "Bags", "Totes", "$1,890.00", "", "USD", u("/img/good.jpg")],
        [2, "Gone", "Women", "Bags", "Totes", "100", "", "USD", u("/status/404")],
        [3, "Flaky", "Women", "Bags", "Totes", "100", "", "USD", u("/flaky/good.jpg")],
        [4, "Truncated", "Women", "Bags", "Totes", "100", "", "USD", u("/img/truncated.jpg")],
        [5, "Html", "Women", "Bags", "Totes", "100", "", "USD", u("/html")],
        [6, "Bomb", "Women", "Bags", "Totes", "100", "", "USD", u("/img/bomb.png")],
        [7, "Cmyk", "Men", "Shoes", "", "690", "590", "USD", u("/img/cmyk.jpg")],
        [8, "Palette", "Men", "Shoes", "", "690", "", "USD", u("/img/palette.png")],
        [9, "Local", "Men", "Belts", "", "450", "", "USD", str(local)],
        [1, "Duplicate", "Women", "Bags", "Totes", "1", "", "USD", u("/img/good.jpg")],
        [10, "No price", "Women", "Bags", "Totes", "", "", "USD", u("/img/good.jpg")],
        [11, "Crème Écharpe", "Women", "Scarves", "", "1.234,00", "", "EUR", u("/img/exif.jpg")],
    ]
    catalog = write_catalog(tmp_path / "catalog.csv", rows)
    out = tmp_path / "shards"
    cfg = DataConfig(catalog=CatalogConfig(source=str(catalog)),
                     images=ImageConfig(timeout_s=2, retries=2, backoff_s=0.01, max_pixels=10_000_000),
                     shards=ShardConfig(dir=str(out), samples_per_shard=2, val_fraction=0.3))
    manifest = prepare(cfg)

    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    by_row = {r["row"]: r for r in rejects}
    assert set(by_row) == {1, 3, 4, 5, 9, 10}
    assert by_row[1]["reason"].endswith("HTTP 404 Not Found") and by_row[1]["stage"] == "image"
    assert "corrupt image" in by_row[3]["reason"]
    assert by_row[4]["reason"].endswith("not an image (got text/html)")
    assert "decompression bomb" in by_row[5]["reason"]
    assert by_row[9] == {"row": 9, "id": "1", "stage": "catalog", "reason": "duplicate id (kept row 0)"}
    assert by_row[10]["reason"].startswith("full_price missing")

    samples = {}
    for shard in manifest["shards"]:
        path = out / shard["name"]
        assert sha256_file(path) == shard["sha256"] and path.stat().st_size == shard["bytes"]
        members = shard_members(path)
        assert len(members) == 2 * shard["count"]
        with tarfile.open(path) as tar:
            for name in members:
                if name.endswith(".json"):
                    meta = json.loads(tar.extractfile(name).read())
                    samples[meta["id"]] = (shard["split"], meta)
    assert sorted(samples) == ["1", "11", "3", "7", "8", "9"]
    assert len(samples) + len(rejects) == len(rows)  # nothing silently lost
    assert samples["11"][1]["title"] == "Crème Écharpe" and samples["11"][1]["full_price"] == 1234.0
    assert samples["7"][1]["price"] == 590.0 and samples["7"][1]["category"] == ["Men", "Shoes"]
    for sid, (split, _) in samples.items():
        assert split == split_of(sid, 0.3, cfg.shards.split_salt)
    assert manifest["totals"]["rejected"] == 6
    assert manifest["reject_reasons"] == {"HTTP 404 Not Found": 1, "corrupt image": 1, "not an image": 1,
                                          "decompression bomb": 1, "duplicate id": 1, "full_price missing": 1}
    assert manifest["totals"]["train"]["samples"] + manifest["totals"]["val"]["samples"] == 6
    assert server.hits["/flaky/good.jpg"] == 3
    assert {k: by_row[1][k] for k in ("image", "product_kept")} == {"image": 1, "product_kept": False}

    # Shards were planned with 2 catalog rows each; rejects leave some with 1 sample or none (no file, not listed).
    entries = [json.loads(p.read_text()) for p in sorted((out / "_progress").glob("*-*.json"))]
    assert sum(e["rows"] for e in entries) == 10 and {e["rows"] for e in entries} <= {1, 2}
    assert any(e["count"] < e["rows"] for e in entries)
    assert {e["shard"] for e in entries if e["count"]} == {s["name"] for s in manifest["shards"]}
    assert not [e for e in entries if not e["count"] and (out / e["shard"]).exists()]
    # ... and the loader still gives every rank its balanced, disjoint share, and preflight accepts it.
    train = split_shards(str(out), "train")
    for world in (1, 2, 3):
        streams = [ShardStream(train, rank, world, shuffle_buffer=2, infinite=False) for rank in range(world)]
        per_rank = [[it["meta"]["id"] for it in stream] for stream in streams]
        assert sorted(itertools.chain(*per_rank)) == sorted(i for i, (split, _) in samples.items() if split == "train")
        assert max(map(len, per_rank)) - min(map(len, per_rank)) <= 1
    preflight(load_config(overrides=[f"data.shards.dir={out}", f"cluster.num_workers={len(train)}",
                                     "model.lora.enabled=false"]))


def test_split_is_a_stable_function_of_the_id():
    # Fixed expectations: a change here would silently move products between train and val.
    assert [i for i in range(100) if split_of(str(i), 0.2, "vlmtune-split-v1") == "val"] == [
        18, 35, 37, 42, 43, 50, 51, 56, 59, 74, 76, 82, 87, 91, 93, 95, 96, 98]
    share = sum(split_of(f"id-{i}", 0.1, "s") == "val" for i in range(5000)) / 5000
    assert 0.08 < share < 0.12


def _slow_sample_catalog(tmp_path, server, n) -> Path:
    """The sample catalog with images served slowly over HTTP, so a prepare run can be killed mid-way."""
    csv_path = generate_sample_catalog(tmp_path / "cat", n, seed=3)
    rows = list(csv.DictReader(csv_path.open(encoding="utf-8")))
    for row in rows:
        name = Path(row["imageurl"]).name
        server.files[name] = (csv_path.parent / row["imageurl"]).read_bytes()
        row["imageurl"] = server.url(f"/delay/{name}")
    with csv_path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return csv_path


SHARD_ARGS = ["data.shards.samples_per_shard=6", "data.shards.val_fraction=0.2", "data.shards.max_concurrent_tasks=1",
              "data.images.fetch_threads=1"]


def _shard_digests(out: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(out.glob("*.tar"))}


@pytest.mark.slow
def test_killed_prepare_resumes_to_the_same_shards(ray_local, server, tmp_path, caplog):
    server.delay_s = 0.08
    catalog = _slow_sample_catalog(tmp_path, server, 72)
    killed, straight = tmp_path / "killed", tmp_path / "straight"
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), RAY_ADDRESS=ray_local.get_runtime_context().gcs_address)
    cmd = [sys.executable, str(REPO / "jobs/prepare_data.py"), f"data.catalog.source={catalog}", *SHARD_ARGS]
    proc = subprocess.Popen([*cmd, f"data.shards.dir={killed}"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    journal = killed / "_progress"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if len(list(journal.glob("train-*.json"))) >= 2:  # 2 finished shards
            break
        time.sleep(0.05)
    assert proc.poll() is None, "prepare finished before it could be interrupted"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "manifest.json").exists()
    finished_ids = {i for entry in journal.glob("*-*.json") for i in json.loads(entry.read_text())["ids"]}
    assert len(finished_ids) >= 12

    server.hits.clear()
    server.delay_s = 0  # slow only to be interrupted
    rerun = subprocess.run([*cmd, f"data.shards.dir={killed}"], env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    refetched = {Path(path).stem for path in server.hits}
    assert refetched and not refetched & finished_ids, "images of finished shards were fetched again"

    cfg = load_config(overrides=[f"data.catalog.source={catalog}", *SHARD_ARGS, f"data.shards.dir={straight}"])
    prepare(cfg.data)
    assert _shard_digests(killed) == _shard_digests(straight)
    assert load_manifest(str(killed))["shards"] == load_manifest(str(straight))["shards"]
    assert (killed / "rejects.jsonl").read_text() == (straight / "rejects.jsonl").read_text()

    server.hits.clear()
    with caplog.at_level("INFO", logger="vlmtune"):
        prepare(cfg.data)
    assert sum(server.hits.values()) == 0  # idempotent: nothing left to do
    assert f"{straight}: all 72 records are in finished shards, nothing to fetch" in caplog.messages
    assert _shard_digests(straight) == _shard_digests(killed)


@pytest.mark.slow
def test_shards_are_byte_identical_on_one_and_on_two_nodes(ray_local, tmp_path):
    """The same catalog prepared by the session's one-node Ray and by a head + a `ray start` worker node (one
    CPU each, so both must take tasks) gives the same shards, manifest and rejects, byte for byte."""
    from tests.data.ray_nodes import TwoNodeCluster

    catalog = generate_sample_catalog(tmp_path / "cat", 40, seed=5)
    args = [f"data.catalog.source={catalog}", "data.shards.samples_per_shard=4", "data.images.max_side=64"]
    one, two = tmp_path / "one-node", tmp_path / "two-nodes"
    with TwoNodeCluster(tmp_path, cpus_per_node=1) as cluster:
        prepare(load_config(overrides=[*args, f"data.shards.dir={one}"]).data)  # while the two nodes start
        cluster.wait()
        done = subprocess.run([sys.executable, str(REPO / "jobs/prepare_data.py"), *args, f"data.shards.dir={two}"],
                              env=cluster.env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(r"wrote \d+ shard\(s\) with tasks on 2 node\(s\)", done.stderr), done.stderr[-3000:]
    assert _shard_digests(one) == _shard_digests(two) and len(_shard_digests(one)) > 4
    assert load_manifest(str(one))["shards"] == load_manifest(str(two))["shards"]
    assert (one / "rejects.jsonl").read_text() == (two / "rejects.jsonl").read_text()


def test_a_shard_counts_as_finished_only_when_its_entry_and_file_agree(tmp_path):
    header = {"catalog": "a", "config": "b"}
    assert Journal(str(tmp_path), {**header, "config": "x"}).open() == {}  # nothing finished yet under "x"
    journal = Journal(str(tmp_path), header)
    assert journal.open() == {}  # so other settings simply start over
    for i, ids in enumerate((["0", "1"], ["2"], [])):
        name = f"train-{i:06d}.tar"
        samples = [({"id": sid, "title": "t"}, [jpeg_bytes()]) for sid in ids]
        written = write_shard(str(tmp_path / name), samples)
        journal.record({"shard": name, "split": "train", "rows": 2, "count": written.count, "images": written.images,
                        "bytes": written.bytes, "sha256": written.sha256, "ids": ids, "rejects": []})
    assert not (tmp_path / "train-000002.tar").exists()  # every row rejected: no file
    assert sorted(journal.open()) == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    (tmp_path / "train-000001.tar").write_bytes(b"cut short")
    (tmp_path / "train-000000.tar").unlink()
    assert sorted(Journal(str(tmp_path), header).open()) == ["train-000002.tar"]  # the others are redone
    with pytest.raises(ShardError, match=r"different catalog or config \(changed: config\)"):
        Journal(str(tmp_path), {**header, "config": "c"}).open()
    (tmp_path / "old" / "_progress" / "train").mkdir(parents=True)
    (tmp_path / "old" / "_progress" / "train" / "header.json").write_text("{}")
    with pytest.raises(ShardError, match="prepared by an older vlmtune"):
        Journal(str(tmp_path / "old"), header).open()


def test_the_plan_is_a_function_of_the_catalog_and_config(tmp_path):
    catalog = generate_sample_catalog(tmp_path / "cat", 40, seed=1)
    cfg = load_config(overrides=[f"data.catalog.source={catalog}", "data.shards.samples_per_shard=6",
                                 "data.shards.val_fraction=0.25"]).data
    plan = plan_shards(cfg)
    for split in ("train", "val"):
        shards = [s for s in plan.shards if s.split == split]
        assert [s.name for s in shards] == [f"{split}-{i:06d}.tar" for i in range(len(shards))]
        assert all(len(s.records) == 6 for s in shards[:-1]) and 0 < len(shards[-1].records) <= 6
    ids = [json.loads(r)["id"] for s in plan.shards if s.split == "train" for r in s.records]
    assert ids == sorted(ids, key=lambda i: order_rank(i, cfg.shards.split_salt))  # id-hash order
    assert sum(len(s.records) for s in plan.shards) == plan.records == 40
    chunked = cfg.model_copy(update={"catalog": cfg.catalog.model_copy(update={"chunk_rows": 7})})
    again = plan_shards(chunked)
    assert again.shards == plan.shards and again.fingerprint == plan.fingerprint


@pytest.mark.parametrize(("stage", "reason", "kind"), [
    ("image", "image https://x/a.jpg: HTTP 404 Not Found", "HTTP 404 Not Found"),
    ("image", "image /p/a.jpg: local file not found: /p/a.jpg", "local file not found"),
    ("image", "image u: decompression bomb: 5000x5000 pixels exceeds images.max_pixels", "decompression bomb"),
    ("catalog", "duplicate id (kept row 3)", "duplicate id"),
    ("catalog", "full_price missing (column 'full_price')", "full_price missing"),
    ("catalog", "catalog.jsonl line 15: invalid JSON (Expecting value)", "invalid JSON"),
])
def test_reject_reasons_are_grouped_without_their_specifics(stage, reason, kind):
    from vlmtune.data.prepare import reason_kind

    assert reason_kind({"stage": stage, "reason": reason}) == kind
