"""A run's directory and the checkpoint format: every file name in them is written and read here.

    <storage_path>/<run_name>/          run_dir(cfg)
      checkpoint-NNNNNNN/               one per saved step; Ray Train gathers every rank's files here
        state/…                         DeepSpeed engine: trainable weights, optimizer, LR schedule (ZeRO shards
                                        per rank)
        worker-<rank>.pt                that rank's data position and RNG states
        trainer_state.json              step, world size, W&B run id
        config.yaml                     the resolved config, so export needs nothing but the checkpoint
      export/                           the Hugging Face directory written after training (export_dir(cfg))
      metrics.jsonl                     every logged scalar (see tracking.py)
      logs/                             the log files of the jobs and of the training workers
      wandb/                            the W&B run

Frozen weights are not saved (LoRA checkpoints stay megabytes, not gigabytes); export rebuilds them from
the base model named in the stored config.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from vlmtune import storage
from vlmtune.config import Config, load_config
from vlmtune.errors import CheckpointError

DEEPSPEED_TAG = "state"
TRAINER_STATE = "trainer_state.json"
CONFIG = "config.yaml"
EXPORT = "export"
LOGS = "logs"


def run_dir(cfg: Config) -> str:
    """The run's directory: absolute when local, so Ray workers (another working directory) agree on it."""
    return storage.join(storage.resolve(cfg.cluster.storage_path), cfg.cluster.run_name)


def export_dir(cfg: Config) -> str:
    return storage.resolve(cfg.export.dir) if cfg.export.dir else storage.join(run_dir(cfg), EXPORT)


def logs_dir(cfg: Config) -> str:
    return storage.join(run_dir(cfg), LOGS)


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step:07d}"


def worker_file(rank: int) -> str:
    return f"worker-{rank}.pt"


@dataclass
class TrainerState:
    """What every rank shares about a checkpoint."""

    step: int = 0
    world_size: int = 1
    wandb_run_id: str | None = None


def write_checkpoint_files(directory: Path, rank: int, state: TrainerState, cfg: Config, worker: dict) -> None:
    """This rank's files of a checkpoint (DeepSpeed writes its own `state/` beside them)."""
    torch.save(worker, directory / worker_file(rank))
    if rank == 0:
        (directory / TRAINER_STATE).write_text(json.dumps(asdict(state)))
        cfg.save(directory / CONFIG)


def is_checkpoint(path: str | Path) -> bool:
    return (Path(path) / TRAINER_STATE).is_file()


def read_trainer_state(directory: str | Path) -> TrainerState:
    path = Path(directory) / TRAINER_STATE
    if not path.is_file():
        raise CheckpointError(f"{directory} is not a vlmtune checkpoint (no {TRAINER_STATE})")
    return TrainerState(**json.loads(path.read_text()))


def read_worker_state(directory: str | Path, rank: int) -> dict:
    return torch.load(Path(directory) / worker_file(rank), weights_only=False)


def read_config(directory: str | Path) -> Config:
    return load_config(Path(directory) / CONFIG)


def trained_state_dict(directory: str | Path, zero_stage: int) -> dict[str, torch.Tensor]:
    """The trained parameters of a checkpoint in fp32, ZeRO-2/3 partitions consolidated (DeepSpeed's own
    zero_to_fp32 reader; imported here only, so reading an export never imports DeepSpeed)."""
    directory = Path(directory)
    if zero_stage == 0:
        states = torch.load(directory / DEEPSPEED_TAG / "mp_rank_00_model_states.pt", map_location="cpu",
                            weights_only=False)
        return {k: v.float() for k, v in states["module"].items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(directory), tag=DEEPSPEED_TAG, exclude_frozen_parameters=True)
