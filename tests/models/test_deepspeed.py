"""DeepSpeed ZeRO-3 on two CPU ranks (gloo): the model runs with partitioned parameters.

Under ZeRO-3 a parameter holds data only inside its own module's forward, and every rank must run the
same modules, in the same order, for collectives to line up. The two ranks get images of different sizes
(different crop grids and token counts, same batch structure), then text-only batches; each rank's loss
must equal the loss of an unpartitioned copy of the model on the same batch.
"""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

deepspeed = pytest.importorskip("deepspeed")

IMAGE_SIZES = [(100, 150), (300, 80)]  # rank 0, rank 1
ZERO3 = {
    "train_micro_batch_size_per_gpu": 1,
    "gradient_accumulation_steps": 1,
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    "zero_allow_untested_optimizer": True,
}


def _worker(rank: int, port: int, results: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    os.environ["LOCAL_RANK"] = str(rank)
    torch.set_num_threads(1)
    from vlmtune.config import FreezeConfig
    from vlmtune.models.loading import apply_freeze, load
    from vlmtune.train.engine import init_distributed

    init_distributed(on_gpu=False)
    model, processor = load("tiny-phi3v")
    reference, _ = load("tiny-phi3v")
    for m in (model, reference):
        apply_freeze(m, FreezeConfig(vision_tower=True))
        m.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        m.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ZERO3)

    width, height = IMAGE_SIZES[rank]
    image = Image.fromarray(np.random.default_rng(rank).integers(0, 256, (height, width, 3), dtype=np.uint8))
    image_batch = processor("<|user|>\n<|image_1|>\nWhat is it?<|end|>\n<|assistant|>\nA coat", [image])
    text_batch = processor(["<|user|>\nHello<|end|>", "<|user|>\nA longer text question<|end|>"][rank])
    losses = []
    for batch in (image_batch, text_batch):
        labels = batch["input_ids"].masked_fill(batch["input_ids"] == processor.image_token_id, -100)
        loss = engine(**batch, labels=labels, use_cache=False).loss
        engine.backward(loss)
        engine.step()
        losses.append((loss.item(), reference(**batch, labels=labels, use_cache=False).loss.item()))
    results[rank] = losses
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_zero3_two_ranks_with_different_images():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.get_context("spawn").Manager() as manager:  # no fork of this process: it is a Ray driver
        results = manager.dict()
        mp.spawn(_worker, args=(port, results), nprocs=2, join=True)
        results = dict(results)
    assert sorted(results) == [0, 1]
    for losses in results.values():
        for zero3, plain in losses:
            assert zero3 == pytest.approx(plain, rel=1e-5)
    assert results[0][0][0] != results[1][0][0]  # the ranks did see different batches
