"""Catalog → WebDataset shards.

    python jobs/prepare_data.py --config configs/phi3v-burberry-lora.yaml [key=value ...]
    python jobs/prepare_data.py --sample 400 --out outputs/sample-shards
    ray job submit --working-dir . -- python jobs/prepare_data.py --config ...
"""

from __future__ import annotations

import json

from vlmtune.cli import announce_config, exit_with, job_parser, load_job_config
from vlmtune.console import console
from vlmtune.data.prepare import prepare


def main(args) -> int:
    extra = []
    if args.sample:
        extra += ["data.catalog.source=sample", f"data.catalog.sample_size={args.sample}"]
    if args.seed is not None:
        extra.append(f"data.catalog.sample_seed={args.seed}")
    if args.out:
        extra.append(f"data.shards.dir={args.out}")
    cfg = load_job_config(args, extra)
    announce_config(cfg, cfg.data.shards.dir, "prepare")
    manifest = prepare(cfg.data)
    console.say(json.dumps({"shards": cfg.data.shards.dir, **manifest["totals"],
                            "reject_reasons": manifest["reject_reasons"]}, indent=2, ensure_ascii=False))
    return 0


def parser():
    p = job_parser(__doc__)
    p.add_argument("--sample", type=int, metavar="N", help="use a synthetic catalog of N products")
    p.add_argument("--seed", type=int, help="seed of the synthetic catalog")
    p.add_argument("--out", help="shard directory (overrides data.shards.dir)")
    return p


if __name__ == "__main__":
    exit_with("prepare", parser(), main)
