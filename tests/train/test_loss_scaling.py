"""The loss is the mean over every answer token of the global batch, whatever the split: micro-batch 2 ×
accumulation 1, micro-batch 1 × accumulation 2, and 2 ranks × micro-batch 1 give the same gradients, with
samples whose answers differ in length. The real `train_step` and DeepSpeed engine, on gloo ranks."""

from __future__ import annotations

import pytest
import torch

from tests.gloo import run_ranks
from vlmtune.config import FreezeConfig, LoraConfig, ModelConfig, PromptConfig, TrainConfig, load_config
from vlmtune.data.batching import MicroBatch
from vlmtune.data.collate import SampleEncoder, collate

TITLES = ["Tote", "Quilted Leather Crossbody Bag with Chain Strap and Monogram Motif"]  # unequal answers


def micro_batch(samples: list[dict], pad_id: int) -> MicroBatch:
    return MicroBatch(inputs=collate(samples, pad_id), ids=[s["id"] for s in samples], epochs=[0] * len(samples),
                      lengths=[len(s["input_ids"]) for s in samples], image_tokens=0,
                      answer_tokens=sum(int((s["labels"] != -100).sum()) for s in samples),
                      positions=len(samples) * max(len(s["input_ids"]) for s in samples))


def _gradients(rank: int, world: int, split: list[list[int]]) -> dict[str, torch.Tensor]:
    """Run one optimizer step on this rank's share of `split` (lists of sample indices per micro-batch,
    assigned to ranks round-robin) and return the gradients the optimizer saw."""
    from PIL import Image

    from vlmtune.models.loading import prepare_model
    from vlmtune.train.engine import build_engine
    from vlmtune.train.loop import Worker, train_step
    from vlmtune.train.metrics import FlopCounter, Throughput

    torch.manual_seed(0)
    model, processor = prepare_model(ModelConfig(lora=LoraConfig(enabled=False), freeze=FreezeConfig()),
                                     torch.float32)
    model.train()
    encoder = SampleEncoder(processor, PromptConfig(), 512)
    samples = [encoder({"key": str(i), "image": Image.new("RGB", (60 + 40 * i, 50), (30 * i, 90, 160)),
                        "meta": {"id": str(i), "title": t, "category": ["Women", "Bags"], "full_price": 10.0,
                                 "currency": "USD"}}) for i, t in enumerate(TITLES)]
    mine = [micro_batch([samples[i] for i in batch], processor.tokenizer.pad_token_id)
            for batch in split[rank::world]]
    train = TrainConfig(micro_batch_size=len(mine[0].ids), grad_accum_steps=len(mine), grad_clip=0.0,
                        zero_stage=0, lr=1e-3, warmup_steps=0)
    engine = build_engine(model, train, world, on_gpu=False)
    seen: dict[str, torch.Tensor] = {}
    step = engine.optimizer.step

    def record_then_step(*args, **kwargs):
        seen.update({n: p.grad.detach().clone() for n, p in engine.module.named_parameters() if p.grad is not None})
        return step(*args, **kwargs)

    engine.optimizer.step = record_then_step
    cfg = load_config(overrides=[f"train.grad_accum_steps={len(mine)}"])
    worker = Worker(rank, world, torch.device("cpu"))
    train_step(engine, iter(mine), cfg, worker, FlopCounter.for_model(model), Throughput(worker.device, world))
    return seen


@pytest.mark.slow
def test_gradients_do_not_depend_on_how_the_batch_is_split():
    one_batch = run_ranks(_gradients, 1, [[0, 1]])[0]
    accumulated = run_ranks(_gradients, 1, [[0], [1]])[0]
    two_ranks = run_ranks(_gradients, 2, [[0], [1]])
    assert one_batch and set(one_batch) == set(accumulated) == set(two_ranks[0])
    for name, grad in one_batch.items():
        for other in (accumulated[name], two_ranks[0][name], two_ranks[1][name]):
            assert torch.allclose(other, grad, rtol=1e-5, atol=1e-6), name
