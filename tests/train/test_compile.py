"""`model.compile`: the worker's compiled layers (inductor, on CPU) train as the eager ones do, through the real
DeepSpeed engine and `train_step` on two gloo ranks, without a graph break; generation stays eager."""

from __future__ import annotations

import pytest
import torch

from tests.gloo import run_ranks
from tests.train.test_loss_scaling import micro_batch
from vlmtune.config import load_config

TITLES = ["Tote", "Quilted Leather Crossbody Bag with Chain Strap", "Check Scarf", "Monogram Belt Bag in Leather"]


def _train_then_generate(rank: int, world: int, compiled: bool) -> dict:
    from PIL import Image
    from torch._dynamo.utils import counters

    from vlmtune.data.collate import SampleEncoder
    from vlmtune.eval.generate import generate_answers
    from vlmtune.train.engine import build_engine, deepspeed_config
    from vlmtune.train.loop import Worker, build_model, train_step
    from vlmtune.train.metrics import FlopCounter, Throughput

    # LoRA dropout off: inductor draws its dropout masks from another generator than eager PyTorch
    cfg = load_config(overrides=[f"model.compile={compiled}", "model.lora.dropout=0", "train.zero_stage=2",
                                 "train.micro_batch_size=1", "train.grad_accum_steps=1", "train.warmup_steps=0",
                                 "train.lr=1e-3"])
    torch.manual_seed(0)
    worker = Worker(rank, world, torch.device("cpu"))
    ds_config = deepspeed_config(cfg.train, world, on_gpu=False)
    model, processor = build_model(cfg, worker, ds_config)
    engine = build_engine(model, cfg.train, world, on_gpu=False, config=ds_config)
    encode = SampleEncoder(processor, cfg.data.prompt, cfg.model.max_length)
    samples = [{"key": str(i), "image": Image.new("RGB", (60 + 50 * i, 80), (40 * i, 90, 160)),
                "meta": {"id": str(i), "title": t, "category": ["Women", "Bags"], "full_price": 10.0 + i,
                         "currency": "USD"}} for i, t in enumerate(TITLES)]
    # one sample a micro-batch, of a different length each step: a static graph, then a dynamic one
    batches = iter([micro_batch([encode(s)], processor.tokenizer.pad_token_id) for s in samples[rank::world]])
    flops, throughput = FlopCounter.for_model(model), Throughput(worker.device, world)
    engine.train()
    losses = [train_step(engine, batches, cfg, worker, flops, throughput)[0].item() for _ in range(2)]
    graphs = counters["stats"]["unique_graphs"]
    question = SampleEncoder(processor, cfg.data.prompt, cfg.model.max_length, with_answer=False)
    answer = generate_answers(engine.module, processor, [question(samples[rank])], 6, worker.device)
    return {"losses": losses, "graphs": graphs, "graph_breaks": sum(counters["graph_break"].values()),
            "graphs_after_generation": counters["stats"]["unique_graphs"], "answer": answer}


@pytest.mark.slow
def test_compiled_layers_train_like_eager_ones_and_generation_stays_eager():
    eager = run_ranks(_train_then_generate, 2, False)
    compiled = run_ranks(_train_then_generate, 2, True)
    for rank in range(2):
        assert eager[rank]["graphs"] == 0
        assert compiled[rank]["graphs"] > 0 and compiled[rank]["graph_breaks"] == 0
        assert compiled[rank]["losses"] == pytest.approx(eager[rank]["losses"], rel=1e-5)
        assert compiled[rank]["graphs_after_generation"] == compiled[rank]["graphs"]
        assert compiled[rank]["answer"] == eager[rank]["answer"]
    assert eager[0]["losses"][1] != eager[1]["losses"][1]  # the ranks trained on different samples
