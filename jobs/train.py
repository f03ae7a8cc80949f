"""Fine-tune Phi-3-Vision with Ray Train + DeepSpeed, then export the result.

    python jobs/train.py --config configs/phi3v-burberry-lora.yaml [key=value ...]
    python jobs/train.py --config configs/phi3v-burberry-lora.yaml --plan
    ray job submit --working-dir . -- python jobs/train.py --config configs/phi3v-burberry-lora.yaml

Connects to the cluster in RAY_ADDRESS (set by `ray job submit`) or starts a local Ray. Running it again
with the same cluster.run_name and cluster.storage_path resumes from the latest checkpoint. Without
--config it runs the built-in CPU demo recipe.

--plan prints each worker's memory (weights, gradients, optimizer states, activations) and the run's FLOPs,
step time and GPU-hours, without starting Ray or loading weights; it exits 2 with a suggestion when the run
does not fit cluster.gpu_type (train/planner.py).
"""

from __future__ import annotations

from vlmtune import runs
from vlmtune.cli import announce_config, exit_with, job_parser, load_job_config
from vlmtune.console import console


def main(args) -> int:
    cfg = load_job_config(args)
    if args.plan:
        from vlmtune.errors import PreflightError
        from vlmtune.train.planner import plan

        result = plan(cfg)
        console.say(result.table())
        if result.fits is False:
            raise PreflightError(result.refusal())
        return 0
    announce_config(cfg, runs.run_dir(cfg), "train")
    from vlmtune.launch.ray import train  # DeepSpeed prints on import: only once the console owns the terminal

    outputs = train(cfg)
    console.say(f"checkpoint: {outputs['checkpoint']}")
    if "export" in outputs:
        console.say(f"export:     {outputs['export']}")
    console.say(f"metrics:    {outputs['run']}/metrics.jsonl")
    return 0


def parser():
    p = job_parser(__doc__)
    p.add_argument("--plan", action="store_true",
                   help="print the per-worker memory and compute plan and exit (no Ray, no weights)")
    return p


if __name__ == "__main__":
    exit_with("train", parser(), main)
