"""The whole pipeline on one machine: sample catalog → shards → Ray Train + DeepSpeed → export → evaluate.

    python jobs/demo.py [--config configs/demo-cpu.yaml] [key=value ...]

Evaluates the untrained base model and the fine-tuned export on the same val shards, so the gain is
visible, then prints where the shards, checkpoints, export, reports and W&B offline run are.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vlmtune.config import ConfigError, load_config
from vlmtune.data.prepare import prepare
from vlmtune.eval.evaluate import evaluate
from vlmtune.jobs_common import announce_config, setup_logging
from vlmtune.launch.ray import PreflightError, storage_path, train
from vlmtune.tracking import read_metrics

ROWS = [("val loss (teacher forced)", "eval_loss"), ("answer parses", "parse_rate"),
        ("category path accuracy", "category_path_acc"), ("top category accuracy", "category_top_acc"),
        ("price MAPE", "price_mape"), ("price within 10%", "price_within_10pct"), ("title chrF", "title_chrf")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/demo-cpu.yaml")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    run = f"{storage_path(cfg)}/{cfg.cluster.run_name}"
    announce_config(cfg, run, "demo")

    print("\n== 1/4 prepare: sample catalog → WebDataset shards", flush=True)
    manifest = prepare(cfg.data)
    print(json.dumps(manifest["totals"]))

    eval_dir = Path(cfg.eval.output_dir)
    print("\n== 2/4 evaluate the untrained base model", flush=True)
    before_cfg = cfg.model_copy(deep=True)
    before_cfg.eval.output_dir = str(eval_dir / "before")
    before = evaluate(before_cfg, cfg.model.name_or_path)["overall"]

    print("\n== 3/4 train: Ray Train + DeepSpeed", flush=True)
    try:
        outputs = train(cfg)
    except PreflightError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    print("\n== 4/4 evaluate the fine-tuned export", flush=True)
    after_cfg = cfg.model_copy(deep=True)
    after_cfg.eval.output_dir = str(eval_dir / "after")
    after = evaluate(after_cfg, outputs["export"])["overall"]

    losses = [r["eval_loss"] for r in read_metrics(run) if "eval_loss" in r]
    before["eval_loss"], after["eval_loss"] = losses[0], losses[-1]
    print(f"\n{'metric':<28}{'before':>10}{'after':>10}")
    for label, key in ROWS:
        print(f"{label:<28}{before.get(key, float('nan')):>10.3f}{after.get(key, float('nan')):>10.3f}")
    print(f"\nshards:      {cfg.data.shards.dir}\ncheckpoint:  {outputs['checkpoint']}\nexport:      "
          f"{outputs['export']}\nreports:     {eval_dir}/before, {eval_dir}/after\nW&B offline: {run}/wandb "
          f"(wandb sync <offline-run dir>)\nmetrics:     {run}/metrics.jsonl")
    return 0


if __name__ == "__main__":
    sys.exit(main())
