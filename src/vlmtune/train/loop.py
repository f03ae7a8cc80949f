"""The per-worker training story, top to bottom: what every Ray Train worker runs.

    model + processor → LoRA or freeze policy → DeepSpeed engine (on Ray's process group)
    → restore the latest checkpoint (engine, data position, RNG, W&B run id)
    → this rank's shard stream → micro-batches → forward/backward/step
    → every N steps: log on rank 0, eval (loss + generated answers), checkpoint through ray.train.report
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Iterator

import deepspeed
import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from vlmtune.config import Config
from vlmtune.data.collate import IGNORE_INDEX, SampleEncoder, collate
from vlmtune.data.shards import ShardStream, local_path, next_position, split_shards, verify_shards
from vlmtune.eval.generate import generate_answers
from vlmtune.eval.metrics import score
from vlmtune.models.loading import apply_freeze, apply_lora, load, trainable_parameter_summary
from vlmtune.tracking import Tracker
from vlmtune.train.checkpoint import TrainerState, restore, save_and_report, set_rng_state
from vlmtune.train.engine import build_engine
from vlmtune.train.metrics import FlopCounter, Throughput

log = logging.getLogger(__name__)


class MicroBatches:
    """Micro-batches from one rank's shard stream, remembering where to resume.

    Skipped samples (corrupt member, too long) are counted and left out of batches; `position` is where
    the stream restarts after the last sample taken, so a checkpoint resumes exactly after it.
    """

    def __init__(self, stream: ShardStream, batch_size: int, pad_id: int, num_workers: int):
        self.stream, self.batch_size, self.pad_id = stream, batch_size, pad_id
        self.per_epoch = stream.samples_per_epoch()
        self.position = stream.start
        self.skipped = 0
        loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=num_workers,
                                             collate_fn=lambda item: item, persistent_workers=num_workers > 0)
        self.items: Iterator[dict] = iter(loader)

    def next_samples(self) -> list[dict]:
        samples = []
        while len(samples) < self.batch_size:
            item = next(self.items)
            self.position = next_position(item["position"], self.per_epoch)
            if "skipped" in item:
                self.skipped += 1
                log.warning("skipped sample: %s", item["skipped"])
            else:
                samples.append(item)
        return samples

    def __next__(self) -> dict:
        return collate(self.next_samples(), self.pad_id)


def prepare_model(cfg: Config, dtype: torch.dtype):
    """Load (4-bit for QLoRA), gradient checkpointing, then LoRA (base frozen) or the full fine-tune freeze
    policy."""
    qlora = cfg.model.lora.enabled and cfg.model.lora.quantize_4bit
    model, processor = load(cfg.model.name_or_path, num_crops=cfg.model.num_crops, dtype=dtype,
                            attn_implementation=cfg.model.attn_implementation, seed=cfg.train.seed,
                            quantize_4bit=qlora)
    if qlora:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.model.gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    elif cfg.model.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model = apply_lora(model, cfg.model.lora) if cfg.model.lora.enabled else apply_freeze(model, cfg.model.freeze)
    return model, processor


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def all_mean(value: float, device: torch.device) -> float:
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.item() / dist.get_world_size()


@torch.no_grad()
def eval_loss(engine, batches: MicroBatches, num_batches: int, device: torch.device) -> float:
    """Token-weighted loss over `num_batches` val batches per rank, reduced over all ranks."""
    engine.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for _ in range(num_batches):
        batch = to_device(next(batches), device)
        tokens = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
        total += torch.stack([engine(**batch).loss.double() * tokens, tokens.double()])
    engine.train()
    dist.all_reduce(total)
    return (total[0] / total[1]).item()


def eval_generation(engine, processor, samples: list[dict], cfg: Config, device: torch.device,
                    rank: int) -> tuple[dict, list[list]]:
    """Generate answers for this rank's table samples; all ranks' results are scored together."""
    texts = generate_answers(engine.module, processor, samples, cfg.eval.max_new_tokens, device,
                             synced_gpus=cfg.train.zero_stage == 3 and dist.get_world_size() > 1)
    records = [{**s["meta"], "generated": t} for s, t in zip(samples, texts, strict=True)]
    gathered: list[list[dict]] = [[] for _ in range(dist.get_world_size())]
    dist.all_gather_object(gathered, records)
    metrics = {f"eval_{k}": v for k, v in score([r for part in gathered for r in part]).items()}
    rows = [[s["id"], s["image"], s["target"], t] for s, t in zip(samples, texts, strict=True)] if rank == 0 else []
    return metrics, rows


def tracking_dir(cfg: Config) -> str:
    if cfg.tracking.dir:
        return cfg.tracking.dir
    run = f"{cfg.cluster.storage_path.rstrip('/')}/{cfg.cluster.run_name}"
    return run if local_path(run) else os.path.join("outputs", "tracking", cfg.cluster.run_name)


def train_loop_per_worker(loop_config: dict) -> None:
    cfg = Config.model_validate(loop_config["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    on_gpu = device.type == "cuda"
    random.seed(cfg.train.seed)
    np.random.seed(cfg.train.seed)
    torch.manual_seed(cfg.train.seed)

    # Model and engine. Ray Train created the process group; DeepSpeed reuses it.
    model, processor = prepare_model(cfg, torch.bfloat16 if cfg.train.bf16 else torch.float32)
    flops = FlopCounter.for_model(model)
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")
    engine = build_engine(model, cfg.train, world, on_gpu)

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and loop_config.get("resume_from"):
        checkpoint = ray.train.Checkpoint(loop_config["resume_from"])
    state = restore(engine, checkpoint, rank, world) if checkpoint else TrainerState()

    tracker = Tracker(cfg.tracking, tracking_dir(cfg), cfg.cluster.run_name, cfg.model_dump(mode="json"),
                      run_id=state.wandb_run_id, active=rank == 0)
    state.wandb_run_id = tracker.run_id
    if rank == 0:
        log.info("trainable parameters: %s", trainable_parameter_summary(engine.module))
        log.info("%s from step %d", "resuming" if checkpoint else "starting", state.step)

    # Data: this rank's slice of the train split; val batches are the same at every eval.
    shard_dir = cfg.data.shards.dir
    train_shards, val_shards = split_shards(shard_dir, "train"), split_shards(shard_dir, "val")
    verify_shards((train_shards + val_shards)[rank::world])  # each rank checks a disjoint share
    encoder = SampleEncoder(processor, cfg.data.prompt, cfg.model.max_length)
    pad_id = processor.tokenizer.pad_token_id
    loader = cfg.data.loader
    train_batches = MicroBatches(
        ShardStream(train_shards, rank, world, seed=loader.seed, shuffle_buffer=loader.shuffle_buffer,
                    start=state.position, transform=encoder),
        cfg.train.micro_batch_size, pad_id, loader.num_workers)
    question_only = SampleEncoder(processor, cfg.data.prompt, cfg.model.max_length, with_answer=False)

    def val_batches() -> MicroBatches:
        return MicroBatches(ShardStream(val_shards, rank, world, shuffle=False, transform=encoder),
                            cfg.train.micro_batch_size, pad_id, num_workers=0)

    def table_samples() -> list[dict]:
        stream = ShardStream(val_shards, rank, world, shuffle=False,
                             transform=lambda s: {**question_only(s), "image": s["image"]})
        return MicroBatches(stream, cfg.train.table_samples, pad_id, num_workers=0).next_samples()

    def run_eval() -> dict:
        metrics = {"eval_loss": eval_loss(engine, val_batches(), cfg.train.eval_batches, device)}
        if cfg.train.table_samples:
            gen_metrics, rows = eval_generation(engine, processor, table_samples(), cfg, device, rank)
            metrics.update(gen_metrics)
            tracker.log_table("eval/samples", ["id", "image", "target", "generated"], rows, state.step)
        tracker.log(metrics, state.step)
        return metrics

    # The loop. A fresh run is evaluated once before training, as the baseline of every curve; a resumed
    # one continues with the RNG streams of the moment it was saved.
    last_eval = run_eval() if state.step == 0 else {}
    if state.rng is not None:
        set_rng_state(state.rng)
    throughput = Throughput(device, world)
    losses: list[torch.Tensor] = []  # kept on the device: reading them every step would sync the GPU
    engine.train()
    while state.step < cfg.train.max_steps:
        for _ in range(cfg.train.grad_accum_steps):
            host_batch = next(train_batches)
            throughput.add(len(host_batch["input_ids"]), int(host_batch["attention_mask"].sum()),
                           flops.step_flops(host_batch["attention_mask"], host_batch["image_sizes"]))
            loss = engine(**to_device(host_batch, device)).loss
            engine.backward(loss)
            engine.step()
            losses.append(loss.detach())
        state.step += 1
        state.position = train_batches.position
        last_step = state.step == cfg.train.max_steps

        if state.step % cfg.train.log_every == 0 or last_step:
            metrics = {"loss": all_mean(torch.stack(losses).float().mean().item(), device), "lr": engine.get_lr()[0],
                       "grad_norm": float(engine.get_global_grad_norm() or 0.0),
                       "skipped_samples": all_mean(train_batches.skipped, device) * world,
                       **throughput.snapshot()}
            losses.clear()
            tracker.log(metrics, state.step)
            if rank == 0:
                log.info("step %d %s", state.step, {k: round(v, 5) for k, v in metrics.items()})

        checkpoint_due = state.step % cfg.train.checkpoint_every == 0 or last_step
        eval_due = (cfg.train.eval_every and state.step % cfg.train.eval_every == 0) or last_step
        if eval_due or (checkpoint_due and not last_eval):
            last_eval = run_eval()
            throughput.reset()  # eval time is not training throughput
        if checkpoint_due:
            save_and_report(engine, cfg, state, {"step": state.step, **last_eval}, rank, world)
            throughput.reset()
    tracker.finish()

