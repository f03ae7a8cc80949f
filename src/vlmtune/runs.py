"""A run's directory and the checkpoint format: every file name in them is written and read here.

    <storage_path>/<run_name>/          run_dir(cfg)
      checkpoint-NNNNNNN/               one per saved step; Ray Train gathers every rank's files here
        state/…                         DeepSpeed engine: trainable weights, optimizer, LR schedule (ZeRO shards
                                        per rank)
        worker-<rank>.pt                that rank's data position and RNG states
        trainer_state.json              step, world size, W&B run id
        config.yaml                     the resolved config, so export needs nothing but the checkpoint
        complete.json                   written last, once every rank's files are in storage: their sizes
      checkpoint-NNNNNNN-<attempt>/     the same step saved again by a later attempt (see checkpoint_name)
      export/                           the Hugging Face directory written after training (export_dir(cfg))
      metrics.jsonl                     every logged scalar (see tracking.py)
      logs/                             the log files of the jobs and of the training workers
      wandb/                            the W&B run

Frozen weights are not saved (LoRA checkpoints stay megabytes, not gigabytes); export rebuilds them from
the base model named in the stored config.

A checkpoint is complete when its `complete.json` exists and every file it lists is in storage with the
listed size. Only complete checkpoints are resumed or exported: a run killed while its workers were
uploading leaves a directory that looks like a checkpoint but holds some ranks' files only.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from vlmtune import storage
from vlmtune.config import Config, load_config
from vlmtune.errors import CheckpointError

DEEPSPEED_TAG = "state"
TRAINER_STATE = "trainer_state.json"
CONFIG = "config.yaml"
COMPLETE = "complete.json"
EXPORT = "export"
LOGS = "logs"


def run_dir(cfg: Config) -> str:
    """The run's directory: absolute when local, so Ray workers (another working directory) agree on it."""
    return storage.join(storage.resolve(cfg.cluster.storage_path), cfg.cluster.run_name)


def export_dir(cfg: Config) -> str:
    return storage.resolve(cfg.export.dir) if cfg.export.dir else storage.join(run_dir(cfg), EXPORT)


def logs_dir(cfg: Config) -> str:
    return storage.join(run_dir(cfg), LOGS)


def checkpoint_name(step: int, attempt: str | None = None) -> str:
    """`checkpoint-NNNNNNN`. An attempt that resumed from an earlier step than a checkpoint left in the run
    (an incomplete one it fell back from) saves that step again under `checkpoint-NNNNNNN-<attempt>`: Ray
    Train still lists the older directory and deletes it in its time, which must not take the new one."""
    return f"checkpoint-{step:07d}" + (f"-{attempt}" if attempt else "")


CHECKPOINT_NAME = re.compile(r"checkpoint-(\d{7,})(-\w+)?")


def checkpoint_step(name: str) -> int | None:
    """The step of a checkpoint directory name, None for any other name."""
    match = CHECKPOINT_NAME.fullmatch(name)
    return int(match.group(1)) if match else None


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
    try:
        text = storage.read_text(storage.join(str(directory), TRAINER_STATE))
    except FileNotFoundError:
        raise CheckpointError(f"{directory} is not a vlmtune checkpoint (no {TRAINER_STATE})") from None
    return TrainerState(**json.loads(text))


def mark_complete(directory: str, step: int, files: dict[str, int]) -> None:
    """The completion marker, written last: the relative path and size of every file the ranks wrote."""
    storage.write_atomic(storage.join(directory, COMPLETE),
                         json.dumps({"step": step, "marked_at": time.time(), "files": files}))


MISSING = "it does not exist"


def incomplete_reason(directory: str | Path) -> str | None:
    """Why the checkpoint in `directory` (local or URL) cannot be trusted, or None when it is complete."""
    sizes = storage.file_sizes(str(directory))
    if not sizes:
        return MISSING
    if COMPLETE not in sizes:
        return "it has no completion marker (the run stopped before every worker's files were saved)"
    listed = json.loads(storage.read_text(storage.join(str(directory), COMPLETE)))["files"]
    bad = sorted(f for f, size in listed.items() if sizes.get(f) != size)
    if bad:
        return f"{len(bad)} of its files are missing or cut short ({', '.join(bad[:3])})"
    return None


def complete_checkpoints(run_directory: str, max_step: int | None = None) -> list[str]:
    """The complete checkpoints of a run directory, newest first (a step saved twice: the later one first),
    only those up to `max_step` when given."""
    found = []
    for directory in storage.subdirectories(run_directory):
        step = checkpoint_step(storage.basename(directory))
        if step is None or (max_step is not None and step > max_step) or incomplete_reason(directory):
            continue
        marked_at = json.loads(storage.read_text(storage.join(directory, COMPLETE)))["marked_at"]
        found.append((step, marked_at, directory))
    return [directory for *_, directory in sorted(found, reverse=True)]


def require_complete(directory: str | Path) -> None:
    """Raise CheckpointError, naming the newest complete alternative, unless `directory` is complete."""
    reason = incomplete_reason(directory)
    if reason is None:
        return
    alternatives = complete_checkpoints(storage.parent(str(directory)))
    hint = f"; the newest complete one is {alternatives[0]}" if alternatives else ""
    raise CheckpointError(f"checkpoint {directory} cannot be used: {reason}{hint}")


def read_worker_state(directory: str | Path, rank: int) -> dict:
    return torch.load(Path(directory) / worker_file(rank), weights_only=False)


def read_config(directory: str | Path) -> Config:
    return load_config(Path(directory) / CONFIG)


def trained_state_dict(directory: str | Path, zero_stage: int,
                       dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The trained parameters of a checkpoint in `dtype` (from the fp32 masters), ZeRO-2/3 partitions
    consolidated one parameter at a time (DeepSpeed's own zero_to_fp32 reader, lazily; imported here only,
    so reading an export never imports DeepSpeed)."""
    directory = Path(directory)
    if zero_stage == 0:
        states = torch.load(directory / DEEPSPEED_TAG / "mp_rank_00_model_states.pt", map_location="cpu",
                            weights_only=False)
        return {k: v.to(dtype) for k, v in states["module"].items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint, to_torch_tensor

    lazy = get_fp32_state_dict_from_zero_checkpoint(str(directory), tag=DEEPSPEED_TAG,
                                                    exclude_frozen_parameters=True, lazy_mode=True)
    return to_torch_tensor(lazy, dtype=dtype)
