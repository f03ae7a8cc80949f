"""The Ray Train driver: config → preflight checks → TorchTrainer.fit() → export.

Ray Train V2 (the default in Ray ≥ 2.51) resumes by itself: calling `fit()` with the same
`RunConfig(name, storage_path)` picks up the run's latest checkpoint, and `FailureConfig(max_failures)`
restarts failed workers from it. Everything that can be wrong with the config, the shards or the LoRA
targets is checked here, before any worker starts; what only a worker can check (shard checksums, the
model itself) comes back as the same kind of error (see train/loop.py).
"""

from __future__ import annotations

import logging
import os

import ray
import ray.train
import ray.util.scheduling_strategies
from ray.train.torch import TorchTrainer

from vlmtune import runs, storage
from vlmtune.config import Config
from vlmtune.data.shards import load_manifest, split_shards, verify_shards
from vlmtune.errors import ModelError, PreflightError, Stopped, VlmtuneError
from vlmtune.export import export_checkpoint
from vlmtune.train.loop import train_loop_per_worker
from vlmtune.train.planner import plan
from vlmtune.train.progress import ProgressBoard, ProgressView

log = logging.getLogger(__name__)


def preflight(cfg: Config) -> None:
    shard_dir = cfg.data.shards.dir
    manifest = load_manifest(shard_dir)
    train, val = split_shards(shard_dir, "train", manifest), split_shards(shard_dir, "val", manifest)
    verify_shards(train + val, checksum=False)  # existence and sizes here; checksums in the workers
    world = cfg.cluster.worker_range[1]
    if world > len(train):
        raise PreflightError(
            f"cluster.num_workers={cfg.cluster.num_workers} but the train split of {shard_dir} has only "
            f"{len(train)} shard(s): every worker needs at least one shard to read; prepare again with a smaller "
            "data.shards.samples_per_shard")
    val_samples = sum(s.count for s in val)
    if world > val_samples:
        raise PreflightError(f"cluster.num_workers={cfg.cluster.num_workers} but the val split has only "
                             f"{val_samples} samples")
    if cfg.model.lora.quantize_4bit and not cfg.cluster.use_gpu:
        raise PreflightError("model.lora.quantize_4bit (QLoRA) needs GPUs: set cluster.use_gpu=true")
    if cfg.model.lora.enabled:
        from vlmtune.models.loading import apply_lora, load

        try:
            skeleton, _ = load(cfg.model.name_or_path, random_init=True, device="meta")
        except (OSError, ModelError) as e:  # no config reachable offline: the workers will report it
            log.warning("could not check LoRA targets before launch: %s", e)
            return
        try:
            apply_lora(skeleton, cfg.model.lora)
        except ModelError as e:
            raise PreflightError(f"model.lora: {e}") from None
    if world == 1 and cfg.train.zero_stage in (1, 2) and not cfg.train.offload_optimizer:
        log.warning("train.zero_stage=%d on one worker partitions nothing, yet DeepSpeed's gradient bucketing "
                    "still runs every step (about 10%% of tiny-phi3v's step on CPU): train.zero_stage=0 trains "
                    "the same, faster", cfg.train.zero_stage)
    if cfg.train.bf16 and not cfg.cluster.use_gpu:
        log.warning("train.bf16 on CPU works but is slow; fp32 is the usual choice without GPUs")
    if cfg.cluster.use_gpu:
        check_memory(cfg)


def check_memory(cfg: Config) -> None:
    """A GPU run's per-worker memory plan against cluster.gpu_type / gpu_memory_gb (train/planner.py)."""
    if cfg.cluster.gpu_type is None and cfg.cluster.gpu_memory_gb is None:
        log.warning("cluster.gpu_type is not set: the memory plan is not checked before launch")
        return
    result = plan(cfg, "gpu")
    log.info("%s", result.table())
    if result.fits is False:
        raise PreflightError(f"{result.refusal()}\n{result.table()}")


def resolved_paths(cfg: Config) -> Config:
    """The config the workers get: local paths made absolute (a Ray worker's working directory differs)."""
    resolved = cfg.model_copy(deep=True)
    resolved.cluster.storage_path = storage.resolve(cfg.cluster.storage_path)
    resolved.data.shards.dir = storage.resolve(cfg.data.shards.dir)
    if cfg.tracking.dir:
        resolved.tracking.dir = storage.resolve(cfg.tracking.dir)
    return resolved


def build_trainer(cfg: Config, board=None) -> TorchTrainer:
    cluster = cfg.cluster
    resources = {"CPU": cluster.cpus_per_worker}
    if cluster.use_gpu:
        resources["GPU"] = cluster.gpus_per_worker
    resolved = resolved_paths(cfg)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": resolved.model_dump(mode="json"), "resume_from": cluster.resume_from,
                           "progress": board},
        scaling_config=ray.train.ScalingConfig(num_workers=cluster.num_workers, use_gpu=cluster.use_gpu,
                                               resources_per_worker=resources,
                                               elastic_resize_monitor_interval_s=cluster.resize_interval_s),
        run_config=ray.train.RunConfig(
            name=cluster.run_name,
            storage_path=resolved.cluster.storage_path,
            # the newest checkpoints are kept: a restart resumes from the latest one
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cluster.keep_checkpoints),
            # node preemptions (drains) are retried without limit, apart from max_failures
            failure_config=ray.train.FailureConfig(max_failures=cluster.max_failures, max_preemption_failures=-1),
        ),
    )


def connect() -> None:
    """Join the cluster in RAY_ADDRESS (ray job submit sets it), else start a local one."""
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or None)


@ray.remote(num_cpus=1)
def _export_task(checkpoint: ray.train.Checkpoint, out_dir: str) -> str:
    """The export of a checkpoint, local or remote, written locally first when `out_dir` is remote."""
    with checkpoint.as_directory() as directory:
        if storage.is_local(out_dir):
            return str(export_checkpoint(directory, out_dir))
        with storage.staging_dir("export") as local:
            export_checkpoint(directory, local)
            storage.upload_dir(local, out_dir)
        return out_dir


def train(cfg: Config) -> dict:
    """Run (or resume) training; returns where the checkpoint, export and tracking files are."""
    preflight(cfg)
    connect()
    # on the driver's node, like Ray Train's controller: a worker node that goes away must not take it along
    here = ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(),
                                                                          soft=False)
    board = ProgressBoard.options(scheduling_strategy=here).remote()
    with ProgressView(board) as view:
        result = build_trainer(cfg, board).fit()
    if view.failure:
        raise VlmtuneError(view.failure)
    if result.error:
        raise result.error
    if view.stopped_at is not None:
        raise Stopped(f"training stopped at step {view.stopped_at} on {view.stop_signal}, after saving "
                      f"{result.checkpoint.path}: run the same command again to resume from there")
    outputs = {"run": runs.run_dir(cfg), "checkpoint": result.checkpoint.path, "metrics": result.metrics}
    if cfg.export.enabled:
        outputs["export"] = ray.get(_export_task.remote(result.checkpoint, runs.export_dir(cfg)))
    return outputs
