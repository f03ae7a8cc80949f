"""Evaluate a model on the val shards: metrics.json, predictions.parquet, plots, W&B table.

    python jobs/evaluate.py --config configs/phi3v-burberry-lora.yaml --checkpoint outputs/runs/x/export
    python jobs/evaluate.py --config configs/demo-cpu.yaml --checkpoint tiny-phi3v   # the untrained base

--checkpoint takes an export directory, a training checkpoint (exported first), a hub id or tiny-phi3v.
Runs generation as a Ray Data actor pool (eval.num_actors, one GPU each when cluster.use_gpu).
"""

from __future__ import annotations

import json

from vlmtune.cli import announce_config, exit_with, job_parser, load_job_config
from vlmtune.console import console
from vlmtune.eval.evaluate import evaluate


def main(args) -> int:
    cfg = load_job_config(args)
    announce_config(cfg, cfg.eval.output_dir, "evaluate")
    metrics = evaluate(cfg, args.checkpoint)
    console.say(json.dumps({"overall": metrics["overall"], "baselines": metrics["baselines"],
                            "report": cfg.eval.output_dir}, indent=2))
    return 0


def parser():
    p = job_parser(__doc__)
    p.add_argument("--checkpoint", required=True, help="export dir, training checkpoint, hub id or tiny-phi3v")
    return p


if __name__ == "__main__":
    exit_with("evaluate", parser(), main)
