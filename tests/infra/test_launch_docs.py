"""The launch commands the README and docs/launch.md open with: the three that users type, naming files
that exist (the tests next to this one check that each command works: test_k8s.py, test_slurm.py)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
THE_THREE = [
    "ray job submit --working-dir . -- python jobs/train.py --config configs/phi3v-burberry-lora.yaml",
    "sbatch slurm/train.sh",
    "kubectl apply -f k8s/",
]


def first_code_block(markdown: str) -> list[str]:
    block = re.search(r"^```\n(.*?)^```", markdown, re.MULTILINE | re.DOTALL)
    assert block, "no code block"
    return block.group(1).splitlines()


def test_readme_launch_section_opens_with_the_three_commands():
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## The three launch paths"):readme.index("## Outputs and resuming")]
    assert section.split("\n", 2)[2].startswith("```\n"), "the commands come first"
    assert first_code_block(section) == THE_THREE


def test_launch_doc_gives_the_same_three_commands():
    assert first_code_block((REPO / "docs" / "launch.md").read_text()) == THE_THREE


def test_the_three_commands_name_what_exists():
    ray, sbatch, kubectl = (shlex.split(c) for c in THE_THREE)
    assert (REPO / ray[ray.index("python") + 1]).is_file() and (REPO / ray[-1]).is_file()
    assert (REPO / sbatch[-1]).is_file()
    assert sorted(p.name for p in (REPO / kubectl[-1]).glob("*.yaml"))
