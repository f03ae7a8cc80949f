"""DeepSpeed state across world sizes: a checkpoint written by N ranks, loaded by M.

ZeRO-1/2/3 keep the fp32 master weights and the Adam moments partitioned by rank: a checkpoint holds one
flat shard per rank, which DeepSpeed's plain loader can only read back on as many ranks. DeepSpeed's
universal checkpoint stores them per parameter instead: `ds_to_universal` converts, and an engine built
with `checkpoint.load_universal` re-partitions them for its own world size as it loads (weights, fp32
masters, both Adam moments and Adam's step, exactly). That fits vlmtune's checkpoints as they are:
frozen parameters are left out of them, and the conversion only reads the optimizer's shards, which hold
exactly the trainable parameters; the engine takes the trainable weights from there and keeps the frozen
ones as the model was built; PyTorch's AdamW passed in by `train/engine.py` saves the same state as
DeepSpeed's own Adam. The LR schedule and step counters come from the model states file, as in a plain
load.

ZeRO-0 needs no conversion: every rank holds the whole optimizer state, and rank 0 saved it.

The conversion runs once per host, by the lowest rank there, into a staging directory (`storage.staging_dir`
under `TMPDIR`; a full fine-tune needs room for the fp32 weights and both moments); the other ranks wait, then
all load, and the directory is removed (by the next conversion on that host, if its maker was killed). Once
per host rather than once in all: the checkpoint is in storage that every host reads, a temporary directory
is not.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import socket
from pathlib import Path

import torch.distributed as dist

from vlmtune import storage
from vlmtune.errors import CheckpointError

log = logging.getLogger(__name__)


def needs_conversion(saved_world_size: int, world_size: int, zero_stage: int) -> bool:
    return saved_world_size != world_size and zero_stage > 0


def convert(checkpoint_dir: Path, tag: str, out_dir: Path) -> None:
    """DeepSpeed's `ds_to_universal` (the arguments of its command line) from `checkpoint_dir/tag` into
    `out_dir/tag`; one process, no pool: it runs inside a training worker."""
    from deepspeed.checkpoint.ds_to_universal import main

    main(argparse.Namespace(input_folder=str(checkpoint_dir / tag), output_folder=str(out_dir / tag),
                            num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False, strict=True,
                            inject_missing_state=True))


def all_gather(value) -> list:
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def load_resharded(engine, checkpoint_dir: str | Path, tag: str, saved_world_size: int) -> None:
    """Collective: load a checkpoint of `saved_world_size` ranks into `engine` (built with `load_universal`)
    on this world size. A failed conversion raises the same CheckpointError on every rank."""
    rank, hosts = dist.get_rank(), all_gather(socket.gethostname())
    converts = hosts.index(hosts[rank]) == rank
    with contextlib.ExitStack() as stack:
        made = error = None
        if converts:
            made = str(stack.enter_context(storage.staging_dir("universal")))
            log.info("converting %s (%d ranks) to a universal checkpoint in %s", checkpoint_dir, saved_world_size,
                     made)
            try:
                convert(Path(checkpoint_dir), tag, Path(made))
            except Exception as e:  # reported on every rank below, so no rank waits forever
                error = f"{type(e).__name__}: {e}"
        results = all_gather((made, error))
        failed = [e for _, e in results if e is not None]
        if failed:
            raise CheckpointError(f"could not convert checkpoint {checkpoint_dir} from {saved_world_size} to "
                                  f"{dist.get_world_size()} workers: {failed[0]}")
        universal, _ = results[hosts.index(hosts[rank])]
        engine.load_checkpoint(universal, tag=tag, load_module_strict=False)
        dist.barrier()  # everyone on this host has read it
