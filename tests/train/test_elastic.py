"""An elastic run on a two-node Ray cluster on loopback (a head and one `ray start` worker node, one CPU
each): the worker node is SIGKILLed mid-run, training goes on with one worker from the last checkpoint, the
node comes back and the run grows to two workers again, and every step ends up logged once. Once it has
trained a few steps on two workers again, the test stops it with SIGTERM (as Slurm or Kubernetes would):
what remains of its steps would only repeat what the first attempt showed."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.data.ray_nodes import TwoNodeCluster
from vlmtune import runs
from vlmtune.tracking import read_metrics

REPO = Path(__file__).resolve().parents[2]
# More steps than the run needs to get through a node's loss and return on a slow machine (at ~7 steps/s, 30 to
# ~105 steps passed on one worker in runs so far): the test stops it once it has grown back (see the docstring).
STEPS = 400
STEPS_AFTER_GROWING = 3  # steps trained on two workers again before the SIGTERM
pytestmark = pytest.mark.slow


def starts(run: Path) -> list[dict]:
    """The start record of every attempt so far: its first step and its number of workers."""
    path = run / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [r for r in map(json.loads, lines) if "start_step" in r]


def wait_for(what: str, check, driver: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert driver.poll() is None, f"the driver exited ({driver.returncode}) before {what}:\n" + \
            log.read_text()[-3000:]
        assert time.monotonic() < deadline, f"timed out waiting for {what}:\n" + log.read_text()[-3000:]
        time.sleep(0.5)


def last_step(run: Path) -> int:
    """The last step logged so far (0 before the first)."""
    if not (run / "metrics.jsonl").exists():
        return 0
    return max((r["step"] for r in read_metrics(run) if "loss" in r), default=0)


def test_an_elastic_run_continues_without_a_lost_node_and_grows_back(sample_shards, tmp_path):
    run = tmp_path / "runs" / "elastic"
    log = tmp_path / "driver.log"
    with TwoNodeCluster(tmp_path, cpus_per_node=1) as cluster:
        cluster.wait()
        driver = subprocess.Popen(
            [sys.executable, "jobs/train.py", "--config", "configs/demo-cpu.yaml", f"data.shards.dir={sample_shards}",
             f"cluster.storage_path={run.parent}", f"cluster.run_name={run.name}", "cluster.num_workers=[1, 2]",
             "cluster.cpus_per_worker=1", "cluster.resize_interval_s=1", "cluster.max_failures=3",
             "data.loader.num_workers=0", "train.micro_batch_size=2", f"train.max_steps={STEPS}",
             "train.checkpoint_every=3", "train.log_every=1", "train.eval_every=0", "train.eval_batches=1",
             "train.table_samples=0", "export.enabled=false", "tracking.mode=disabled"],
            # a restart first tries both workers until the lost node is declared dead: wait less for them
            cwd=REPO, env={**cluster.env, "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "15"}, stdout=log.open("w"),
            stderr=subprocess.STDOUT)
        try:
            wait_for("a checkpoint on two workers", lambda: runs.complete_checkpoints(str(run)), driver, log)
            assert starts(run)[-1]["workers"] == 2
            cluster.kill_worker_node()
            wait_for("an attempt on one worker", lambda: starts(run)[-1]["workers"] == 1, driver, log)
            cluster.start_worker_node()
            cluster.wait()
            wait_for("the run to grow back", lambda: starts(run)[-1]["workers"] == 2, driver, log)
            grown_at = starts(run)[-1]["start_step"]
            wait_for("steps on two workers again", lambda: last_step(run) >= grown_at + STEPS_AFTER_GROWING, driver,
                     log)
            driver.send_signal(signal.SIGTERM)
            assert driver.wait(timeout=300) == 75, log.read_text()[-4000:]  # stopped after a checkpoint
        finally:
            if driver.poll() is None:
                driver.kill()
    workers = [s["workers"] for s in starts(run)]
    assert workers[0] == 2 and workers[-1] == 2 and 1 in workers, workers
    assert all(s["start_step"] > 0 for s in starts(run)[1:]), starts(run)  # every restart from a checkpoint
    stopped_at = last_step(run)
    assert grown_at + STEPS_AFTER_GROWING <= stopped_at < STEPS
    assert runs.checkpoint_step(Path(runs.complete_checkpoints(str(run))[0]).name) == stopped_at
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == list(range(1, stopped_at + 1))  # each step once
