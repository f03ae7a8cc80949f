"""The job runner: one `error: …` line and exit 2 for expected failures, a traceback for bugs, and a quiet
console with everything else in the log file (all through real subprocesses, as users run jobs)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run(*args: str, cwd: Path = REPO, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, timeout=300,
                          env={**os.environ, "VLMTUNE_LOG": "", **(env or {})})


@pytest.mark.parametrize(("args", "message"), [
    (["jobs/export.py", "no-such-checkpoint", "out"], "error: no-such-checkpoint is not a vlmtune checkpoint"),
    (["jobs/inspect_shards.py", "no-such-dir"], "error: no manifest.json in no-such-dir"),
    (["jobs/prepare_data.py", "data.catalog.source=missing.csv"], "error: catalog file not found: missing.csv"),
    (["jobs/train.py", "train.max_stesp=3"], "did you mean 'train.max_steps'?"),
], ids=["export", "inspect", "prepare", "train-config"])
def test_expected_failures_are_one_line_and_exit_2(tmp_path, args, message):
    done = run(str(REPO / args[0]), *args[1:], cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert "Traceback" not in done.stderr and done.stderr.startswith("error: ")


SCRIPT = textwrap.dedent("""
    import logging, os, sys
    from vlmtune.cli import exit_with, job_parser
    from vlmtune.console import console

    def main(args):
        console.open_log(sys.argv[-1])
        logging.getLogger("somelib").info("library chatter")
        logging.getLogger("somelib").warning("library warning")
        os.write(2, b"C++ line on fd 2\\n")
        print("a stray print")
        logging.getLogger("vlmtune.job").info("stage header")
        console.say("the result")
        if os.environ.get("BUG"):
            raise RuntimeError("a bug")
        if os.environ.get("STOPPED"):
            from vlmtune.errors import Stopped
            raise Stopped("training stopped at step 7 on SIGTERM")
        return 0

    parser = job_parser(None, config=False)
    parser.add_argument("logdir")
    exit_with("probe", parser, main)
""")


def test_console_shows_vlmtune_and_results_the_log_keeps_the_rest(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(SCRIPT)
    done = run(str(script), str(tmp_path / "logs"))
    assert done.returncode == 0, done.stderr
    console = done.stdout + done.stderr
    assert "stage header" in console and "the result" in console
    for noise in ("library chatter", "library warning", "C++ line", "a stray print"):
        assert noise not in console
    (log,) = (tmp_path / "logs").glob("probe-*.log")
    assert f"log: {log}" in console
    text = log.read_text()
    assert all(line in text for line in ("library chatter", "library warning", "C++ line", "a stray print"))

    verbose = run(str(script), "--verbose", str(tmp_path / "logs-verbose"))
    assert all(line in verbose.stdout + verbose.stderr for line in ("library chatter", "C++ line", "a stray print"))
    assert not (tmp_path / "logs-verbose").exists()


def test_a_bug_keeps_its_traceback_and_exits_1(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(SCRIPT)
    done = run(str(script), str(tmp_path / "logs"), env={"BUG": "1"})
    assert done.returncode == 1
    assert "Traceback" in done.stderr and "RuntimeError: a bug" in done.stderr
    (log,) = (tmp_path / "logs").glob("probe-*.log")
    assert done.stderr.rstrip().endswith(f"(log: {log})")  # below the traceback, where the reader is looking
    assert done.stdout.count(f"log: {log}") == 1  # once when the log got its place, not again at the end


def test_a_run_stopped_on_request_exits_75_for_launchers_that_retry(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(SCRIPT)
    done = run(str(script), str(tmp_path / "logs"), env={"STOPPED": "1"})
    assert done.returncode == 75  # EX_TEMPFAIL: Slurm's requeue in slurm/train.sh, KubeRay's backoffLimit
    assert "error: training stopped at step 7 on SIGTERM" in done.stderr and "Traceback" not in done.stderr


EARLY_EXIT = textwrap.dedent("""
    import logging, os
    from vlmtune.cli import exit_with, job_parser

    def main(args):  # ends before it knows an output directory, as `train.py --plan` and config errors do
        if os.environ.get("CHATTER"):
            logging.getLogger("somelib").warning("library warning")
        return 0

    exit_with("probe", job_parser(None, config=False), main)
""")


def test_a_job_that_ends_before_its_log_has_a_place_leaves_no_file_unsaid(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(EARLY_EXIT)
    temp = tmp_path / "tmp"
    temp.mkdir()
    quiet = run(str(script), env={"TMPDIR": str(temp)})
    assert quiet.returncode == 0, quiet.stderr
    assert list(temp.iterdir()) == [] and "log:" not in quiet.stdout + quiet.stderr  # an empty log is removed

    chatty = run(str(script), env={"TMPDIR": str(temp), "CHATTER": "1"})
    assert chatty.returncode == 0, chatty.stderr
    (log,) = temp.glob("vlmtune-probe-*.log")  # kept, and said
    assert "library warning" in log.read_text() and f"log: {log}" in chatty.stdout
