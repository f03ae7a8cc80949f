"""The real-size rehearsal on CPU: Phi-3-Vision-128k with random weights, the LoRA recipe, 2 Ray workers.

    python bench/real_size.py [--dir outputs/bench/real-size] [--keep] [--from-training]

Not part of CI: it needs about 14 minutes on 2 cores with AMX-BF16 (a real-size LoRA step takes ~2.5 minutes
on one core per worker), about 40 minutes on 2 cores with AVX512-BF16 alone (~5.5 minutes a step), and about
18 GiB of memory. What runs is what a GPU cluster runs, at full size: the real architecture (the official
config from the presets; random weights, `model.random_init`, nothing downloaded),
configs/phi3v-burberry-lora.yaml's LoRA recipe (r 64 on the language model's attention and MLP, gradient
checkpointing, bf16), `num_crops=4`, DeepSpeed ZeRO-3 on 2 Ray Train workers (CPU, gloo) that build the
model partitioned as it is built, on the synthetic catalog's shards (no baseline eval before the first
step, `train.eval_on_start=false`: one eval pass less):

    train    2 optimizer steps and a checkpoint
    resume   a new run from that checkpoint: 1 step and a checkpoint
    export   the checkpoint's model rebuilt in bf16, merged and written in the official sharded layout
             (model-0000k-of-0000n.safetensors + model.safetensors.index.json), then reloaded; its logits
             on a catalog sample are compared with the checkpoint's model's (LoRA unmerged)

It prints a table: per-stage wall time, per-worker peak RSS next to the memory planner's prediction
(train/planner.py), step time, checkpoint and export sizes, the
logits comparison.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import threading
import time
from pathlib import Path

import psutil
import ray
import torch

from vlmtune import runs
from vlmtune.config import Config, load_config
from vlmtune.data.collate import SampleEncoder, collate
from vlmtune.data.prepare import prepare
from vlmtune.data.shards import ShardStream, split_shards
from vlmtune.export import checkpoint_model, write_export
from vlmtune.launch.ray import train
from vlmtune.models.loading import load, trainable_parameter_summary
from vlmtune.tracking import read_metrics
from vlmtune.train.planner import plan

REPO = Path(__file__).resolve().parents[1]
GiB = 2**30


def rehearsal_config(work: Path, name: str, model: str, *overrides: str) -> Config:
    """The LoRA recipe at real size, on the synthetic catalog, 2 CPU workers, ZeRO-3."""
    recipe = load_config(REPO / "configs/phi3v-burberry-lora.yaml", [
        f"model.name_or_path={model}", "model.random_init=true", "model.num_crops=4", "model.max_length=1024",
        "train.zero_stage=3", "train.bf16=true", "train.micro_batch_size=1", "train.grad_accum_steps=1",
        "train.max_steps=2", "train.checkpoint_every=2", "train.log_every=1", "train.eval_every=0",
        "train.eval_on_start=false", "train.eval_batches=1", "train.table_samples=0", "train.warmup_steps=0",
        "cluster.num_workers=2", "cluster.use_gpu=false", "cluster.cpus_per_worker=1",
        f"cluster.storage_path={work / 'runs'}", f"cluster.run_name={name}",
        "cluster.max_failures=0", "tracking.mode=disabled", "export.enabled=false", *overrides])
    data = load_config(REPO / "configs/demo-cpu.yaml", [
        f"data.shards.dir={work / 'shards'}", "data.catalog.sample_size=40", "data.shards.samples_per_shard=8",
        "data.shards.val_fraction=0.2", "data.images.max_side=672", "data.loader.num_workers=0"]).data
    return recipe.model_copy(update={"data": data})


class RssWatch(threading.Thread):
    """Peak resident memory of this process and everything it started (the local Ray cluster and its
    workers), per stage, sampled every `interval` seconds; Ray Train workers' peaks also from the kernel's
    high-water mark (VmHWM), so a peak between samples is not missed. RSS counts pages shared between
    processes (mapped files, Ray's object store) in each of them."""

    def __init__(self, interval: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.interval, self.stage = interval, "setup"
        self.workers: dict[str, dict[int, int]] = {}  # stage → pid → peak bytes
        self.total: dict[str, int] = {}  # stage → peak of the summed RSS
        self.driver: dict[str, int] = {}
        self.machine_used: dict[str, int] = {}  # whole machine, other users included
        self.born: dict[int, str] = {}  # pid → the stage it was first seen in
        self._done = threading.Event()

    def run(self) -> None:
        me = psutil.Process()
        while not self._done.wait(self.interval):
            self.sample(me)

    def sample(self, me: psutil.Process) -> None:
        stage, total = self.stage, 0
        for proc in [me, *me.children(recursive=True)]:
            try:
                rss = proc.memory_info().rss
                title = " ".join(proc.cmdline())
            except psutil.Error:
                continue
            total += rss
            if proc.pid == me.pid:
                self.driver[stage] = max(self.driver.get(stage, 0), rss)
            elif title.startswith("ray::RayTrainWorker"):
                peak = max(rss, hwm(proc.pid))
                stage_workers = self.workers.setdefault(self.born.setdefault(proc.pid, stage), {})
                stage_workers[proc.pid] = max(stage_workers.get(proc.pid, 0), peak)
        self.total[stage] = max(self.total.get(stage, 0), total)
        used = psutil.virtual_memory().total - psutil.virtual_memory().available
        self.machine_used[stage] = max(self.machine_used.get(stage, 0), used)

    def stop(self) -> None:
        self._done.set()
        self.join()


def hwm(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def step_times(run_dir: Path, cfg: Config) -> list[float]:
    """Seconds per optimizer step, from the per-step throughput the workers logged (log_every=1)."""
    samples = cfg.train.micro_batch_size * cfg.train.grad_accum_steps * cfg.cluster.num_workers
    return [samples / r["samples_per_s"] for r in read_metrics(run_dir) if r.get("samples_per_s")]


def probe(cfg: Config, processor) -> dict:
    """One val sample of the catalog with its answer: a real-length input (~800 tokens, 4 crops + global)."""
    encoder = SampleEncoder(processor, cfg.data.prompt, cfg.model.max_length)
    sample = next(iter(ShardStream(split_shards(cfg.data.shards.dir, "val"), shuffle=False, transform=encoder)))
    batch = collate([sample], processor.tokenizer.pad_token_id)
    return {k: batch[k] for k in ("input_ids", "pixel_values", "image_sizes")}


@torch.no_grad()
def logits_of(model, batch: dict) -> torch.Tensor:
    return model(**batch).logits[0].float()


class Stages(dict):
    """Wall time per stage, printed as each ends (with the memory peaks so far), so a run that fails part
    way still shows where it got to."""

    def __init__(self, watch: RssWatch) -> None:
        super().__init__()
        self.watch = watch

    def __setitem__(self, stage: str, seconds: float) -> None:
        super().__setitem__(stage, seconds)
        watch = self.watch
        peaks = sorted(watch.workers.get(watch.stage, {}).values(), reverse=True)
        workers = ", ".join(f"{p / GiB:.2f}" for p in peaks)
        print(f"[real_size] {stage}: {seconds:.0f} s; peak RSS: all processes "
              f"{watch.total.get(watch.stage, 0) / GiB:.2f} GiB, workers [{workers}] GiB, this process "
              f"{watch.driver.get(watch.stage, 0) / GiB:.2f} GiB", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default="outputs/bench/real-size", help="work directory (emptied first)")
    parser.add_argument("--keep", action="store_true", help="keep checkpoints and export afterwards")
    parser.add_argument("--from-training", action="store_true",
                        help="start at the resume, from the checkpoint that an earlier run's training stage left in "
                             "--dir (run with --keep, or stopped after that stage); --dir is kept")
    parser.add_argument("--max-shard-size", help="export.max_shard_size (default: the config's, 5GB: 2 shards "
                        "at real size, as Microsoft's checkpoint has)")
    parser.add_argument("--model", default="microsoft/Phi-3-vision-128k-instruct",
                        help="tiny-phi3v: the same rehearsal in a minute, to check the script itself")
    args = parser.parse_args()
    work = Path(args.dir).resolve()
    if not args.from_training:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)

    # glibc's per-thread heaps and its growing mmap threshold keep freed gathers and activations: a worker's
    # RSS grew by ~0.5 GB per forward pass at 4 layers without these (Ray's workers inherit them from the
    # local cluster this process starts)
    os.environ.setdefault("MALLOC_ARENA_MAX", "2")
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(4 * 2**20))
    watch = RssWatch()
    watch.start()
    rows: list[tuple[str, str]] = []
    wall = Stages(watch)
    cfg = rehearsal_config(work, "real-size", args.model)
    first_run = Path(runs.run_dir(cfg))
    if args.from_training:
        found = runs.complete_checkpoints(str(first_run), max_step=cfg.train.max_steps)
        if not found:
            raise SystemExit(f"error: no complete checkpoint in {first_run}: run without --from-training first")
        checkpoint_2 = Path(found[0])
        shutil.rmtree(work / "runs" / "real-size-resumed", ignore_errors=True)
    else:
        t = time.perf_counter()
        prepare(cfg.data)
        wall["prepare shards"] = time.perf_counter() - t
        watch.stage = "train"
        t = time.perf_counter()
        checkpoint_2 = Path(train(cfg)["checkpoint"])
        wall["train: 2 steps + checkpoint"] = time.perf_counter() - t

    watch.stage = "resume"
    resumed_cfg = rehearsal_config(work, "real-size-resumed", args.model, "train.max_steps=3",
                                   "train.checkpoint_every=1", f"cluster.resume_from={checkpoint_2}")
    t = time.perf_counter()
    second = train(resumed_cfg)
    wall["resume: 1 step + checkpoint"] = time.perf_counter() - t
    checkpoint_3 = Path(second["checkpoint"])

    # Export in this process, in stages, to time them and compare logits on the way: one bf16 copy at a time.
    ray.shutdown()  # the local cluster's own processes hold ~2-3 GB
    watch.stage = "export"
    out = work / "export"
    t = time.perf_counter()
    model, processor, run_cfg = checkpoint_model(checkpoint_3, torch.bfloat16)
    wall["export: rebuild the checkpoint's model (bf16)"] = time.perf_counter() - t
    summary = trainable_parameter_summary(model)["all"]
    batch = probe(cfg, processor)
    t = time.perf_counter()
    held = logits_of(model, batch)  # the model the checkpoint holds, LoRA unmerged
    wall["export: forward, checkpoint's model"] = time.perf_counter() - t
    model = model.merge_and_unload()
    merged = logits_of(model, batch)
    t = time.perf_counter()
    export = run_cfg.export.model_copy(update={"max_shard_size": args.max_shard_size or run_cfg.export.max_shard_size})
    write_export(model, processor, run_cfg, checkpoint_3, out, export)
    wall["export: write sharded bf16"] = time.perf_counter() - t
    del model
    gc.collect()
    t = time.perf_counter()
    reloaded, _ = load(out, dtype=torch.bfloat16)
    wall["export: reload"] = time.perf_counter() - t
    again = logits_of(reloaded, batch)
    del reloaded
    gc.collect()
    watch.stop()

    index_file = out / "model.safetensors.index.json"
    names = json.loads(index_file.read_text())["weight_map"] if index_file.exists() else {}
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    planned = plan(cfg, "cpu").per_worker_bytes  # the memory planner's per-worker prediction
    steps = step_times(first_run, cfg) + step_times(Path(second["run"]), resumed_cfg)
    diff = (again - held).abs()

    print(f"\n{args.model} (random weights, {summary['total'] / 1e9:.2f}B parameters, "
          f"{summary['trainable'] / 1e6:.1f}M trainable LoRA), num_crops 4, {batch['input_ids'].shape[1]} tokens "
          f"per sample, ZeRO-3 bf16, 2 Ray workers x 1 CPU, gloo\n")
    for stage, seconds in wall.items():
        rows.append((f"wall: {stage}", f"{seconds:.0f} s"))
    rows.append(("step time (per optimizer step, 2 workers x 1 sample)",
                 ", ".join(f"{s:.1f}" for s in steps) + f" s (median {statistics.median(steps):.1f} s)"))
    planned_text = f"{planned / GiB:.2f} GiB"
    for stage in ("train", "resume"):
        peaks = sorted(watch.workers.get(stage, {}).values(), reverse=True)[: cfg.cluster.num_workers]
        if not peaks:  # --from-training: not run here
            continue
        rows.append((f"peak RSS per worker, {stage} (measured | planned)",
                     ", ".join(f"{p / GiB:.2f}" for p in peaks) + f" GiB | {planned_text}"))
    for stage in [stage for stage in ("train", "resume", "export") if stage in watch.total]:
        rows.append((f"peak RSS, all processes, {stage} (this one: {watch.driver.get(stage, 0) / GiB:.2f})",
                     f"{watch.total.get(stage, 0) / GiB:.2f} GiB"))
    rows.append(("peak memory in use on the machine (all users)",
                 f"{max(watch.machine_used.values()) / GiB:.2f} GiB"))
    rows.append(("checkpoint size (step 2 | step 3)",
                 f"{du(checkpoint_2) / 2**20:.0f} | {du(checkpoint_3) / 2**20:.0f} MiB"))
    rows.append((f"export size ({len(shards)} shards + index)", f"{du(out) / GiB:.2f} GiB, "
                 + ", ".join(f"{(out / s).stat().st_size / 1e9:.2f}" for s in shards) + " GB"))
    official = set(load(args.model, random_init=True, device="meta")[0].state_dict())
    rows.append(("export weight names (index)", "the official names" if set(names) == official
                 else f"{len(set(names) ^ official)} names differ from the official ones"))
    rows.append(("reloaded export vs merged model in memory", "equal" if torch.equal(again, merged)
                 else f"max |diff| {(again - merged).abs().max():.3g}"))
    rows.append(("reloaded export vs checkpoint's model (LoRA unmerged), bf16",
                 f"max |diff| {diff.max():.3g}, mean {diff.mean():.3g}, logits std {held.std():.3g}, "
                 f"same argmax {(again.argmax(-1) == held.argmax(-1)).float().mean():.1%}"))
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
