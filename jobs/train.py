"""Fine-tune Phi-3-Vision with Ray Train + DeepSpeed.

    python jobs/train.py --config configs/phi3v-burberry-lora.yaml [key=value ...]
    ray job submit --working-dir . -- python jobs/train.py --config configs/phi3v-burberry-lora.yaml

Connects to the cluster in RAY_ADDRESS (set by `ray job submit`) or starts a local Ray. Running it again
with the same cluster.run_name and cluster.storage_path resumes from the latest checkpoint.
"""

from __future__ import annotations

import argparse
import json
import sys

from vlmtune.config import ConfigError, load_config
from vlmtune.data.shards import ShardError
from vlmtune.jobs_common import announce_config, setup_logging
from vlmtune.launch.ray import PreflightError, storage_path, train


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config (default: the built-in CPU demo)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=50")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        cfg = load_config(args.config, args.overrides)
        announce_config(cfg, f"{storage_path(cfg)}/{cfg.cluster.run_name}", "train")
        outputs = train(cfg)
    except (ConfigError, ShardError, PreflightError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(outputs, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
