"""A real, throw-away Slurm cluster on one host: munged + slurmctld + one slurmd per "node".

Everything lives in one temp directory (config, state, spool, logs, munge socket), all ports are picked
free, and every daemon is started by us, recorded by PID and stopped by that PID. Several slurmd on one
host (each with its own `-N name` and port) give a multi-node allocation, so `srun -w <node>` really
starts one task per node. Nodes may declare placeholder GPUs (gres with files that are not devices), so
GPU job templates schedule and get CUDA_VISIBLE_DEVICES without any GPU present.

Needs root (slurmd runs job steps as the submitting user) and Debian's slurm-wlm + munge packages.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REQUIRED_BINARIES = ("munged", "munge", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "scancel", "srun")
TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
                   "BOOT_FAIL", "DEADLINE"}


def missing_requirements() -> str | None:
    """Why this host cannot run the cluster, or None if it can."""
    missing = [b for b in REQUIRED_BINARIES if shutil.which(b) is None]
    if missing:
        return (f"Slurm/munge not installed (missing {', '.join(missing)}); "
                "install Debian's slurm-wlm and munge (see .ci/run)")
    if os.geteuid() != 0:
        return "a local Slurm cluster needs root (slurmd starts job steps as the submitting user)"
    if not Path("/etc/munge/munge.key").is_file():
        return "/etc/munge/munge.key is missing (the munge package creates it)"
    return None


def free_ports(n: int) -> list[int]:
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


@dataclass
class Job:
    job_id: str
    state: str
    exit_code: str
    fields: dict[str, str]
    seconds: float


@dataclass
class SlurmCluster:
    nodes: tuple[str, ...] = ("n1", "n2")
    cpus_per_node: int = 1
    gpus_per_node: int = 1
    # Directly under /tmp: munged wants every parent directory traversable by its user, and Ray's unix
    # sockets under <root>/ray-<job>-<i>/session_*/sockets must stay below the 107-byte path limit.
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="vlmtune-slurm-", dir="/tmp")))
    pids: dict[str, int] = field(default_factory=dict)
    _procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    # ------------------------------------------------------------------------------------------ setup

    @property
    def conf(self) -> Path:
        return self.root / "etc" / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        """Environment for client commands (sbatch, scontrol, ...): points them at this cluster."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def _write_config(self) -> None:
        for d in ("etc", "state", "spool", "log", "munge", "dev"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        # munged refuses sockets and logs in directories other users can write, and runs as `munge`.
        self.root.chmod(0o755)
        shutil.chown(self.root / "munge", "munge", "munge")
        (self.root / "munge").chmod(0o755)
        ctld_port, *node_ports = free_ports(1 + len(self.nodes))
        host = socket.gethostname()
        lines = [
            "ClusterName=vlmtune-test",
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.root / 'munge' / 'munge.socket'}",
            f"StateSaveLocation={self.root / 'state'}",
            f"SlurmdSpoolDir={self.root / 'spool'}/%n",
            f"SlurmctldPidFile={self.root / 'slurmctld.pid'}",
            f"SlurmdPidFile={self.root / 'spool'}/slurmd-%n.pid",
            f"SlurmctldLogFile={self.root / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={self.root / 'log'}/slurmd-%n.log",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            # No cgroups in a CI container: track processes by parentage, no task affinity.
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "SchedulerType=sched/builtin",
            "MpiDefault=none",
            "ReturnToService=2",
            "GresTypes=gpu",
            "KillWait=5",
            "MinJobAge=600",
            "InactiveLimit=0",
            "SlurmdParameters=config_overrides",
        ]
        gres = []
        for name, port in zip(self.nodes, node_ports, strict=True):
            gpu = f" Gres=gpu:{self.gpus_per_node}" if self.gpus_per_node else ""
            lines.append(f"NodeName={name} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} "
                         f"CPUs={self.cpus_per_node}{gpu} State=UNKNOWN")
            (self.root / "spool" / name).mkdir(exist_ok=True)
            for i in range(self.gpus_per_node):
                dev = self.root / "dev" / f"{name}-gpu{i}"
                dev.touch()
                gres.append(f"NodeName={name} Name=gpu File={dev}")
        lines.append(f"PartitionName=test Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP")
        self.conf.write_text("\n".join(lines) + "\n")
        (self.root / "etc" / "gres.conf").write_text("\n".join(gres) + "\n")

    def _spawn(self, name: str, argv: list[str]) -> None:
        # Daemons never inherit the test's stdout/stderr (a CI runner would wait on the pipe).
        log = open(self.root / "log" / f"{name}.stdout", "wb")  # noqa: SIM115 - lives as long as the daemon
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                env=self.env, start_new_session=True)
        log.close()
        self._procs[name] = proc
        self.pids[name] = proc.pid

    def _wait(self, what: str, check, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self._procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode} while waiting for {what}\n"
                                       + self.logs())
            if check():
                return
            time.sleep(0.1)
        raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}\n" + self.logs())

    def _ok(self, argv: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=30)

    def start(self) -> SlurmCluster:
        self._write_config()
        sock = self.root / "munge" / "munge.socket"
        self._spawn("munged", ["runuser", "-u", "munge", "--", "munged", "--foreground", f"--socket={sock}",
                               f"--pid-file={self.root / 'munge' / 'munged.pid'}",
                               f"--log-file={self.root / 'munge' / 'munged.log'}",
                               f"--seed-file={self.root / 'munge' / 'munged.seed'}"])
        self._wait("munged", lambda: self._ok(["munge", "-n", f"--socket={sock}"]).returncode == 0)
        self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
        self._wait("slurmctld", lambda: "UP" in self._ok(["scontrol", "ping"]).stdout)
        for name in self.nodes:
            self._spawn(f"slurmd-{name}", ["slurmd", "-D", "-N", name, "-f", str(self.conf)])

        def all_idle() -> bool:
            out = self._ok(["sinfo", "-h", "-N", "-o", "%N %t"]).stdout.split()
            states = dict(zip(out[::2], out[1::2], strict=False))
            return all(states.get(n) == "idle" for n in self.nodes)

        self._wait("all nodes idle", all_idle)
        return self

    # ------------------------------------------------------------------------------------------- jobs

    def sbatch(self, args: list[str], cwd: Path | str, env: dict[str, str] | None = None) -> str:
        res = subprocess.run(["sbatch", "--parsable", *args], cwd=cwd, env={**self.env, **(env or {})},
                             capture_output=True, text=True, timeout=60)
        if res.returncode != 0:
            raise RuntimeError(f"sbatch failed ({res.returncode}): {res.stderr}\n{res.stdout}")
        return res.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        res = self._ok(["scontrol", "show", "job", "-o", job_id])
        fields: dict[str, str] = {}
        for token in res.stdout.split():
            key, sep, value = token.partition("=")
            if sep:
                fields.setdefault(key, value)
        return fields

    def wait(self, job_id: str, timeout: float) -> Job:
        """Poll until the job ends (sbatch --wait backs off up to 10 s); cancel it on timeout."""
        start = time.monotonic()
        try:
            fields = self.wait_for(job_id, lambda job: job.get("JobState", "") in TERMINAL_STATES, timeout)
        except TimeoutError:
            self.cancel(job_id)
            raise
        return Job(job_id, fields["JobState"], fields.get("ExitCode", ""), fields, time.monotonic() - start)

    def cancel(self, job_id: str, timeout: float = 30.0) -> None:
        self._ok(["scancel", job_id])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.job(job_id).get("JobState") in TERMINAL_STATES | {None}:
                return
            time.sleep(0.5)

    def wait_for(self, job_id: str, check, timeout: float) -> dict[str, str]:
        """Poll `scontrol show job` until `check(fields)` holds; the fields then."""
        deadline = time.monotonic() + timeout
        while not check(fields := self.job(job_id)):
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {fields.get('JobState')} after {timeout:.0f} s: {fields}\n"
                                   + self.logs())
            time.sleep(0.5)
        return fields

    def start_now(self, job_id: str) -> None:
        """Make a pending job eligible at once (`scontrol update StartTime=now`)."""
        done = self._ok(["scontrol", "update", f"JobId={job_id}", "StartTime=now"])
        assert done.returncode == 0, done.stderr

    def signal_batch(self, job_id: str, signal: str) -> None:
        """`scancel --batch --signal=SIGNAL JOB`: the batch script alone, as --signal=B:SIGNAL@T does."""
        done = self._ok(["scancel", "--batch", f"--signal={signal}", job_id])
        assert done.returncode == 0, done.stderr

    def active_jobs(self) -> list[str]:
        out = self._ok(["squeue", "-h", "-o", "%i"]).stdout.split()
        return [j for j in out if j]

    # --------------------------------------------------------------------------------------- teardown

    def logs(self, tail: int = 40) -> str:
        chunks = []
        for path in sorted((self.root / "log").glob("*")):
            lines = path.read_text(errors="replace").splitlines()[-tail:]
            if lines:
                chunks.append(f"--- {path.name} ---\n" + "\n".join(lines))
        return "\n".join(chunks)

    def stop(self) -> None:
        """Cancel what is still queued or running, then stop each daemon by its recorded PID."""
        if "slurmctld" in self._procs and self._procs["slurmctld"].poll() is None:
            for job_id in self.active_jobs():
                self.cancel(job_id)
        for name in reversed(list(self._procs)):
            proc = self._procs[name]
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5)

    def alive(self) -> list[str]:
        return [name for name, proc in self._procs.items() if proc.poll() is None]

    def remove(self) -> None:
        """Delete the cluster's directory (config, state, logs, Ray temp dirs) once everything is stopped."""
        if not self.alive():
            shutil.rmtree(self.root, ignore_errors=True)
