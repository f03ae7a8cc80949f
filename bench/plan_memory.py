"""The memory planner against measured peak memory, on CPU: train/planner.py's per-worker total next to what
each gloo rank really grew by while it built the model and the DeepSpeed engine and ran a few training steps.

    python bench/plan_memory.py [--steps 2] [--only tiny|small] [--glibc]

Two models, each for ZeRO 0 on 1 rank and ZeRO 2 and 3 on 1 and 2 ranks (forked processes, one thread
each, no Ray):
tiny   tiny-phi3v (165k parameters) with a 16 x 1023-token micro-batch: activations are nearly everything.
small  the tiny architecture widened to ~13M parameters (hidden 512, 4 layers, 16 heads), random weights, a
       2 x 511-token micro-batch: weights, gradients and Adam states are about half, so ZeRO's sharding shows.
Samples are built to fill `model.max_length` (a long question), so the padded micro-batch is the planner's
token budget. Measured: the rise of each rank's peak RSS (VmHWM, reset through /proc/self/clear_refs) above
its RSS just before the model is built, over `--steps` training steps; the table shows the largest rank.
Planned: `plan(cfg, "cpu").per_worker_bytes` (fp32, no CUDA context). Ratio = measured / planned.

"live" runs the ranks with glibc's mmap threshold fixed at 64 KiB, so freed blocks leave the RSS at once and
the peak is the peak of live memory, which is what the planner models. With glibc's defaults (`--glibc`)
the heap keeps freed activation blocks of earlier steps and the peak RSS grows for a few steps beyond that.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import socket
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from vlmtune.config import Config, load_config
from vlmtune.data.collate import SampleEncoder, collate
from vlmtune.models.loading import load, prepare_model, tiny_config
from vlmtune.models.phi3v import Phi3VConfig
from vlmtune.train.engine import build_engine
from vlmtune.train.planner import TYPICAL_RECORD, plan

MIB = 2**20
M_MMAP_THRESHOLD = -3  # mallopt parameter (malloc.h)


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def small_model_dir(root: Path) -> str:
    """A local model directory (config.json + processor) for the 'small' architecture: prepare_model builds it
    with random weights, as the planner does on the meta device."""
    _, processor = load("tiny-phi3v")
    config = tiny_config(processor.tokenizer).to_dict()
    # head width stays 32 (16 heads), so the tiny model's RoPE factors still fit
    config.update(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=16,
                  num_key_value_heads=16)
    config = Phi3VConfig.from_dict(config)
    config.save_pretrained(root)
    processor.save_pretrained(root)
    return str(root)


def batch_for(cfg: Config, processor) -> dict:
    """micro_batch_size samples of (up to one token short of) max_length tokens: the question is padded out
    with words, the answer kept whole."""
    tile = processor.image_processor.tile_size
    record = {"key": "x", "meta": TYPICAL_RECORD, "images": [Image.new("RGB", (tile, tile), "white")]}

    def encode(words: int) -> dict:
        prompt = cfg.data.prompt.model_copy(update={"question": cfg.data.prompt.question + " z" * words})
        return SampleEncoder(processor, prompt, 10**9)(record)

    base = len(encode(0)["input_ids"])
    words = (cfg.model.max_length - base) // 2
    sample = encode(words)
    if base > cfg.model.max_length:
        raise ValueError(f"model.max_length={cfg.model.max_length} is below a typical sample ({base} tokens)")
    while len(sample["input_ids"]) > cfg.model.max_length:
        words -= 1
        sample = encode(words)
    return collate([sample] * cfg.train.micro_batch_size, processor.tokenizer.pad_token_id)


def rank_main(rank: int, world: int, port: int, cfg_json: str, batch: dict, steps: int, allocator: str,
              results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    if allocator == "mmap":  # glibc: large blocks always mmapped, so freed memory leaves the RSS at once
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 64 * 1024)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        cfg = Config.model_validate_json(cfg_json)
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        before = status_kib("VmRSS")
        model, _ = prepare_model(cfg.model, torch.float32, seed=cfg.train.seed, random_init=True)
        engine = build_engine(model, cfg.train, world, on_gpu=False)
        engine.train()
        for _ in range(steps):
            engine.backward(engine(**batch).loss)
            engine.step()
        results[rank] = (status_kib("VmHWM") - before) * 1024
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(cfg: Config, batch: dict, world: int, steps: int, allocator: str) -> float:
    """The largest rank's peak RSS growth, in bytes."""
    with mp.Manager() as manager:
        results = manager.dict()
        mp.start_processes(rank_main, nprocs=world,
                           args=(world, free_port(), cfg.model_dump_json(), batch, steps, allocator, results),
                           join=True, start_method="fork")
        return max(results.values())


CASES = {
    "tiny": ["model.name_or_path=tiny-phi3v", "model.max_length=1024", "train.micro_batch_size=16"],
    "small": ["model.max_length=512", "train.micro_batch_size=2"],
}
COMMON = ["model.lora.enabled=false", "model.freeze.vision_tower=false", "model.num_crops=4", "train.bf16=false",
          "model.attn_implementation=sdpa", "cluster.use_gpu=false"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--only", choices=sorted(CASES))
    parser.add_argument("--glibc", action="store_true",
                        help="also measure 1-rank runs with glibc's default allocator settings (slower)")
    args = parser.parse_args()
    print(f"{'model':<6} {'ZeRO':>4} {'ranks':>5} {'batch':>9} {'states':>7} {'activ.':>7} {'planned':>8} "
          f"{'live':>7} {'ratio':>6} {'glibc':>7} {'ratio':>6}   (MiB per rank; ratio = measured/planned)")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in CASES.items():
            if args.only and name != args.only:
                continue
            extra = [f"model.name_or_path={small_model_dir(Path(tmp))}"] if name == "small" else []
            for zero in (0, 2, 3):
                for world in (1, 2) if zero else (1,):  # ZeRO-0 shards nothing: 2 ranks hold what 1 holds
                    cfg = load_config(None, [*COMMON, *overrides, *extra, f"train.zero_stage={zero}",
                                             f"cluster.num_workers={world}"])
                    _, processor = prepare_model(cfg.model, torch.float32, random_init=True, device="meta")
                    batch = batch_for(cfg, processor)
                    cfg.model.max_length = batch["input_ids"].shape[1]  # the budget the batch really has
                    planned = plan(cfg, "cpu")
                    live = measure(cfg, batch, world, args.steps, "mmap")
                    default = measure(cfg, batch, world, args.steps, "glibc") if args.glibc and world == 1 \
                        else None
                    row = {"model": name, "zero": zero, "world": world, "planned": planned.per_worker_bytes,
                           "live": live, "glibc": default}
                    rows.append(row)
                    b = planned.breakdown()
                    states = b["weights"] + b["gradients"] + b["optimizer"] + b["zero_buffers"]
                    glibc = f"{default / MIB:7.1f} {default / planned.per_worker_bytes:6.2f}" if default else \
                        f"{'-':>7} {'-':>6}"
                    print(f"{name:<6} {zero:>4} {world:>5} {'x'.join(map(str, batch['input_ids'].shape)):>9} "
                          f"{states / MIB:7.1f} {b['activations'] / MIB:7.1f} {b['total'] / MIB:8.1f} "
                          f"{live / MIB:7.1f} {live / planned.per_worker_bytes:6.2f} {glibc}", flush=True)
    live = [r["live"] / r["planned"] for r in rows]
    glibc = [r["glibc"] / r["planned"] for r in rows if r["glibc"]]
    print(f"\nlive/planned {min(live):.2f}-{max(live):.2f}" +
          (f"; glibc/planned {min(glibc):.2f}-{max(glibc):.2f}" if glibc else ""))


if __name__ == "__main__":
    main()
