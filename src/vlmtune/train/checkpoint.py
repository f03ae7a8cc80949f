"""Training state in and out of Ray Train checkpoints (the files themselves are defined in runs.py).

Every rank writes its part into a local directory and reports it with `ray.train.report`; Ray merges the
ranks' files into one checkpoint directory under `RunConfig.storage_path`.
"""

from __future__ import annotations

import random
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import ray.train
import torch

from vlmtune import runs
from vlmtune.config import Config
from vlmtune.data.position import DataPosition
from vlmtune.errors import CheckpointError


@dataclass
class LoopState:
    """Where this rank's training stands: what a checkpoint saves and a resume restores."""

    step: int = 0
    position: DataPosition = field(default_factory=DataPosition)  # where this rank's train data resumes
    wandb_run_id: str | None = None
    rng: dict | None = None  # restored by the loop right before training resumes (see restore)


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


def check_resumable(checkpoint: ray.train.Checkpoint, world_size: int) -> runs.TrainerState:
    """The checkpoint's shared state, if this run can resume from it (no engine needed yet)."""
    with checkpoint.as_directory() as directory:
        saved = runs.read_trainer_state(directory)
    if saved.world_size != world_size:
        raise CheckpointError(
            f"checkpoint {checkpoint.path} was written by {saved.world_size} workers but this run has {world_size}: "
            f"ZeRO shards and data positions are per rank; resume with cluster.num_workers={saved.world_size}")
    return saved


def save_and_report(engine, cfg: Config, state: LoopState, metrics: dict, rank: int, world_size: int) -> None:
    """All ranks: write this rank's part of the checkpoint and report it (a barrier across ranks)."""
    with tempfile.TemporaryDirectory(prefix="vlmtune-ckpt-") as tmp:
        engine.save_checkpoint(tmp, tag=runs.DEEPSPEED_TAG, exclude_frozen_parameters=True)
        shared = runs.TrainerState(step=state.step, world_size=world_size, wandb_run_id=state.wandb_run_id)
        runs.write_checkpoint_files(Path(tmp), rank, shared, cfg, {"position": state.position, "rng": rng_state()})
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=runs.checkpoint_name(state.step))


def restore(engine, checkpoint: ray.train.Checkpoint, rank: int) -> LoopState:
    """Load the engine and this rank's data position and RNG states.

    The RNG states are returned, not applied: building the data pipeline draws from the global RNG (a
    DataLoader iterator takes a seed), so the loop applies them right before the first resumed step.
    """
    with checkpoint.as_directory() as directory:
        saved = runs.read_trainer_state(directory)
        engine.load_checkpoint(str(directory), tag=runs.DEEPSPEED_TAG, load_module_strict=False)
        worker = runs.read_worker_state(directory, rank)
    return LoopState(step=saved.step, position=worker["position"], wandb_run_id=saved.wandb_run_id,
                    rng=worker["rng"])
