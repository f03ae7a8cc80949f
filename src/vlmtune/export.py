"""Checkpoint → Hugging Face directory, and the one place that turns a model argument into a loadable name.

A checkpoint holds only the trained parameters (see runs.py), and only a complete one is exported. Export
rebuilds the model the run trained — base weights from `model.name_or_path` (or the same seeded random
weights for a `model.random_init` run), LoRA or the freeze policy from the stored config — directly in the
export dtype (`export.dtype`, bf16 by default: one copy of a 4.2B model is 8.4 GB, not 17), loads the trained
parameters into it (consolidated from the fp32 masters one at a time), then writes either the merged model
(LoRA folded into the weights: loadable by vlmtune, by transformers with vlmtune imported, by Microsoft's
code and by vLLM) or the PEFT adapter alone. Weights larger than `export.max_shard_size` are written in the
official sharded layout, `model-0000k-of-0000n.safetensors` plus `model.safetensors.index.json`, with the
official parameter names.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import PeftModel
from torch import nn

from vlmtune import runs
from vlmtune.config import Config, ExportConfig
from vlmtune.errors import CheckpointError
from vlmtune.models.loading import prepare_model
from vlmtune.models.phi3v import Phi3VProcessor

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def checkpoint_model(checkpoint_dir: str | Path, dtype: torch.dtype) -> tuple[nn.Module, Phi3VProcessor, Config]:
    """The model a complete checkpoint holds, built in `dtype` (LoRA adapters unmerged), its processor and the
    run's config."""
    checkpoint_dir = Path(checkpoint_dir)
    runs.require_complete(checkpoint_dir)
    cfg = runs.read_config(checkpoint_dir)
    model, processor = prepare_model(cfg.model, dtype, seed=cfg.train.seed)
    state = runs.trained_state_dict(checkpoint_dir, cfg.train.zero_stage, dtype=dtype)
    expected = {name for name, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise CheckpointError(f"{checkpoint_dir} does not match the model its config describes: "
                              f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    model.load_state_dict(state, strict=False)
    return model.eval(), processor, cfg


def export_checkpoint(checkpoint_dir: str | Path, out_dir: str | Path, export: ExportConfig | None = None) -> Path:
    """Write the HF directory for a vlmtune checkpoint; returns `out_dir`."""
    checkpoint_dir = Path(checkpoint_dir)
    runs.read_trainer_state(checkpoint_dir)  # not a checkpoint at all: CheckpointError
    runs.require_complete(checkpoint_dir)
    export = export or runs.read_config(checkpoint_dir).export
    model, processor, cfg = checkpoint_model(checkpoint_dir, DTYPES[export.dtype])
    return write_export(model, processor, cfg, checkpoint_dir, out_dir, export)


def write_export(model: nn.Module, processor: Phi3VProcessor, cfg: Config, checkpoint_dir: str | Path,
                 out_dir: str | Path, export: ExportConfig) -> Path:
    """Write `model` (from `checkpoint_model`, its adapters merged here when `export.merge_lora`, or merged
    already) as an HF directory."""
    out_dir = Path(out_dir)
    trainer_state = runs.read_trainer_state(checkpoint_dir)
    merged = cfg.model.lora.enabled and export.merge_lora
    if merged and isinstance(model, PeftModel):
        model = model.merge_and_unload()
    model.to(DTYPES[export.dtype]).save_pretrained(out_dir, max_shard_size=export.max_shard_size)
    processor.save_pretrained(out_dir)
    (out_dir / "vlmtune_export.json").write_text(json.dumps({
        "checkpoint": str(checkpoint_dir), "step": trainer_state.step, "base_model": cfg.model.name_or_path,
        "random_init": cfg.model.random_init, "lora": cfg.model.lora.enabled, "merged": bool(merged),
        "dtype": export.dtype}, indent=2))
    cfg.save(out_dir / "vlmtune_config.yaml")
    return out_dir


def resolve_model(model: str, work_dir: str | Path) -> str:
    """What `load()` can open for a model argument: a training checkpoint is exported to `<work_dir>/model`
    first; an export directory (one weight file or the sharded layout), a hub id or `tiny-phi3v` is returned
    as it is."""
    if runs.is_checkpoint(model):
        return str(export_checkpoint(model, Path(work_dir) / "model"))
    return model
