"""Checkpoint → Hugging Face directory (merged LoRA by default, or the adapter alone).

    python jobs/export.py CHECKPOINT_DIR OUT_DIR [--adapter-only] [--dtype bfloat16]

CHECKPOINT_DIR is a Ray Train checkpoint of a vlmtune run (…/<run_name>/checkpoint-NNNNNNN); the config
stored inside it says which base model and adapters to rebuild.
"""

from __future__ import annotations

from pathlib import Path

from vlmtune import runs
from vlmtune.cli import exit_with, job_parser
from vlmtune.console import console
from vlmtune.export import export_checkpoint


def main(args) -> int:
    runs.read_trainer_state(args.checkpoint)  # a clear error when this is not a vlmtune checkpoint
    stored = runs.read_config(args.checkpoint).export
    console.open_log(str(Path(args.checkpoint).resolve().parent / runs.LOGS))
    export = stored.model_copy(update={"merge_lora": stored.merge_lora and not args.adapter_only,
                                       "dtype": args.dtype or stored.dtype})
    console.say(str(export_checkpoint(args.checkpoint, args.out, export)))
    return 0


def parser():
    p = job_parser(__doc__, config=False)
    p.add_argument("checkpoint")
    p.add_argument("out")
    p.add_argument("--adapter-only", action="store_true", help="write the PEFT adapter, not merged weights")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"])
    return p


if __name__ == "__main__":
    exit_with("export", parser(), main)
