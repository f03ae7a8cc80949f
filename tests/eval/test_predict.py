"""evaluate and predict end to end: Ray Data actor pool, tiny model, real shards, resumable Parquet."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from vlmtune.config import load_config
from vlmtune.data.shards import split_shards
from vlmtune.eval.evaluate import evaluate
from vlmtune.eval.predict import predict

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow
FAST = ["eval.max_new_tokens=6", "eval.batch_size=4", "tracking.mode=offline"]


def val_ids(shards: str) -> list[str]:
    from vlmtune.data.shards import read_metadata

    return sorted(m["id"] for m in read_metadata(split_shards(shards, "val")))


def test_evaluate_writes_a_full_report(sample_shards, tmp_path):
    cfg = load_config(overrides=[f"data.shards.dir={sample_shards}", f"eval.output_dir={tmp_path}",
                                 "eval.num_actors=2", *FAST])
    metrics = evaluate(cfg, "tiny-phi3v")
    assert metrics["samples"] == len(val_ids(sample_shards))
    assert json.loads((tmp_path / "metrics.json").read_text())["overall"]["n"] == metrics["samples"]
    frame = pd.read_parquet(tmp_path / "predictions.parquet")
    assert sorted(frame["id"]) == val_ids(sample_shards)
    assert frame["image"].str.contains("#").all() and frame["target"].str.startswith("Product: ").all()
    for name in ("price_scatter", "category_errors", "confusion", "examples"):
        with Image.open(tmp_path / f"{name}.png") as image:
            image.load()
            assert min(image.size) > 200
    assert "majority_category_path_acc" in metrics["baselines"]
    assert list(tmp_path.glob("wandb/offline-run-*/files/media/table/eval/predictions_*.table.json"))


def test_predict_resumes_without_duplicates(sample_shards, tmp_path, ray_local):
    out = tmp_path / "preds.parquet"
    env = dict(os.environ, RAY_ADDRESS=ray_local.get_runtime_context().gcs_address)
    cmd = [sys.executable, str(REPO / "jobs/predict.py"), "--model", "tiny-phi3v", "--input", sample_shards,
           "--output", str(out), "--split", "train", "--rows-per-part", "8", "eval.max_new_tokens=24",
           "eval.batch_size=2"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not list(out.glob("part-*.parquet")):
        time.sleep(0.1)
    assert proc.poll() is None, "predict finished before it could be interrupted"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    written_before = pd.read_parquet(out)
    assert len(written_before) > 0

    cfg = load_config(overrides=["eval.max_new_tokens=6", "eval.batch_size=8"])
    frame = predict(cfg, "tiny-phi3v", sample_shards, str(out), split="train")
    train_ids = sorted(m for s in split_shards(sample_shards, "train") for m in _ids(s.url))
    assert sorted(frame["id"]) == train_ids  # complete, and no id twice
    kept = frame.set_index("id").loc[written_before["id"], "generated"]
    assert list(kept) == list(written_before["generated"])  # earlier parts were not redone


def _ids(url: str) -> list[str]:
    from vlmtune.data.shards import raw_samples

    return [json.loads(r["json"])["id"] for r in raw_samples(url)]


def test_predict_prices_new_products_from_ids_and_images_alone(tmp_path, ray_local, caplog):
    """A catalog of new products holds only `product_code` and `imageurl`: every id gets a prediction or the
    reason it could not (in the output, or said on the console for a row without any image), the target
    columns stay empty."""
    from vlmtune.data.sample import generate_sample_catalog

    csv_path = generate_sample_catalog(tmp_path / "cat", 6, seed=9)
    rows = list(csv.DictReader(csv_path.open(encoding="utf-8")))
    rows[2]["imageurl"] = "images/missing.jpg"
    new = csv_path.parent / "new-products.csv"
    with new.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["product_code", "imageurl"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows([*rows, {"product_code": "no-photo", "imageurl": ""}])
    cfg = load_config(overrides=FAST)
    with caplog.at_level("WARNING", logger="vlmtune"):
        frame = predict(cfg, "tiny-phi3v", str(new), str(tmp_path / "out"))
    assert f"{new}: 1 row(s) not predicted, e.g. row 6: missing image (column 'imageurl')" in caplog.messages
    assert sorted(frame["id"]) == sorted(r["product_code"] for r in rows)
    bad = frame.set_index("id").loc[rows[2]["product_code"]]
    assert "local file not found" in bad["error"] and bad["generated"] == ""
    assert frame["error"].isna().sum() == 5
    assert (frame["target"] == "").all() and frame[["title", "category", "full_price"]].isna().all().all()
    assert frame["currency"].eq("USD").all()  # data.catalog.default_currency
