"""Checkpoint completeness (the marker written last and the files it lists), the run's checkpoints newest
first, and URLs that carry pyarrow's S3 options through joins to fsspec."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from vlmtune import runs, storage
from vlmtune.errors import CheckpointError
from vlmtune.export import export_checkpoint


def fake_checkpoint(run: Path, name: str, complete: bool = True, step: int | None = None) -> Path:
    """A checkpoint directory as the ranks leave it: a shard per rank and the trainer state."""
    directory = run / name
    (directory / runs.DEEPSPEED_TAG).mkdir(parents=True)
    files = {f"{runs.DEEPSPEED_TAG}/zero_pp_rank_{r}_mp_rank_00_optim_states.pt": b"x" * (10 + r) for r in (0, 1)}
    files[runs.TRAINER_STATE] = json.dumps({"step": step or runs.checkpoint_step(name), "world_size": 2}).encode()
    for path, data in files.items():
        (directory / path).write_bytes(data)
    if complete:
        runs.mark_complete(str(directory), step or runs.checkpoint_step(name), {p: len(d) for p, d in files.items()})
    return directory


def test_a_checkpoint_is_complete_with_its_marker_and_every_listed_file(tmp_path):
    good = fake_checkpoint(tmp_path, "checkpoint-0000004")
    assert runs.incomplete_reason(good) is None
    assert "no completion marker" in runs.incomplete_reason(fake_checkpoint(tmp_path, "checkpoint-0000008", False))
    assert runs.incomplete_reason(tmp_path / "checkpoint-0000012") == runs.MISSING
    (good / runs.DEEPSPEED_TAG / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"cut")
    assert "1 of its files are missing or cut short (state/zero_pp_rank_1" in runs.incomplete_reason(good)
    os.remove(good / runs.TRAINER_STATE)
    assert "2 of its files" in runs.incomplete_reason(good)


def test_complete_checkpoints_newest_first_and_a_step_saved_again_first(tmp_path):
    fake_checkpoint(tmp_path, "checkpoint-0000002")
    fake_checkpoint(tmp_path, "checkpoint-0000004", complete=False)
    fake_checkpoint(tmp_path, "checkpoint-0000004-3f2a9c1d")  # step 4 saved again by the attempt after
    fake_checkpoint(tmp_path, "checkpoint-0000006")
    (tmp_path / "logs").mkdir()
    names = [storage.basename(c) for c in runs.complete_checkpoints(str(tmp_path))]
    assert names == ["checkpoint-0000006", "checkpoint-0000004-3f2a9c1d", "checkpoint-0000002"]
    up_to_5 = runs.complete_checkpoints(str(tmp_path), max_step=5)
    assert storage.basename(up_to_5[0]) == "checkpoint-0000004-3f2a9c1d"
    assert runs.complete_checkpoints(str(tmp_path / "nothing-here")) == []
    assert runs.checkpoint_step("checkpoint-0000004-3f2a9c1d") == 4 and runs.checkpoint_step("export") is None


def test_export_refuses_an_incomplete_checkpoint_and_names_a_complete_one(tmp_path):
    fake_checkpoint(tmp_path, "checkpoint-0000002")
    partial = fake_checkpoint(tmp_path, "checkpoint-0000004", complete=False)
    with pytest.raises(CheckpointError, match=r"checkpoint-0000004 cannot be used: it has no completion marker.*"
                                              r"the newest complete one is .*checkpoint-0000002"):
        export_checkpoint(partial, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_urls_keep_their_s3_options_through_joins_and_hand_them_to_fsspec():
    url = "s3://bucket/runs/?endpoint_override=127.0.0.1:9000&scheme=http&allow_bucket_creation=true"
    run = storage.join(storage.resolve(url), "demo", "checkpoint-0000004")
    assert run == "s3://bucket/runs/demo/checkpoint-0000004?endpoint_override=127.0.0.1:9000&scheme=http" \
                  "&allow_bucket_creation=true"
    assert storage.basename(run) == "checkpoint-0000004"
    assert storage.parent(run) == storage.join(storage.resolve(url), "demo")
    path, query = storage.split_query(run)
    assert storage.fsspec_options(path, query) == {"endpoint_url": "http://127.0.0.1:9000"}
    assert storage.fsspec_options("s3://b/x", "region=eu-west-3") == {"client_kwargs": {"region_name": "eu-west-3"}}
    assert storage.fsspec_options("s3://b/x", "") == {} and storage.split_query("/local/a?b") == ("/local/a?b", "")
