"""DeepSpeed config and the learning-rate schedule."""

from __future__ import annotations

import pytest

from vlmtune.config import TrainConfig
from vlmtune.train.engine import deepspeed_config, lr_lambda


def test_deepspeed_config_follows_ours():
    cfg = TrainConfig(micro_batch_size=4, grad_accum_steps=3, zero_stage=3, bf16=True, grad_clip=0.5)
    ds = deepspeed_config(cfg, world_size=8, on_gpu=True)
    assert ds["train_batch_size"] == 4 * 3 * 8
    assert ds["gradient_accumulation_steps"] == 3 and ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["zero_optimization"]["stage"] == 3 and ds["zero_optimization"]["overlap_comm"]
    assert ds["bf16"] == {"enabled": True} and ds["gradient_clipping"] == 0.5
    assert "optimizer" not in ds  # ours is passed in, no op build
    offload = deepspeed_config(TrainConfig(zero_stage=2, offload_optimizer=True), 2, on_gpu=False)
    assert offload["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert offload["optimizer"]["type"] == "AdamW"


def test_warmup_then_cosine_to_the_floor():
    f = lr_lambda(TrainConfig(max_steps=110, warmup_steps=10, min_lr_ratio=0.1))
    assert f(0) == pytest.approx(1 / 11)
    assert [f(i) for i in range(10)] == sorted(f(i) for i in range(10))
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.55)
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)


def _one_step(rank: int, world: int, bf16: bool, force_allreduce: bool = False) -> tuple[int, list[float]]:
    """One ZeRO-0 step of a small model: how often the engine all-reduced gradient buckets, and the weights
    after it. `force_allreduce`: with DeepSpeed's all_reduce even on one rank."""
    import torch

    from vlmtune.train.engine import build_engine

    torch.manual_seed(0)
    train = TrainConfig(micro_batch_size=2, zero_stage=0, bf16=bf16, warmup_steps=0, lr=0.1)
    engine = build_engine(torch.nn.Linear(4, 2), train, world, on_gpu=False)
    engine.enable_backward_allreduce |= force_allreduce
    calls = []
    reduce = engine.buffered_allreduce_fallback
    engine.buffered_allreduce_fallback = lambda *a, **k: calls.append(1) or reduce(*a, **k)
    x = torch.full((2, 4), float(rank + 1), dtype=torch.bfloat16 if bf16 else torch.float32)
    engine.backward(engine(x).float().square().mean())
    engine.step()
    return len(calls), engine.module.weight.detach().float().flatten().tolist()


@pytest.mark.parametrize("bf16", [False, True])
def test_one_zero0_rank_skips_the_gradient_allreduce(bf16):
    """One rank has nothing to average: its step skips DeepSpeed's all_reduce and ends where the step with it
    does. Two ranks still all-reduce, and step alike (that the average is right: test_loss_scaling)."""
    from tests.gloo import run_ranks

    (alone, weights), = run_ranks(_one_step, 1, bf16)
    (forced, forced_weights), = run_ranks(_one_step, 1, bf16, True)
    pair = run_ranks(_one_step, 2, bf16)
    assert (alone, forced) == (0, 1) and weights == forced_weights
    assert [calls for calls, _ in pair] == [1, 1] and pair[0][1] == pair[1][1]
