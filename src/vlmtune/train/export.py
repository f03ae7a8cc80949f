"""Checkpoint → Hugging Face directory in the official Phi-3-V layout (+ processor files).

A checkpoint holds only the trained parameters (see train/checkpoint.py). Export rebuilds the model the
run trained — base weights from `model.name_or_path`, LoRA or the freeze policy from the stored config —
loads the trained parameters consolidated to fp32 from the DeepSpeed files (ZeRO-2/3 partitions
included, via DeepSpeed's zero_to_fp32), then writes either the merged model (LoRA folded into the
weights: loadable by vlmtune, by transformers with vlmtune imported, by Microsoft's code and by vLLM) or
the PEFT adapter alone.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

from vlmtune.config import Config, ExportConfig, load_config
from vlmtune.train.checkpoint import TAG
from vlmtune.train.loop import prepare_model

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def default_export_dir(cfg: Config) -> str:
    return cfg.export.dir or f"{cfg.cluster.storage_path.rstrip('/')}/{cfg.cluster.run_name}/export"


def trained_state_dict(checkpoint_dir: Path, zero_stage: int) -> dict[str, torch.Tensor]:
    if zero_stage == 0:
        states = torch.load(checkpoint_dir / TAG / "mp_rank_00_model_states.pt", map_location="cpu",
                            weights_only=False)
        return {k: v.float() for k, v in states["module"].items()}
    return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=TAG, exclude_frozen_parameters=True)


def export_checkpoint(checkpoint_dir: str | Path, out_dir: str | Path, export: ExportConfig | None = None) -> Path:
    """Write the HF directory for a vlmtune checkpoint; returns `out_dir`."""
    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
    cfg = load_config(checkpoint_dir / "config.yaml")
    export = export or cfg.export
    model, processor = prepare_model(cfg, torch.float32)
    state = trained_state_dict(checkpoint_dir, cfg.train.zero_stage)
    expected = {name for name, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise RuntimeError(f"{checkpoint_dir} does not match the model its config describes: "
                           f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    model.load_state_dict(state, strict=False)

    merged = cfg.model.lora.enabled and export.merge_lora
    if merged:
        model = model.merge_and_unload()
    model.to(DTYPES[export.dtype]).save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    trainer_state = json.loads((checkpoint_dir / "trainer_state.json").read_text())
    (out_dir / "vlmtune_export.json").write_text(json.dumps({
        "checkpoint": str(checkpoint_dir), "step": trainer_state["step"], "base_model": cfg.model.name_or_path,
        "lora": cfg.model.lora.enabled, "merged": bool(merged), "dtype": export.dtype}, indent=2))
    cfg.save(out_dir / "vlmtune_config.yaml")
    return out_dir
