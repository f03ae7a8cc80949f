"""Training state in and out of Ray Train checkpoints.

Every rank writes its part into a local directory and reports it with `ray.train.report`; Ray merges
the ranks' files into one checkpoint directory in `RunConfig.storage_path`. A checkpoint holds:

    state/…                  DeepSpeed engine: (trainable) weights, optimizer, LR schedule; ZeRO shards per rank
    worker-<rank>.pt         that rank's data position and RNG states
    trainer_state.json       step, world size, W&B run id (rank 0)
    config.yaml              the resolved vlmtune config, so export needs nothing but the checkpoint

Frozen weights are not saved (LoRA checkpoints stay megabytes, not gigabytes); they come back from the
base model named in the config.
"""

from __future__ import annotations

import json
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray.train
import torch

from vlmtune.config import Config

TAG = "state"


@dataclass
class TrainerState:
    step: int = 0
    position: tuple[int, int] = (0, 0)  # (epoch, index) where this rank's train stream resumes
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


def save_and_report(engine, cfg: Config, state: TrainerState, metrics: dict, rank: int, world_size: int) -> None:
    """All ranks: write this rank's part of the checkpoint and report it (a barrier across ranks)."""
    with tempfile.TemporaryDirectory(prefix="vlmtune-ckpt-") as tmp:
        engine.save_checkpoint(tmp, tag=TAG, exclude_frozen_parameters=True)
        torch.save({"position": state.position, "rng": rng_state()}, Path(tmp) / f"worker-{rank}.pt")
        if rank == 0:
            (Path(tmp) / "trainer_state.json").write_text(json.dumps(
                {"step": state.step, "world_size": world_size, "wandb_run_id": state.wandb_run_id}))
            cfg.save(Path(tmp) / "config.yaml")
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"checkpoint-{state.step:07d}")


def restore(engine, checkpoint: ray.train.Checkpoint, rank: int, world_size: int) -> TrainerState:
    """Load the engine and this rank's data position and RNG states; the world size must not have changed.

    The RNG states are returned, not applied: building the data pipeline draws from the global RNG (a
    DataLoader iterator takes a seed), so the loop applies them right before the first resumed step.
    """
    with checkpoint.as_directory() as directory:
        directory = Path(directory)
        saved = json.loads((directory / "trainer_state.json").read_text())
        if saved["world_size"] != world_size:
            raise RuntimeError(
                f"checkpoint {checkpoint.path} was written by {saved['world_size']} workers but this run has "
                f"{world_size}: ZeRO shards and data positions are per rank; resume with "
                f"cluster.num_workers={saved['world_size']}")
        engine.load_checkpoint(str(directory), tag=TAG, load_module_strict=False)
        worker = torch.load(directory / f"worker-{rank}.pt", weights_only=False)
    return TrainerState(step=saved["step"], position=tuple(worker["position"]), wandb_run_id=saved["wandb_run_id"],
                        rng=worker["rng"])
