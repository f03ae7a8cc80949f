"""Local staging directories (`storage.staging_dir`): what a killed holder leaves behind is removed by the next
one of its kind; what a live process holds is not."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from vlmtune import storage

HOLD = """
import sys, time
from vlmtune import storage
with storage.staging_dir(sys.argv[1]) as path:
    (path / "part-0.pt").write_bytes(b"x" * 1000)
    print(path, flush=True)
    time.sleep(120)
"""


@pytest.fixture
def tmp_root(tmp_path, monkeypatch):
    """Staging directories under this test's own directory, here and in the processes it starts."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    return tmp_path


def holder(kind: str) -> tuple[subprocess.Popen, Path]:
    """A process inside `staging_dir(kind)`, and its directory."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, kind], stdout=subprocess.PIPE, text=True)
    return proc, Path(proc.stdout.readline().strip())


def test_a_staging_directory_and_its_lock_are_gone_after_use(tmp_root):
    with storage.staging_dir("ckpt") as path:
        assert path.is_dir() and path.parent == tmp_root and path.name.startswith("vlmtune-staging-ckpt-")
        (path / "mp_rank_00_model_states.pt").write_bytes(b"state")
        assert sorted(p.name for p in tmp_root.iterdir()) == sorted([path.name, path.name + ".lock"])
        assert [p.name for p in path.iterdir()] == ["mp_rank_00_model_states.pt"]  # the lock is not uploaded
    assert list(tmp_root.iterdir()) == []


def test_a_killed_holders_directory_is_removed_by_the_next_and_a_live_ones_is_kept(tmp_root):
    killed, abandoned = holder("ckpt")
    alive, in_use = holder("ckpt")
    other_kind, other = holder("export")
    try:
        os.kill(killed.pid, signal.SIGKILL)
        killed.wait()
        assert abandoned.is_dir() and abandoned.with_name(abandoned.name + ".lock").exists()
        with storage.staging_dir("ckpt") as path:
            assert not abandoned.exists() and not abandoned.with_name(abandoned.name + ".lock").exists()
            assert (in_use / "part-0.pt").exists()  # its holder is alive
            assert (other / "part-0.pt").exists()  # another kind is another kind's business
            with storage.staging_dir("ckpt") as second:  # the same process holding two: neither is removed
                assert path.is_dir() and second.is_dir()
    finally:
        for proc in (alive, other_kind):
            proc.kill()
            proc.wait()


def test_leftovers_without_a_lock_or_without_a_directory(tmp_root):
    young, old = tmp_root / "vlmtune-staging-ckpt-young", tmp_root / "vlmtune-staging-ckpt-old"
    young.mkdir()
    old.mkdir()
    hour_ago = time.time() - 3600
    os.utime(old, (hour_ago, hour_ago))
    orphan_lock = tmp_root / "vlmtune-staging-ckpt-gone.lock"  # killed between removing its directory and its lock
    orphan_lock.touch()
    with storage.staging_dir("ckpt"):
        assert young.is_dir()  # may be a creator between making it and locking it
        assert not old.exists() and not orphan_lock.exists()
