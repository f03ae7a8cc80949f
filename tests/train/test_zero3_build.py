"""ZeRO-3 training builds the model partitioned as it is built, and its checkpoint exports to the sharded
official layout that reloads with the trained model's logits.

On 2 gloo ranks, `prepare_model` with the run's ZeRO-3 DeepSpeed config (as train/loop.py calls it) returns
parameters that are DeepSpeed placeholders holding no local data, whose gathered values equal those of a
model built whole. The engine trains a step on it, saves a checkpoint through train/checkpoint.py, and the
bf16 export of that checkpoint — written in shards — reloads with logits equal to the checkpoint's model
(LoRA unmerged) and within bf16 rounding of the merged weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import deepspeed
import numpy as np
import pytest
import torch
from PIL import Image

from tests.gloo import run_ranks
from vlmtune import runs
from vlmtune.config import Config, ExportConfig, FreezeConfig, LoraConfig, ModelConfig, TrainConfig
from vlmtune.export import checkpoint_model, export_checkpoint
from vlmtune.models.loading import load, prepare_model, trainable_parameter_summary
from vlmtune.train.checkpoint import LoopState, write_checkpoint
from vlmtune.train.engine import build_engine, deepspeed_config, init_distributed

pytestmark = pytest.mark.slow


def config() -> Config:
    return Config(model=ModelConfig(lora=LoraConfig(enabled=True, r=4, targets=["language_attention", "lm_head"]),
                                    freeze=FreezeConfig(vision_tower=True)),
                  train=TrainConfig(zero_stage=3, bf16=True, micro_batch_size=1, lr=5e-2, warmup_steps=0,
                                    max_steps=10))


def probe(processor) -> dict:
    """A short input with an image, the same in every process."""
    pixels = np.random.default_rng(0).integers(0, 256, size=(70, 90, 3), dtype=np.uint8)
    batch = processor("<|user|>\n<|image_1|>\nWhat is it?<|end|>\n<|assistant|>\nA coat", [Image.fromarray(pixels)])
    return {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "pixel_values", "image_sizes")}


def _train_and_save(rank: int, world: int, directory: str) -> dict:
    torch.set_num_threads(1)
    torch.manual_seed(0)  # the LoRA initialisation, the same on both ranks
    cfg = config()
    ds = deepspeed_config(cfg.train, world, on_gpu=False)
    init_distributed(on_gpu=False)
    model, processor = prepare_model(cfg.model, torch.bfloat16, seed=cfg.train.seed, deepspeed_config=ds)
    base = [(n, p) for n, p in model.named_parameters() if ".lora_" not in n]
    built = {"partitioned": all(hasattr(p, "ds_id") and p.data.numel() == 0 for _, p in base),
             "full_sizes": sum(p.ds_numel for _, p in base),
             "summary": trainable_parameter_summary(model)}
    gathered = {}
    for name, param in base:
        with deepspeed.zero.GatheredParameters([param]):
            gathered[name] = param.data.clone()

    engine = build_engine(model, cfg.train, world, on_gpu=False, config=ds)
    batch = probe(processor)
    engine.train()
    for _ in range(2):
        engine.backward(engine(**batch, labels=batch["input_ids"].clamp(min=0)).loss)
        engine.step()
    engine.eval()
    with torch.no_grad():
        logits = engine(**batch).logits.float()
    adapters = {}
    for name, param in engine.module.named_parameters():
        if ".lora_" in name:
            with deepspeed.zero.GatheredParameters([param]):
                adapters[name] = param.data.clone()
    write_checkpoint(engine, cfg, LoopState(step=2), rank, world, Path(directory))
    torch.distributed.barrier()
    if rank == 0:
        files = {str(p.relative_to(directory)): p.stat().st_size for p in Path(directory).rglob("*") if p.is_file()}
        runs.mark_complete(directory, 2, files)
    return {**built, "weights": gathered if rank == 0 else None, "logits": logits, "adapters": adapters}


def test_zero3_builds_partitioned_and_the_sharded_bf16_export_reloads_with_equal_logits(tmp_path):
    checkpoint = tmp_path / "checkpoint-0000002"
    checkpoint.mkdir()
    results = run_ranks(_train_and_save, 2, str(checkpoint))

    cfg = config()
    whole, processor = prepare_model(cfg.model, torch.bfloat16, seed=cfg.train.seed)
    for rank in results:
        assert rank["partitioned"], "a base parameter holds data outside a gather right after prepare_model"
        assert rank["full_sizes"] == sum(p.numel() for n, p in whole.named_parameters() if ".lora_" not in n)
        assert rank["summary"] == trainable_parameter_summary(whole)
    whole_weights = {n: p for n, p in whole.named_parameters() if ".lora_" not in n}
    assert results[0]["weights"].keys() == whole_weights.keys()
    assert all(torch.equal(results[0]["weights"][n], p) for n, p in whole_weights.items())
    assert torch.equal(results[0]["logits"], results[1]["logits"])
    trained = results[0]["logits"]
    batch = probe(processor)
    del whole

    # The checkpoint's model, rebuilt in bf16 (adapters unmerged, in fp32 as PEFT keeps them), is the model the
    # engine trained: the engine computes with the same fp32 masters rounded to bf16.
    held, _, _ = checkpoint_model(checkpoint, torch.bfloat16)
    held_adapters = {n: p for n, p in held.named_parameters() if ".lora_" in n}
    assert held_adapters.keys() == results[0]["adapters"].keys()
    assert all(torch.equal(results[0]["adapters"][n].bfloat16(), p.bfloat16()) for n, p in held_adapters.items())
    with torch.no_grad():
        held_logits = held(**batch).logits.float()
        merged_logits = held.merge_and_unload()(**batch).logits.float()
        untrained_logits = load("tiny-phi3v", dtype=torch.bfloat16)[0](**batch).logits.float()
    assert bf16_close(held_logits, trained) and bf16_close(merged_logits, held_logits)
    assert not bf16_close(untrained_logits, trained)  # training moved the logits further than bf16 rounding

    out = export_checkpoint(checkpoint, tmp_path / "export", ExportConfig(dtype="bfloat16", max_shard_size="200KB"))
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 1 and not (out / "model.safetensors").exists()
    assert shards == [f"model-{k:05d}-of-{len(shards):05d}.safetensors" for k in range(1, len(shards) + 1)]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    official = set(load("tiny-phi3v")[0].state_dict())  # the official names (see models/phi3v/modeling.py)
    assert set(index["weight_map"]) == official
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"

    reloaded, _ = load(out, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in reloaded.parameters())
    with torch.no_grad():
        logits = reloaded(**batch).logits.float()
    assert torch.equal(logits, merged_logits)  # the sharded files hold exactly the merged bf16 weights
    assert bf16_close(logits, trained)

    # In fp32 the merge is exact up to float rounding: the export is the checkpoint's model.
    held32, _, _ = checkpoint_model(checkpoint, torch.float32)
    out32 = export_checkpoint(checkpoint, tmp_path / "export32", ExportConfig(dtype="float32", max_shard_size="200KB"))
    with torch.no_grad():
        expected = held32(**batch).logits
        got = load(out32, dtype=torch.float32)[0](**batch).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def bf16_close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to bf16 rounding through the network: mean difference under 2% of the logits' spread, none
    over half of it."""
    diff, spread = (a - b).abs(), b.std()
    return bool(diff.mean() < 0.02 * spread and diff.max() < 0.5 * spread)
