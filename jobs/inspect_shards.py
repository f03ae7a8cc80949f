"""Look at prepared shards: manifest totals, reject reasons, and a contact sheet of labelled images.

    python jobs/inspect_shards.py outputs/demo/shards [--split val] [--n 24] [--out sheet.png]
"""

from __future__ import annotations

import argparse
import json
import sys

from vlmtune.data.inspect import contact_sheet
from vlmtune.data.shards import ShardError, load_manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shard_dir")
    parser.add_argument("--split", default="train", choices=["train", "val"])
    parser.add_argument("--n", type=int, default=24, help="images on the contact sheet")
    parser.add_argument("--out", help="PNG path (default: <shard_dir>/contact-<split>.png)")
    args = parser.parse_args(argv)
    try:
        manifest = load_manifest(args.shard_dir)
        out = args.out or f"{args.shard_dir.rstrip('/')}/contact-{args.split}.png"
        shown = contact_sheet(args.shard_dir, args.split, args.n, out)
    except ShardError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"source": manifest["source"], "totals": manifest["totals"],
                      "reject_reasons": manifest["reject_reasons"]}, indent=2, ensure_ascii=False))
    print(f"contact sheet of {shown} {args.split} samples: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
