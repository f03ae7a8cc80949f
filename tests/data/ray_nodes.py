"""A two-node Ray cluster on loopback: a head and one worker node, each started with `ray start`.

Both nodes run on this machine, each with its own raylet and object store, as `ray start` on two hosts would.
Each runs with `--block` in its own process session and is killed with it (never `ray stop`, which would
also stop the test session's own cluster). No dashboard: nothing here submits jobs, and the nodes come up in
seconds. Ray's socket paths must stay under 107 bytes, so the session directory is a short one under /tmp.

A worker node joins once the head's GCS accepts connections: a worker started alongside the head could
find no node record for itself and wait out the fixed 30 s `ray start` gives a raylet to register. If a
worker's `ray start` still exits, `wait` starts it again (fresh agent ports) and says so in its log, as an
operator's retry loop would. A head that exits ends `wait` at once, with both nodes' logs.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.train.ray_cluster import free_port, kill_process_group

WAIT_FOR_NODES = """
import sys, time, ray
ray.init(address=sys.argv[1], log_to_driver=False)
deadline = time.time() + 180
while sum(n["Alive"] for n in ray.nodes()) < int(sys.argv[2]):
    if time.time() > deadline:
        sys.exit(f"only {sum(n['Alive'] for n in ray.nodes())} of {sys.argv[2]} nodes joined")
    time.sleep(0.2)
"""
WORKER_RESTARTS = 2  # per `wait`: a worker node whose `ray start` exited is started again this often


class TwoNodeCluster:
    def __init__(self, tmp: Path, cpus_per_node: int = 1):
        self.port = free_port()
        self.temp_dir = tempfile.mkdtemp(prefix="raynodes-", dir="/tmp")
        # a lost node is declared dead after ~5 s of failed health checks instead of Ray's ~15-30 s; token auth
        # said outright, so that nodes and drivers agree (with the mode unset, each process decides by itself)
        self.env = dict(os.environ, RAY_ADDRESS=f"127.0.0.1:{self.port}", RAY_health_check_period_ms="1000",
                        RAY_health_check_failure_threshold="5", RAY_AUTH_MODE="token")
        self.ray = str(Path(sys.executable).parent / "ray")
        self.cpus_per_node = cpus_per_node
        self.logs = {name: tmp / f"ray-{name}.log" for name in ("head", "worker")}
        self.nodes: dict[str, subprocess.Popen] = {}

    def _command(self, name: str) -> list[str]:
        """`ray start` for the head or the worker node, with agent ports of its own (the session's cluster holds
        Ray's default ones)."""
        if name == "head":
            role = ["--head", f"--port={self.port}", "--include-dashboard=false",
                    f"--ray-client-server-port={free_port()}", f"--temp-dir={self.temp_dir}"]
        else:
            role = [f"--address=127.0.0.1:{self.port}"]
        return [self.ray, "start", *role, "--block", "--node-ip-address=127.0.0.1", f"--num-cpus={self.cpus_per_node}",
                "--disable-usage-stats", f"--dashboard-agent-listen-port={free_port()}",
                f"--dashboard-agent-grpc-port={free_port()}", f"--metrics-export-port={free_port()}",
                f"--runtime-env-agent-port={free_port()}"]

    def _start(self, name: str) -> None:
        self.nodes[name] = subprocess.Popen(self._command(name), env=self.env, stdout=self.logs[name].open("a"),
                                            stderr=subprocess.STDOUT, start_new_session=True)

    def __enter__(self) -> TwoNodeCluster:
        """Start the head without waiting for it: the caller can do other work meanwhile (`wait` adds the worker)."""
        self._start("head")
        return self

    def _wait_for_gcs(self) -> None:
        """Return once the head's GCS port accepts connections, as slurm/ray-cluster.sh waits before its workers."""
        deadline = time.monotonic() + 120
        while True:
            self._check_head()
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the head's GCS did not open port {self.port}:\n{self._log_tails()}")
            time.sleep(0.2)

    def wait(self, nodes: int = 2) -> None:
        """Return once `nodes` nodes are alive in the cluster: the worker node is started once the head's GCS
        listens (the first time), and started again if its start failed."""
        if "worker" not in self.nodes:
            self._wait_for_gcs()
            self._start("worker")
        waiter = subprocess.Popen([sys.executable, "-c", WAIT_FOR_NODES, self.env["RAY_ADDRESS"], str(nodes)],
                                  env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        restarts = 0
        try:
            while waiter.poll() is None:
                self._check_head()
                worker = self.nodes["worker"]
                if worker.poll() is not None and restarts < WORKER_RESTARTS:
                    with self.logs["worker"].open("a") as log:
                        log.write(f"\n--- `ray start` exited ({worker.returncode}): starting the node again\n")
                    kill_process_group(worker)
                    self._start("worker")
                    restarts += 1
                time.sleep(0.5)
        finally:
            if waiter.poll() is None:
                waiter.kill()
        if waiter.returncode:
            raise RuntimeError(f"{waiter.stdout.read()[-1000:]}\n{self._log_tails()}")

    def _check_head(self) -> None:
        head = self.nodes["head"]
        if head.poll() is not None:
            raise RuntimeError(f"the head node exited ({head.returncode}):\n{self._log_tails()}")

    def _log_tails(self) -> str:
        return "\n".join(f"[{name}] {log.read_text()[-1500:]}" for name, log in self.logs.items())

    def kill_worker_node(self) -> None:
        """SIGKILL the worker node and everything it runs, as when a host is lost."""
        kill_process_group(self.nodes.pop("worker"))

    def start_worker_node(self) -> None:
        """A worker node again: a replacement host joining the cluster (`wait` for it to join)."""
        self._start("worker")

    def __exit__(self, *exc) -> None:
        for proc in self.nodes.values():
            kill_process_group(proc)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
