"""The training loop's parts that need no Ray: eval-loss reduction, rank agreement on failures, FLOPs,
throughput, the logged gradient norm. Collectives run on a real gloo group."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tests.gloo import run_ranks
from vlmtune.config import FreezeConfig, LoraConfig, ModelConfig, TrainConfig
from vlmtune.data.batching import MicroBatch
from vlmtune.errors import ShardError
from vlmtune.models.loading import prepare_model
from vlmtune.train import metrics as metrics_mod
from vlmtune.train.loop import Worker, agree_on_failure, eval_loss, step_metrics
from vlmtune.train.metrics import FlopCounter, Throughput


class FixedLoss(torch.nn.Module):
    """Each batch carries its own loss value (the mean over its answer tokens)."""

    def forward(self, loss_value):
        return type("Out", (), {"loss": loss_value[0]})()


def batch(loss: float, answer: int) -> MicroBatch:
    return MicroBatch(inputs={"loss_value": torch.tensor([loss])}, ids=["x"], epochs=[0], lengths=[answer + 2],
                      image_tokens=0, answer_tokens=answer, positions=answer + 2)


# rank → its batches (loss, answer tokens): unequal token counts within and across ranks
RANK_BATCHES = {0: [(1.0, 2), (3.0, 6)], 1: [(5.0, 4)]}


def _eval_loss_on_rank(rank: int, world: int) -> float:
    batches = iter([batch(*b) for b in RANK_BATCHES[rank]] * 2)
    return eval_loss(FixedLoss(), batches, len(RANK_BATCHES[rank]), torch.device("cpu"))


def test_eval_loss_weights_every_answer_token_once_across_batches_and_ranks():
    results = run_ranks(_eval_loss_on_rank, 2)
    expected = (1.0 * 2 + 3.0 * 6 + 5.0 * 4) / (2 + 6 + 4)  # not the mean of batch means (3.0)
    assert results == [pytest.approx(expected)] * 2


def _agree(rank: int, world: int) -> list[str | None]:
    worker = Worker(rank, world, torch.device("cpu"))
    return [agree_on_failure(ShardError(f"shard {rank} is broken") if rank in failing else None, worker)
            for failing in ([], [1], [0, 1])]


def test_ranks_agree_on_the_first_failure():
    expected = [None, "shard 1 is broken (worker 1)", "shard 0 is broken (worker 0)"]
    assert run_ranks(_agree, 2) == [expected, expected]


def test_flops_follow_the_6n_rule_and_what_trains():
    full, _ = prepare_model(ModelConfig(lora=LoraConfig(enabled=False), freeze=FreezeConfig(vision_tower=False)),
                            torch.float32)
    lora, _ = prepare_model(ModelConfig(lora=LoraConfig(enabled=True)), torch.float32)
    f_full, f_lora = FlopCounter.for_model(full), FlopCounter.for_model(lora)
    assert f_full.text_params == f_lora.text_params > 0  # adapters are not counted as matmul weights
    assert f_full.text_weights_train and f_full.vision_backward
    assert not f_lora.text_weights_train and not f_lora.vision_backward
    lengths, no_images = [10, 10], torch.zeros(0, 2, dtype=torch.long)
    attention = 2 * f_full.text_layers * f_full.text_hidden * 2 * 10**2
    assert f_full.step_flops(lengths, no_images) == pytest.approx(3 * (2 * f_full.text_params * 20 + attention))
    assert f_lora.step_flops(lengths, no_images) == pytest.approx(2 * (2 * f_full.text_params * 20 + attention))
    # one 2x2-crop image: the global view + 4 crops through the vision tower
    image = torch.tensor([[2 * f_full.tile, 2 * f_full.tile]])
    vision = f_full.step_flops(lengths, image) - f_full.step_flops(lengths, no_images)
    per_crop = 2 * f_full.vision_params * f_full.vision_tokens + 4 * f_full.vision_layers * f_full.vision_hidden * (
        f_full.vision_tokens**2)
    assert vision == pytest.approx(3 * 5 * per_crop)
    assert f_lora.step_flops(lengths, image) - f_lora.step_flops(lengths, no_images) == pytest.approx(5 * per_crop)


def test_throughput_reports_rates_since_the_last_snapshot(monkeypatch):
    clock = iter([100.0, 102.0, 102.0, 103.0, 103.0])
    monkeypatch.setattr(metrics_mod.time, "perf_counter", lambda: next(clock))
    meter = Throughput(torch.device("cpu"), world_size=4)  # reset: t=100
    meter.add(samples=8, tokens=1000, image_tokens=600, positions=1250, flops=4e12)
    first = meter.snapshot()  # t=102, then reset at t=102
    assert first["samples_per_s"] == 8 * 4 / 2 and first["tokens_per_s"] == 1000 * 4 / 2
    assert first["image_tokens_per_s"] == 600 * 4 / 2 and first["text_tokens_per_s"] == 400 * 4 / 2
    assert first["padding_share"] == pytest.approx(0.2)
    assert first["tflops_per_worker"] == pytest.approx(2.0)
    assert "mfu" not in first and first["cpu_max_rss_gb"] > 0  # no known peak on a CPU
    meter.add(samples=2, tokens=10, image_tokens=0, positions=10, flops=0.0)
    assert meter.snapshot()["samples_per_s"] == 2 * 4 / 1  # only what came after the first snapshot


def _logged_grad_norm(rank: int, world: int, zero_stage: int) -> float | None:
    """One DeepSpeed step of a linear model whose gradient norm is 4·√2 (clipped to 1), then its step metrics."""
    from vlmtune.train.engine import build_engine

    model = torch.nn.Linear(2, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    engine = build_engine(model, TrainConfig(micro_batch_size=1, zero_stage=zero_stage, grad_clip=1.0), world,
                          on_gpu=False)
    loss = (engine(torch.ones(1, 2)) - 2).pow(2).sum()  # d/dw = 2·(0 - 2)·x = (-4, -4)
    engine.backward(loss)
    engine.step()
    metrics = step_metrics(engine, [loss.detach()], SimpleNamespace(skipped=0), Throughput(torch.device("cpu"), world),
                           Worker(rank, world, torch.device("cpu")))
    return metrics.get("grad_norm")


def test_the_gradient_norm_is_logged_where_deepspeed_keeps_it_and_never_as_a_false_zero():
    assert run_ranks(_logged_grad_norm, 1, 2) == [pytest.approx(4 * 2**0.5)]  # before clipping
    assert run_ranks(_logged_grad_norm, 1, 0) == [None]  # ZeRO-0 in fp32 clips without keeping the norm


@pytest.mark.parametrize(("workers", "world", "gas", "note"), [
    (4, 4, 2, None),  # a fixed-size run: as configured
    ((2, 4), 4, 2, None),  # elastic at its largest: as configured
    ((2, 4), 2, 4, None),  # half the workers: twice the accumulation, the same global batch
    ((3, 4), 3, 3, "global batch is 18 samples instead of 16"),  # 2 x 4 / 3 does not divide: the nearest
])
def test_an_elastic_run_on_fewer_workers_accumulates_more(workers, world, gas, note):
    from vlmtune.config import Config
    from vlmtune.train.loop import grad_accum_for

    cfg = Config.model_validate({"cluster": {"num_workers": workers}, "train": {"grad_accum_steps": 2,
                                                                              "micro_batch_size": 2}})
    adapted, message = grad_accum_for(cfg, world)
    assert adapted == gas
    assert (message is None) if note is None else note in message
