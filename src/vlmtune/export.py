"""Checkpoint → Hugging Face directory, and the one place that turns a model argument into a loadable name.

A checkpoint holds only the trained parameters (see runs.py), and only a complete one is exported. Export
rebuilds the model the run trained — base weights from `model.name_or_path`, LoRA or the freeze policy from
the stored config — loads the trained parameters consolidated to fp32, then writes either the merged model
(LoRA folded into the weights: loadable by vlmtune, by transformers with vlmtune imported, by Microsoft's
code and by vLLM) or the PEFT adapter alone.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from vlmtune import runs
from vlmtune.config import ExportConfig
from vlmtune.errors import CheckpointError
from vlmtune.models.loading import prepare_model

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def export_checkpoint(checkpoint_dir: str | Path, out_dir: str | Path, export: ExportConfig | None = None) -> Path:
    """Write the HF directory for a vlmtune checkpoint; returns `out_dir`."""
    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
    trainer_state = runs.read_trainer_state(checkpoint_dir)
    runs.require_complete(checkpoint_dir)
    cfg = runs.read_config(checkpoint_dir)
    export = export or cfg.export
    model, processor = prepare_model(cfg.model, torch.float32, seed=cfg.train.seed)
    state = runs.trained_state_dict(checkpoint_dir, cfg.train.zero_stage)
    expected = {name for name, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise CheckpointError(f"{checkpoint_dir} does not match the model its config describes: "
                              f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    model.load_state_dict(state, strict=False)

    merged = cfg.model.lora.enabled and export.merge_lora
    if merged:
        model = model.merge_and_unload()
    model.to(DTYPES[export.dtype]).save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    (out_dir / "vlmtune_export.json").write_text(json.dumps({
        "checkpoint": str(checkpoint_dir), "step": trainer_state.step, "base_model": cfg.model.name_or_path,
        "lora": cfg.model.lora.enabled, "merged": bool(merged), "dtype": export.dtype}, indent=2))
    cfg.save(out_dir / "vlmtune_config.yaml")
    return out_dir


def resolve_model(model: str, work_dir: str | Path) -> str:
    """What `load()` can open for a model argument: a training checkpoint is exported to `<work_dir>/model`
    first; an export directory, a hub id or `tiny-phi3v` is returned as it is."""
    if runs.is_checkpoint(model):
        return str(export_checkpoint(model, Path(work_dir) / "model"))
    return model
