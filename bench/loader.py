"""Loader throughput: shard read → decode → resize, against plain PIL on the same JPEG bytes in memory.

    python bench/loader.py [--samples 600] [--max-side 768] [--resize 336]

Both paths do the same per-sample work (JPEG decode, RGB, resize the longer side to --resize); the
loader also reads the tar shards, groups members, parses the JSON record and tracks its position. The
ratio loader/baseline (single process, so per core) is the figure; the goal is ≥ 0.80.
"""

from __future__ import annotations

import argparse
import io
import time
from pathlib import Path

from PIL import Image

from vlmtune.config import load_config
from vlmtune.data.images import resize_max_side
from vlmtune.data.prepare import prepare
from vlmtune.data.shards import ShardStream, raw_samples, split_shards


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=600)
    parser.add_argument("--max-side", type=int, default=768, help="image size stored in the shards")
    parser.add_argument("--resize", type=int, default=336, help="longer side after decoding")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default="outputs/bench/loader-shards")
    args = parser.parse_args()

    shard_dir = f"{args.dir}-{args.samples}-{args.max_side}"
    if not Path(shard_dir, "manifest.json").exists():
        cfg = load_config(overrides=["data.catalog.source=sample", f"data.catalog.sample_size={args.samples}",
                                     f"data.images.max_side={args.max_side}", f"data.shards.dir={shard_dir}",
                                     "data.shards.val_fraction=0.0"])
        prepare(cfg.data)
    shards = split_shards(shard_dir, "train")
    n = sum(s.count for s in shards)
    jpegs = [raw["jpg"] for s in shards for raw in raw_samples(s.url)]

    def baseline() -> None:
        for data in jpegs:
            resize_max_side(Image.open(io.BytesIO(data)).convert("RGB"), args.resize)

    def loader() -> None:
        stream = ShardStream(shards, shuffle=True, shuffle_buffer=64, infinite=False,
                             transform=lambda s: {"image": resize_max_side(s["image"], args.resize)})
        count = sum(1 for item in stream if "skipped" not in item)
        assert count == n

    base_s = best_of(baseline, args.repeats)
    load_s = best_of(loader, args.repeats)
    rows = [("PIL decode+resize from memory (baseline)", n / base_s), ("ShardStream read+decode+resize", n / load_s)]
    print(f"\n{n} samples, stored max side {args.max_side}px, resized to {args.resize}px, 1 process\n")
    print(f"{'path':<44}{'samples/s/core':>16}")
    for name, rate in rows:
        print(f"{name:<44}{rate:>16.1f}")
    ratio = rows[1][1] / rows[0][1]
    print(f"\nratio loader/baseline: {ratio:.3f} (goal ≥ 0.80)")


if __name__ == "__main__":
    main()
