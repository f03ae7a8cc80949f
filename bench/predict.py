"""Batched generation against one-at-a-time generation, same model, same samples, same run.

    python bench/predict.py [--samples 32] [--batch 16] [--max-new-tokens 48] [--model tiny-phi3v]

Both paths use vlmtune.eval.generate (greedy, KV cache); batching uses left padding. The ratio
batched/single samples/s is the figure.
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

import torch

from vlmtune.config import PromptConfig, load_config
from vlmtune.data.collate import SampleEncoder
from vlmtune.data.prepare import prepare
from vlmtune.data.shards import ShardStream, split_shards
from vlmtune.eval.generate import generate_answers
from vlmtune.models.loading import load


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--model", default="tiny-phi3v")
    parser.add_argument("--dir", default="outputs/bench/predict-shards")
    args = parser.parse_args()

    cfg = load_config(overrides=["data.catalog.sample_size=200", f"data.shards.dir={args.dir}",
                                 "data.images.max_side=256"])
    if not Path(args.dir, "manifest.json").exists():
        prepare(cfg.data)
    torch.manual_seed(0)
    model, processor = load(args.model)
    encoder = SampleEncoder(processor, PromptConfig(), 4096, with_answer=False)
    stream = ShardStream(split_shards(args.dir, "train"), shuffle=False, transform=encoder)
    samples = list(itertools.islice(iter(stream), args.samples))
    device = torch.device("cpu")

    def run(batch: int) -> float:
        start = time.perf_counter()
        for i in range(0, len(samples), batch):
            generate_answers(model, processor, samples[i : i + batch], args.max_new_tokens, device)
        return len(samples) / (time.perf_counter() - start)

    run(args.batch)  # warm-up
    single, batched = run(1), run(args.batch)
    print(f"\n{args.samples} samples, {args.model}, greedy, max_new_tokens={args.max_new_tokens}, CPU\n")
    print(f"{'mode':<28}{'samples/s':>12}")
    print(f"{'one at a time (batch 1)':<28}{single:>12.2f}")
    print(f"{f'batched (batch {args.batch})':<28}{batched:>12.2f}")
    print(f"\nratio batched/single: {batched / single:.2f}x")


if __name__ == "__main__":
    main()
