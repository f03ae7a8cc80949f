"""slurm/*.sh without a Slurm cluster: bash syntax, shellcheck, the #SBATCH defaults against the default
recipe, and how the scripts resolve their config from their arguments (run outside a job, they get as far
as naming the config, then stop because there is no allocation)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from vlmtune.config import load_config

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = sorted((REPO / "slurm").glob("*.sh"))
DEFAULT_CONFIG = "configs/phi3v-burberry-lora.yaml"  # the README's default recipe


def test_scripts_exist():
    assert {p.name for p in SCRIPTS} == {"train.sh", "prepare.sh", "ray-cluster.sh"}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script):
    res = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_shellcheck():
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck not installed (apt-get install shellcheck; .ci/run does)")
    res = subprocess.run([shellcheck, "-x", *map(str, SCRIPTS)], capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0, res.stdout
    bad = subprocess.run([shellcheck, "-"], input="#!/bin/bash\nrm -rf $1/*\n", capture_output=True, text=True)
    assert bad.returncode != 0  # shellcheck really checks


def sbatch_defaults(script: str) -> dict[str, str]:
    return dict(re.findall(r"^#SBATCH --([a-z-]+)(?:=(\S+))?", (REPO / "slurm" / script).read_text(), re.MULTILINE))


def test_train_defaults_fit_the_default_recipe():
    """`sbatch slurm/train.sh` allocates what the default recipe asks for: a GPU per worker, none idle,
    and CPUs for every worker (the job's pre-flight check would stop it otherwise)."""
    text = (REPO / "slurm" / "train.sh").read_text()
    sbatch = sbatch_defaults("train.sh")
    assert f"vlmtune_config_args train.sh {DEFAULT_CONFIG} " in text
    c = load_config(REPO / DEFAULT_CONFIG).cluster
    nodes, gpus, cpus = int(sbatch["nodes"]), int(sbatch["gpus-per-node"]), int(sbatch["cpus-per-task"])
    assert sbatch["ntasks-per-node"] == "1" and c.use_gpu
    assert nodes * gpus == c.num_workers * c.gpus_per_worker
    assert cpus >= gpus // c.gpus_per_worker * c.cpus_per_worker
    assert {"time", "output", "job-name", "exclusive"} <= set(sbatch)
    # sbatch stops reading #SBATCH lines at the first command: all of them must come before `set -euo`.
    assert text.index("set -euo pipefail") > text.rindex("#SBATCH")


def test_prepare_uses_the_same_default_recipe():
    assert f"vlmtune_config_args prepare.sh {DEFAULT_CONFIG} " in (REPO / "slurm" / "prepare.sh").read_text()
    assert int(sbatch_defaults("prepare.sh")["nodes"]) >= 1


def run_outside_slurm(script: str, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "VLMTUNE_"))}
    return subprocess.run(["bash", f"slurm/{script}", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=30)


@pytest.mark.parametrize("script", ["train.sh", "prepare.sh"])
@pytest.mark.parametrize(("args", "config", "overrides"), [
    ((), f"{DEFAULT_CONFIG} (the default: no CONFIG argument)", "none"),
    (("cluster.num_workers=16", "train.max_steps=10"), f"{DEFAULT_CONFIG} (the default: no CONFIG argument)",
     "cluster.num_workers=16 train.max_steps=10"),
    (("configs/demo-cpu.yaml", "train.max_steps=10"), "configs/demo-cpu.yaml (from the arguments)",
     "train.max_steps=10"),
], ids=["no arguments", "overrides only", "config and overrides"])
def test_scripts_say_which_config_they_resolved(script, args, config, overrides):
    res = run_outside_slurm(script, *args)
    assert f"config: {REPO}/{config}\n" in res.stdout, res.stdout + res.stderr
    assert f"overrides: {overrides}\n" in res.stdout
    # Then the job part, which needs an allocation: stops with its own message.
    assert res.returncode == 1 and "run this script with sbatch" in res.stderr


def test_missing_config_fails_before_ray_starts():
    res = run_outside_slurm("train.sh", "configs/no-such-recipe.yaml")
    assert res.returncode == 1
    assert f"config configs/no-such-recipe.yaml not found (relative paths start at {REPO})" in res.stderr
    assert "config:" not in res.stdout


@pytest.mark.parametrize("script", ["train.sh", "prepare.sh"])
def test_options_after_the_script_are_a_usage_error(script):
    res = run_outside_slurm(script, "--nodes=2")
    assert res.returncode == 2
    assert res.stderr.startswith(f"usage: sbatch [sbatch options] slurm/{script} [CONFIG]")
    help_ = run_outside_slurm(script, "--help")
    assert help_.returncode == 0 and DEFAULT_CONFIG in help_.stdout
