"""Will a run fit its GPUs, and what will it cost? Answered before any Ray worker starts or any weight loads.

`plan(cfg)` builds the model a run would train on PyTorch's `meta` device (`models.loading.prepare_model`:
the same LoRA adapters and freeze policy, so parameter counts are exact), encodes one typical sample with the
run's processor, and turns both into a per-worker memory budget and a compute estimate. `jobs/train.py
--plan` prints it; `launch.ray.preflight` refuses a GPU run that does not fit. It lives in `train/` because it
models what a training worker holds; it imports neither Ray nor DeepSpeed (the ZeRO bucket sizes come from
`train.engine.deepspeed_config`, the FLOPs from `train.metrics.FlopCounter`).

Memory per worker, in bytes (P parameters, T of them trainable, N workers = cluster.num_workers, or its
minimum for an elastic range; w = 2 with train.bf16, else 4):

    weights      ZeRO 0-2: w·P            ZeRO 3: w·P/N + w·(P_small + gather)
    gradients    ZeRO 0-1: w·T            ZeRO 2-3: w·T/N + w·bucket·k
    optimizer    ZeRO 0, fp32: 8·T (Adam m, v)          ZeRO 0, bf16: 12·T (fp32 master + m + v) + 4·T
                 ZeRO 1-3: (12·T + 4·T)/N   (DeepSpeed keeps an fp32 copy of its partition even in fp32 runs,
                 and makes an fp32 gradient of it at the step: the trailing 4·T)
    activations  see below
    overhead     GPU: 2 GiB (CUDA context ~0.5, NCCL communicators and buffers ~0.5, cuBLAS workspaces and
                 allocator fragmentation ~1); CPU: 0

This is the accounting of the ZeRO paper (Rajbhandari et al. 2020, mixed-precision Adam: 2 + 2 + 12 bytes per
parameter, partitioned by stage) and of DeepSpeed's `estimate_zero2/3_model_states_mem_needs`, with frozen
parameters (the LoRA base model, a frozen vision tower) holding weights only. Under ZeRO-3, parameters of at
most `stage3_param_persistence_threshold` elements (P_small: norms, biases) stay whole on every worker, and a
layer being gathered plus the prefetch bucket (`gather` = largest parameter + `stage3_prefetch_bucket_size`)
are whole while they run. `bucket` is `reduce_bucket_size` elements (k = 2 buffers with `overlap_comm`),
allocated in full on a GPU; on the CPU only the pages gradients touch count, so min(bucket, T). QLoRA stores
the language model's linear weights in 4-bit NF4 with double quantisation (~0.53 bytes each). With
`offload_optimizer`, optimizer states and their fp32 gradients live in host memory (shown, not counted).

Activations are those of one micro-batch of the token budget B (data.batching.max_tokens for length/packed
batches, else train.micro_batch_size × model.max_length), whose images are those of B / (typical sample
length) typical samples. Per token, with a = w bytes per activation (a Phi-3 decoder layer of width h, MLP
width I, SwiGLU; RMSNorm computes in fp32):

    decoder layer       8·h + 11·a·h + 5·a·I      (norms 2·(4h + ah), qkv input + output 4ah, rotated q, k 2ah,
                                                    attention output and its contiguous copy 2ah, MLP input ah,
                                                    gate/up 2aI, SiLU input and output 2aI, product aI)
    + eager attention   2.5·a·heads·s            (Korthikanti et al. 2022's 5·a·s²·b per layer at a = 2; SDPA
                                                    and flash-attention keep no s² term)
    + LoRA              (a + 1)·d_in + a·r per adapted linear layer with dropout (dropout output and mask)
    final norm, logits  (4 + 2a)·h + V·(a + 12 + 4·[a = 2])  (logits, their fp32 copy for the loss, log-softmax
                                                    output, its gradient and the logits' gradient)
    vision layer        9·a·d + 3·a·I_v per CLIP token (577 per crop at 336 px), only when something in the
                        tower trains; else one layer's worth, transient
    projector           a·(4d + 2h) per image token when the projector trains

That is Korthikanti et al. (2022)'s 34·s·b·h per layer counted for Phi-3's blocks instead of GPT's. Gradient
checkpointing keeps each layer's input (a·h per token per layer; a·d per CLIP token per layer) plus one layer's
full activations while it is recomputed. Both are reported; the total uses the one the config selects. The
attention mask adds one byte per position pair of each sequence with eager attention, and of each packed row
with SDPA (padded training batches carry no mask: SDPA runs them causal; flash-attention keeps none).

Compute: FLOPs per typical sample (text and vision, forward and backward) from `FlopCounter`; step time =
FLOPs of one worker's samples per step / (peak × cluster.assumed_mfu); GPU-hours = step time × max_steps × N.
The typical sample is one catalog record (`TYPICAL_RECORD`) with data.images.max_per_product square images at
the model's num_crops (a square image fills the largest square tile grid that num_crops allows), encoded by
the run's processor: exact image tokens, and text tokens of whatever tokenizer the processor has offline.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
from PIL import Image

from vlmtune.config import Config
from vlmtune.data.collate import SampleEncoder
from vlmtune.errors import ModelError
from vlmtune.models.loading import parameter_group, prepare_model
from vlmtune.train.engine import deepspeed_config
from vlmtune.train.metrics import GPU_SPECS, FlopCounter

GIB = 2**30
GPU_OVERHEAD_BYTES = 2 * GIB  # CUDA context, NCCL, cuBLAS workspaces, allocator fragmentation (see the docstring)
NF4_BYTES = 0.53  # 4-bit NF4 + double-quantised absmax per weight (bitsandbytes, QLoRA)

# One catalog record as the Burberry catalog has them; its answer is what a typical target costs in tokens.
TYPICAL_RECORD = {"id": "typical", "title": "Vintage Check Cotton Gabardine Trench Coat",
                  "category": ["Women", "Clothing", "Coats and Jackets"], "full_price": 2290.0, "currency": "USD"}


# ----------------------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class ModelStats:
    """What the plan needs from the model a run trains, read from its meta-device skeleton."""

    name: str
    total: int
    trainable: int
    trainable_by_group: dict[str, int]
    persistent: int  # parameters small enough for ZeRO-3 to keep whole on every worker
    largest: int  # elements of the largest parameter
    quantizable: int  # the language model's linear weights (4-bit under QLoRA)
    lora_inputs: int  # per token: sum of input widths of LoRA-adapted layers with dropout
    lora_rank_outputs: int  # per token: sum of r over LoRA-adapted layers
    lora: bool
    flops: FlopCounter
    hidden: int
    intermediate: int
    layers: int
    heads: int
    vocab: int
    vision_hidden: int
    vision_intermediate: int
    vision_heads: int
    projector_trains: bool


def model_stats(cfg: Config, persistence_threshold: float) -> tuple[ModelStats, object]:
    """(stats, processor) of the model `prepare_model(cfg.model)` would train, built on the meta device."""
    model_cfg = cfg.model
    if model_cfg.lora.quantize_4bit:  # the skeleton is not quantised; the 4-bit bytes are counted below
        model_cfg = model_cfg.model_copy(update={"lora": model_cfg.lora.model_copy(update={"quantize_4bit": False})})
    dtype = torch.bfloat16 if cfg.train.bf16 else torch.float32
    try:
        model, processor = prepare_model(model_cfg, dtype, random_init=True, device="meta")
    except OSError as e:  # a hub id that is neither official nor cached
        raise ModelError(f"cannot plan {model_cfg.name_or_path!r} without its config.json: {e}") from e
    total = trainable = persistent = largest = quantizable = 0
    by_group: dict[str, int] = {}
    for name, p in model.named_parameters():
        n = p.numel()
        total += n
        largest = max(largest, n)
        persistent += n if n <= persistence_threshold else 0
        group = parameter_group(name)
        if p.requires_grad:
            trainable += n
            by_group[group] = by_group.get(group, 0) + n
        if group == "language_model" and p.ndim >= 2:
            quantizable += n
    lora_inputs = lora_rank = 0
    for module in model.modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            r = module.lora_A["default"].out_features
            lora_rank += r
            if cfg.model.lora.dropout > 0:
                lora_inputs += module.lora_A["default"].in_features
    config = model.config
    vision = config.vision_config
    stats = ModelStats(
        name=model_cfg.name_or_path, total=total, trainable=trainable, trainable_by_group=by_group,
        persistent=persistent, largest=largest, quantizable=quantizable, lora_inputs=lora_inputs,
        lora_rank_outputs=lora_rank, lora=model_cfg.lora.enabled, flops=FlopCounter.for_model(model),
        hidden=config.hidden_size, intermediate=config.intermediate_size, layers=config.num_hidden_layers,
        heads=config.num_attention_heads, vocab=config.vocab_size, vision_hidden=vision.hidden_size,
        vision_intermediate=vision.intermediate_size, vision_heads=vision.num_attention_heads,
        projector_trains=by_group.get("projector", 0) > 0)
    return stats, processor


@dataclass(frozen=True)
class TypicalSample:
    images: int
    crops: int  # CLIP passes: global view + tiles, over all images
    image_tokens: int
    tokens: int
    image_sizes: torch.Tensor
    num_crops: int
    stand_in_tokenizer: bool = False  # text counted with the byte-level tokenizer (the real one is not cached)

    def describe(self) -> str:
        note = " (text counted by the byte-level stand-in tokenizer: the model's own is not available offline and " \
            "needs fewer)" if self.stand_in_tokenizer else ""
        return (f"{self.images} square image(s) at num_crops={self.num_crops} ({self.crops} CLIP crops): "
                f"{self.image_tokens:,} image + {self.tokens - self.image_tokens:,} text tokens = "
                f"{self.tokens:,} tokens{note}")


def typical_sample(cfg: Config, processor, vocab_size: int | None = None) -> TypicalSample:
    """`TYPICAL_RECORD` with `max_per_product` square images, through the run's own `SampleEncoder`."""
    tile = processor.image_processor.tile_size
    images = [Image.new("RGB", (tile, tile), "white") for _ in range(cfg.data.images.max_per_product)]
    encoder = SampleEncoder(processor, cfg.data.prompt, max_length=10**9)
    out = encoder({"key": "typical", "meta": TYPICAL_RECORD, "images": images})
    sizes = out["image_sizes"]
    crops = int(((sizes[:, 0] // tile) * (sizes[:, 1] // tile) + 1).sum())
    stand_in = vocab_size is not None and len(processor.tokenizer) < vocab_size // 2
    return TypicalSample(len(images), crops, out["image_tokens"], len(out["input_ids"]), sizes,
                         processor.image_processor.num_crops, stand_in)


# ------------------------------------------------------------------------------------------- the plan


@dataclass
class Plan:
    """Per-worker memory (bytes) and compute of a run. `per_worker_bytes` is what one worker needs in all."""

    title: str
    device: str  # "gpu" or "cpu"
    world_size: int
    zero_stage: int
    weights: float
    gradients: float
    optimizer: float
    zero_buffers: float
    activations_checkpointed: float
    activations_full: float
    checkpointing: bool
    overhead: float
    offloaded: float  # host memory under offload_optimizer (not in the total)
    limit_bytes: float | None
    limit_name: str
    total_params: int
    trainable_params: int
    token_budget: int
    budget_note: str
    sample: TypicalSample
    flops_text: float  # per typical sample, forward + backward
    flops_vision: float
    samples_per_step: float  # per worker, all micro-batches of a step
    peak_tflops: float | None
    mfu: float
    max_steps: int
    suggestions: list[str] = field(default_factory=list)

    @property
    def activations(self) -> float:
        return self.activations_checkpointed if self.checkpointing else self.activations_full

    @property
    def per_worker_bytes(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.zero_buffers + self.activations + self.overhead

    @property
    def fits(self) -> bool | None:
        """None when there is no limit to check (a CPU plan without a GPU type)."""
        return None if self.limit_bytes is None else self.per_worker_bytes <= self.limit_bytes

    @property
    def step_time_s(self) -> float | None:
        if not self.peak_tflops:
            return None
        return (self.flops_text + self.flops_vision) * self.samples_per_step / (self.peak_tflops * 1e12 * self.mfu)

    @property
    def gpu_hours(self) -> float | None:
        step = self.step_time_s
        return None if step is None else step * self.max_steps * self.world_size / 3600

    def breakdown(self) -> dict[str, float]:
        """Bytes per worker by part (the total under "total")."""
        return {"weights": self.weights, "gradients": self.gradients, "optimizer": self.optimizer,
                "zero_buffers": self.zero_buffers, "activations": self.activations, "overhead": self.overhead,
                "total": self.per_worker_bytes}

    def table(self) -> str:
        def gib(x: float) -> str:
            return f"{x / GIB:10.2f}"

        used, unused = ("checkpointed", "not checkpointed") if self.checkpointing else \
            ("not checkpointed", "checkpointed")
        act_used, act_other = (self.activations_checkpointed, self.activations_full) if self.checkpointing else \
            (self.activations_full, self.activations_checkpointed)
        share = self.trainable_params / self.total_params if self.total_params else 0
        lines = [self.title,
                 f"parameters: {self.total_params:,} total, {self.trainable_params:,} trainable ({share:.2%})",
                 f"{'per worker':<44}{'GiB':>10}",
                 f"  {'weights':<42}{gib(self.weights)}",
                 f"  {'gradients':<42}{gib(self.gradients)}",
                 f"  {'optimizer states':<42}{gib(self.optimizer)}",
                 f"  {'ZeRO buffers':<42}{gib(self.zero_buffers)}",
                 f"  {'activations, ' + used:<42}{gib(act_used)}",
                 f"  {'(activations, ' + unused + ')':<42}{gib(act_other)}",
                 f"  {'CUDA context and allocator' if self.device == 'gpu' else 'runtime overhead (CPU: none)':<42}"
                 f"{gib(self.overhead)}",
                 f"  {'total':<42}{gib(self.per_worker_bytes)}"]
        if self.offloaded:
            lines.append(f"  {'(host memory: offloaded optimizer)':<42}{gib(self.offloaded)}")
        if self.limit_bytes is not None:
            verdict = "fits" if self.fits else "does NOT fit"
            lines.append(f"  {self.limit_name + ' memory':<42}{gib(self.limit_bytes)}   → {verdict}")
        lines += [f"token budget: {self.token_budget:,} tokens per micro-batch ({self.budget_note})",
                  f"typical sample: {self.sample.describe()}",
                  f"FLOPs per sample (forward + backward): text {self.flops_text / 1e12:.3g} TFLOP, vision "
                  f"{self.flops_vision / 1e12:.3g} TFLOP"]
        if self.step_time_s is not None:
            lines.append(f"step: {self.samples_per_step:.3g} samples per worker, {self.step_time_s:.3g} s at MFU "
                         f"{self.mfu:.2f} of {self.peak_tflops:g} TFLOP/s; {self.max_steps} steps × "
                         f"{self.world_size} GPUs = {self.gpu_hours:.3g} GPU-hours")
        for s in self.suggestions:
            lines.append(f"suggestion: {s}")
        return "\n".join(lines)

    def refusal(self) -> str:
        """The one-line error of a plan that does not fit."""
        need, have = self.per_worker_bytes / GIB, (self.limit_bytes or 0) / GIB
        hint = self.suggestions[0] if self.suggestions else "use more or larger GPUs"
        return (f"the run needs {need:.1f} GiB per worker but the {self.limit_name} has {have:.1f} GiB; "
                f"{hint}")


def token_budget(cfg: Config) -> tuple[int, str]:
    batching = cfg.data.batching
    if batching.mode != "pad":
        return batching.max_tokens, f"data.batching.max_tokens, {batching.mode} batches"
    return (cfg.train.micro_batch_size * cfg.model.max_length,
            f"train.micro_batch_size {cfg.train.micro_batch_size} × model.max_length {cfg.model.max_length}")


def _activations(stats: ModelStats, cfg: Config, sample: TypicalSample, tokens: int, width: int,
                 checkpointing: bool) -> float:
    """Bytes of one micro-batch's activations (see the module docstring for each term)."""
    a, h, inter = width, stats.hidden, stats.intermediate
    seq = cfg.model.max_length
    mode = cfg.data.batching.mode
    samples = cfg.train.micro_batch_size if mode == "pad" else tokens / sample.tokens
    eager = cfg.model.attn_implementation == "eager"
    flash = cfg.model.attn_implementation == "flash_attention_2"

    layer = 8 * h + 11 * a * h + 5 * a * inter + (2.5 * a * stats.heads * seq if eager else 0)
    lora = ((a + 1) * stats.lora_inputs + a * stats.lora_rank_outputs) / max(stats.layers, 1)
    layer += lora
    head = (4 + 2 * a) * h + stats.vocab * (a + 12 + (4 if a == 2 else 0))
    # checkpointed: each layer's input, plus one layer recomputed in the backward pass
    text = tokens * (stats.layers * a * h + layer) if checkpointing else tokens * stats.layers * layer
    text += tokens * head + tokens * 2 * a * h  # the residual stream's gradient in the backward pass

    flops = stats.flops
    d, vinter = stats.vision_hidden, stats.vision_intermediate
    vision_tokens = samples * sample.crops * flops.vision_tokens
    vlayer = 9 * a * d + 3 * a * vinter + (2.5 * a * stats.vision_heads * flops.vision_tokens if eager else 0)
    if flops.vision_backward:
        per_token = flops.vision_layers * a * d + vlayer if checkpointing else flops.vision_layers * vlayer
    else:
        per_token = vlayer  # one layer at a time, nothing kept for a backward pass
    vision = vision_tokens * per_token
    image_tokens = samples * sample.image_tokens
    projector = image_tokens * a * (4 * d + 2 * h) if stats.projector_trains else 0
    if mode == "packed" and not flash:
        mask = tokens**2  # one row, block-diagonal boolean mask
    elif eager:
        mask = samples * seq**2  # eager builds the causal mask it needs
    else:
        mask = 0  # padded training batches carry no mask (data/collate.collate): sdpa runs causal
    return text + vision + projector + mask


def estimate(stats: ModelStats, sample: TypicalSample, cfg: Config, device: str = "gpu") -> Plan:
    """The plan of `cfg` for a model already measured (`model_stats`) — cheap, so variants can be tried."""
    train, cluster = cfg.train, cfg.cluster
    world = cluster.worker_range[0]  # an elastic run's fewest workers hold the most each
    zero = train.zero_stage
    w = 2 if train.bf16 else 4
    ds = deepspeed_config(train, world, on_gpu=device == "gpu")["zero_optimization"]
    P, T = stats.total, stats.trainable

    qlora = cfg.model.lora.enabled and cfg.model.lora.quantize_4bit
    weights = (P - stats.quantizable) * w + stats.quantizable * NF4_BYTES if qlora else P * w
    zero_buffers = 0.0
    if zero == 3:
        gather = min(stats.largest + ds["stage3_prefetch_bucket_size"], P)
        zero_buffers += w * gather
        weights = weights / world + w * stats.persistent * (1 - 1 / world)
    if zero >= 2:
        gradients = w * T / world
        bucket = ds["reduce_bucket_size"] if device == "gpu" else min(ds["reduce_bucket_size"], T)
        zero_buffers += w * bucket * (2 if ds.get("overlap_comm") and zero == 2 else 1)
    else:
        gradients = w * T
    if zero == 0:
        optimizer = 8 * T if w == 4 else 16 * T
    else:
        optimizer = 16 * T / world
        if zero == 1 and w == 2:
            gradients += 4 * T  # DeepSpeed's bf16 ZeRO-1 accumulates gradients in a full fp32 buffer
    offloaded = 0.0
    if train.offload_optimizer:
        offloaded, optimizer = optimizer, 0.0

    tokens, note = token_budget(cfg)
    ckpt = _activations(stats, cfg, sample, tokens, w, checkpointing=True)
    full = _activations(stats, cfg, sample, tokens, w, checkpointing=False)

    flops = stats.flops
    per_sample = flops.step_flops([sample.tokens], sample.image_sizes)
    vision = flops.step_flops([0], sample.image_sizes)
    samples = train.micro_batch_size if cfg.data.batching.mode == "pad" else tokens / sample.tokens

    spec = GPU_SPECS.get(cluster.gpu_type) if cluster.gpu_type else None
    limit = cluster.gpu_memory_gb * GIB if cluster.gpu_memory_gb else (spec.memory_gib * GIB if spec else None)
    limit_name = cluster.gpu_type or ("GPU" if cluster.gpu_memory_gb else "")
    if device == "cpu":
        limit = None
    kind = "LoRA" if stats.lora else "full fine-tune"
    if qlora:
        kind = "QLoRA"
    where = f"{cluster.gpu_type or 'GPU'}" if device == "gpu" else "CPU"
    title = (f"plan: {stats.name}, {kind}, ZeRO-{zero} on {world} worker(s) ({where}), "
             f"{'bf16' if w == 2 else 'fp32'}")
    return Plan(
        title=title, device=device, world_size=world, zero_stage=zero, weights=weights, gradients=gradients,
        optimizer=optimizer, zero_buffers=zero_buffers, activations_checkpointed=ckpt, activations_full=full,
        checkpointing=cfg.model.gradient_checkpointing, overhead=GPU_OVERHEAD_BYTES if device == "gpu" else 0.0,
        offloaded=offloaded, limit_bytes=limit, limit_name=limit_name, total_params=P, trainable_params=T,
        token_budget=tokens, budget_note=note, sample=sample, flops_text=per_sample - vision, flops_vision=vision,
        samples_per_step=samples * train.grad_accum_steps, peak_tflops=spec.peak_bf16_tflops if spec else None,
        mfu=cluster.assumed_mfu, max_steps=train.max_steps)


def _variant(cfg: Config, overrides: dict[str, object]) -> Config:
    tree = cfg.model_dump()
    for dotted, value in overrides.items():
        node = tree
        *path, key = dotted.split(".")
        for part in path:
            node = node[part]
        node[key] = value
    return Config.model_validate(tree)


def suggestions(stats: ModelStats, sample: TypicalSample, cfg: Config, device: str) -> list[str]:
    """Changes that make a plan that does not fit fit, each with its per-worker total; the cheapest first."""
    train, model = cfg.train, cfg.model
    world = cfg.cluster.worker_range[0]

    def total(overrides: dict) -> tuple[float, bool]:
        p = estimate(stats, sample, _variant(cfg, overrides), device)
        return p.per_worker_bytes, bool(p.fits)

    def say(overrides: dict, why: str) -> str:
        need, _ = total(overrides)
        change = " ".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in overrides.items())
        return f"{change} ({why}): {need / GIB:.1f} GiB per worker"

    found: list[str] = []
    tried: list[dict] = []
    if not model.gradient_checkpointing:
        tried.append({"model.gradient_checkpointing": True})
    if train.zero_stage < 3:
        tried.append({"train.zero_stage": 3})
    if not model.gradient_checkpointing and train.zero_stage < 3:
        tried.append({"model.gradient_checkpointing": True, "train.zero_stage": 3})
    for overrides in tried:
        if total(overrides)[1]:
            why = "ZeRO-3 shards weights, gradients and optimizer states over the workers" \
                if "train.zero_stage" in overrides else "recompute activations in the backward pass"
            found.append(say(overrides, why))
    # A smaller token budget
    if cfg.data.batching.mode == "pad":
        for mbs in range(train.micro_batch_size - 1, 0, -1):
            if total({"train.micro_batch_size": mbs})[1]:
                found.append(say({"train.micro_batch_size": mbs, "train.grad_accum_steps":
                                  math.ceil(train.grad_accum_steps * train.micro_batch_size / mbs)},
                                 "a smaller token budget, same global batch"))
                break
    else:
        budget, floor = cfg.data.batching.max_tokens, model.max_length
        candidates = [b for b in range(budget - 256, floor - 1, -256)] + [floor]
        for b in candidates:
            if b < budget and total({"data.batching.max_tokens": b})[1]:
                found.append(say({"data.batching.max_tokens": b}, "a smaller token budget"))
                break
    # More workers (sharding only helps from ZeRO-1 on)
    stage = 3 if train.zero_stage == 0 else train.zero_stage
    for n in (2, 4, 8, 16, 32, 64, 128, 256, 512, 1024):
        if n <= world:
            continue
        overrides = {"cluster.num_workers": n, **({"train.zero_stage": stage} if stage != train.zero_stage else {})}
        if total(overrides)[1]:
            found.append(say(overrides, "more workers share the sharded states"))
            break
    if not train.offload_optimizer and train.zero_stage > 0 and total({"train.offload_optimizer": True})[1]:
        found.append(say({"train.offload_optimizer": True}, "optimizer states in host memory, slower steps"))
    if not found:
        found.append("nothing tried alone fits (gradient checkpointing, ZeRO-3, a smaller token budget, more "
                     "workers, optimizer offload): use LoRA (model.lora.enabled=true) or a GPU with more memory")
    return found


def plan(cfg: Config, device: str | None = None) -> Plan:
    """The plan of a run: per-worker memory and compute, with suggestions when it does not fit.

    `device` is "gpu" (the default when cluster.use_gpu or cluster.gpu_type is set) or "cpu" (no CUDA overhead,
    no limit; what CPU benchmarks compare against)."""
    if device is None:
        device = "gpu" if cfg.cluster.use_gpu or cfg.cluster.gpu_type or cfg.cluster.gpu_memory_gb else "cpu"
    if device not in ("gpu", "cpu"):
        raise ValueError(f"device must be 'gpu' or 'cpu', not {device!r}")
    threshold = deepspeed_config(cfg.train, 1, on_gpu=device == "gpu")["zero_optimization"].get(
        "stage3_param_persistence_threshold", 0)
    stats, processor = model_stats(cfg, threshold)
    sample = typical_sample(cfg, processor, stats.vocab)
    result = estimate(stats, sample, cfg, device)
    if result.fits is False:
        result = replace(result, suggestions=suggestions(stats, sample, cfg, device))
    return result
