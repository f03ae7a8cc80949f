"""Experiment tracking on rank 0: Weights & Biases (online, offline or disabled) and a metrics.jsonl.

Only rank 0 talks to W&B, so one training run is one W&B run whatever the number of workers. The W&B
run id travels in every checkpoint, so a restarted or resumed job continues the same W&B run instead of
starting a new one. metrics.jsonl holds the same scalars in plain JSON lines: W&B's offline files have
no public reader, and a file next to the run is what scripts and tests can read back.

A resumed run goes back to its checkpoint's step, and the steps after it that an earlier attempt had
logged are logged again. Each step keeps one value:

- metrics.jsonl is append-only. Every line carries the attempt that logged it (one start of the training
  function), and each attempt's first line says the step it started from. `read_metrics` drops what an
  attempt logged after the start step of a later attempt, the way the run itself went back.
- W&B online: the run is rewound to the checkpoint's step (`wandb.init(resume_from="<id>?_step=<step>")`):
  the server drops the history after it and the resumed attempt logs in its place. Rewinding is a W&B
  server feature that not every server has, and a run still marked running (a crashed attempt that the
  server has not yet marked crashed) cannot be rewound; then the run is resumed as before and a warning
  says that W&B keeps the earlier attempt's values for the steps it logs again (W&B ignores steps lower than
  the last one it saw), while metrics.jsonl has the right ones.
- W&B offline: nothing reaches a server while training. Each attempt writes its own offline run directory
  with the same run id, and a resumed one records the rewind point (its run record's branch point, the
  checkpoint's step); `wandb sync` of the directories in order replays the rewind on the server, with the
  same server requirement as online.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from vlmtune.config import TrackingConfig

log = logging.getLogger(__name__)


def init_run(wandb, attempts: int = 10, wait_s: float = 3.0, **init):
    """`wandb.init`, waiting while W&B still counts the run as in use: right after a restart the previous
    attempt's W&B process can hold the run id for a few seconds."""
    for attempt in range(attempts):
        try:
            return wandb.init(**init)
        except Exception as e:
            if "is in use" not in str(e) or attempt == attempts - 1:
                raise
            time.sleep(wait_s)


class Tracker:
    """`attempt` tags every metrics.jsonl line; `start_step` is the checkpoint step a resumed attempt goes on
    from (its W&B run, `run_id`, is rewound there); `warn` says what the console should show."""

    def __init__(self, cfg: TrackingConfig, directory: str, run_name: str, config: dict, run_id: str | None = None,
                 active: bool = True, attempt: str = "", start_step: int = 0, workers: int = 1,
                 warn: Callable[[str], None] = log.warning):
        self.active = active
        self.dir = Path(directory)
        self.run = None
        self.run_id = run_id
        self.attempt = attempt
        if not active:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        self.metrics_file = (self.dir / "metrics.jsonl").open("a")
        self._write({"attempt": attempt, "start_step": start_step, "workers": workers})
        if cfg.mode == "disabled":
            return
        import wandb

        os.environ.setdefault("WANDB_DATA_DIR", str(self.dir / "wandb-data"))
        init = dict(project=cfg.project, entity=cfg.entity, name=run_name, mode=cfg.mode, dir=str(self.dir),
                    config=config, tags=cfg.tags)
        if run_id is not None and start_step > 0:
            try:
                self.run = init_run(wandb, **init, resume_from=f"{run_id}?_step={start_step}")
            except Exception as e:  # wandb raises several kinds here: no rewind on this server, offline, …
                warn(f"W&B could not rewind run {run_id} to step {start_step} ({e}); it is resumed instead and "
                     f"keeps the earlier attempt's values for the steps after {start_step} that it logged "
                     "(metrics.jsonl has this attempt's)")
        if self.run is None:
            self.run = init_run(wandb, **init, id=run_id, resume="allow")
        self.run_id = self.run.id

    def _write(self, record: dict) -> None:
        self.metrics_file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.metrics_file.flush()

    def log(self, metrics: dict, step: int) -> None:
        if not self.active:
            return
        self._write({"step": step, "attempt": self.attempt, **metrics})
        if self.run is not None:
            self.run.log(metrics, step=step)

    def log_table(self, key: str, columns: list[str], rows: list[list], step: int) -> None:
        """Rows may hold PIL images; they become W&B images (and are left out of metrics.jsonl)."""
        if not self.active:
            return
        plain = [{c: v for c, v in zip(columns, row, strict=True) if isinstance(v, (str, int, float, type(None)))}
                 for row in rows]
        self._write({"step": step, "attempt": self.attempt, "table": key, "rows": plain})
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
    """The scalars of metrics.jsonl, one record per step in step order (tables left out): for each step and key
    the value of the latest attempt that logged it, without what an attempt logged after a later attempt's
    start step (that later attempt went back to its checkpoint and took over from there)."""
    lines = [json.loads(line) for line in (Path(directory) / "metrics.jsonl").read_text().splitlines() if line]
    attempts: list = []  # in the order they started; lines of files older than attempts count as one attempt
    starts: dict = {}
    for line in lines:
        attempt = line.get("attempt")
        if attempt not in starts:
            attempts.append(attempt)
            starts[attempt] = line.get("start_step", 0)
    superseded_after, earliest_later_start = {}, float("inf")
    for attempt in reversed(attempts):
        superseded_after[attempt] = earliest_later_start
        earliest_later_start = min(earliest_later_start, starts[attempt])
    steps: dict[int, dict] = {}
    for line in lines:
        if "step" not in line or "table" in line or line["step"] > superseded_after[line.get("attempt")]:
            continue
        steps.setdefault(line["step"], {}).update({k: v for k, v in line.items() if k != "attempt"})
    return [steps[step] for step in sorted(steps)]
