"""A separate Ray head on loopback for `ray job submit` tests, stopped by the process group it started.

`ray stop` would also kill the test session's own local cluster, so the head runs with `--block` in its
own process session and is torn down with it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RayHead:
    def __init__(self, tmp: Path, num_cpus: int = 4):
        self.gcs_port, self.dash_port = free_port(), free_port()
        self.dashboard = f"http://127.0.0.1:{self.dash_port}"
        self.env = dict(os.environ, RAY_ADDRESS=f"127.0.0.1:{self.gcs_port}")
        self.cmd = ["ray", "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={self.gcs_port}",
                    f"--dashboard-port={self.dash_port}", "--dashboard-host=127.0.0.1", "--include-dashboard=true",
                    f"--ray-client-server-port={free_port()}", f"--num-cpus={num_cpus}", "--disable-usage-stats",
                    f"--temp-dir={tmp / 'ray'}"]
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
            except OSError:
                time.sleep(1)
        self.__exit__()
        raise RuntimeError(f"the Ray dashboard did not come up: {self.log.read_text()[-2000:]}")

    def __exit__(self, *exc) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=60)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(self.proc.pid, signal.SIGKILL)
