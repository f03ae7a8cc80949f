"""Training throughput by batching mode, and vlmtune's training path against a bare PyTorch loop, in one run.

    python bench/train_step.py [--steps 30] [--rounds 1] [--micro-batch 8] [--modes pad length packed]
                               [--zero-stage 0] [--interleaved 150]

Data: shards of the synthetic sample catalog (data/sample.py: aspect ratios 0.6 to 1.6, titles of two to five
words, 240 to 720 px photos), prepared once with the library's `prepare` under `--dir`.

1. Batching at real size (no model). Each train sample's token count as Phi-3-vision-128k would see it: its
   image slots from the official image processor settings at `num_crops=16` (336-px tiles, 144 tokens a
   crop; no pixels are processed) plus its text tokens (byte-level tokenizer), ~2,000 to ~2,700 tokens a
   sample. Each mode's micro-batches planned by `data/batching.plan_batches` window by window: padding share
   (pad positions / all positions) and how full the token budget is.
2. Timed steps, tiny model (`tiny-phi3v`, fp32, num_crops 16, DeepSpeed on gloo, one thread), for each mode:
   bare:    the same micro-batches (`MicroBatches` on the same stream, collated beforehand and held in
            memory) through the model and torch AdamW: forward, backward, gradient clipping at
            `train.grad_clip`, step, schedule; one thread, no Ray, no DeepSpeed.
   bare-live: the same loop reading the stream as it trains, one DataLoader process decoding as in the
            worker: what a plain loop over these shards pays on this machine (the decoder shares its cores).
   vlmtune: jobs/train.py's path: one Ray Train worker with 1 CPU running train/loop.py (DeepSpeed engine,
            shard stream decoding JPEGs and running the HD transform in one DataLoader process, the step's
            answer-token all_reduce, metrics, progress), its tokens/s and padding share as it logs them.
   The worker runs ZeRO stage `--zero-stage`: 0 by default, what one worker should run (ZeRO-1/2 partition
   nothing on one rank, yet DeepSpeed's gradient bucketing costs ~10% of this model's step; `--zero-stage 2`
   measures it).
   Each reports the median rate over `--log-every`-step intervals after the first (the warm-up). The three
   run one after the other (`--rounds` times per mode), and the ratios vlmtune/bare and vlmtune/bare-live
   are taken per round, so a change in the machine's load during the run moves all three. On a machine
   shared with other work, pair whole processes instead: `--only bare`, `--only bare-live` and
   `--only vlmtune` each print one run's figures as a JSON line.
3. Interleaved, one process, no Ray (`--interleaved N` steps per mode): two copies of the model from the same
   seed take turns micro-batch by micro-batch, one through the bare step on micro-batches collated
   beforehand, the other through the worker's `train_step` (DeepSpeed engine, the loss all_reduce, metrics)
   on the live stream (one DataLoader process decoding). A drift in the machine's speed then moves both
   alike: the ratio is what vlmtune's own per-step code and hand-over cost. It leaves out what part 2 adds:
   Ray's processes and the decoding process competing with the training process for the cores (the
   decoder runs during both halves here).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

import ray
import torch
import torch.distributed as dist

from vlmtune.config import BatchingConfig, Config, load_config
from vlmtune.data.batching import MicroBatches, plan_batches
from vlmtune.data.collate import SampleEncoder
from vlmtune.data.prepare import prepare
from vlmtune.data.shards import ShardStream, split_shards
from vlmtune.launch.ray import train
from vlmtune.models.loading import prepare_model
from vlmtune.models.phi3v.image_processing import Phi3VImageProcessor
from vlmtune.models.phi3v.presets import OFFICIAL_PREPROCESSORS, PHI3_VISION_128K
from vlmtune.tracking import read_metrics
from vlmtune.train.engine import build_engine, lr_lambda, parameter_groups
from vlmtune.train.loop import Worker, train_step
from vlmtune.train.metrics import FlopCounter, Throughput

MODES = ("pad", "length", "packed")
PATHS = ("bare", "bare-live", "vlmtune")


def base_config(args) -> Config:
    return load_config("configs/demo-cpu.yaml", [
        f"data.shards.dir={args.dir}", f"data.catalog.sample_size={args.samples}", "data.shards.samples_per_shard=64",
        "data.images.max_side=256", "data.loader.num_workers=1", "model.num_crops=16", "model.max_length=4096",
        f"train.micro_batch_size={args.micro_batch}", f"train.log_every={args.log_every}", "train.eval_every=0",
        "train.table_samples=0", "train.eval_batches=1", "export.enabled=false", "tracking.mode=disabled",
        "cluster.max_failures=0", "cluster.num_workers=1", "cluster.cpus_per_worker=1",
        f"train.zero_stage={args.zero_stage}"])


def with_mode(cfg: Config, mode: str, max_tokens: int | None) -> Config:
    out = cfg.model_copy(deep=True)
    out.data.batching = BatchingConfig(mode=mode, max_tokens=None if mode == "pad" else max_tokens)
    if mode != "pad":  # a budget must hold the longest sample the model accepts
        out.model.max_length = min(out.model.max_length, max_tokens)
    return out


def token_budget(lengths: list[int], batch_size: int) -> int:
    """The budget a pad-mode micro-batch holds on average (and at least the longest sample), to the next 64."""
    budget = max(max(lengths), round(statistics.mean(lengths) * batch_size))
    return -(-budget // 64) * 64


# ---- 1. batching statistics at real size -------------------------------------------------------------------------

def token_counts(cfg: Config) -> dict[str, list[int]]:
    """Tokens of every train sample in stream order: as tiny-phi3v's processor encodes it (`tiny`) and as
    Phi-3-vision-128k's would at num_crops=16 (`real`: the same text, the real image processor's slot count)."""
    _, processor = prepare_model(cfg.model, torch.float32)
    encoder = SampleEncoder(processor, cfg.data.prompt, cfg.model.max_length)
    real = Phi3VImageProcessor(**{**OFFICIAL_PREPROCESSORS[PHI3_VISION_128K], "num_crops": 16})

    def counts(sample: dict) -> dict:
        encoded = encoder(sample)
        text = len(encoded["input_ids"]) - encoded["image_tokens"]
        image = real.calc_num_image_tokens_from_image_size(sample["image"].width, sample["image"].height)
        return {"tiny": len(encoded["input_ids"]), "real": text + image, "real_image": image}

    stream = ShardStream(split_shards(cfg.data.shards.dir, "train"), seed=cfg.data.loader.seed,
                         shuffle_buffer=cfg.data.loader.shuffle_buffer, infinite=False, transform=counts)
    items = [s for s in stream if "skipped" not in s]
    return {k: [s[k] for s in items] for k in ("tiny", "real", "real_image")}


def batching_stats(lengths: list[int], mode: str, batch_size: int, max_tokens: int, long_from: int) -> dict:
    """Plan the stream window by window, as `MicroBatches` does, and count positions."""
    import random

    window = batch_size if mode == "pad" else BatchingConfig().lookahead
    tokens = positions = batches = 0
    for start in range(0, len(lengths) - window + 1, window):
        part = lengths[start : start + window]
        for batch in plan_batches(part, mode, batch_size, max_tokens, long_from, random.Random(start)):
            sizes = [part[i] for i in batch]
            tokens += sum(sizes)
            positions += sum(sizes) if mode == "packed" else len(sizes) * max(sizes)
            batches += 1
    return {"padding_share": 1 - tokens / positions, "tokens_per_batch": tokens / batches,
            "budget_fill": tokens / batches / max_tokens}


# ---- 2. timed steps --------------------------------------------------------------------------------------------

def micro_batches(cfg: Config, processor, long_from: int, num_workers: int = 0) -> MicroBatches:
    """The worker's train micro-batches (one rank), decoded here (`num_workers` 0) or in DataLoader processes."""
    stream = ShardStream(split_shards(cfg.data.shards.dir, "train"), seed=cfg.data.loader.seed,
                         shuffle_buffer=cfg.data.loader.shuffle_buffer,
                         transform=SampleEncoder(processor, cfg.data.prompt, cfg.model.max_length))
    return MicroBatches(stream, cfg.data.batching, cfg.train.micro_batch_size, processor.tokenizer.pad_token_id,
                        num_workers, seed=cfg.data.loader.seed, long_from=long_from)


class BareStep:
    """Forward, backward, clip, AdamW, schedule: the step with nothing around it."""

    def __init__(self, model: torch.nn.Module, cfg: Config):
        t = cfg.train
        self.model, self.grad_clip = model, t.grad_clip
        self.optimizer = torch.optim.AdamW(parameter_groups(model, t.weight_decay), lr=t.lr, betas=t.betas, eps=t.eps)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(t))

    def __call__(self, m) -> None:
        loss = self.model(**m.inputs, num_items_in_batch=torch.tensor(float(m.answer_tokens))).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)


def bare_loop(cfg: Config, steps: int, log_every: int, live: bool = False) -> dict:
    """The worker's micro-batches through forward, backward, clip, AdamW, schedule. Collated beforehand, or
    `live`: read from the stream as the loop goes, decoded by the worker's DataLoader processes, as any loop
    over these shards must (on 2 cores the decoding competes with the step)."""
    model, processor = prepare_model(cfg.model, torch.float32, seed=cfg.train.seed)
    model.train()
    source = micro_batches(cfg, processor, model.config.original_max_position_embeddings,
                           num_workers=cfg.data.loader.num_workers if live else 0)
    batches = source if live else iter([next(source) for _ in range(steps)])
    step = BareStep(model, cfg)
    rates = []
    for start in range(0, steps, log_every):
        began, tokens, image_tokens, positions = time.perf_counter(), 0, 0, 0
        for _ in range(min(log_every, steps - start)):
            m = next(batches)
            step(m)
            tokens, image_tokens, positions = tokens + m.tokens, image_tokens + m.image_tokens, positions + m.positions
        seconds = time.perf_counter() - began
        rates.append({"tokens_per_s": tokens / seconds, "image_tokens_per_s": image_tokens / seconds,
                      "text_tokens_per_s": (tokens - image_tokens) / seconds,
                      "padding_share": 1 - tokens / positions})
    return summarise(rates[1:])


def summarise(records: list[dict]) -> dict:
    keys = ("tokens_per_s", "image_tokens_per_s", "text_tokens_per_s", "padding_share")
    return {k: statistics.median(r[k] for r in records) for k in keys}


def vlmtune_run(cfg: Config, steps: int, storage: str, name: str) -> dict:
    run = cfg.model_copy(deep=True)
    run.cluster.storage_path, run.cluster.run_name = storage, name
    run.train.max_steps = run.train.checkpoint_every = steps
    train(run)
    ray.shutdown()  # the next live bare loop forks DataLoader processes: not from a Ray driver
    records = [r for r in read_metrics(Path(storage) / name) if "tokens_per_s" in r]
    return summarise(records[1:])  # the first interval holds the warm-up


def interleaved(cfg: Config, steps: int) -> dict:
    """Part 3, for one mode: the bare step and the worker's `train_step` on alternate micro-batches in this
    process (a gloo group of one, see `main`); each side's time summed over the steps after the first 10 %
    (the warm-up)."""
    bare_model, processor = prepare_model(cfg.model, torch.float32, seed=cfg.train.seed)
    model, _ = prepare_model(cfg.model, torch.float32, seed=cfg.train.seed)
    long_from = model.config.original_max_position_embeddings
    source = micro_batches(cfg, processor, long_from)
    collated = [next(source) for _ in range(steps)]
    live = micro_batches(cfg, processor, long_from, num_workers=cfg.data.loader.num_workers)
    bare_model.train()
    bare = BareStep(bare_model, cfg)
    engine = build_engine(model, cfg.train, 1, on_gpu=False)
    engine.train()
    worker = Worker(0, 1, torch.device("cpu"))
    flops, throughput = FlopCounter.for_model(model), Throughput(worker.device, 1)
    seconds = {"bare": 0.0, "vlmtune": 0.0}
    tokens = 0
    for i, m in enumerate(collated):
        began = time.perf_counter()
        bare(m)
        middle = time.perf_counter()
        train_step(engine, live, cfg, worker, flops, throughput)
        if i >= steps // 10:
            seconds["bare"] += middle - began
            seconds["vlmtune"] += time.perf_counter() - middle
            tokens += m.tokens
    return {"bare_tokens_per_s": tokens / seconds["bare"], "vlmtune_tokens_per_s": tokens / seconds["vlmtune"],
            "ratio": seconds["bare"] / seconds["vlmtune"]}


def interleaved_modes(cfg: Config, modes: list[str], budget: int, steps: int) -> dict[str, dict]:
    """Part 3 for every mode, on one gloo group of one (DeepSpeed keeps its groups for the process's life):
    an in-memory store, no port to find; DeepSpeed still reads the rank variables. Before any Ray call: the
    DataLoader processes are forked from this one."""
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        return {mode: interleaved(with_mode(cfg, mode, budget), steps) for mode in modes}
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per run, warm-up interval included")
    parser.add_argument("--log-every", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=1, help="bare/vlmtune pairs per mode")
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--samples", type=int, default=320)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--zero-stage", type=int, choices=(0, 1, 2, 3), default=0,
                        help="the vlmtune worker's train.zero_stage (one worker: 0 is the right choice)")
    parser.add_argument("--interleaved", type=int, default=150, metavar="STEPS",
                        help="part 3's steps per mode (0: skip it)")
    parser.add_argument("--dir", default="outputs/bench/train-step-shards")
    parser.add_argument("--only", choices=PATHS,
                        help="one timed run of one path and mode (the first of --modes), printed as a JSON line: "
                             "for pairing whole processes from outside")
    args = parser.parse_args()

    cfg = base_config(args)
    if not Path(args.dir, "manifest.json").exists():
        prepare(cfg.data)
        ray.shutdown()  # part 3 forks a DataLoader process: not from a Ray driver (it loses its link to Ray)
    torch.set_num_threads(1)  # a Ray Train worker with 1 CPU runs with one thread too

    counts = token_counts(cfg)
    tiny_budget = token_budget(counts["tiny"], args.micro_batch)
    if args.only:
        run_cfg = with_mode(cfg, args.modes[0], tiny_budget)
        with tempfile.TemporaryDirectory() as storage:
            result = vlmtune_run(run_cfg, args.steps, storage, "only") if args.only == "vlmtune" else \
                bare_loop(run_cfg, args.steps, args.log_every, live=args.only == "bare-live")
        print(json.dumps({"path": args.only, "mode": args.modes[0], **result}))
        return

    lengths, image_tokens = counts["real"], counts["real_image"]
    real_budget = token_budget(lengths, args.micro_batch)
    print(f"\nreal-size token counts (Phi-3-vision-128k processor, num_crops=16), {len(lengths)} train samples: "
          f"min {min(lengths)}, median {statistics.median(lengths):.0f}, max {max(lengths)}; image share "
          f"{sum(image_tokens) / sum(lengths):.2f}; image tokens per sample (count) "
          f"{dict(sorted(Counter(image_tokens).items()))}")
    print(f"{'mode':<8}{'padding share':>15}{'tokens/micro-batch':>20}{'budget fill':>13}   (max_tokens {real_budget})")
    for mode in args.modes:
        s = batching_stats(lengths, mode, args.micro_batch, real_budget, long_from=4096)
        print(f"{mode:<8}{s['padding_share']:>15.3f}{s['tokens_per_batch']:>20.0f}{s['budget_fill']:>13.2f}")

    steps_together = interleaved_modes(cfg, args.modes, tiny_budget, args.interleaved) if args.interleaved else {}

    results: dict[str, dict[str, list[dict]]] = {m: {path: [] for path in PATHS} for m in args.modes}
    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as storage:
        for r in range(args.rounds):
            for mode in args.modes:
                run_cfg = with_mode(cfg, mode, tiny_budget)
                results[mode]["bare"].append(bare_loop(run_cfg, args.steps, args.log_every))
                results[mode]["bare-live"].append(bare_loop(run_cfg, args.steps, args.log_every, live=True))
                results[mode]["vlmtune"].append(vlmtune_run(run_cfg, args.steps, storage, f"{mode}-{r}"))
    elapsed = time.perf_counter() - began

    def ratios(mode: str, baseline: str) -> list[float]:
        return [v["tokens_per_s"] / b["tokens_per_s"]
                for b, v in zip(results[mode][baseline], results[mode]["vlmtune"], strict=True)]

    print(f"\ntiny-phi3v (fp32, num_crops 16), micro-batch {args.micro_batch} (pad) or max_tokens {tiny_budget} "
          f"(length, packed), ZeRO-{cfg.train.zero_stage} on gloo, 1 thread; median over rounds "
          f"({args.rounds} x {args.steps} steps each, {elapsed:.0f} s)")
    print("bare: micro-batches collated beforehand; bare-live: read from the stream as it trains, one DataLoader "
          "process decoding (as the worker's)")
    print(f"{'mode':<8}{'path':<11}{'padding':>9}{'tokens/s':>10}{'image tok/s':>13}{'text tok/s':>12}"
          f"{'vlmtune / this (per round)':>30}")
    for mode in args.modes:
        for path in PATHS:
            rows = results[mode][path]
            med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
            per_round = ratios(mode, path) if path != "vlmtune" else []
            ratio = (f"{statistics.median(per_round):.3f} ({', '.join(f'{x:.3f}' for x in per_round)})"
                     if per_round else "")
            print(f"{mode:<8}{path:<11}{med['padding_share']:>9.3f}{med['tokens_per_s']:>10.0f}"
                  f"{med['image_tokens_per_s']:>13.0f}{med['text_tokens_per_s']:>12.0f}{ratio:>30}")
    for baseline in ("bare", "bare-live"):
        every = [x for mode in args.modes for x in ratios(mode, baseline)]
        print(f"ratio vlmtune(1 worker)/{baseline}, median over all modes and rounds: {statistics.median(every):.3f}")
    if steps_together:
        print(f"\ninterleaved in one process, no Ray ({args.interleaved} steps per mode, the first 10 % not timed): "
              "bare step on collated micro-batches vs the worker's train_step on the live stream")
        print(f"{'mode':<8}{'bare tok/s':>12}{'vlmtune tok/s':>15}{'vlmtune/bare':>14}")
        for mode, r in steps_together.items():
            print(f"{mode:<8}{r['bare_tokens_per_s']:>12.0f}{r['vlmtune_tokens_per_s']:>15.0f}{r['ratio']:>14.3f}")

if __name__ == "__main__":
    main()
