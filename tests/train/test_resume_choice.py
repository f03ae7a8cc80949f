"""Which checkpoint a run resumes from: never an incomplete one; the newest complete one before it instead,
or a fresh start, said as a warning; a checkpoint of another run starts a new W&B run."""

from __future__ import annotations

import pytest
import ray.train

from tests.test_runs import fake_checkpoint
from vlmtune.config import load_config
from vlmtune.errors import CheckpointError
from vlmtune.train.checkpoint import choose_checkpoint


@pytest.fixture
def cfg(tmp_path):
    return load_config(overrides=[f"cluster.storage_path={tmp_path}", "cluster.run_name=run"])


def test_an_incomplete_checkpoint_falls_back_to_the_newest_complete_one_before_it(cfg, tmp_path):
    run = tmp_path / "run"
    fake_checkpoint(run, "checkpoint-0000002")
    fake_checkpoint(run, "checkpoint-0000004")
    fake_checkpoint(run, "checkpoint-0000006", complete=False)
    warnings: list[str] = []
    resume = choose_checkpoint(cfg, ray.train.Checkpoint(str(run / "checkpoint-0000006")), None, warnings.append)
    assert resume.url == str(run / "checkpoint-0000004") and resume.saved.step == 4 and resume.own_run
    assert warnings == [f"checkpoint {run}/checkpoint-0000006 is not used: it has no completion marker (the run "
                        "stopped before every worker's files were saved); resuming from "
                        f"{run}/checkpoint-0000004 instead"]

    # cluster.resume_from an incomplete one of another run: the one before it, there
    warnings.clear()
    resume = choose_checkpoint(cfg, None, str(run / "checkpoint-0000006"), warnings.append)
    assert resume.url == str(run / "checkpoint-0000004") and len(warnings) == 1
    other = load_config(overrides=[f"cluster.storage_path={tmp_path}", "cluster.run_name=other"])
    resume = choose_checkpoint(other, None, str(run / "checkpoint-0000004"), warnings.append)
    assert resume.url == str(run / "checkpoint-0000004") and not resume.own_run and len(warnings) == 1


def test_no_complete_checkpoint_starts_from_scratch_and_says_so(cfg, tmp_path):
    run = tmp_path / "run"
    fake_checkpoint(run, "checkpoint-0000002", complete=False)
    warnings: list[str] = []
    assert choose_checkpoint(cfg, ray.train.Checkpoint(str(run / "checkpoint-0000002")), None, warnings.append) is None
    assert warnings[0].endswith(f"no complete checkpoint before it in {run}: training starts from scratch")
    assert choose_checkpoint(cfg, None, None, warnings.append) is None and len(warnings) == 1


def test_resume_from_a_directory_that_does_not_exist_is_an_error(cfg, tmp_path):
    with pytest.raises(CheckpointError, match=r"cluster\.resume_from=.*nowhere: there is no checkpoint there"):
        choose_checkpoint(cfg, None, str(tmp_path / "nowhere"), print)


def test_without_a_checkpoint_from_ray_the_runs_newest_complete_one_is_resumed(cfg, tmp_path):
    """Ray Train hands over no checkpoint, yet the run has complete ones: they win over cluster.resume_from."""
    run = tmp_path / "run"
    fake_checkpoint(run, "checkpoint-0000002")
    fake_checkpoint(run, "checkpoint-0000004")
    fake_checkpoint(run, "checkpoint-0000006", complete=False)
    other = tmp_path / "other"
    fake_checkpoint(other, "checkpoint-0000010")
    warnings: list[str] = []
    resume = choose_checkpoint(cfg, None, str(other / "checkpoint-0000010"), warnings.append)
    assert resume.url == str(run / "checkpoint-0000004") and resume.own_run
    assert warnings == ["Ray Train handed over no checkpoint of this run: resuming from its newest complete one, "
                        f"{run}/checkpoint-0000004"]
