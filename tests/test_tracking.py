"""Tracker: metrics.jsonl on rank 0 only, tables without images, W&B offline with a resumable run id."""

from __future__ import annotations

import json

from PIL import Image

from tests.wandb_records import history, run_id
from vlmtune.config import TrackingConfig
from vlmtune.tracking import Tracker, read_metrics


def test_only_the_active_rank_writes(tmp_path):
    Tracker(TrackingConfig(mode="disabled"), str(tmp_path / "r1"), "run", {}, active=False).log({"loss": 1.0}, 1)
    assert not (tmp_path / "r1").exists()


def test_metrics_jsonl_holds_scalars_and_tables_without_images(tmp_path):
    tracker = Tracker(TrackingConfig(mode="disabled"), str(tmp_path), "run", {})
    tracker.log({"loss": 2.5}, 1)
    tracker.log_table("eval/samples", ["id", "image", "text"], [["a", Image.new("RGB", (4, 4)), "hi"]], 1)
    tracker.log({"loss": 1.5}, 2)
    tracker.finish()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[1] == {"step": 1, "table": "eval/samples", "rows": [{"id": "a", "text": "hi"}]}
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 2.5}, {"step": 2, "loss": 1.5}]


def test_offline_wandb_run_continues_under_the_same_id(tmp_path):
    cfg = TrackingConfig(mode="offline", project="p")
    first = Tracker(cfg, str(tmp_path), "run", {"a": 1})
    first.log({"loss": 3.0}, 1)
    first.finish()
    second = Tracker(cfg, str(tmp_path), "run", {"a": 1}, run_id=first.run_id)
    second.log({"loss": 2.0}, 2)
    second.finish()
    assert second.run_id == first.run_id
    files = sorted(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))
    assert run_id(files[0]) == first.run_id  # a resumed offline run's file need not repeat the run record
    assert [r["loss"] for f in files for r in history(f)] == [3.0, 2.0]
