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


def _allreduces_in_a_step(rank: int, world: int, zero_stage: int) -> tuple[int, list[float]]:
    """How often the engine all-reduced gradient buckets during one step, and the weights after it."""
    import torch

    from vlmtune.train.engine import build_engine

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    engine = build_engine(model, TrainConfig(micro_batch_size=2, zero_stage=zero_stage, warmup_steps=0, lr=0.1),
                          world, on_gpu=False)
    calls = []
    reduce = engine.buffered_allreduce_fallback
    engine.buffered_allreduce_fallback = lambda *a, **k: calls.append(1) or reduce(*a, **k)
    x = torch.full((2, 4), float(rank + 1))
    engine.backward(engine(x).square().mean())
    engine.step()
    return len(calls), engine.module.weight.detach().flatten().tolist()


def test_one_zero0_rank_skips_the_gradient_allreduce():
    """One rank has nothing to average; two ranks at ZeRO-0 still all-reduce and step alike (that one rank's
    gradients equal two ranks' is test_loss_scaling's)."""
    from tests.gloo import run_ranks

    (alone, alone_weights), = run_ranks(_allreduces_in_a_step, 1, 0)
    pair = run_ranks(_allreduces_in_a_step, 2, 0)
    assert alone == 0 and [calls for calls, _ in pair] == [1, 1]
    assert pair[0][1] == pair[1][1] != alone_weights  # ranks saw different data, averaged
