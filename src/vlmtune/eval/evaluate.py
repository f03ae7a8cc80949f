"""evaluate: generate answers for a split of the shards, score them, write the report.

The model is a name or directory `load()` understands (an export, a hub id, `tiny-phi3v`) or a vlmtune
training checkpoint, which is exported to `<output_dir>/model` first.
"""

from __future__ import annotations

from pathlib import Path

from vlmtune.config import Config
from vlmtune.data.shards import read_metadata, split_shards
from vlmtune.eval.predict import predict
from vlmtune.eval.report import write_report
from vlmtune.export import resolve_model
from vlmtune.tracking import Tracker


def evaluate(cfg: Config, model: str) -> dict:
    out = Path(cfg.eval.output_dir)
    model = resolve_model(model, out)
    frame = predict(cfg, model, cfg.data.shards.dir, str(out / "predictions-parts"), split=cfg.eval.split,
                    max_samples=cfg.eval.max_samples)
    train_meta = read_metadata(split_shards(cfg.data.shards.dir, "train"))
    tracker = None
    if cfg.tracking.mode != "disabled":
        tracker = Tracker(cfg.tracking, str(out), f"{cfg.cluster.run_name}-eval",
                          {"model": model, **cfg.model_dump(mode="json")})
    try:
        metrics = write_report(frame, train_meta, out, tracker)
    finally:
        if tracker is not None:
            tracker.finish()
    return metrics
