"""The per-worker training story, top to bottom: what every Ray Train worker runs.

    setup_worker      rank, device, seeds (Ray Train made the process group; DeepSpeed reuses it)
    prepare_model     model + processor, LoRA or the freeze policy (models/loading.py); under ZeRO-3 the
                      model is partitioned across the ranks as it is built
    build_engine      the DeepSpeed engine on the process group Ray Train created (train/engine.py)
    restore           the latest checkpoint: engine, data position, RNG states, W&B run id
    setup_data        this rank's shard stream → micro-batches; the val batches every eval reuses
    evaluate          val loss and generated answers, scored like the evaluate job
    train_step        one optimizer step over `grad_accum_steps` micro-batches; the ranks also agree on
                      whether the driver asked them to stop (SIGTERM)
    save_and_report   every rank's part of a checkpoint, through ray.train.report: every
                      `checkpoint_every` steps, at the end, and before stopping on request

Expected failures (`VlmtuneError`: altered shards, unreachable model, a checkpoint that does not fit) can
only happen before the first collective operation; every rank checks, the ranks agree, and the run ends
with the error posted to the driver (train/progress.py) instead of a crash that Ray would retry for nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from vlmtune import runs, storage
from vlmtune.config import BatchingConfig, Config
from vlmtune.data.batching import MicroBatch, MicroBatches
from vlmtune.data.collate import SampleEncoder
from vlmtune.data.position import DataPosition, redistribute
from vlmtune.data.shards import ShardStream, split_shards, verify_shards
from vlmtune.errors import CheckpointError, VlmtuneError
from vlmtune.eval.generate import generate_answers
from vlmtune.eval.metrics import score
from vlmtune.models.loading import compile_layers, prepare_model, trainable_parameter_summary
from vlmtune.tracking import Tracker
from vlmtune.train.checkpoint import LoopState, choose_checkpoint, loads_universal, restore, resume_rng, save_and_report
from vlmtune.train.engine import build_engine, deepspeed_config, init_distributed
from vlmtune.train.metrics import FlopCounter, Throughput
from vlmtune.train.progress import Progress

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Worker:
    rank: int
    world_size: int
    device: torch.device

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"


@dataclass
class Data:
    train: MicroBatches
    val_batches: Callable[[], MicroBatches]  # a fresh stream each time: every eval sees the same batches
    table_samples: Callable[[], list[dict]]  # question-only val samples for generated answers


@dataclass(frozen=True)
class Requests:
    """What rank 0 was asked between steps, for every rank; agreed through the next step's all_reduce.

    (Ray Train's `get_preemption_info` would add node drains, but it is a barrier of its own over all
    workers: a worker that dies meanwhile leaves the others in it, and the restart of the run fails.)"""

    stop: bool = False  # the driver got SIGTERM: checkpoint, then stop

    def as_list(self) -> list[float]:
        return [float(self.stop)]


def setup_worker(cfg: Config) -> Worker:
    ctx = ray.train.get_context()
    random.seed(cfg.train.seed)
    np.random.seed(cfg.train.seed)
    torch.manual_seed(cfg.train.seed)
    return Worker(ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device())


def grad_accum_for(cfg: Config, world_size: int) -> tuple[int, str | None]:
    """Gradient accumulation on `world_size` workers: `train.grad_accum_steps` is meant for the largest worker
    count, so an elastic run on fewer workers accumulates more and keeps the global batch. When the
    product does not divide, the nearest global batch is used; the second value then says so."""
    gas, most = cfg.train.grad_accum_steps, cfg.cluster.worker_range[1]
    if world_size == most:
        return gas, None
    adapted = max(1, round(gas * most / world_size))
    if adapted * world_size == gas * most:
        return adapted, None
    micro = cfg.train.micro_batch_size
    return adapted, (f"on {world_size} workers the global batch is {adapted * world_size * micro} samples instead "
                     f"of {gas * most * micro} (grad_accum_steps {adapted}: {gas} x {most} workers is not a multiple "
                     f"of {world_size})")


def build_model(cfg: Config, worker: Worker, ds_config: dict):
    """The model and processor this run trains; under ZeRO-3 partitioned as it is built (collective). With
    `model.compile` its layers compile on their first step."""
    init_distributed(worker.on_gpu)  # DeepSpeed on Ray Train's process group, before zero.Init needs it
    model, processor = prepare_model(cfg.model, torch.bfloat16 if cfg.train.bf16 else torch.float32,
                                     seed=cfg.train.seed, deepspeed_config=ds_config)
    if cfg.model.compile:
        compile_layers(model)
    release_free_memory()
    return model, processor


def release_free_memory() -> None:
    """Hand the heap memory freed while building (whole modules, before ZeRO-3 partitioned them) back to the
    OS, where the C library allows it (glibc's malloc_trim): on CPU workers it is memory the other workers
    on the host need."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def agree_on_failure(error: VlmtuneError | None, worker: Worker) -> str | None:
    """Collective: the first rank's expected failure (rank-prefixed when several ranks run), or None."""
    errors: list[str | None] = [None] * worker.world_size
    dist.all_gather_object(errors, None if error is None else str(error))
    failed = [(rank, e) for rank, e in enumerate(errors) if e is not None]
    if not failed:
        return None
    rank, message = failed[0]
    return message if worker.world_size == 1 else f"{message} (worker {rank})"


def start_position(state: LoopState, train_samples: int, worker: Worker) -> DataPosition:
    """Where this rank's train data starts: its own saved position, a fresh one, or, after a change of world
    size (`state.previous_positions`: every old rank's position), its share of what no old rank consumed."""
    if state.previous_positions is not None:
        return redistribute(state.previous_positions, train_samples, worker.rank, worker.world_size)
    return state.position or DataPosition()


def setup_data(cfg: Config, processor, worker: Worker, state: LoopState, long_from: int,
               on_skip: Callable[[str], None]) -> Data:
    """This rank's train micro-batches from where it stands (`start_position`), and the val data every eval
    reads from the start."""
    shard_dir, loader, batch_size = cfg.data.shards.dir, cfg.data.loader, cfg.train.micro_batch_size
    train_shards, val_shards = split_shards(shard_dir, "train"), split_shards(shard_dir, "val")
    encoder = SampleEncoder(processor, cfg.data.prompt, cfg.model.max_length)
    question_only = SampleEncoder(processor, cfg.data.prompt, cfg.model.max_length, with_answer=False)
    pad_id = processor.tokenizer.pad_token_id
    rank, world = worker.rank, worker.world_size
    position = start_position(state, sum(shard.count for shard in train_shards), worker)

    stream = ShardStream(train_shards, rank, world, seed=loader.seed, shuffle_buffer=loader.shuffle_buffer,
                         start=position.window, transform=encoder, shares=position.shares)
    train = MicroBatches(stream, cfg.data.batching, batch_size, pad_id, loader.num_workers, position=position,
                         seed=loader.seed, long_from=long_from, on_skip=on_skip)
    padded = BatchingConfig()  # eval batches are fixed: the same val loss whatever the training batching

    def val_batches() -> MicroBatches:
        stream = ShardStream(val_shards, rank, world, shuffle=False, transform=encoder)
        return MicroBatches(stream, padded, batch_size, pad_id)

    def table_samples() -> list[dict]:
        stream = ShardStream(val_shards, rank, world, shuffle=False,
                             transform=lambda s: {**question_only(s), "image": s["image"]})
        return MicroBatches(stream, padded, cfg.train.table_samples, pad_id).next_samples()

    return Data(train, val_batches, table_samples)


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def all_min(value: int, device: torch.device) -> int:
    tensor = torch.tensor([value], dtype=torch.long, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return int(tensor.item())


def all_mean(values: list[float], device: torch.device) -> list[float]:
    """Means over ranks of several values, in one collective (each one costs a round trip)."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return (tensor / dist.get_world_size()).tolist()


@torch.no_grad()
def eval_loss(model, batches: Iterator[MicroBatch], num_batches: int, device: torch.device) -> float:
    """Token-weighted loss over `num_batches` val batches per rank, reduced over all ranks: every answer token
    counts once, however the tokens are spread over batches and ranks."""
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for _ in range(num_batches):
        batch = next(batches)
        loss = model(**to_device(batch.inputs, device)).loss.double()
        total += torch.stack([loss * batch.answer_tokens, torch.tensor(float(batch.answer_tokens), device=device)])
    model.train(was_training)
    dist.all_reduce(total)
    return (total[0] / total[1]).item()


def eval_generation(engine, processor, samples: list[dict], cfg: Config, worker: Worker) -> tuple[dict, list[list]]:
    """Generate answers for this rank's table samples; all ranks' results are scored together."""
    texts = generate_answers(engine.module, processor, samples, cfg.eval.max_new_tokens, worker.device,
                             synced_gpus=cfg.train.zero_stage == 3 and worker.world_size > 1)
    records = [{**s["meta"], "generated": t} for s, t in zip(samples, texts, strict=True)]
    gathered: list[list[dict]] = [[] for _ in range(worker.world_size)]
    dist.all_gather_object(gathered, records)
    metrics = {f"eval_{k}": v for k, v in score([r for part in gathered for r in part]).items()}
    rows = [[s["id"], s["image"], s["target"], t] for s, t in zip(samples, texts, strict=True)] \
        if worker.rank == 0 else []
    return metrics, rows


def evaluate(engine, processor, data: Data, cfg: Config, worker: Worker, tracker: Tracker, step: int) -> dict:
    metrics = {"eval_loss": eval_loss(engine, data.val_batches(), cfg.train.eval_batches, worker.device)}
    if cfg.train.table_samples:
        gen_metrics, rows = eval_generation(engine, processor, data.table_samples(), cfg, worker)
        metrics.update(gen_metrics)
        tracker.log_table("eval/samples", ["id", "image", "target", "generated"], rows, step)
    tracker.log(metrics, step)
    return metrics


def train_step(engine, batches: Iterator[MicroBatch], cfg: Config, worker: Worker, flops: FlopCounter,
               throughput: Throughput, requests: Requests = Requests()) -> tuple[torch.Tensor, Requests]:
    """One optimizer step over `grad_accum_steps` micro-batches; returns the step's loss (this rank's share)
    and the requests every rank agreed on.

    The loss is the mean over every answer token of the global batch, however the batch is split into
    micro-batches and ranks: the step's answer tokens are counted on the host and summed over ranks first,
    then each micro-batch's loss is its token-loss sum divided by that count. DeepSpeed divides each
    micro-batch's loss by the accumulation steps and averages gradients over ranks, so the divisor handed to
    the model is the global count / (world size × accumulation steps). Rank 0's `requests` ride along in
    the same all_reduce.
    """
    gas = cfg.train.grad_accum_steps
    micro = [next(batches) for _ in range(gas)]
    counts = torch.tensor([float(sum(m.answer_tokens for m in micro)), *requests.as_list()], dtype=torch.float64,
                          device=worker.device)
    dist.all_reduce(counts)
    agreed = Requests(*(bool(flag) for flag in counts[1:].tolist()))
    divisor = (counts[0] / (worker.world_size * gas)).float()
    loss = torch.zeros((), device=worker.device)
    for m in micro:
        throughput.add(len(m.ids), m.tokens, m.image_tokens, m.positions,
                       flops.step_flops(m.lengths, m.inputs["image_sizes"]))
        out = engine(**to_device(m.inputs, worker.device), num_items_in_batch=divisor)
        loss += engine.backward(out.loss).detach()  # the loss / gas; kept on the device (no sync per step)
        engine.step()
    return loss, agreed


def checkpoint_position(data: Data, worker: Worker) -> DataPosition:
    """Collective: this rank's data position for a checkpoint. Epochs every rank has moved past are dropped
    from the consumption record first (it only matters for a resume on another number of workers)."""
    data.train.forget_epochs_before(all_min(data.train.position.window[0], worker.device))
    return data.train.position


def step_metrics(engine, losses: list[torch.Tensor], batches: MicroBatches, throughput: Throughput,
                 worker: Worker) -> dict:
    """Metrics of the steps since the last log: the mean global token loss per step, and the rates. The gradient
    norm (before clipping) where DeepSpeed keeps it: ZeRO-0 in fp32 clips without keeping it, so no value
    rather than a false 0."""
    loss, skipped = all_mean([torch.stack(losses).double().mean().item(), batches.skipped], worker.device)
    norm = engine.get_global_grad_norm()
    return {"loss": loss, "lr": engine.get_lr()[0], **({} if norm is None else {"grad_norm": float(norm)}),
            "skipped_samples": skipped * worker.world_size, **throughput.snapshot()}


def tracking_dir(cfg: Config) -> str:
    """W&B and metrics.jsonl live in the run directory, or locally when that is remote (W&B writes files)."""
    if cfg.tracking.dir:
        return storage.resolve(cfg.tracking.dir)
    run = runs.run_dir(cfg)
    return run if storage.is_local(run) else storage.resolve(f"outputs/tracking/{cfg.cluster.run_name}")


def train_loop_per_worker(loop_config: dict) -> None:
    cfg = Config.model_validate(loop_config["config"])
    worker = setup_worker(cfg)
    progress = Progress(loop_config.get("progress"), worker.rank)
    gas, batch_note = grad_accum_for(cfg, worker.world_size)
    cfg.train.grad_accum_steps = gas

    # Everything that can fail for a reason the user must fix, before the first collective operation. Under
    # ZeRO-3 building the model is itself collective (it is partitioned as it is built): the ranks agree on
    # the other checks first; a model that cannot be loaded fails on every rank alike, before any gather.
    error = model = processor = resume = None
    ds_config: dict = {}
    try:
        resume = choose_checkpoint(cfg, ray.train.get_checkpoint(), loop_config.get("resume_from"),
                                   warn=progress.warn_once)
        shard_dir = cfg.data.shards.dir
        shards = split_shards(shard_dir, "train") + split_shards(shard_dir, "val")
        verify_shards(shards[worker.rank :: worker.world_size])  # each rank checks a disjoint share
        ds_config = deepspeed_config(cfg.train, worker.world_size, worker.on_gpu,
                                     load_universal=loads_universal(resume, worker.world_size, cfg.train.zero_stage))
        if cfg.train.zero_stage != 3:
            model, processor = build_model(cfg, worker, ds_config)
    except VlmtuneError as e:
        error = e
    failure = agree_on_failure(error, worker)
    if failure is None and model is None:
        try:
            model, processor = build_model(cfg, worker, ds_config)
        except VlmtuneError as e:
            error = e
        failure = agree_on_failure(error, worker)
    if failure is not None:
        progress.fail(failure)  # the driver raises it; returning normally keeps Ray from retrying
        return

    flops = FlopCounter.for_model(model)
    engine = build_engine(model, cfg.train, worker.world_size, worker.on_gpu, config=ds_config)
    try:
        state = restore(engine, resume, cfg, worker.rank, worker.world_size)
    except CheckpointError as e:  # raised on every rank alike
        progress.fail(str(e))
        return
    tracker = Tracker(cfg.tracking, tracking_dir(cfg), cfg.cluster.run_name, cfg.model_dump(mode="json"),
                      run_id=state.wandb_run_id, active=worker.rank == 0, attempt=state.attempt,
                      start_step=state.step, workers=worker.world_size, warn=progress.warn_once)
    state.wandb_run_id = tracker.run_id
    if worker.rank == 0:
        log.info("trainable parameters: %s", trainable_parameter_summary(engine.module))
        log.info("%s from step %d on %d workers", "resuming" if resume else "starting", state.step, worker.world_size)
    if batch_note:
        progress.warn_once(batch_note)
    data = setup_data(cfg, processor, worker, state, long_from=model.config.original_max_position_embeddings,
                      on_skip=progress.warn)
    progress.start(state.step, cfg.train.max_steps)

    # A fresh run is evaluated once before training (train.eval_on_start), as the baseline of every curve; a
    # resumed one continues with the RNG streams of the moment it was saved.
    baseline = state.step == 0 and cfg.train.eval_on_start
    last_eval = evaluate(engine, processor, data, cfg, worker, tracker, state.step) if baseline else {}
    if last_eval:
        progress.evaluated(state.step, last_eval)
    resume_rng(state, cfg.train.seed, worker.rank)
    throughput = Throughput(worker.device, worker.world_size)
    losses: list[torch.Tensor] = []
    engine.train()
    while state.step < cfg.train.max_steps:
        loss, requests = train_step(engine, data.train, cfg, worker, flops, throughput,
                                    Requests(stop=progress.stopping()))
        losses.append(loss)
        state.step += 1
        last_step = state.step == cfg.train.max_steps

        if state.step % cfg.train.log_every == 0 or last_step:
            metrics = step_metrics(engine, losses, data.train, throughput, worker)
            losses.clear()
            tracker.log(metrics, state.step)
            progress.step(state.step, metrics)
            if worker.rank == 0:
                log.info("step %d %s", state.step, {k: round(v, 5) for k, v in metrics.items()})

        checkpoint_due = state.step % cfg.train.checkpoint_every == 0 or last_step or requests.stop
        eval_due = (cfg.train.eval_every and state.step % cfg.train.eval_every == 0) or last_step
        if eval_due and not requests.stop:
            last_eval = evaluate(engine, processor, data, cfg, worker, tracker, state.step)
            progress.evaluated(state.step, last_eval)
            throughput.reset()  # eval time is not training throughput
        if checkpoint_due:
            state.position = checkpoint_position(data, worker)
            try:
                save_and_report(engine, cfg, state, {"step": state.step, **last_eval}, worker.rank, worker.world_size)
            except CheckpointError as e:  # the adapter check: raised on every rank alike
                progress.fail(str(e))
                tracker.finish()
                return
            progress.saved(state.step)
            throughput.reset()
        if requests.stop:
            progress.stopped(state.step)
            break
    tracker.finish()
