"""Tracker: metrics.jsonl on rank 0 only, tables without images, W&B offline with a resumable run id; after a
resume from an earlier step, one value per step: the latest attempt's in metrics.jsonl, a rewound W&B run."""

from __future__ import annotations

import json

import wandb
from PIL import Image

from tests.wandb_records import branch_point, history, run_files, run_id
from vlmtune.config import TrackingConfig
from vlmtune.tracking import Tracker, read_metrics


def test_only_the_active_rank_writes(tmp_path):
    Tracker(TrackingConfig(mode="disabled"), str(tmp_path / "r1"), "run", {}, active=False).log({"loss": 1.0}, 1)
    assert not (tmp_path / "r1").exists()


def test_metrics_jsonl_holds_scalars_and_tables_without_images(tmp_path):
    tracker = Tracker(TrackingConfig(mode="disabled"), str(tmp_path), "run", {})
    tracker.log({"loss": 2.5}, 1)
    tracker.log_table("eval/samples", ["id", "image", "text"], [["a", Image.new("RGB", (4, 4)), "hi"]], 1)
    tracker.log({"loss": 1.5}, 2)
    tracker.finish()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[0] == {"attempt": "", "start_step": 0, "workers": 1}
    assert lines[2] == {"step": 1, "attempt": "", "table": "eval/samples", "rows": [{"id": "a", "text": "hi"}]}
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 2.5}, {"step": 2, "loss": 1.5}]


def test_offline_wandb_run_continues_under_the_same_id(tmp_path):
    cfg = TrackingConfig(mode="offline", project="p")
    first = Tracker(cfg, str(tmp_path), "run", {"a": 1})
    first.log({"loss": 3.0}, 1)
    first.finish()
    second = Tracker(cfg, str(tmp_path), "run", {"a": 1}, run_id=first.run_id)
    second.log({"loss": 2.0}, 2)
    second.finish()
    assert second.run_id == first.run_id
    files = run_files(tmp_path)
    assert run_id(files[0]) == first.run_id  # a resumed offline run's file need not repeat the run record
    assert [r["loss"] for f in files for r in history(f)] == [3.0, 2.0]


def log_steps(tracker: Tracker, steps, value: float) -> None:
    for step in steps:
        tracker.log({"loss": value + step}, step)


def test_after_a_rollback_each_step_keeps_the_latest_attempts_value(tmp_path):
    """Attempt a logs steps 1-6 (checkpoint at 4) and dies; b resumes at 4, logs 5-7 and dies; c resumes at 4
    again, logs 5-8. Every step once: 1-4 from a (its eval at 4 too), 5-8 from c, b's 7 not at all."""
    disabled = TrackingConfig(mode="disabled")
    first = Tracker(disabled, str(tmp_path), "run", {}, attempt="a")
    log_steps(first, range(1, 7), 100.0)
    first.log({"eval_loss": 9.0}, 4)
    log_steps(Tracker(disabled, str(tmp_path), "run", {}, attempt="b", start_step=4), range(5, 8), 200.0)
    log_steps(Tracker(disabled, str(tmp_path), "run", {}, attempt="c", start_step=4), range(5, 9), 300.0)
    metrics = read_metrics(tmp_path)
    assert [r["step"] for r in metrics] == list(range(1, 9))
    assert [r["loss"] for r in metrics] == [101.0, 102.0, 103.0, 104.0, 305.0, 306.0, 307.0, 308.0]
    assert metrics[3] == {"step": 4, "loss": 104.0, "eval_loss": 9.0}
    # a fresh start (no complete checkpoint to resume) supersedes everything before it
    log_steps(Tracker(disabled, str(tmp_path), "run", {}, attempt="d"), range(1, 3), 400.0)
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 401.0}, {"step": 2, "loss": 402.0}]


def test_a_resumed_offline_wandb_run_records_its_rewind_to_the_checkpoint_step(tmp_path):
    cfg = TrackingConfig(mode="offline", project="p")
    first = Tracker(cfg, str(tmp_path), "run", {}, attempt="a")
    log_steps(first, range(1, 7), 100.0)
    first.finish()
    second = Tracker(cfg, str(tmp_path), "run", {}, run_id=first.run_id, attempt="b", start_step=4)
    log_steps(second, range(5, 9), 200.0)
    second.finish()
    before, after = run_files(tmp_path)
    assert branch_point(before) is None
    assert branch_point(after) == (first.run_id, "_step", 4.0)  # `wandb sync` asks the server to rewind there
    assert second.run_id == first.run_id
    assert [(r["_step"], r["loss"]) for r in history(after)] == [(s, 200.0 + s) for s in range(5, 9)]


def test_a_server_that_cannot_rewind_resumes_the_run_and_says_what_w_and_b_keeps(tmp_path, monkeypatch):
    cfg = TrackingConfig(mode="offline", project="p")
    first = Tracker(cfg, str(tmp_path), "run", {})
    first.finish()
    real_init = wandb.init

    def server_without_rewind(**kwargs):
        if "resume_from" in kwargs:
            raise wandb.errors.CommError("failed to rewind run: returned error 400: cannot rewind a run that is "
                                         "not in a terminal state")
        return real_init(**kwargs)

    monkeypatch.setattr(wandb, "init", server_without_rewind)
    warnings: list[str] = []
    second = Tracker(cfg, str(tmp_path), "run", {}, run_id=first.run_id, start_step=4, warn=warnings.append)
    second.finish()
    assert second.run_id == first.run_id
    assert len(warnings) == 1 and f"W&B could not rewind run {first.run_id} to step 4" in warnings[0]
    assert "keeps the earlier attempt's values for the steps after 4" in warnings[0]
