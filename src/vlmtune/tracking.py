"""Experiment tracking on rank 0: Weights & Biases (online, offline or disabled) and a metrics.jsonl.

Only rank 0 talks to W&B, so one training run is one W&B run whatever the number of workers. The W&B
run id travels in every checkpoint, so a restarted or resumed job continues the same W&B run instead of
starting a new one. metrics.jsonl holds the same scalars in plain JSON lines: W&B's offline files have
no public reader, and a file next to the run is what scripts and tests can read back.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from vlmtune.config import TrackingConfig


class Tracker:
    def __init__(self, cfg: TrackingConfig, directory: str, run_name: str, config: dict, run_id: str | None = None,
                 active: bool = True):
        self.active = active
        self.dir = Path(directory)
        self.run = None
        self.run_id = run_id
        if not active:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        self.metrics_file = (self.dir / "metrics.jsonl").open("a")
        if cfg.mode == "disabled":
            return
        import wandb

        os.environ.setdefault("WANDB_DATA_DIR", str(self.dir / "wandb-data"))
        self.run = wandb.init(project=cfg.project, entity=cfg.entity, name=run_name, id=run_id, resume="allow",
                              mode=cfg.mode, dir=str(self.dir), config=config, tags=cfg.tags)
        self.run_id = self.run.id

    def log(self, metrics: dict, step: int) -> None:
        if not self.active:
            return
        self.metrics_file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.metrics_file.flush()
        if self.run is not None:
            self.run.log(metrics, step=step)

    def log_table(self, key: str, columns: list[str], rows: list[list], step: int) -> None:
        """Rows may hold PIL images; they become W&B images (and are left out of metrics.jsonl)."""
        if not self.active:
            return
        plain = [{c: v for c, v in zip(columns, row, strict=True) if isinstance(v, (str, int, float, type(None)))}
                 for row in rows]
        self.metrics_file.write(json.dumps({"step": step, "table": key, "rows": plain}, ensure_ascii=False) + "\n")
        self.metrics_file.flush()
        if self.run is not None:
            import wandb
            from PIL import Image

            table = wandb.Table(columns=columns)
            for row in rows:
                table.add_data(*[wandb.Image(v) if isinstance(v, Image.Image) else v for v in row])
            self.run.log({key: table}, step=step)

    def log_images(self, images: dict, step: int | None = None) -> None:
        """Plots or pictures (PIL images or file paths) logged under their keys."""
        if self.run is None:
            return
        import wandb

        self.run.log({k: wandb.Image(str(v) if isinstance(v, Path) else v) for k, v in images.items()}, step=step)

    def finish(self) -> None:
        if not self.active:
            return
        self.metrics_file.close()
        if self.run is not None:
            self.run.finish()


def read_metrics(directory: str | Path) -> list[dict]:
    """The scalar records of metrics.jsonl (tables left out)."""
    path = Path(directory) / "metrics.jsonl"
    return [r for r in map(json.loads, path.read_text().splitlines()) if "table" not in r]
