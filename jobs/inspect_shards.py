"""Look at prepared shards: manifest totals, reject reasons, and a contact sheet of labelled images (a product's
several images side by side).

    python jobs/inspect_shards.py outputs/demo/shards [--split val] [--n 24] [--out sheet.png]
"""

from __future__ import annotations

import json

from vlmtune.cli import exit_with, job_parser
from vlmtune.console import console
from vlmtune.data.inspect import contact_sheet
from vlmtune.data.shards import load_manifest


def main(args) -> int:
    manifest = load_manifest(args.shard_dir)
    out = args.out or f"{args.shard_dir.rstrip('/')}/contact-{args.split}.png"
    shown = contact_sheet(args.shard_dir, args.split, args.n, out)
    console.say(json.dumps({"source": manifest["source"], "totals": manifest["totals"],
                            "reject_reasons": manifest["reject_reasons"]}, indent=2, ensure_ascii=False))
    console.say(f"contact sheet of {shown} {args.split} samples: {out}")
    return 0


def parser():
    p = job_parser(__doc__, config=False)
    p.add_argument("shard_dir")
    p.add_argument("--split", default="train", choices=["train", "val"])
    p.add_argument("--n", type=int, default=24, help="images on the contact sheet")
    p.add_argument("--out", help="PNG path (default: <shard_dir>/contact-<split>.png)")
    return p


if __name__ == "__main__":
    exit_with("inspect", parser(), main)
