"""Bad configs fail before any Ray Train worker starts, with a message that says what to change."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.data.test_shards import make_shards
from vlmtune.config import load_config
from vlmtune.data.shards import ShardError
from vlmtune.launch.ray import PreflightError, preflight

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def shard_dir(tmp_path):
    """3 train shards + 1 val shard (ids repeat across splits; preflight does not care)."""
    make_shards(tmp_path, [3], split="val")
    val = json.loads((tmp_path / "manifest.json").read_text())["shards"]
    make_shards(tmp_path, [4, 4, 4], split="train")
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["shards"] += val
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    return str(tmp_path)


def cfg(shard_dir, *overrides):
    return load_config(overrides=[f"data.shards.dir={shard_dir}", *overrides])


def test_a_good_config_passes(shard_dir):
    preflight(cfg(shard_dir))
    preflight(cfg(shard_dir, "model.lora.enabled=true", "model.lora.targets=[language_attention, vision_tower]"))


def test_more_workers_than_train_shards(shard_dir):
    with pytest.raises(PreflightError, match=r"num_workers=4 but the train split .* has only 3 shard\(s\)"):
        preflight(cfg(shard_dir, "cluster.num_workers=4"))


def test_missing_shard(shard_dir):
    (Path(shard_dir) / "train-000001.tar").unlink()
    with pytest.raises(ShardError, match=r"train-000001\.tar listed in the manifest is missing"):
        preflight(cfg(shard_dir))


def test_no_shards_at_all(tmp_path):
    with pytest.raises(ShardError, match=r"run `python jobs/prepare_data\.py` first"):
        preflight(cfg(tmp_path / "nothing"))


def test_lora_target_that_matches_nothing(shard_dir):
    with pytest.raises(PreflightError, match="LoRA extra target module 'q_lin' matches no module"):
        preflight(cfg(shard_dir, "model.lora.enabled=true", "model.lora.extra_target_modules=[q_lin]"))


def test_qlora_needs_gpus(shard_dir):
    with pytest.raises(PreflightError, match=r"quantize_4bit.*needs GPUs"):
        preflight(cfg(shard_dir, "model.lora.enabled=true", "model.lora.quantize_4bit=true"))


@pytest.mark.parametrize(("overrides", "warned"), [
    (["cluster.num_workers=1", "train.zero_stage=2"], True),
    (["cluster.num_workers=1", "train.zero_stage=0"], False),
    (["cluster.num_workers=1", "train.zero_stage=2", "train.offload_optimizer=true"], False),  # ZeRO-Offload
    (["cluster.num_workers=[1, 2]", "train.zero_stage=2"], False),  # elastic: two workers at times
])
def test_zero_1_or_2_on_a_single_worker_is_pointed_out(shard_dir, caplog, overrides, warned):
    preflight(cfg(shard_dir, *overrides))
    assert ("partitions nothing" in caplog.text) is warned


def test_cli_fails_fast_with_the_message(shard_dir, tmp_path):
    """jobs/train.py exits 2 with the reason, before Ray starts (no session directory appears)."""
    cases = {
        "train.max_stesp=3": "unknown key 'train.max_stesp'; did you mean 'train.max_steps'?",
        "cluster.num_workers=5": "num_workers=5 but the train split",
        "model.lora.extra_target_modules=[nope]": "LoRA extra target module 'nope' matches no module",
    }
    for override, message in cases.items():
        done = subprocess.run([sys.executable, str(REPO / "jobs/train.py"), f"data.shards.dir={shard_dir}",
                               f"cluster.storage_path={tmp_path / 'runs'}", override],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 2, done.stderr[-2000:]
        assert message in done.stderr
        assert "Started a local Ray instance" not in done.stderr
