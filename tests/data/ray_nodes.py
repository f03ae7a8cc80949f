"""A two-node Ray cluster on loopback: a head and one worker node, each started with `ray start`.

Both nodes run on this machine, each with its own raylet and object store, as `ray start` on two hosts would.
Each runs with `--block` in its own process session and is killed with it (never `ray stop`, which would
also stop the test session's own cluster). No dashboard: nothing here submits jobs, and the nodes come up in
seconds. Ray's socket paths must stay under 107 bytes, so the session directory is a short one under /tmp.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.train.ray_cluster import free_port, kill_process_group

WAIT_FOR_NODES = """
import sys, time, ray
ray.init(address=sys.argv[1], log_to_driver=False)
deadline = time.time() + 120
while sum(n["Alive"] for n in ray.nodes()) < int(sys.argv[2]):
    if time.time() > deadline:
        sys.exit(f"only {sum(n['Alive'] for n in ray.nodes())} of {sys.argv[2]} nodes joined")
    time.sleep(0.2)
"""


class TwoNodeCluster:
    def __init__(self, tmp: Path, cpus_per_node: int = 1):
        self.port = free_port()
        self.temp_dir = tempfile.mkdtemp(prefix="raynodes-", dir="/tmp")
        # a lost node is declared dead after ~5 s of failed health checks instead of Ray's ~15-30 s
        self.env = dict(os.environ, RAY_ADDRESS=f"127.0.0.1:{self.port}", RAY_health_check_period_ms="1000",
                        RAY_health_check_failure_threshold="5")
        ray = str(Path(sys.executable).parent / "ray")

        def node_args() -> list[str]:  # every node needs agent ports of its own (the defaults are taken)
            return ["--block", "--node-ip-address=127.0.0.1", f"--num-cpus={cpus_per_node}", "--disable-usage-stats",
                    f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
                    f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}"]

        self.commands = {
            "head": [ray, "start", "--head", f"--port={self.port}", "--include-dashboard=false",
                     f"--ray-client-server-port={free_port()}", f"--temp-dir={self.temp_dir}", *node_args()],
            "worker": [ray, "start", f"--address=127.0.0.1:{self.port}", *node_args()],
        }
        self.logs = {name: tmp / f"ray-{name}.log" for name in self.commands}
        self.procs: list[subprocess.Popen] = []

    def __enter__(self) -> TwoNodeCluster:
        """Start both nodes without waiting for them (see `wait`): the caller can do other work meanwhile."""
        for name, cmd in self.commands.items():  # the worker node waits for the head's GCS by itself
            self.procs.append(subprocess.Popen(cmd, env=self.env, stdout=self.logs[name].open("w"),
                                               stderr=subprocess.STDOUT, start_new_session=True))
        return self

    def wait(self, nodes: int = 2) -> None:
        """Return once `nodes` nodes are alive in the cluster."""
        joined = subprocess.run([sys.executable, "-c", WAIT_FOR_NODES, self.env["RAY_ADDRESS"], str(nodes)],
                                env=self.env, capture_output=True, text=True, timeout=180)
        if joined.returncode:
            logs = "\n".join(log.read_text()[-1500:] for log in self.logs.values())
            raise RuntimeError(f"{joined.stderr[-1000:]}\n{logs}")

    def kill_worker_node(self) -> None:
        """SIGKILL the worker node and everything it runs, as when a host is lost."""
        kill_process_group(self.procs.pop())

    def start_worker_node(self) -> None:
        """A worker node (again): a replacement host joining the cluster."""
        self.procs.append(subprocess.Popen(self.commands["worker"], env=self.env, stdout=self.logs["worker"].open("a"),
                                           stderr=subprocess.STDOUT, start_new_session=True))

    def __exit__(self, *exc) -> None:
        for proc in self.procs:
            kill_process_group(proc)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
