"""Evaluate a model on the val shards: metrics.json, predictions.parquet, plots, W&B table.

    python jobs/evaluate.py --config configs/phi3v-burberry-lora.yaml --checkpoint outputs/runs/x/export
    python jobs/evaluate.py --config configs/demo-cpu.yaml --checkpoint tiny-phi3v   # the untrained base

--checkpoint takes an export directory, a training checkpoint (exported first), a hub id or tiny-phi3v.
Runs generation as a Ray Data actor pool (eval.num_actors, one GPU each when cluster.use_gpu).
"""

from __future__ import annotations

import argparse
import json
import sys

from vlmtune.config import ConfigError, load_config
from vlmtune.data.shards import ShardError
from vlmtune.eval.evaluate import evaluate
from vlmtune.jobs_common import announce_config, setup_logging


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config (default: the built-in CPU demo)")
    parser.add_argument("--checkpoint", required=True, help="export dir, training checkpoint, hub id or tiny-phi3v")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. eval.max_samples=100")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        cfg = load_config(args.config, args.overrides)
        announce_config(cfg, cfg.eval.output_dir, "evaluate")
        metrics = evaluate(cfg, args.checkpoint)
    except (ConfigError, ShardError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"overall": metrics["overall"], "baselines": metrics["baselines"],
                      "report": cfg.eval.output_dir}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
