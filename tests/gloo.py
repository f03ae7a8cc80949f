"""Run a function on N ranks of a real gloo process group (separate processes, no Ray): for the collective
parts of training — loss reductions, gradient averaging, rank agreement — at unit-test speed.

The ranks come from a fork server, never from a fork of the test process: that process is a Ray driver (the
session's local cluster), and a fork of it broke its connection to Ray's GCS, so that a later Ray call in
the test session waited forever. The fork server is a fresh interpreter that imports the heavy libraries
once; each rank forks from it in well under a second (spawning re-imports them, ~10 s a rank)."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable

import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, fn: Callable, args: tuple, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        results[rank] = fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


PRELOAD = ["torch", "torch.distributed", "deepspeed", "transformers", "peft", "tests.gloo"]


def run_ranks(fn: Callable, world_size: int, *args) -> list:
    """`fn(rank, world_size, *args)` on every rank (fn must be importable: a module-level function); the
    results in rank order."""
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)  # read when the server starts (the first call)
    with context.Manager() as manager:
        results = manager.dict()
        mp.start_processes(_entry, args=(world_size, _free_port(), fn, args, results), nprocs=world_size,
                           join=True, start_method="forkserver")
        return [results[r] for r in range(world_size)]
