"""slurm/*.sh statically: bash syntax, shellcheck, and the #SBATCH defaults the docs promise."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = sorted((REPO / "slurm").glob("*.sh"))


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


def test_train_defaults_are_a_multi_node_gpu_job():
    text = (REPO / "slurm" / "train.sh").read_text()
    sbatch = dict(re.findall(r"^#SBATCH --([a-z-]+)(?:=(\S+))?", text, re.MULTILINE))
    assert int(sbatch["nodes"]) >= 2 and sbatch["ntasks-per-node"] == "1"
    assert int(sbatch["gpus-per-node"]) >= 1 and int(sbatch["cpus-per-task"]) >= 1
    assert {"time", "output", "job-name"} <= set(sbatch)
    # sbatch stops reading #SBATCH lines at the first command: all of them must come before `set -euo`.
    assert text.index("set -euo pipefail") > text.rindex("#SBATCH")
