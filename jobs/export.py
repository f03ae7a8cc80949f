"""Checkpoint → Hugging Face directory (merged LoRA by default, or the adapter alone).

    python jobs/export.py CHECKPOINT_DIR OUT_DIR [--adapter-only] [--dtype bfloat16]

CHECKPOINT_DIR is a Ray Train checkpoint of a vlmtune run (…/<run_name>/checkpoint-NNNNNNN); the config
stored inside it says which base model and adapters to rebuild.
"""

from __future__ import annotations

import argparse
import sys

from vlmtune.config import ExportConfig, load_config
from vlmtune.jobs_common import setup_logging
from vlmtune.train.export import export_checkpoint


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("out")
    parser.add_argument("--adapter-only", action="store_true", help="write the PEFT adapter, not merged weights")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"])
    args = parser.parse_args(argv)
    setup_logging()
    stored = load_config(f"{args.checkpoint.rstrip('/')}/config.yaml").export
    export = ExportConfig(merge_lora=stored.merge_lora and not args.adapter_only, dtype=args.dtype or stored.dtype)
    print(export_checkpoint(args.checkpoint, args.out, export))
    return 0


if __name__ == "__main__":
    sys.exit(main())
