"""slurm/*.sh for real: a local Slurm cluster (munged + slurmctld + two slurmd "nodes" on one host),
jobs submitted with sbatch, a Ray cluster started by the template across both nodes, the real drivers.

The cluster is CPU-only but declares one placeholder GPU per node, so the GPU path of the template
(--gpus-per-node, Ray's --num-gpus, the GPU count the readiness check waits for) runs as in production.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import uuid
from pathlib import Path

import pytest

from vlmtune.config import load_config
from vlmtune.tracking import read_metrics

from .slurm_cluster import SlurmCluster, free_ports, missing_requirements

REPO = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = "configs/phi3v-burberry-lora.yaml"  # what slurm/train.sh runs without a CONFIG (README)
NODES = ("n1", "n2")
CPUS_PER_NODE = 2
# Small enough for a CPU box, big enough that each of the 2 training workers gets train shards.
DATA = ["data.catalog.source=sample", "data.catalog.sample_size=60", "data.shards.samples_per_shard=16"]

# A time limit on every test job: one orphaned by an interrupted test run ends by itself.
JOB_LIMITS = ["--gpus-per-node=1", f"--cpus-per-task={CPUS_PER_NODE}", "--time=10"]

pytestmark = pytest.mark.slow


def tagged_processes(tag: str) -> list[int]:
    """PIDs whose environment carries this test's tag: everything started inside its Slurm jobs."""
    needle = f"VLMTUNE_TEST_TAG={tag}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def assert_nothing_left(tag: str, timeout: float = 20.0) -> None:
    """Every process the job started is gone shortly after it ended (else: fail, and kill those PIDs)."""
    deadline = time.monotonic() + timeout
    while (left := tagged_processes(tag)) and time.monotonic() < deadline:
        time.sleep(0.5)
    if left:
        names = {pid: Path(f"/proc/{pid}/cmdline").read_bytes()[:120] for pid in left}
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        pytest.fail(f"processes outlived their Slurm job: {names}")


@pytest.fixture(scope="module")
def slurm():
    reason = missing_requirements()
    if reason:
        pytest.skip(reason)
    cluster = SlurmCluster(nodes=NODES, cpus_per_node=CPUS_PER_NODE, gpus_per_node=1)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        assert not cluster.alive(), f"daemons still running: {cluster.alive()}"
        cluster.remove()


class Submit:
    """sbatch one of the templates from the repository root, with the test's Python and free ports."""

    def __init__(self, cluster: SlurmCluster, tmp: Path, dashboard: bool = False):
        self.cluster, self.tmp = cluster, tmp
        self.tag = uuid.uuid4().hex
        ray_port, dash_port, client_port = free_ports(3)
        python_env = ({"VLMTUNE_VENV": sys.prefix} if Path(sys.prefix, "bin", "python").exists()
                      else {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"})
        self.env = {
            **python_env,
            "VLMTUNE_TEST_TAG": self.tag,
            "RAY_PORT": str(ray_port), "RAY_DASHBOARD_PORT": str(dash_port), "RAY_CLIENT_SERVER_PORT": str(client_port),
            "VLMTUNE_RAY_TMPDIR": str(cluster.root),  # short, and removed with the cluster
            "VLMTUNE_RAY_WAIT_S": "180",
            # The dashboard costs ~7 s of head start-up on a small CI box; only Ray Train uses it (state API).
            "VLMTUNE_RAY_HEAD_ARGS": "" if dashboard else "--include-dashboard=false",
            "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true",
        }
        self.out = tmp / "job.out"

    def __call__(self, script: str, *args: str, sbatch: tuple[str, ...] = (), timeout: float = 300.0):
        """sbatch SCRIPT ARGS with this cluster's limits (JOB_LIMITS), then the extra sbatch options."""
        job_id = self.cluster.sbatch([*JOB_LIMITS, f"--output={self.out}", *sbatch, script, *args], cwd=REPO,
                                     env=self.env)
        job = self.cluster.wait(job_id, timeout)
        return job, self.output()

    def output(self) -> str:
        return self.out.read_text(errors="replace") if self.out.exists() else "<no output file>"


@pytest.fixture(scope="module")
def prepared(slurm, tmp_path_factory):
    """slurm/prepare.sh with the demo config and the sample catalog on both nodes (shared with the train test)."""
    tmp = tmp_path_factory.mktemp("prepare")
    submit = Submit(slurm, tmp)
    shards = tmp / "shards"
    started = time.monotonic()
    job, out = submit("slurm/prepare.sh", "configs/demo-cpu.yaml", *DATA, f"data.shards.dir={shards}")
    print(f"prepare on Slurm: {job.state} in {time.monotonic() - started:.1f} s")
    return job, out, shards, submit.tag


def test_prepare_runs_on_a_two_node_ray_cluster(prepared):
    job, out, shards, tag = prepared
    assert job.state == "COMPLETED" and job.exit_code == "0:0", out[-4000:]
    assert "ray cluster ready: 2 nodes, 4 CPUs, 2 GPUs" in out, out[-4000:]
    assert "head n1" in out and "n[1-2]" in job.fields["NodeList"]
    manifest = shards / "manifest.json"
    assert manifest.is_file(), out[-4000:]
    assert sorted(shards.glob("train-*.tar")) and sorted(shards.glob("val-*.tar"))
    assert "driver exited with code 0" in out and "stopping the Ray steps this job started (exit code 0)" in out
    assert_nothing_left(tag)


def test_train_on_slurm_stops_on_sigterm_requeues_itself_and_resumes_to_the_export(slurm, prepared, tmp_path):
    """`scancel --batch --signal=TERM` mid-run (what the time limit's --signal=B:TERM@120 sends): the script
    passes the TERM to the driver alone, the workers save a checkpoint after their step, the driver exits 75
    and the job requeues itself; its second run resumes from that checkpoint, finishes and exports."""
    _, prep_out, shards, _ = prepared
    assert (shards / "manifest.json").is_file(), "prepare failed: " + prep_out[-2000:]
    submit = Submit(slurm, tmp_path, dashboard=True)
    storage = tmp_path / "runs"
    run = storage / "slurm-demo"
    started = time.monotonic()
    job_id = slurm.sbatch([*JOB_LIMITS, f"--output={submit.out}", "--nodes=2", "slurm/train.sh",
                           "configs/demo-cpu.yaml", *DATA, f"data.shards.dir={shards}", "train.max_steps=80",
                           "train.micro_batch_size=2", "train.log_every=1", "train.eval_batches=1",
                           "train.table_samples=0", "train.checkpoint_every=1000", "tracking.mode=disabled",
                           f"cluster.storage_path={storage}", f"cluster.run_name={run.name}"], cwd=REPO, env=submit.env)
    deadline = time.monotonic() + 300
    while not ((run / "metrics.jsonl").exists() and any(r["step"] >= 2 for r in read_metrics(run) if "loss" in r)):
        assert time.monotonic() < deadline, submit.output()[-4000:]
        assert slurm.job(job_id).get("JobState") in {"PENDING", "RUNNING"}, submit.output()[-4000:]
        time.sleep(0.5)
    slurm.signal_batch(job_id, "TERM")
    requeued = slurm.wait_for(job_id, lambda job: job.get("Restarts") == "1" and job.get("JobState") == "PENDING", 120)
    # Slurm holds a requeued batch job back for a while (its begin time is set ahead); this test needs no wait
    print(f"requeued: Reason={requeued.get('Reason')} EligibleTime={requeued.get('EligibleTime')}")
    slurm.start_now(job_id)
    job = slurm.wait(job_id, 480)
    out = submit.output()
    print(f"train on Slurm, stopped and requeued: {job.state} in {time.monotonic() - started:.1f} s")
    assert job.state == "COMPLETED" and job.exit_code == "0:0", out[-6000:]
    assert job.fields["Restarts"] == "1", out[-4000:]
    assert "SIGTERM: the driver (step" in out and "driver exited with code 75" in out, out[-6000:]
    assert f"requeueing job {job_id}" in out
    assert out.count("ray cluster ready: 2 nodes") == 2 and "training needs 2 workers" in out
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    resumed_at = [r["start_step"] for r in logged if "start_step" in r]
    assert len(resumed_at) == 2 and resumed_at[0] == 0 and 2 <= resumed_at[1] < 80, resumed_at
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == list(range(1, 81))  # each step once
    assert (run / "export" / "config.json").is_file(), out[-4000:]
    assert_nothing_left(submit.tag)


def test_infeasible_config_fails_before_training_and_cleans_up(slurm, tmp_path):
    """8 GPU workers on 2 one-GPU nodes: the pre-flight check stops the job with a clear error, exit 1."""
    submit = Submit(slurm, tmp_path)
    job, out = submit("slurm/train.sh", "configs/demo-cpu.yaml", "cluster.use_gpu=true", "cluster.num_workers=8",
                      f"cluster.storage_path={tmp_path / 'runs'}", sbatch=("--nodes=2",))
    assert job.state == "FAILED" and job.exit_code == "1:0", out[-4000:]
    assert "ray cluster ready: 2 nodes, 4 CPUs, 2 GPUs" in out
    assert "does not fit 4 CPUs / 2 GPUs" in out
    assert "the config was rejected before training started" in out
    assert "stopping the Ray steps this job started (exit code 1)" in out
    assert "running: python jobs/train.py" not in out
    assert not (tmp_path / "runs").exists()
    assert_nothing_left(submit.tag)


def test_scancel_stops_the_ray_cluster(slurm, tmp_path):
    submit = Submit(slurm, tmp_path)
    job_id = slurm.sbatch([*JOB_LIMITS, f"--output={submit.out}",
                           "slurm/prepare.sh", "configs/demo-cpu.yaml", "data.catalog.sample_size=100000",
                           f"data.shards.dir={tmp_path / 'shards'}"], cwd=REPO, env=submit.env)
    deadline = time.monotonic() + 240
    while "running: python jobs/prepare_data.py" not in submit.output():
        assert time.monotonic() < deadline, submit.output()[-4000:]
        assert slurm.job(job_id).get("JobState") in {"PENDING", "RUNNING"}, submit.output()[-4000:]
        time.sleep(1)
    assert len(tagged_processes(submit.tag)) > 5  # Ray really is running on the nodes
    slurm.cancel(job_id)
    job = slurm.wait(job_id, 60)
    assert job.state == "CANCELLED"
    assert "stopping the Ray steps this job started (exit code 143)" in submit.output(), submit.output()[-3000:]
    assert_nothing_left(submit.tag)


def test_no_arguments_resolve_and_check_the_default_recipe(slurm, tmp_path):
    """`sbatch slurm/train.sh` with no script arguments (the sbatch options only fit the job to this small
    cluster). The job names the default recipe, starts Ray on its allocation and checks the recipe against
    it: 8 GPU workers with 6 CPUs each, which this CPU-only cluster (1 placeholder GPU per node) cannot
    hold, so the job stops there with the pre-flight error, before the driver writes anything. On the
    node the #SBATCH defaults ask for, the same check passes (test_slurm_scripts.py)."""
    default = REPO / DEFAULT_CONFIG
    want = load_config(default).cluster
    submit = Submit(slurm, tmp_path)
    started = time.monotonic()
    job, out = submit("slurm/train.sh", timeout=180)
    print(f"sbatch slurm/train.sh: {job.state} in {time.monotonic() - started:.1f} s")
    assert f"config: {default} (the default: no CONFIG argument)" in out, out[-4000:]
    assert "overrides: none" in out
    assert "ray cluster ready: 1 nodes, 2 CPUs, 1 GPUs" in out, out[-4000:]
    assert (f"training needs {want.num_workers} workers: {want.num_workers * want.cpus_per_worker:g} CPUs, "
            f"{want.num_workers * want.gpus_per_worker:g} GPUs") in out
    assert "does not fit 2 CPUs / 1 GPUs" in out
    assert "the config was rejected before training started" in out
    assert job.state == "FAILED" and job.exit_code == "1:0", out[-4000:]
    assert "running: python jobs/train.py" not in out
    assert_nothing_left(submit.tag)


def test_demo_config_used_here_is_valid():
    cfg = load_config(REPO / "configs" / "demo-cpu.yaml", DATA)
    assert cfg.cluster.num_workers * cfg.cluster.cpus_per_worker <= len(NODES) * CPUS_PER_NODE
