"""Batch inference over shards or a raw catalog → a Parquet dataset (resumable).

    python jobs/predict.py --model outputs/runs/x/export --input outputs/shards --output preds.parquet
    python jobs/predict.py --model outputs/runs/x/export --input new-products.csv --output preds.parquet

--input: a shard directory (its --split is read) or a catalog file (CSV/Parquet/JSONL, fetched and
resized by the same image pipeline as prepare). --output is a Parquet dataset directory; rerunning
skips the ids already in it.
"""

from __future__ import annotations

import argparse
import sys

from vlmtune.config import ConfigError, load_config
from vlmtune.data.catalog import CatalogError
from vlmtune.data.shards import ShardError
from vlmtune.eval.predict import predict
from vlmtune.jobs_common import announce_config, setup_logging


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="export dir, hub id or tiny-phi3v")
    parser.add_argument("--input", required=True, help="shard directory or catalog file")
    parser.add_argument("--output", required=True, help="Parquet dataset directory")
    parser.add_argument("--split", default="val", choices=["train", "val"])
    parser.add_argument("--max-samples", type=int)
    parser.add_argument("--rows-per-part", type=int, default=256, help="rows per Parquet part file")
    parser.add_argument("--config", help="YAML config for prompt, model and image settings")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. eval.batch_size=32")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        cfg = load_config(args.config, args.overrides)
        announce_config(cfg, args.output, "_predict")  # "_" files are skipped by Parquet dataset readers
        frame = predict(cfg, args.model, args.input, args.output, split=args.split, max_samples=args.max_samples,
                        rows_per_part=args.rows_per_part)
    except (ConfigError, ShardError, CatalogError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{len(frame)} predictions in {args.output} ({int(frame['error'].notna().sum())} with errors)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
