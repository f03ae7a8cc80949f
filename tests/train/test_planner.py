"""The pre-launch planner: exact parameter counts from the meta-device skeleton, ZeRO sharding, the fit verdict
with its suggestions, `jobs/train.py --plan` without Ray or DeepSpeed, and the preflight refusal."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.train.test_preflight import shard_dir  # noqa: F401  (fixture)
from vlmtune.config import GpuType, load_config
from vlmtune.errors import PreflightError
from vlmtune.launch.ray import preflight
from vlmtune.models.loading import prepare_model
from vlmtune.train.metrics import GPU_SPECS
from vlmtune.train.planner import GIB, estimate, model_stats, plan, typical_sample

REPO = Path(__file__).resolve().parents[2]
PHI3V = "microsoft/Phi-3-vision-128k-instruct"
FULL_ZERO0 = [f"model.name_or_path={PHI3V}", "model.lora.enabled=false", "train.zero_stage=0", "train.bf16=true",
              "model.gradient_checkpointing=true", "model.max_length=3072", "train.micro_batch_size=1",
              "model.num_crops=16", "cluster.num_workers=1"]

# Runs jobs/train.py as its own process and reports its exit code and whether Ray or DeepSpeed got imported.
PROBE = """
import json, runpy, sys
out, sys.argv = sys.argv[1], ["jobs/train.py", *sys.argv[2:]]
try:
    runpy.run_path("jobs/train.py", run_name="__main__")
    code = 0
except SystemExit as e:
    code = e.code
open(out, "w").write(json.dumps({"code": code, "ray": "ray" in sys.modules, "deepspeed": "deepspeed" in sys.modules}))
"""


def run_plan(tmp_path, *args: str) -> tuple[dict, subprocess.CompletedProcess]:
    out = tmp_path / "probe.json"
    proc = subprocess.run([sys.executable, "-c", PROBE, str(out), "--plan", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    return json.loads(out.read_text()), proc


@pytest.mark.parametrize("overrides", [
    ["model.lora.enabled=false", "model.freeze.vision_tower=true"],
    ["model.lora.enabled=false", "model.freeze.vision_tower=false", "model.freeze.embeddings=true"],
    ["model.lora.enabled=true", "model.lora.targets=[language_attention, projector, vision_tower]"],
    ["model.lora.enabled=true", "model.lora.targets=[language_mlp]", "model.lora.r=4"],
])
def test_parameter_counts_equal_a_real_model(overrides):
    cfg = load_config(overrides=overrides)
    real, _ = prepare_model(cfg.model, torch.float32)
    result = plan(cfg, "cpu")
    assert result.total_params == sum(p.numel() for p in real.parameters())
    assert result.trainable_params == sum(p.numel() for p in real.parameters() if p.requires_grad)
    assert 0 < result.trainable_params < result.total_params


def test_real_size_counts_and_image_tokens():
    cfg = load_config(overrides=FULL_ZERO0)
    stats, processor = model_stats(cfg, persistence_threshold=1e5)
    assert stats.total == 4_146_621_440  # the official checkpoint's parameter count (specs: 2 shards, bf16)
    assert typical_sample(cfg, processor).image_tokens == 2509  # a square image at num_crops=16: 4x4 tiles


def test_zero3_shards_weights_over_workers_and_zero2_does_not():
    cfg = load_config(overrides=[*FULL_ZERO0, "train.zero_stage=3"])
    stats, processor = model_stats(cfg, persistence_threshold=1e5)
    sample = typical_sample(cfg, processor)

    def weights(zero: int, workers: int) -> float:
        variant = load_config(overrides=[*FULL_ZERO0, f"train.zero_stage={zero}", f"cluster.num_workers={workers}"])
        return estimate(stats, sample, variant, "cpu").weights

    assert weights(3, 1) > weights(3, 2) > weights(3, 4) > weights(3, 16)
    assert weights(3, 16) < weights(3, 1) / 10
    assert weights(2, 1) == weights(2, 2) == weights(2, 4)
    # the tiny model's parameters are all below ZeRO-3's persistence threshold: every worker keeps them whole
    tiny = load_config(overrides=["model.lora.enabled=false", "train.zero_stage=3"])
    tiny_stats, _ = model_stats(tiny, persistence_threshold=1e5)
    assert tiny_stats.persistent == tiny_stats.total


def test_zero_stages_and_checkpointing_order_the_real_model():
    base = load_config(overrides=[*FULL_ZERO0, "cluster.gpu_type=H100-SXM", "cluster.num_workers=8"])
    stats, processor = model_stats(base, persistence_threshold=1e5)
    sample = typical_sample(base, processor)
    totals = {z: estimate(stats, sample, load_config(overrides=[*FULL_ZERO0, "cluster.gpu_type=H100-SXM",
                                                                "cluster.num_workers=8", f"train.zero_stage={z}"]),
                          "gpu") for z in (0, 2, 3)}
    assert totals[0].per_worker_bytes > totals[2].per_worker_bytes > totals[3].per_worker_bytes
    # ZeRO-0, mixed precision: 2 bytes per weight, 2 per gradient, 16 per trainable parameter of optimizer state
    assert totals[0].weights == 2 * stats.total
    assert totals[0].optimizer == 16 * stats.trainable
    plan0 = totals[0]
    assert plan0.activations_checkpointed < plan0.activations_full / 3
    assert plan0.flops_text > 0 and plan0.flops_vision > 0 and plan0.step_time_s > 0


def test_elastic_worker_range_plans_for_the_minimum():
    def per_worker(workers: str) -> int:
        cfg = load_config(overrides=["train.zero_stage=3", "cluster.use_gpu=true", "cluster.gpu_type=H100-SXM",
                                     f"cluster.num_workers={workers}"])
        return plan(cfg, "gpu").per_worker_bytes

    assert per_worker("[2, 8]") == per_worker("2") > per_worker("8")


def test_gpu_types_match_the_config_schema():
    assert set(GPU_SPECS) == set(GpuType.__args__)


def test_full_finetune_zero0_on_a_24gb_gpu_is_refused(tmp_path):
    probe, proc = run_plan(tmp_path, "--config", "configs/phi3v-burberry-full-zero3.yaml", *FULL_ZERO0,
                           "cluster.gpu_type=L4")
    assert probe["code"] == 2, proc.stderr
    assert "does NOT fit" in proc.stdout and "optimizer states" in proc.stdout  # the table, printed
    assert "error: the run needs" in proc.stderr and "the L4 has 22.5 GiB" in proc.stderr
    assert "train.zero_stage=3" in proc.stderr  # a concrete change
    assert not probe["ray"] and not probe["deepspeed"]


def test_lora_zero3_on_h100_is_accepted(tmp_path):
    probe, proc = run_plan(tmp_path, "--config", "configs/phi3v-burberry-lora.yaml", "train.zero_stage=3",
                           "cluster.gpu_type=H100-SXM")
    assert probe["code"] == 0, proc.stderr
    assert "→ fits" in proc.stdout and "GPU-hours" in proc.stdout


@pytest.mark.parametrize("config", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_plan_of_every_shipped_config_runs_without_ray_or_deepspeed(tmp_path, config):
    probe, proc = run_plan(tmp_path, "--config", f"configs/{config}")
    assert probe == {"code": 0, "ray": False, "deepspeed": False}, proc.stderr
    assert "per worker" in proc.stdout and "FLOPs per sample" in proc.stdout


def test_preflight_refuses_a_gpu_run_that_does_not_fit(shard_dir):  # noqa: F811
    overrides = [f"data.shards.dir={shard_dir}", *FULL_ZERO0, "cluster.use_gpu=true"]
    with pytest.raises(PreflightError, match=r"needs \d+\.\d GiB per worker but the L4 has 22\.5 GiB"):
        preflight(load_config(overrides=[*overrides, "cluster.gpu_type=L4"]))
    preflight(load_config(overrides=[*overrides, "cluster.gpu_type=H200"]))  # 141 GB holds it
    assert plan(load_config(overrides=[*overrides, "cluster.gpu_type=H200"])).per_worker_bytes > 40 * GIB


def test_the_attention_mask_counts_for_packed_rows_and_eager_attention_only():
    """Padded training batches carry no mask (sdpa runs them causal), so sdpa plans them like flash-attention;
    a packed row's block-diagonal mask (tokens² bytes) counts with sdpa, not with flash-attention's varlen."""
    packed = ["data.batching.mode=packed", "data.batching.max_tokens=6144"]
    stats, processor = model_stats(load_config(overrides=FULL_ZERO0), persistence_threshold=1e5)

    def activations(*overrides: str) -> float:
        cfg = load_config(overrides=[*FULL_ZERO0, *overrides])
        return estimate(stats, typical_sample(cfg, processor), cfg, "gpu").activations_full

    assert activations("model.attn_implementation=sdpa") == activations("model.attn_implementation=flash_attention_2")
    assert (activations("model.attn_implementation=sdpa", *packed)
            - activations("model.attn_implementation=flash_attention_2", *packed)) == 6144**2
    assert activations("model.attn_implementation=eager") > activations("model.attn_implementation=sdpa")
