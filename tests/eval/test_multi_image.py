"""Products with two images (front and back) end to end on the tiny model: prepare → inspect → train (Ray Train
+ DeepSpeed) → evaluate → predict new products from a catalog holding only ids and image URLs."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageOps

from vlmtune.config import load_config
from vlmtune.data.inspect import CELL, contact_sheet
from vlmtune.data.prepare import prepare
from vlmtune.data.sample import generate_sample_catalog
from vlmtune.data.shards import ShardStream, split_shards
from vlmtune.eval.evaluate import evaluate
from vlmtune.eval.predict import predict
from vlmtune.launch.ray import train

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def with_back_images(csv_path: Path) -> Path:
    """Give every product a second photo (its mirror image, in grey) in a `back_imageurl` column."""
    rows = list(csv.DictReader(csv_path.open(encoding="utf-8")))
    for row in rows:
        front = csv_path.parent / row["imageurl"]
        back = front.with_name(f"{front.stem}-back.png")
        ImageOps.grayscale(ImageOps.mirror(Image.open(front))).save(back)
        row["back_imageurl"] = str(back.relative_to(csv_path.parent))
    with csv_path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return csv_path


def test_two_images_per_product_from_prepare_to_predict(ray_local, tmp_path):
    catalog = with_back_images(generate_sample_catalog(tmp_path / "cat", 24, seed=8))
    cfg = load_config(REPO / "configs/demo-cpu.yaml", [
        f"data.catalog.source={catalog}", "data.catalog.columns.image=[imageurl, back_imageurl]",
        "data.images.max_per_product=2", "data.images.max_side=96", f"data.shards.dir={tmp_path / 'shards'}",
        "data.shards.samples_per_shard=8", "data.shards.val_fraction=0.25", "data.loader.num_workers=0",
        f"cluster.storage_path={tmp_path / 'runs'}", "cluster.run_name=two-images", "cluster.num_workers=1",
        "train.max_steps=2", "train.micro_batch_size=2", "train.eval_every=0", "train.eval_batches=1",
        "train.table_samples=1", "train.checkpoint_every=2", "train.log_every=1", "tracking.mode=disabled",
        f"eval.output_dir={tmp_path / 'eval'}", "eval.max_new_tokens=8", "eval.batch_size=4"])

    manifest = prepare(cfg.data)
    for split in ("train", "val"):
        assert manifest["totals"][split]["images"] == 2 * manifest["totals"][split]["samples"] > 0
    item = next(iter(ShardStream(split_shards(cfg.data.shards.dir, "val"), shuffle=False, infinite=False)))
    front, back = item["images"]
    assert back.size == front.size and item["meta"]["source"]["images"][1].endswith("-back.png")

    sheet = tmp_path / "sheet.png"
    assert contact_sheet(cfg.data.shards.dir, "train", 6, str(sheet)) == 6
    with Image.open(sheet) as image:  # each cell: the colour front on the left, the grey back on the right
        pixels = np.asarray(image.convert("RGB"), dtype=int)[:CELL, : 6 * CELL].reshape(CELL, 6, CELL, 3)
    colourfulness = np.abs(pixels - pixels.mean(axis=-1, keepdims=True)).max(axis=-1)  # 0 for greys
    fronts, backs = colourfulness[:, :, : CELL // 2], colourfulness[:, :, CELL // 2 :]
    assert fronts.max() > 40 and backs.max() < 8
    assert all(len(np.unique(pixels[:, cell, CELL // 2 :].reshape(-1, 3), axis=0)) > 3 for cell in range(6))

    outputs = train(cfg)
    assert outputs["checkpoint"].endswith("checkpoint-0000002")
    metrics = evaluate(cfg, outputs["export"])
    assert metrics["samples"] == manifest["totals"]["val"]["samples"]

    new = catalog.parent / "new-products.csv"  # no title, category or price yet: what the model is for
    pd.read_csv(catalog, dtype=str)[["product_code", "imageurl", "back_imageurl"]].head(5).to_csv(new, index=False)
    frame = predict(cfg, outputs["export"], str(new), str(tmp_path / "preds"))
    assert len(frame) == 5 and frame["error"].isna().all()
    assert (frame["target"] == "").all() and frame["full_price"].isna().all() and frame["title"].isna().all()
