"""The whole pipeline on one machine: sample catalog → shards → Ray Train + DeepSpeed → export → evaluate.

    python jobs/demo.py [--config configs/demo-cpu.yaml] [key=value ...]

Evaluates the untrained base model and the fine-tuned export on the same val shards, so the gain is
visible, then prints where the shards, checkpoints, export, reports and W&B offline run are.
"""

from __future__ import annotations

from pathlib import Path

from vlmtune import runs
from vlmtune.cli import announce_config, exit_with, job_parser, load_job_config
from vlmtune.console import console
from vlmtune.data.prepare import prepare
from vlmtune.eval.evaluate import evaluate
from vlmtune.tracking import read_metrics

ROWS = [("val loss (teacher forced)", "eval_loss"), ("answer parses", "parse_rate"),
        ("category path accuracy", "category_path_acc"), ("top category accuracy", "category_top_acc"),
        ("price MAPE", "price_mape"), ("price within 10%", "price_within_10pct"), ("title chrF", "title_chrf")]


def evaluate_as(cfg, model: str, name: str) -> dict:
    stage = cfg.model_copy(deep=True)
    stage.eval.output_dir = str(Path(cfg.eval.output_dir) / name)
    return evaluate(stage, model)["overall"]


def main(args) -> int:
    cfg = load_job_config(args)
    run = runs.run_dir(cfg)
    announce_config(cfg, run, "demo")
    from vlmtune.launch.ray import train  # DeepSpeed prints on import: only once the console owns the terminal

    console.say("\n== 1/4 prepare: sample catalog → WebDataset shards")
    totals = prepare(cfg.data)["totals"]
    console.say(f"{totals['train']['samples']} train and {totals['val']['samples']} val samples in "
                f"{totals['train']['shards']} + {totals['val']['shards']} shards, {totals['rejected']} rejected")

    console.say("\n== 2/4 evaluate the untrained base model")
    before = evaluate_as(cfg, cfg.model.name_or_path, "before")

    console.say("\n== 3/4 train: Ray Train + DeepSpeed")
    outputs = train(cfg)

    console.say("\n== 4/4 evaluate the fine-tuned export")
    after = evaluate_as(cfg, outputs["export"], "after")

    losses = [r["eval_loss"] for r in read_metrics(run) if "eval_loss" in r]
    before["eval_loss"], after["eval_loss"] = losses[0], losses[-1]
    console.say(f"\n{'metric':<28}{'before':>10}{'after':>10}")
    for label, key in ROWS:
        console.say(f"{label:<28}{before.get(key, float('nan')):>10.3f}{after.get(key, float('nan')):>10.3f}")
    eval_dir = cfg.eval.output_dir
    console.say(f"\nshards:      {cfg.data.shards.dir}\ncheckpoint:  {outputs['checkpoint']}\nexport:      "
                f"{outputs['export']}\nreports:     {eval_dir}/before, {eval_dir}/after\nW&B offline: {run}/wandb "
                f"(wandb sync <offline-run dir>)\nmetrics:     {run}/metrics.jsonl")
    return 0


if __name__ == "__main__":
    exit_with("demo", job_parser(__doc__, default_config="configs/demo-cpu.yaml"), main)
