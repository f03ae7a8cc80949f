"""Training state in and out of Ray Train checkpoints (the files themselves are defined in runs.py).

Every rank writes its part into a local directory and reports it with `ray.train.report`; Ray merges the
ranks' files into one checkpoint directory under `RunConfig.storage_path`. Once every rank's report has
returned (its files are in storage), rank 0 writes the completion marker; a resume only ever starts from a
complete checkpoint (`choose_checkpoint`). A checkpoint resumes on any number of workers: when the world
size changed, the DeepSpeed state is re-partitioned (train/universal.py) and the old ranks' data positions
are handed to the loop, which spreads the rest of the epoch over the new ranks.
"""

from __future__ import annotations

import logging
import random
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import ray.train
import torch
import torch.distributed as dist

from vlmtune import runs, storage
from vlmtune.config import Config
from vlmtune.data.position import DataPosition
from vlmtune.errors import CheckpointError
from vlmtune.train import universal

log = logging.getLogger(__name__)


@dataclass
class LoopState:
    """Where this rank's training stands: what a checkpoint saves and a resume restores."""

    step: int = 0
    # where this rank's train data resumes; None after a change of world size, when no saved position belongs
    # to this rank (see previous_positions)
    position: DataPosition | None = None
    wandb_run_id: str | None = None
    rng: dict | None = None  # restored by the loop right before training resumes (see resume_rng)
    # After a change of world size: every old rank's saved position, in old-rank order
    previous_positions: list[DataPosition] | None = None
    attempt: str = ""  # this start of the training function, the same on every rank (not saved)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def resume_rng(state: LoopState, seed: int, rank: int) -> None:
    """Right before the first resumed step: this rank's saved RNG streams. After a change of world size no
    saved stream belongs to this rank: fresh ones, seeded from (seed, step, rank), the same on every rerun."""
    if state.rng is not None:
        set_rng_state(state.rng)
    elif state.previous_positions is not None:
        fresh = int(np.random.SeedSequence([seed, state.step, rank]).generate_state(1)[0])
        random.seed(fresh)
        np.random.seed(fresh)
        torch.manual_seed(fresh)


def new_attempt_id(rank: int) -> str:
    """Collective: an id for this start of the training function, drawn by rank 0 and shared with all."""
    attempt = [uuid.uuid4().hex[:8] if rank == 0 else None]
    dist.broadcast_object_list(attempt, src=0)
    return attempt[0]


# ----------------------------------------------------------------------------------------------- resume


@dataclass(frozen=True)
class Resume:
    """The checkpoint a run resumes from."""

    url: str  # local path or URL
    saved: runs.TrainerState
    own_run: bool  # it lies in this run's directory: the run's W&B run goes on from its step


def choose_checkpoint(cfg: Config, reported: ray.train.Checkpoint | None, resume_from: str | None,
                      warn: Callable[[str], None]) -> Resume | None:
    """The complete checkpoint to resume from (None: start from scratch).

    That is the checkpoint Ray Train reported last (a restarted worker group, a rerun of the run), else the
    newest complete one in the run's directory (Ray Train can lose track of its checkpoints: seen when an
    elastic run's restart first waited in vain for a lost node), else `cluster.resume_from`. When the one
    wanted is incomplete, the newest complete one up to its step in the same directory takes its place, and
    `warn` says so.
    """
    run = runs.run_dir(cfg)
    own = runs.complete_checkpoints(run) if reported is None else []
    if reported is not None:  # always in this run's directory; Ray's path has no scheme or query
        wanted = storage.join(run, PurePosixPath(reported.path).name)
    elif own:
        warn(f"Ray Train handed over no checkpoint of this run: resuming from its newest complete one, {own[0]}")
        wanted = own[0]
    elif resume_from:
        wanted = storage.resolve(resume_from)
    else:
        return None
    reason = runs.incomplete_reason(wanted)
    if reason == runs.MISSING and reported is None:
        raise CheckpointError(f"cluster.resume_from={resume_from}: there is no checkpoint there")
    url: str | None = wanted
    if reason is not None:
        directory = storage.parent(wanted)
        earlier = runs.complete_checkpoints(directory, max_step=runs.checkpoint_step(storage.basename(wanted)))
        url = earlier[0] if earlier else None
        then = f"resuming from {url} instead" if url else \
            f"no complete checkpoint before it in {directory}: training starts from scratch"
        message = f"checkpoint {wanted} is not used: {reason}; {then}"
        log.warning(message)
        warn(message)
    if url is None:
        return None
    return Resume(url, runs.read_trainer_state(url), own_run=storage.parent(url) == run)


def loads_universal(resume: Resume | None, world_size: int, zero_stage: int) -> bool:
    """Whether the engine must be built to load a universal checkpoint (see train/universal.py)."""
    return resume is not None and universal.needs_conversion(resume.saved.world_size, world_size, zero_stage)


def restore(engine, resume: Resume | None, cfg: Config, rank: int, world_size: int) -> LoopState:
    """Collective: load the engine and the data positions and RNG states of `resume` (a fresh state when
    None), and agree on this attempt's id.

    On the saved world size a rank gets its own position and RNG states. On another one the DeepSpeed state
    is re-partitioned, and the state carries every old rank's position (`previous_positions`) instead, for
    the loop to spread what is left of the epoch over the new ranks; RNG streams start afresh (resume_rng).
    The RNG states are returned, not applied: building the data pipeline draws from the global RNG (a
    DataLoader iterator takes a seed), so the loop applies them right before the first resumed step.
    """
    attempt = new_attempt_id(rank)
    if resume is None:
        return LoopState(attempt=attempt)
    saved = resume.saved
    run_id = saved.wandb_run_id if resume.own_run else None  # a new run from another run's checkpoint: new W&B run
    with ray.train.Checkpoint(resume.url).as_directory() as directory:
        if universal.needs_conversion(saved.world_size, world_size, cfg.train.zero_stage):
            universal.load_resharded(engine, directory, runs.DEEPSPEED_TAG, saved.world_size)
        else:
            engine.load_checkpoint(str(directory), tag=runs.DEEPSPEED_TAG, load_module_strict=False)
        if saved.world_size == world_size:
            worker = runs.read_worker_state(directory, rank)
            return LoopState(step=saved.step, position=worker["position"], wandb_run_id=run_id,
                             rng=worker["rng"], attempt=attempt)
        previous = [runs.read_worker_state(directory, r)["position"] for r in range(saved.world_size)]
    log.info("resuming %d workers' checkpoint on %d workers", saved.world_size, world_size)
    return LoopState(step=saved.step, position=None, wandb_run_id=run_id, previous_positions=previous,
                     attempt=attempt)


# ------------------------------------------------------------------------------------------------- save


def check_adapter(module: torch.nn.Module, step: int, device: torch.device) -> None:
    """Collective: raise CheckpointError on every rank alike when the LoRA adapter about to be saved is empty or
    all zero, a checkpoint that would export the base model unchanged.

    Known causes: ZeRO-3 + PEFT, where partitioned weights read without gathering them are empty; a
    learning rate that underflows, or adapters off the loss path, leaving lora_B at its zero initialisation.
    Each rank adds what it holds: under ZeRO-3 its partition of each weight (`ds_tensor`), otherwise rank 0
    the whole weight (every rank has the same).
    """
    rank = dist.get_rank()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # elements and sum of squares: lora_A, lora_B
    for name, param in module.named_parameters():
        kind = 0 if ".lora_A." in name else 2 if ".lora_B." in name else None
        if kind is None:
            continue
        held = param.ds_tensor if hasattr(param, "ds_tensor") else param.data if rank == 0 else None
        if held is not None:
            totals[kind] += held.numel()
            totals[kind + 1] += held.detach().double().pow(2).sum().to(device)
    dist.all_reduce(totals)
    elements, zero = int(totals[0] + totals[2]), [m for m, i in (("lora_A", 1), ("lora_B", 3)) if totals[i] == 0]
    if elements == 0 or zero:
        what = "empty (no adapter weights on any worker)" if elements == 0 else f"all zero ({' and '.join(zero)})"
        raise CheckpointError(
            f"the LoRA adapter to save at step {step} is {what}: training has not changed the model, and the "
            "checkpoint would export the base model; check train.lr and model.lora.targets (under ZeRO-3, "
            "partitioned adapter weights must be gathered before they are read)")


def write_checkpoint(engine, cfg: Config, state: LoopState, rank: int, world_size: int, directory: Path) -> None:
    """This rank's files of a checkpoint: its DeepSpeed shard, its data position and RNG states (and, on rank 0,
    the shared state and config)."""
    engine.save_checkpoint(str(directory), tag=runs.DEEPSPEED_TAG, exclude_frozen_parameters=True)
    shared = runs.TrainerState(step=state.step, world_size=world_size, wandb_run_id=state.wandb_run_id)
    runs.write_checkpoint_files(directory, rank, shared, cfg, {"position": state.position, "rng": rng_state()})


def checkpoint_dir_name(cfg: Config, state: LoopState, rank: int) -> str:
    """Collective: this step's checkpoint directory name (see runs.checkpoint_name), chosen by rank 0."""
    name = [None]
    if rank == 0:
        name[0] = runs.checkpoint_name(state.step)
        if storage.exists(storage.join(runs.run_dir(cfg), name[0])):  # left by an attempt this one rolled back
            name[0] = runs.checkpoint_name(state.step, state.attempt)
    dist.broadcast_object_list(name, src=0)
    return name[0]


def mark_if_stored(directory: str, step: int, written: list[dict[str, int]]) -> None:
    """Rank 0, once every rank's files are persisted: the completion marker, if storage holds them all."""
    files = {path: size for rank_files in written for path, size in rank_files.items()}
    stored = storage.file_sizes(directory)
    missing = sorted(path for path, size in files.items() if stored.get(path) != size)
    if missing:  # left unmarked: a resume falls back to the checkpoint before, and says why
        log.warning("checkpoint %s is not marked complete: %d files are missing in storage (%s)", directory,
                    len(missing), ", ".join(missing[:3]))
        return
    runs.mark_complete(directory, step, files)


def save_and_report(engine, cfg: Config, state: LoopState, metrics: dict, rank: int, world_size: int) -> None:
    """All ranks: write this rank's part of the checkpoint, report it, then rank 0 marks it complete.

    `ray.train.report` returns on a rank once that rank's files are uploaded; gathering every rank's file
    list afterwards is the barrier that makes the marker come last. A LoRA adapter about to be saved empty or
    all zero stops the run first (CheckpointError on every rank).
    """
    if cfg.model.lora.enabled:
        check_adapter(engine.module, state.step, engine.device)
    name = checkpoint_dir_name(cfg, state, rank)
    with storage.staging_dir("ckpt") as tmp:
        write_checkpoint(engine, cfg, state, rank, world_size, tmp)
        written = storage.file_sizes(str(tmp))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=name)
    written_by_all = universal.all_gather(written)
    if rank == 0:
        mark_if_stored(storage.join(runs.run_dir(cfg), name), state.step, written_by_all)
