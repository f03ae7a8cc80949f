"""A separate Ray head on loopback for `ray job submit` tests, stopped by the process group it started.

`ray stop` would also kill the test session's own local cluster, so the head runs with `--block` in its
own process session and is torn down with it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path


def kill_process_group(proc: subprocess.Popen) -> None:
    """SIGKILL a `ray start --block` started in its own process session, with everything it runs: on SIGTERM
    Ray drains the node for up to 30 s first, and nothing in a test cluster needs saving."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RayHead:
    def __init__(self, tmp: Path, num_cpus: int = 4):
        self.gcs_port, self.dash_port = free_port(), free_port()
        # Ray's socket paths must stay under 107 bytes: pytest's tmp_path is too deep.
        self.temp_dir = tempfile.mkdtemp(prefix="rayhead-", dir="/tmp")
        self.dashboard = f"http://127.0.0.1:{self.dash_port}"
        self.env = dict(os.environ, RAY_ADDRESS=f"127.0.0.1:{self.gcs_port}")
        self.cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block",
                    "--node-ip-address=127.0.0.1", f"--port={self.gcs_port}",
                    f"--dashboard-port={self.dash_port}", "--dashboard-host=127.0.0.1", "--include-dashboard=true",
                    f"--ray-client-server-port={free_port()}", f"--num-cpus={num_cpus}", "--disable-usage-stats",
                    # the session's own local cluster holds Ray's default agent ports
                    f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
                    f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
                    f"--temp-dir={self.temp_dir}"]
        self.log = tmp / "ray-head.log"

    def __enter__(self) -> RayHead:
        self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=self.log.open("w"), stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited: {self.log.read_text()[-2000:]}")
            try:
                urllib.request.urlopen(f"{self.dashboard}/api/version", timeout=2)
                return self
            except urllib.error.HTTPError:  # 401 with token authentication on: up, and guarding itself
                return self
            except OSError:
                time.sleep(1)
        self.__exit__()
        raise RuntimeError(f"the Ray dashboard did not come up: {self.log.read_text()[-2000:]}")

    def submit(self, args: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
        """`ray job submit ARGS` against this head. Right after start-up the node's job agent may not be
        registered yet ("No available agent to submit job, please try again later"): then try again."""
        ray = str(Path(sys.executable).parent / "ray")
        deadline = time.time() + 60
        while True:
            done = subprocess.run([ray, "job", "submit", "--address", self.dashboard, *args], capture_output=True,
                                  text=True, env=self.env, timeout=timeout)
            if "No available agent" not in done.stderr or time.time() > deadline:
                return done
            time.sleep(2)

    def __exit__(self, *exc) -> None:
        kill_process_group(self.proc)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
