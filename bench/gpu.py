"""Training throughput of the real Phi-3-Vision on one GPU: img/s, tokens/s, MFU and peak memory.

    bench/gpu.sh [--out FILE.json] [--steps 8] [--warmup N] [--micro-batch 4]      (one GPU, ~2.5 min)
    bench/gpu.sh --device cpu --tiny                                               (CPU smoke test, ~1 min)
    bench/gpu.sh --compile                         (each decoder layer through torch.compile, as torchtune does)

For each combination of LoRA / full fine-tune, `num_crops` 4 / 16, sdpa / flash-attn (flash-attn only when
`import flash_attn` works) and pad / length / packed batching, it times optimizer steps of
Phi-3-vision-128k-instruct's architecture (the config from the presets) with random weights in bf16, on
samples of the synthetic catalog (data/sample.py: mixed aspect ratios and titles) encoded by the library's
processor (the official image processor settings; the byte-level tokenizer when the real one is not cached).
What it measures is what training runs: the model from `models/loading.prepare_model` (LoRA preset or the
freeze policy), micro-batches planned by `data/batching.plan_batches` and built by `data/collate.collate`
(pad) or `collate.pack` (packed), the loss over answer tokens, FLOPs from `train/metrics.FlopCounter`.

Single process, single GPU, no Ray and no DeepSpeed: the optimizer is torch's fused AdamW on the bf16
parameters (no fp32 master copy, unlike DeepSpeed's bf16 mode). A 4.2B model with its gradients and AdamW
states fits one 141 GB GPU that way; the figure is the model's step throughput, not the distributed
runtime's (bench/train_step.py measures vlmtune's overhead over a bare loop).

MFU is against the device's bf16 matmul peak measured first (a large `torch.matmul` loop), and against the
data-sheet peak where the device is known (train/metrics.PEAK_BF16_TFLOPS). A combination that runs out of
memory or fails is recorded as such and the others go on; past `--time-limit` the rest are recorded as
skipped. Results: a table on stdout and a JSON file (default outputs/bench/gpu-<time>.json), rewritten after
every combination so that a run cut off by its machine's time limit keeps what it measured.

`--compile` compiles every text decoder layer and every CLIP encoder layer in place, as training does with
`model.compile=true` (models/loading.compile_layers; inductor fuses the elementwise kernels around the
matmuls). Compiling happens during the warm-up, whose seconds are recorded (`warmup_s`): a sequence length
the first graphs did not cover recompiles once with dynamic shapes.

`--padding-mask` gives padded batches the attention mask that training leaves out (`data/collate.collate`:
causal attention already keeps real tokens off the padding after them): the baseline for what sdpa's causal
kernel gains, measured in the same call.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

REQUIRED = ("torch", "transformers", "peft", "PIL", "pydantic", "yaml", "webdataset", "fsspec", "numpy")
USED = ("vlmtune.config", "vlmtune.data.batching", "vlmtune.data.collate", "vlmtune.data.sample",
        "vlmtune.models.loading", "vlmtune.train.metrics")


def check_imports() -> None:
    """Every package this script needs, named before anything runs (nothing is installed from here)."""
    missing = []
    for name in REQUIRED:
        try:
            importlib.import_module(name)
        except ImportError as e:
            missing.append(f"{name} ({e})")
    if not missing:
        for name in USED:  # what the library modules import beyond the list above
            try:
                importlib.import_module(name)
            except ModuleNotFoundError as e:
                missing.append(f"{e.name} (needed by {name})")
    if missing:
        sys.exit("bench/gpu.py needs these Python packages, which this interpreter cannot import:\n  "
                 + "\n  ".join(missing) + f"\ninterpreter: {sys.executable}\nNothing is installed by this script: "
                 "run it with a python that has them (PYTHON=/path/to/python bench/gpu.sh).")


def measure_matmul_peak(device, dtype, size: int, seconds: float = 3.0) -> float:
    """FLOP/s of back-to-back square matmuls, the best of a few timed rounds."""
    import torch

    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(3):
        a @ b
    sync()
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        began = time.perf_counter()
        for _ in range(10):
            a @ b
        sync()
        best = max(best, 10 * 2 * size**3 / (time.perf_counter() - began))
    return best


def catalog_samples(n: int, workdir: str) -> list[dict]:
    """Raw samples ({'image', 'meta', 'key'}, as a shard stream yields them) of the synthetic catalog."""
    import csv

    from PIL import Image

    from vlmtune.data.sample import generate_sample_catalog

    path = generate_sample_catalog(workdir, n, seed=0)
    samples = []
    with path.open(encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            image = Image.open(path.parent / row["imageurl"]).convert("RGB")
            meta = {"id": row["product_code"], "title": row["title"], "currency": row["currency_code"],
                    "category": [row["category1_code"], row["category2_code"], row["category3_code"]],
                    "full_price": float(row["full_price"]), "price": float(row["price"])}
            samples.append({"image": image, "meta": meta, "key": row["product_code"]})
    return samples


def micro_batches(encoded: list[dict], mode: str, micro_batch: int, max_tokens: int, long_from: int,
                  pad_id: int, padding_mask: bool = False) -> list[tuple[dict, list[dict]]]:
    """(model inputs, samples) per micro-batch, planned window by window as data/batching.MicroBatches does.
    `padding_mask` adds the attention mask that `collate` leaves out of padded training batches."""
    import torch

    from vlmtune.config import BatchingConfig
    from vlmtune.data.batching import plan_batches
    from vlmtune.data.collate import collate, pack

    window = micro_batch if mode == "pad" else BatchingConfig().lookahead
    out = []
    for start in range(0, len(encoded), window):
        part = encoded[start : start + window]
        plan = plan_batches([len(s["input_ids"]) for s in part], mode, micro_batch, max_tokens, long_from,
                            random.Random(start))
        for batch in plan:
            samples = [part[i] for i in batch]
            inputs = pack(samples) if mode == "packed" else collate(samples, pad_id)
            if padding_mask and mode != "packed":
                lengths = torch.tensor([len(s["input_ids"]) for s in samples])
                inputs["attention_mask"] = (torch.arange(inputs["input_ids"].shape[1]) < lengths[:, None]).long()
            out.append((inputs, samples))
    return out


def run_case(model, flops, batches, device, steps: int, warmup: int | None, profile: Path | None = None,
             label: str = "") -> dict:
    """Time `steps` optimizer steps after `warmup` untimed ones (None: every micro-batch once); with
    `profile`, two more steps under torch.profiler, whose busiest operators are appended to that file
    under `label`.

    Why a whole pass of warm-up by default: on a GPU the first step at a new sequence length pays one-off
    costs (cuDNN builds an attention plan per shape, kernels load on first use), ~0.1-0.2 s a step on an
    H200 at real size. A long run pays them once per distinct length and then never again; a short timing
    that met mostly new lengths would charge them to every step."""
    import torch

    from vlmtune.data.collate import IGNORE_INDEX

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5,
                                  fused=device.type == "cuda")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)

    def step(i: int) -> tuple[list[int], int, int, float]:
        inputs, samples = batches[i % len(batches)]
        lengths = [len(s["input_ids"]) for s in samples]
        answer = sum(int((s["labels"][1:] != IGNORE_INDEX).sum()) for s in samples)
        step_flops = flops.step_flops(lengths, inputs["image_sizes"])  # from the CPU copy: no device sync
        inputs = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in inputs.items()}
        loss = model(**inputs, num_items_in_batch=torch.tensor(float(answer), device=device)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return lengths, int(inputs["image_sizes"].shape[0]), inputs["input_ids"].numel(), step_flops

    warmup = len(batches) if warmup is None else warmup
    warmup_began = time.perf_counter()
    for i in range(warmup):
        step(i)
    sync()
    warmup_s = time.perf_counter() - warmup_began
    images = tokens = positions = 0
    total_flops = 0.0
    began = time.perf_counter()
    for i in range(warmup, warmup + steps):
        lengths, step_images, step_positions, step_flops = step(i)
        images, tokens = images + step_images, tokens + sum(lengths)
        positions, total_flops = positions + step_positions, total_flops + step_flops
    sync()
    seconds = time.perf_counter() - began
    result = {"warmup_steps": warmup, "warmup_s": warmup_s, "step_s": seconds / steps, "img_per_s": images / seconds,
              "tokens_per_s": tokens / seconds, "tflops": total_flops / seconds / 1e12,
              "padding_share": 1 - tokens / positions,
              "tokens_per_step": tokens / steps}
    if device.type == "cuda":
        result["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    if profile is not None:
        result.update(profile_steps(step, warmup + steps, device, sync, profile, label))
    return result


def profile_steps(step, first: int, device, sync, path: Path, label: str, count: int = 2) -> dict:
    """Two steps under torch.profiler: the operators with the most time on the device (CPU time on a CPU
    device) appended to `path`, and the share of the wall time the device spent running kernels (low
    when the Python side cannot launch work fast enough)."""
    import torch

    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        began = time.perf_counter()
        for i in range(first, first + count):
            step(i)
        sync()
        wall = time.perf_counter() - began
    events = prof.key_averages()
    if device.type == "cuda":  # kernels only: their launching operators report the same time again
        key, what = "self_device_time_total", "kernels"
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA
                   and not getattr(e, "is_user_annotation", False)]
        busy = sum(e.self_device_time_total for e in kernels) / 1e6
    else:
        key, what = "self_cpu_time_total", "operators"
        busy = sum(e.self_cpu_time_total for e in events) / 1e6
    table = events.table(sort_by=key, row_limit=25, max_name_column_width=60)
    with path.open("a", encoding="utf-8") as fh:
        fh.write(f"\n== {label}: {count} steps, {wall:.3f} s wall, {busy:.3f} s in {what}\n{table}\n")
    return {"profiled_wall_s": wall, "profiled_busy_share": busy / wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="JSON file (default outputs/bench/gpu-<time>.json)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny-phi3v instead of the real size (smoke test)")
    parser.add_argument("--steps", type=int, default=8, help="timed optimizer steps per combination")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed steps first (default: one per micro-batch, so every shape was seen)")
    parser.add_argument("--micro-batch", type=int, default=4, help="samples per pad micro-batch")
    parser.add_argument("--samples", type=int, default=48)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile each text decoder and CLIP encoder layer (compiling is in the warm-up)")
    parser.add_argument("--crops", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--training", nargs="+", choices=["lora", "full"], default=["lora", "full"])
    parser.add_argument("--batching", nargs="+", choices=["pad", "length", "packed"],
                        default=["pad", "length", "packed"])
    parser.add_argument("--padding-mask", action="store_true",
                        help="give padded batches an attention mask (a baseline: training leaves it out, see "
                             "data/collate.collate)")
    parser.add_argument("--profile", action="store_true",
                        help="profile two extra steps per combination (operator tables in <out>-profile.txt)")
    parser.add_argument("--time-limit", type=float, default=480.0,
                        help="seconds after which the remaining combinations are recorded as skipped")
    args = parser.parse_args()
    check_imports()

    import torch

    from vlmtune.config import load_config
    from vlmtune.data.collate import SampleEncoder
    from vlmtune.models.loading import compile_layers, prepare_model
    from vlmtune.train.metrics import FlopCounter, peak_flops

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit(f"torch {torch.__version__} sees no CUDA device: run on a GPU machine, or --device cpu --tiny")
    dtype = torch.bfloat16
    name = "tiny-phi3v" if args.tiny else "microsoft/Phi-3-vision-128k-instruct"
    attns = ["sdpa"]
    try:
        import flash_attn  # noqa: F401

        if device.type == "cuda":
            attns.append("flash_attention_2")
    except ImportError:
        print("flash_attn is not importable: sdpa only")

    measured = measure_matmul_peak(device, dtype, 8192 if device.type == "cuda" else 1024)
    sheet = peak_flops(device)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    transformers_version = importlib.import_module("transformers").__version__
    print(f"{gpu}: measured bf16 matmul peak {measured / 1e12:.1f} TFLOP/s"
          + (f" (data sheet {sheet / 1e12:.0f})" if sheet else "")
          + f"; torch {torch.__version__}, transformers {transformers_version}", flush=True)

    torch.manual_seed(0)
    results = []
    began = time.perf_counter()
    out = Path(args.out or f"outputs/bench/gpu-{time.strftime('%Y%m%d-%H%M%S')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    profile_path = out.with_name(f"{out.stem}-profile.txt")
    if args.profile:
        profile_path.write_text(f"torch.profiler tables of bench/gpu.py, {gpu}\n", encoding="utf-8")
    report = {"device": gpu, "torch": torch.__version__, "cuda": torch.version.cuda,
              "transformers": transformers_version,
              "peft": importlib.import_module("peft").__version__, "model": name, "dtype": "bfloat16",
              "measured_peak_tflops": measured / 1e12, "datasheet_peak_tflops": sheet / 1e12 if sheet else None,
              "steps": args.steps, "warmup": args.warmup, "gradient_checkpointing": args.gradient_checkpointing,
              "compile": args.compile, "padding_mask": args.padding_mask,
              "results": results}
    with tempfile.TemporaryDirectory() as workdir:
        raw = catalog_samples(args.samples, workdir)
        encoded_by_crops: dict[int, list[dict]] = {}
        for training in args.training:
            for attn in attns:
                cfg = load_config(overrides=[f"model.name_or_path={name}", f"model.attn_implementation={attn}",
                                             f"model.lora.enabled={training == 'lora'}",
                                             f"model.gradient_checkpointing={args.gradient_checkpointing}",
                                             "model.freeze.vision_tower=false", "model.max_length=8192"])
                model, processor = prepare_model(cfg.model, dtype, random_init=True, device=args.device)
                for parameter in model.parameters():  # DeepSpeed's bf16 mode casts every parameter, LoRA's too
                    parameter.data = parameter.data.to(dtype)
                model.to(device).train()
                if args.compile:
                    torch._dynamo.reset()  # each combination's model compiles anew, not on an earlier model's graphs
                    print(f"{training}: {compile_layers(model)} layers compiled", flush=True)
                flops = FlopCounter.for_model(model)
                long_from = model.config.original_max_position_embeddings
                for crops in args.crops:
                    if crops not in encoded_by_crops:
                        processor.image_processor.num_crops = crops
                        encoder = SampleEncoder(processor, cfg.data.prompt, cfg.model.max_length)
                        encoded_by_crops[crops] = [encoder(s) for s in raw]
                    encoded = encoded_by_crops[crops]
                    lengths = [len(s["input_ids"]) for s in encoded]
                    max_tokens = math.ceil(statistics.mean(lengths) * args.micro_batch / 64) * 64
                    max_tokens = max(max_tokens, max(lengths))
                    for mode in args.batching:
                        case = {"training": training, "attn": attn, "num_crops": crops, "batching": mode,
                                "micro_batch": args.micro_batch if mode == "pad" else None,
                                "max_tokens": max_tokens if mode != "pad" else None,
                                "tokens_per_sample": statistics.mean(lengths)}
                        if time.perf_counter() - began > args.time_limit:
                            case["error"] = f"skipped: past --time-limit {args.time_limit:.0f} s"
                        else:
                            batches = micro_batches(encoded, mode, args.micro_batch, max_tokens, long_from,
                                                    processor.tokenizer.pad_token_id, args.padding_mask)
                            try:
                                case.update(run_case(model, flops, batches, device, args.steps, args.warmup,
                                                     profile_path if args.profile else None,
                                                     f"{training} {attn} num_crops={crops} {mode}"))
                                case["mfu"] = case["tflops"] * 1e12 / measured
                                if sheet:
                                    case["mfu_datasheet"] = case["tflops"] * 1e12 / sheet
                            except torch.cuda.OutOfMemoryError:
                                case["error"] = "out of memory"
                            except Exception as e:  # one broken combination must not lose the others' numbers
                                case["error"] = f"{type(e).__name__}: {e}"[:400]
                            model.zero_grad(set_to_none=True)  # run_case empties the allocator's cache first
                        results.append(case)
                        report["seconds"] = time.perf_counter() - began
                        out.write_text(json.dumps(report, indent=2))  # a run cut off keeps its numbers
                        print(describe(case), flush=True)
                del model
                if device.type == "cuda":
                    torch.cuda.empty_cache()

    report["seconds"] = time.perf_counter() - began
    out.write_text(json.dumps(report, indent=2))
    print(f"\n{name}, bf16{', compiled layers' if args.compile else ''}"
          f"{', padded batches with an attention mask' if args.padding_mask else ''}, {gpu}, "
          f"peak {measured / 1e12:.1f} TFLOP/s measured; {report['seconds']:.0f} s")
    print(f"{'training':<9}{'attn':<19}{'crops':>6}{'batching':>9}{'tok/sample':>11}{'img/s':>8}{'tokens/s':>10}"
          f"{'MFU':>7}{'padding':>8}{'peak GB':>9}")
    for case in results:
        print(describe(case))
    print(f"\nwrote {out}")


def describe(case: dict) -> str:
    head = (f"{case['training']:<9}{case['attn']:<19}{case['num_crops']:>6}{case['batching']:>9}"
            f"{case['tokens_per_sample']:>11.0f}")
    if "error" in case:
        return head + f"  {case['error']}"
    memory = f"{case['peak_mem_gb']:>9.1f}" if "peak_mem_gb" in case else f"{'-':>9}"
    return head + (f"{case['img_per_s']:>8.2f}{case['tokens_per_s']:>10.0f}{case['mfu']:>7.3f}"
                   f"{case['padding_share']:>8.3f}{memory}")


if __name__ == "__main__":
    main()
