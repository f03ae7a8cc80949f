"""Catalog → WebDataset shards.

    python jobs/prepare_data.py --config configs/phi3v-burberry-lora.yaml [key=value ...]
    python jobs/prepare_data.py --sample 400 --out outputs/sample-shards
    ray job submit --working-dir . -- python jobs/prepare_data.py --config ...
"""

from __future__ import annotations

import argparse
import json
import sys

from vlmtune.config import ConfigError, load_config
from vlmtune.data.catalog import CatalogError
from vlmtune.data.prepare import prepare
from vlmtune.data.shards import ShardError
from vlmtune.jobs_common import announce_config, setup_logging


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config (default: built-in defaults)")
    parser.add_argument("--sample", type=int, metavar="N", help="use a synthetic catalog of N products")
    parser.add_argument("--seed", type=int, help="seed of the synthetic catalog")
    parser.add_argument("--out", help="shard directory (overrides data.shards.dir)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.shards.samples_per_shard=500")
    args = parser.parse_args(argv)
    setup_logging()

    overrides = list(args.overrides)
    if args.sample:
        overrides += ["data.catalog.source=sample", f"data.catalog.sample_size={args.sample}"]
    if args.seed is not None:
        overrides.append(f"data.catalog.sample_seed={args.seed}")
    if args.out:
        overrides.append(f"data.shards.dir={args.out}")
    try:
        cfg = load_config(args.config, overrides)
        announce_config(cfg, cfg.data.shards.dir, "prepare")
        manifest = prepare(cfg.data)
    except (ConfigError, CatalogError, ShardError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"shards": cfg.data.shards.dir, **manifest["totals"],
                      "reject_reasons": manifest["reject_reasons"]}, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
