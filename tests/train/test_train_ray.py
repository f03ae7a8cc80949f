"""The training job for real: Ray Train with 2 CPU workers, DeepSpeed on gloo, tiny Phi-3-V, real shards."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from tests.wandb_records import branch_point, history, run_files, run_id
from vlmtune import runs, storage
from vlmtune.config import load_config
from vlmtune.console import console
from vlmtune.errors import Stopped, VlmtuneError
from vlmtune.launch.ray import train
from vlmtune.models.loading import load
from vlmtune.tracking import read_metrics

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


@pytest.fixture
def shards(sample_shards):
    return sample_shards


def config(shards: str, tmp_path: Path, name: str, *overrides: str):
    return load_config(REPO / "configs/demo-cpu.yaml", [
        f"data.shards.dir={shards}", f"cluster.storage_path={tmp_path / 'runs'}", f"cluster.run_name={name}",
        "data.loader.num_workers=0", "train.micro_batch_size=4", "train.log_every=1", "train.eval_every=0",
        "train.eval_batches=1", "train.table_samples=2", "train.warmup_steps=2", "eval.max_new_tokens=12",
        "cluster.max_failures=0", *overrides])


def losses(run_dir: Path) -> dict[int, float]:
    """step → loss, the last record of a step winning (a restarted run logs some steps twice)."""
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def wandb_file(run_dir: Path) -> Path:
    files = list(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    return files[0]


def answer(model_dir: str, shards: str) -> str:
    from vlmtune.config import PromptConfig
    from vlmtune.data.collate import SampleEncoder
    from vlmtune.data.shards import ShardStream, split_shards
    from vlmtune.eval.generate import generate_answers

    model, processor = load(model_dir)
    encoder = SampleEncoder(processor, PromptConfig(), 512, with_answer=False)
    sample = next(iter(ShardStream(split_shards(shards, "val"), shuffle=False, transform=encoder)))
    return generate_answers(model, processor, [sample], 24, torch.device("cpu"))[0]


@pytest.mark.parametrize(("zero", "lora", "bf16"), [(2, False, False), (3, True, True)],
                         ids=["zero2-full-fp32", "zero3-lora-bf16"])
def test_loss_decreases_and_the_export_reloads_and_generates(shards, tmp_path, zero, lora, bf16):
    name = f"learn-z{zero}"
    cfg = config(shards, tmp_path, name, f"train.zero_stage={zero}", f"model.lora.enabled={lora}",
                 f"train.bf16={bf16}", "train.max_steps=24", "train.checkpoint_every=12",
                 "train.lr=3e-3" if not lora else "train.lr=2e-2", "model.lora.r=8",
                 # on a random-init base, adapting lm_head is what moves the loss within a few steps
                 "model.lora.targets=[language_attention, language_mlp, projector, lm_head]")
    outputs = train(cfg)
    run = tmp_path / "runs" / name
    loss = losses(run)
    assert sorted(loss) == list(range(1, 25))
    first, last = sum(loss[s] for s in (1, 2, 3)) / 3, sum(loss[s] for s in (22, 23, 24)) / 3
    # full fine-tuning falls far below this; rank-8 adapters on a random base fall about 40% in 24 steps
    assert last < 0.65 * first, loss
    assert outputs["checkpoint"].endswith("checkpoint-0000024")
    assert json.loads((Path(outputs["checkpoint"]) / "trainer_state.json").read_text())["step"] == 24

    export = Path(outputs["export"])
    assert json.loads((export / "vlmtune_export.json").read_text())["merged"] is lora
    assert not (export / "adapter_config.json").exists()
    model, _ = load(export)
    base, _ = load("tiny-phi3v")
    changed = [k for k, v in base.state_dict().items() if not torch.equal(v, model.state_dict()[k])]
    assert any("layers.0.self_attn.qkv_proj" in k for k in changed)
    assert isinstance(answer(str(export), shards), str)

    from transformers import AutoModelForCausalLM

    import vlmtune.models.phi3v  # noqa: F401  registers phi3_v with the Auto classes

    auto = AutoModelForCausalLM.from_pretrained(export)
    assert type(auto).__name__ == "Phi3VForCausalLM"

    # W&B offline: the logged metrics and the eval table are in the run file; same run id as the checkpoint.
    rows = history(wandb_file(run))
    logged = {r["_step"]: r for r in rows}
    assert all(logged[s]["loss"] == pytest.approx(loss[s]) for s in range(1, 25))
    assert logged[24]["eval/samples/_type"] == "table-file" and logged[24]["eval/samples/nrows"] == 2
    assert "eval_loss" in logged[0]
    state = json.loads((Path(outputs["checkpoint"]) / "trainer_state.json").read_text())
    assert state["wandb_run_id"] == run_id(wandb_file(run))

    if lora:  # the adapter alone, exported from the ZeRO-3 checkpoint by the export job
        out = tmp_path / "adapter-export"
        done = subprocess.run([sys.executable, str(REPO / "jobs/export.py"), outputs["checkpoint"], str(out),
                               "--adapter-only"], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        assert (out / "adapter_config.json").exists() and not (out / "model.safetensors").exists()
        model, _ = load(out)
        assert type(model).__name__ == "PeftModelForCausalLM"
        assert isinstance(answer(str(out), shards), str)


def test_resume_from_a_checkpoint_matches_the_uninterrupted_run(shards, tmp_path):
    """Packed rows and gradient accumulation, the hardest case for the data position (the other modes' exact
    resume: tests/data/test_batching.py)."""
    batching = ["data.batching.mode=packed", "data.batching.max_tokens=1024", "data.batching.lookahead=6",
                "train.grad_accum_steps=2"]
    common = ["train.zero_stage=2", "model.lora.enabled=true", "model.lora.dropout=0.1", "train.max_steps=8",
              "train.checkpoint_every=4", "export.enabled=false", "train.lr=1e-2", *batching]
    straight = train(config(shards, tmp_path, "straight", *common))
    checkpoint_4 = Path(straight["checkpoint"]).parent / "checkpoint-0000004"
    assert checkpoint_4.is_dir()
    train(config(shards, tmp_path, "resumed", *common, f"cluster.resume_from={checkpoint_4}"))
    full = losses(tmp_path / "runs" / "straight")
    resumed = losses(tmp_path / "runs" / "resumed")
    assert sorted(resumed) == [5, 6, 7, 8]  # continued at the saved step
    for step in resumed:
        assert resumed[step] == pytest.approx(full[step], rel=1e-5, abs=1e-6), step


def test_sigterm_checkpoints_at_the_next_step_and_the_rerun_resumes_there(shards, tmp_path):
    """SIGTERM to the driver (here: this process, which runs it) is what Slurm's --signal, scancel --signal and
    a Kubernetes pod deletion send: the run saves a checkpoint after the step in progress and stops (exit code
    75 in the job); the same command then resumes from it and logs each step once. (Without the step-0 eval:
    it evaluates at the end only.)"""
    cfg = config(shards, tmp_path, "preempted", "train.zero_stage=2", "model.lora.enabled=true",
                 "train.max_steps=60", "train.checkpoint_every=100", "export.enabled=false", "train.table_samples=0",
                 "train.eval_on_start=false")
    run = tmp_path / "runs" / "preempted"

    def sigterm_after_step_3() -> None:
        deadline = time.time() + 300
        while time.time() < deadline and not (
                (run / "metrics.jsonl").exists() and any(r["step"] >= 3 for r in read_metrics(run) if "loss" in r)):
            time.sleep(0.1)
        os.kill(os.getpid(), signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    threading.Thread(target=sigterm_after_step_3, daemon=True).start()
    with pytest.raises(Stopped, match=r"training stopped at step \d+ on SIGTERM") as stopped:
        train(cfg)
    step = int(re.search(r"step (\d+)", str(stopped.value))[1])
    assert 3 <= step < 60
    assert runs.incomplete_reason(run / runs.checkpoint_name(step)) is None, sorted(p.name for p in run.iterdir())
    assert signal.getsignal(signal.SIGTERM) is before  # the run's handler is gone with the run

    train(cfg)
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["start_step"] for r in logged if "start_step" in r] == [0, step]
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == list(range(1, 61))
    assert [r["step"] for r in read_metrics(run) if "eval_loss" in r] == [60]


def test_ray_job_submit_to_a_running_cluster(shards, tmp_path):
    from tests.train.ray_cluster import RayHead

    with RayHead(tmp_path) as head:
        storage = tmp_path / "runs"
        # the entrypoint runs with the head's PATH: name this interpreter, which has vlmtune installed
        done = head.submit(["--working-dir", str(REPO), "--", sys.executable, "jobs/train.py", "--config",
                            "configs/demo-cpu.yaml", f"data.shards.dir={shards}", f"cluster.storage_path={storage}",
                            "cluster.run_name=submitted", "train.max_steps=4", "train.checkpoint_every=4",
                            "train.eval_batches=1", "train.table_samples=1", "eval.max_new_tokens=8",
                            "data.loader.num_workers=0"])
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert re.search(r"Job '\S+' succeeded", done.stdout + done.stderr)
    assert (storage / "submitted" / "checkpoint-0000004" / "trainer_state.json").exists()
    assert (storage / "submitted" / "export" / "model.safetensors").exists()


def test_an_altered_shard_ends_the_run_with_one_line_and_no_retry(shards, tmp_path):
    """A flipped byte in a train shard: the worker that verifies it reports the sha256 mismatch, every rank
    stops, the job prints one `error:` line and exits 2, and Ray does not restart the workers for it."""
    import shutil

    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    victim = sorted(copy.glob("train-*.tar"))[1]
    data = bytearray(victim.read_bytes())
    data[5000] ^= 0xFF
    victim.write_bytes(data)
    runs_dir = tmp_path / "runs"
    done = subprocess.run(
        [sys.executable, str(REPO / "jobs/train.py"), "--config", str(REPO / "configs/demo-cpu.yaml"),
         f"data.shards.dir={copy}", f"cluster.storage_path={runs_dir}", "cluster.run_name=altered",
         "cluster.max_failures=1", "data.loader.num_workers=0"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "VLMTUNE_LOG": ""})
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"shard {victim}" in errors[0] and "sha256" in errors[0]
    assert "Traceback" not in done.stderr
    (log,) = (runs_dir / "altered" / "logs").glob("train-*.log")
    assert log.read_text().count("Started training worker group") == 1  # no restart was spent on it


def test_a_run_in_s3_resumes_on_fewer_workers_from_its_last_complete_checkpoint(shards, tmp_path, s3_server,
                                                                                 monkeypatch):
    """The run directory on an S3 server (moto on loopback, its endpoint in pyarrow's URL options, which
    vlmtune's own calls follow too). Two workers train to step 4 (checkpoints at 2 and 4); the driver dies after
    step 4 was logged and its checkpoint registered, before the completion marker (removed here). The rerun, on
    one worker, skips that checkpoint and says so, resumes the two workers' state from step 2, exports the final
    checkpoint to S3, and every step keeps one value: the latest attempt's, in metrics.jsonl and in the rewound
    W&B run."""
    runs_url = f"s3://vlmtune/runs?endpoint_override={s3_server}&scheme=http"
    run, tracking = storage.join(runs_url, "shrink"), tmp_path / "tracking"
    common = [f"cluster.storage_path={runs_url}", f"tracking.dir={tracking}", "train.zero_stage=2",
              "model.lora.enabled=true", "train.checkpoint_every=2", "train.table_samples=0"]
    train(config(shards, tmp_path, "shrink", *common, "train.max_steps=4", "export.enabled=false"))
    incomplete = storage.join(run, "checkpoint-0000004")
    fs, marker = storage.filesystem(storage.join(incomplete, runs.COMPLETE))
    fs.rm(marker)
    console_notes = io.StringIO()
    monkeypatch.setattr(console, "err", console_notes)
    outputs = train(config(shards, tmp_path, "shrink", *common, "train.max_steps=6", "cluster.num_workers=1"))

    assert (f"warning: checkpoint {incomplete} is not used: it has no completion marker (the run stopped before "
            f"every worker's files were saved); resuming from {storage.join(run, 'checkpoint-0000002')} instead"
            ) in console_notes.getvalue()
    final = storage.join(run, storage.basename(outputs["checkpoint"]))
    assert storage.basename(final) == "checkpoint-0000006" and runs.incomplete_reason(final) is None
    assert runs.read_trainer_state(final).world_size == 1
    (step_4_again,) = [d for d in storage.subdirectories(run) if storage.basename(d).startswith("checkpoint-0000004-")]
    assert runs.incomplete_reason(step_4_again) is None  # saved beside the incomplete one Ray Train still lists
    assert outputs["export"] == storage.join(run, "export")
    assert {"model.safetensors", "config.json", "vlmtune_export.json"} <= set(storage.file_sizes(outputs["export"]))
    assert json.loads(storage.read_text(storage.join(outputs["export"], "vlmtune_export.json")))["step"] == 6

    logged = [json.loads(line) for line in (tracking / "metrics.jsonl").read_text().splitlines()]
    first, second = [r for r in logged if "start_step" in r]
    assert (first["start_step"], second["start_step"]) == (0, 2)
    by_attempt = {a: {r["step"]: r["loss"] for r in logged if "loss" in r and r["attempt"] == a}
                  for a in (first["attempt"], second["attempt"])}
    before, after = by_attempt[first["attempt"]], by_attempt[second["attempt"]]
    assert sorted(before) == [1, 2, 3, 4] and sorted(after) == [3, 4, 5, 6]
    assert before[3] != after[3]  # two workers' batches, then one worker's
    assert losses(tracking) == {1: before[1], 2: before[2], 3: after[3], 4: after[4], 5: after[5], 6: after[6]}
    segments = run_files(tracking)
    assert len(segments) == 2 and branch_point(segments[1]) == (run_id(segments[0]), "_step", 2.0)


def test_an_adapter_that_training_left_at_zero_ends_the_run_before_it_is_saved(shards, tmp_path):
    """A learning rate that underflows leaves lora_B at its zero initialisation: the first save stops the run
    with one clear error on the driver, and no checkpoint is written."""
    cfg = config(shards, tmp_path, "zero-adapter", "train.zero_stage=3", "model.lora.enabled=true", "train.lr=1e-50",
                 "train.max_steps=1", "train.checkpoint_every=1", "train.table_samples=0", "export.enabled=false")
    with pytest.raises(VlmtuneError, match=r"the LoRA adapter to save at step 1 is all zero \(lora_B\)"):
        train(cfg)
    assert not list((tmp_path / "runs" / "zero-adapter").glob("checkpoint-*"))
