"""prepare with remote storage (s3:// on a loopback moto server), a Hugging Face data set source (a local data
set directory, read through `datasets` offline), and the inspect job."""

from __future__ import annotations

import csv
import itertools
import subprocess
import sys
from pathlib import Path

import fsspec
import pandas as pd
import pytest
from PIL import Image

from vlmtune.config import load_config
from vlmtune.data.catalog import read_catalog, stream_catalog
from vlmtune.data.prepare import prepare
from vlmtune.data.sample import generate_sample_catalog
from vlmtune.data.shards import ShardStream, load_manifest, split_shards, verify_shards

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_prepare_to_s3_and_stream_back(ray_local, s3_bucket, tmp_path, caplog):
    """Ray tasks write the shards and journal straight to S3 (a moto server on loopback); the loader streams
    them back, and a rerun finds everything done."""
    catalog = generate_sample_catalog(tmp_path / "cat", 30, seed=4)
    url = f"{s3_bucket}/shards"
    cfg = load_config(overrides=[f"data.catalog.source={catalog}", f"data.shards.dir={url}",
                                 "data.shards.samples_per_shard=8", "data.images.max_side=96"])
    manifest = prepare(cfg.data)
    fs = fsspec.filesystem("s3")
    names = sorted(p.rsplit("/", 1)[1] for p in fs.ls(url, detail=False))
    assert {s["name"] for s in manifest["shards"]} <= set(names)
    assert {"manifest.json", "rejects.jsonl", "_progress"} <= set(names)
    assert not any(n.endswith(".partial") for n in fs.find(url))
    assert load_manifest(url) == manifest
    shards = split_shards(url, "train")
    verify_shards(shards)
    items = list(ShardStream(shards, shuffle=False, infinite=False))
    assert len(items) == manifest["totals"]["train"]["samples"]
    assert all(isinstance(it["image"], Image.Image) and max(it["image"].size) <= 96 for it in items)
    with caplog.at_level("INFO", logger="vlmtune"):
        assert prepare(cfg.data) == manifest
    assert f"{url}: all 30 records are in finished shards, nothing to fetch" in caplog.messages


def test_hugging_face_data_set_source(tmp_path):
    """A data set directory goes through `datasets.load_dataset` (streamed), as a hub id would (offline here)."""
    csv_path = generate_sample_catalog(tmp_path / "cat", 5, seed=1)
    frame = pd.read_csv(csv_path, dtype=str)
    frame["imageurl"] = [str(csv_path.parent / p) for p in frame["imageurl"]]
    frame["full_price"] = frame["full_price"].astype(float)  # typed columns, as on the hub
    frame["product_code"] = frame["product_code"].astype(int)
    dataset_dir = tmp_path / "DBQ-like"
    (dataset_dir / "data").mkdir(parents=True)
    frame.to_parquet(dataset_dir / "data" / "train-00000-of-00001.parquet")
    rows = read_catalog(load_config(overrides=[f"data.catalog.source={dataset_dir}"]).data.catalog)
    assert [r["id"] for r in rows.records] == [str(c) for c in frame["product_code"]]
    assert rows.records[0]["full_price"] == float(frame["full_price"][0]) and not rows.rejects
    chunked = load_config(overrides=[f"data.catalog.source={dataset_dir}", "data.catalog.chunk_rows=2"])
    assert [len(chunk) for chunk in stream_catalog(chunked.data.catalog)] == [2, 2, 1]  # streamed, 2 rows at a time
    assert read_catalog(chunked.data.catalog).records == rows.records


@pytest.mark.slow
def test_sample_cli_and_inspect(ray_local, tmp_path):
    env = {"RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    out = tmp_path / "shards"
    done = subprocess.run([sys.executable, str(REPO / "jobs/prepare_data.py"), "--sample", "24", "--seed", "2",
                           "--out", str(out), "data.shards.samples_per_shard=10"], capture_output=True, text=True,
                          env={**__import__("os").environ, **env})
    assert done.returncode == 0, done.stderr[-2000:]
    assert '"samples"' in done.stdout and (out / "prepare-config.yaml").exists()
    rows = list(csv.DictReader((out / "_catalog" / "catalog.csv").open(encoding="utf-8")))
    assert len(rows) == 24
    sheet = tmp_path / "sheet.png"
    shown = subprocess.run([sys.executable, str(REPO / "jobs/inspect_shards.py"), str(out), "--n", "8",
                            "--out", str(sheet)], capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert "contact sheet of 8 train samples" in shown.stdout and '"train"' in shown.stdout
    with Image.open(sheet) as image:
        assert image.size[0] == 6 * 220 and image.size[1] > 220
        colours = {image.getpixel((x, y)) for x, y in itertools.product(range(0, 1320, 40), range(0, 200, 20))}
        assert len(colours) > 5  # images were drawn, not a blank canvas
