"""Batch inference over shards or a raw catalog → a Parquet dataset (resumable).

    python jobs/predict.py --model outputs/runs/x/export --input outputs/shards --output preds.parquet
    python jobs/predict.py --model outputs/runs/x/export --input new-products.csv --output preds.parquet

--model: an export directory, a training checkpoint (exported first), a hub id or tiny-phi3v. --input: a
shard directory (its --split is read) or a catalog file (CSV/Parquet/JSONL, fetched and resized by the same
image pipeline as prepare). A catalog needs only the id and image column(s) (data.catalog.columns): new
products without a title, category or price are what the model prices; label columns that are there are
kept as targets. --output is a Parquet dataset directory; rerunning skips the ids already in it.
"""

from __future__ import annotations

from vlmtune.cli import announce_config, exit_with, job_parser, load_job_config
from vlmtune.console import console
from vlmtune.eval.predict import predict
from vlmtune.export import resolve_model


def main(args) -> int:
    cfg = load_job_config(args)
    announce_config(cfg, f"{args.output.rstrip('/')}/_vlmtune", "predict")  # "_" is skipped by Parquet readers
    model = resolve_model(args.model, f"{args.output.rstrip('/')}/_vlmtune")
    frame = predict(cfg, model, args.input, args.output, split=args.split, max_samples=args.max_samples,
                    rows_per_part=args.rows_per_part)
    console.say(f"{len(frame)} predictions in {args.output} ({int(frame['error'].notna().sum())} with errors)")
    return 0


def parser():
    p = job_parser(__doc__)
    p.add_argument("--model", required=True, help="export dir, training checkpoint, hub id or tiny-phi3v")
    p.add_argument("--input", required=True, help="shard directory or catalog file")
    p.add_argument("--output", required=True, help="Parquet dataset directory")
    p.add_argument("--split", default="val", choices=["train", "val"])
    p.add_argument("--max-samples", type=int)
    p.add_argument("--rows-per-part", type=int, default=256, help="rows per Parquet part file")
    return p


if __name__ == "__main__":
    exit_with("predict", parser(), main)
