"""Training throughput: the full vlmtune step against a bare PyTorch loop, same model and batches, same run.

    python bench/train_step.py [--steps 40] [--micro-batch 8] [--zero 2]

bare:      model + torch AdamW on pre-collated batches held in memory, one thread, no Ray, no DeepSpeed.
deepspeed: the same batches through vlmtune's DeepSpeed engine (world size 1, gloo), no Ray, no data.
vlmtune:   jobs/train.py's path: Ray Train worker(s) with 1 CPU each, DeepSpeed ZeRO on gloo, the shard
          stream decoding JPEGs and running the HD transform in a DataLoader process, collate, logging.
Tokens/s per worker (one core each); the ratio vlmtune/bare is the overhead figure.

On a GPU machine, `--model microsoft/Phi-3-vision-128k-instruct --random-init --device cuda --bf16
--lora --gradient-checkpointing` measures the bare loop at real size and prints MFU against the
device's bf16 peak.
"""

from __future__ import annotations

import argparse
import itertools
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch

from vlmtune.config import load_config
from vlmtune.data.collate import SampleEncoder, collate
from vlmtune.data.prepare import prepare
from vlmtune.data.shards import ShardStream, split_shards
from vlmtune.launch.ray import train
from vlmtune.models.loading import prepare_model
from vlmtune.tracking import read_metrics
from vlmtune.train.engine import build_engine
from vlmtune.train.metrics import FlopCounter, peak_flops


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bare_loop(cfg, args, deepspeed: bool = False) -> dict:
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    model, processor = prepare_model(cfg.model, dtype, random_init=args.random_init, device=args.device)
    model.to(device).train()
    encoder = SampleEncoder(processor, cfg.data.prompt, cfg.model.max_length)
    stream = ShardStream(split_shards(cfg.data.shards.dir, "train"), seed=0, transform=encoder)
    items = list(itertools.islice(iter(stream), args.micro_batch * 8))
    batches = [collate(items[i : i + args.micro_batch], processor.tokenizer.pad_token_id)
               for i in range(0, len(items), args.micro_batch)]
    flops = FlopCounter.for_model(model)
    if deepspeed:
        engine = build_engine(model, cfg.train, world_size=1, on_gpu=device.type == "cuda")

        def step(batch):
            loss = engine(**batch).loss
            engine.backward(loss)
            engine.step()
    else:
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def step(batch):
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    tokens = total_flops = 0.0
    start = 0.0
    for i in range(args.steps + 5):
        if i == 5:  # warm-up excluded
            if device.type == "cuda":
                torch.cuda.synchronize()
            start, tokens, total_flops = time.perf_counter(), 0.0, 0.0
        batch = {k: v.to(device) for k, v in batches[i % len(batches)].items()}
        step(batch)
        tokens += float(batch["attention_mask"].sum())
        total_flops += flops.step_flops(batch["attention_mask"].cpu(), batch["image_sizes"].cpu())
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    result = {"tokens_per_s": tokens / seconds}
    peak = peak_flops(device)
    if peak:
        result["mfu"] = total_flops / seconds / peak
        result["gpu_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return result


def vlmtune_run(cfg, args, workers: int, storage: str) -> dict:
    run = cfg.model_copy(deep=True)
    run.cluster.num_workers = workers
    run.cluster.storage_path = storage
    run.cluster.run_name = f"bench-{workers}w"
    run.cluster.cpus_per_worker = 1
    train(run)
    rates = [r["tokens_per_s"] for r in read_metrics(Path(storage) / run.cluster.run_name) if "tokens_per_s" in r]
    return {"tokens_per_s": statistics.median(rates[1:]) / workers}  # per worker; first interval is warm-up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--zero", type=int, default=2)
    parser.add_argument("--model", default="tiny-phi3v")
    parser.add_argument("--random-init", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--lora", action="store_true")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--dir", default="outputs/bench/train-shards")
    parser.add_argument("--bare-only", action="store_true", help="skip the Ray runs (e.g. real size on a GPU)")
    args = parser.parse_args()

    cfg = load_config("configs/demo-cpu.yaml", [
        f"data.shards.dir={args.dir}", f"model.name_or_path={args.model}", f"model.lora.enabled={args.lora}",
        f"model.gradient_checkpointing={args.gradient_checkpointing}", f"train.zero_stage={args.zero}",
        f"train.micro_batch_size={args.micro_batch}", f"train.max_steps={args.steps}", "train.log_every=5",
        "train.eval_every=0", "train.table_samples=0", "train.eval_batches=1",
        f"train.checkpoint_every={args.steps}", "export.enabled=false", "tracking.mode=disabled",
        "cluster.max_failures=0"])
    if not Path(args.dir, "manifest.json").exists():
        prepare(cfg.data)
    torch.set_num_threads(1)  # a Ray Train worker with 1 CPU runs with one thread too
    rows = [("bare PyTorch loop (1 thread)", bare_loop(cfg, args))]
    if not args.bare_only:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
                          LOCAL_RANK="0")
        torch.distributed.init_process_group("gloo" if args.device == "cpu" else "nccl")
        rows.append((f"DeepSpeed ZeRO-{args.zero} engine, no Ray", bare_loop(cfg, args, deepspeed=True)))
        torch.distributed.destroy_process_group()
        with tempfile.TemporaryDirectory() as storage:
            rows.append(("vlmtune, 1 Ray worker", vlmtune_run(cfg, args, 1, storage)))
            rows.append(("vlmtune, 2 Ray workers (per worker)", vlmtune_run(cfg, args, 2, storage)))
    print(f"\n{args.model}, micro-batch {args.micro_batch}, ZeRO-{args.zero}, {args.device}\n")
    print(f"{'path':<40}{'tokens/s/worker':>16}{'MFU':>8}")
    for name, r in rows:
        mfu = f"{r['mfu']:.3f}" if "mfu" in r else "-"
        print(f"{name:<40}{r['tokens_per_s']:>16.0f}{mfu:>8}")
    if len(rows) > 1:
        ratio = rows[2][1]["tokens_per_s"] / rows[0][1]["tokens_per_s"]
        print(f"\nratio vlmtune(1 worker)/bare: {ratio:.3f}")


if __name__ == "__main__":
    main()
