"""DeepSpeed engine from our config, on the process group Ray Train already created.

The optimizer is PyTorch's AdamW (fused on CUDA) handed to DeepSpeed rather than named in the DeepSpeed
config: that avoids compiling DeepSpeed's FusedAdam/CPUAdam ops at start-up and keeps one optimizer
implementation on CPU and GPU. ZeRO-Offload is the exception, it needs DeepSpeed's CPU Adam.

DeepSpeed is imported when an engine is built, not with this module: the planner (train/planner.py) reads the
bucket sizes from `deepspeed_config` without loading DeepSpeed.
"""

from __future__ import annotations

import math

import torch

from vlmtune.config import TrainConfig


def deepspeed_config(train: TrainConfig, world_size: int, on_gpu: bool, load_universal: bool = False) -> dict:
    """`load_universal`: the engine will load a universal checkpoint (one converted from another world size,
    see train/universal.py)."""
    zero: dict = {"stage": train.zero_stage}
    if train.zero_stage > 0:
        # ZeRO-3 allocates its gradient bucket whole, per dtype (5e8 elements: 1-2 GB per worker); CPU workers
        # share the host's memory, so they take 5e7
        bucket = 5e8 if on_gpu else 5e7
        zero.update(contiguous_gradients=True, overlap_comm=on_gpu, reduce_bucket_size=bucket,
                    allgather_bucket_size=bucket)
    if train.zero_stage == 3:
        zero.update(stage3_gather_16bit_weights_on_model_save=False, stage3_prefetch_bucket_size=5e7,
                    stage3_param_persistence_threshold=1e5)
        if not on_gpu:
            # CPU workers share the host's memory: keep about one decoder layer gathered at a time rather
            # than DeepSpeed's default of up to 1e9 parameters (2 GB in bf16 per worker at real size).
            zero.update(stage3_max_live_parameters=1e8, stage3_max_reuse_distance=1e8)
    if train.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    config = {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum_steps,
        "train_batch_size": train.micro_batch_size * train.grad_accum_steps * world_size,
        "gradient_clipping": train.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": train.bf16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if load_universal:
        config["checkpoint"] = {"load_universal": True}
    if train.offload_optimizer:
        config["optimizer"] = {"type": "AdamW", "params": {
            "lr": train.lr, "betas": list(train.betas), "eps": train.eps, "weight_decay": train.weight_decay}}
    return config


def lr_lambda(train: TrainConfig):
    """Linear warmup to 1, then cosine down to `min_lr_ratio` at `max_steps`."""

    def factor(step: int) -> float:
        if step < train.warmup_steps:
            return (step + 1) / (train.warmup_steps + 1)
        progress = min(1.0, (step - train.warmup_steps) / max(1, train.max_steps - train.warmup_steps))
        return train.min_lr_ratio + (1 - train.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only; norms, biases and the learnable separators are not decayed."""
    decay, no_decay = [], []
    for _, param in model.named_parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 and weight_decay > 0 else no_decay).append(param)
    return [g for g in ({"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0})
            if g["params"]]


def init_distributed(on_gpu: bool) -> None:
    """DeepSpeed's communication on the process group Ray Train created (NCCL on GPUs, gloo on CPUs).

    On CPU, DeepSpeed's backend would also JIT-compile its shared-memory all-reduce kernel: a C++ build of
    35-60 s on two cores the first time, and again whenever the compile command changes (another venv, a
    Slurm job's environment). That kernel only serves DeepSpeed inference (`inference_all_reduce`); training's
    collectives go through torch.distributed. So it is marked unavailable before the backend is made (DeepSpeed
    keeps edits to `__compatible_ops__`)."""
    import deepspeed  # here, not at the top: the planner reads this module's config without DeepSpeed

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")


def build_engine(model: torch.nn.Module, train: TrainConfig, world_size: int, on_gpu: bool,
                 load_universal: bool = False, config: dict | None = None):
    """`deepspeed.initialize` with our optimizer and schedule, on the process group Ray Train created (NCCL on
    GPUs, gloo on CPUs); the engine steps the schedule itself. `config`: the DeepSpeed config the model was
    built with (`deepspeed_config(train, world_size, on_gpu, load_universal)` when not given)."""
    import deepspeed

    init_distributed(on_gpu)
    groups = parameter_groups(model, train.weight_decay)
    optimizer = None
    if not train.offload_optimizer:
        optimizer = torch.optim.AdamW(groups, lr=train.lr, betas=train.betas, eps=train.eps, fused=on_gpu)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, model_parameters=groups if optimizer is None else None,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(train)),
        config=config or deepspeed_config(train, world_size, on_gpu, load_universal))
    if world_size == 1 and train.zero_stage == 0:
        # One rank has nothing to average, yet DeepSpeed would flatten every gradient into a bucket, all_reduce
        # it over that one rank and copy it back each step (2-3% of a tiny-model step on CPU; at real size a
        # copy of every gradient). ZeRO 1-3 reduce through their optimizer, which needs this path.
        engine.enable_backward_allreduce = False
    return engine
