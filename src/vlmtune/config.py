"""One typed configuration tree for every vlmtune job.

The same YAML file drives prepare, train, evaluate and predict, whether they run on a laptop, under
Slurm or as a KubeRay RayJob. Every model here forbids unknown keys, so a typo fails loudly (with the
file, the key and the closest valid key) instead of silently falling back to a default. Dotted
overrides (`train.max_steps=50`) are applied to the YAML before validation, so they get the same checks.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from vlmtune.errors import ConfigError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


# ----------------------------------------------------------------------------------------------- data


class ColumnMapping(_Section):
    """Which catalog columns hold each field. Defaults fit the DBQ Burberry price data sets."""

    id: str = "product_code"
    title: str = "title"
    category: list[str] = Field(default_factory=lambda: ["category1_code", "category2_code", "category3_code"])
    full_price: str = "full_price"
    price: str | None = "price"
    currency: str | None = "currency_code"
    image: str | list[str] = Field("imageurl", description="the image column, or several (front, back, detail …); "
                                   "a cell may also hold several URLs: a list, a JSON array, or text split at "
                                   "image_separator")
    image_separator: str | None = Field(None, description="splits text cells of the image column(s) into several "
                                        "URLs, e.g. '|'")


class CatalogConfig(_Section):
    """Where the catalog comes from: `sample` (synthetic), a HF data set id, or a CSV/Parquet/JSONL file."""

    source: str = "sample"
    hf_split: str = "train"
    sample_size: int = Field(400, ge=1, description="rows of the synthetic catalog when source is 'sample'")
    sample_seed: int = 0
    columns: ColumnMapping = Field(default_factory=ColumnMapping)
    image_root: str | None = Field(None, description="base directory for relative local image paths")
    default_currency: str = "USD"
    limit: int | None = Field(None, ge=1, description="read only the first N rows (smoke runs)")
    chunk_rows: int = Field(10_000, ge=1, description="catalog rows read and normalised at a time: the full rows "
                            "of one chunk are all the driver holds besides the shard plan")


class ImageConfig(_Section):
    """Fetching and normalising product images."""

    max_side: int = Field(768, ge=32, description="resize so the longer side is at most this many pixels")
    min_side: int = Field(16, ge=1, description="reject images with a shorter side below this")
    jpeg_quality: int = Field(90, ge=1, le=100)
    resample: Literal["box", "bilinear", "bicubic", "lanczos"] = Field(
        "box", description="downscaling filter: box averages the source pixels each output pixel covers (what "
        "OpenCV calls INTER_AREA); lanczos is sharper and costs about 3x more")
    max_per_product: int = Field(1, ge=1, description="the first N images a product lists are fetched; those "
                                 "that pass validation become the sample's images (prompt <|image_1|>…<|image_N|>)")
    timeout_s: float = Field(15.0, gt=0, description="connect and read timeout of one request")
    retries: int = Field(3, ge=0, description="retries of a download on 408/429/5xx, timeouts and connection "
                         "errors (never on other 4xx)")
    backoff_s: float = Field(0.5, ge=0, description="backoff factor: retry k waits backoff_s * 2^(k-1) (the "
                             "first retry goes at once), unless the server says Retry-After")
    retry_after_max_s: int = Field(60, ge=0, description="longest Retry-After (429, 503) waited for; a longer "
                                   "one is cut to this")
    max_per_host: int = Field(8, ge=1, description="requests in flight to one host from one fetch task")
    user_agent: str = Field("vlmtune/0.1 (+https://github.com/vlmtune/vlmtune)",
                            description="User-Agent of every image request; name yourself to the sites you fetch from")
    max_bytes: int = Field(25_000_000, ge=1024, description="largest accepted download")
    max_pixels: int = Field(60_000_000, ge=1024, description="decompression-bomb limit")
    fetch_threads: int = Field(16, ge=1, description="concurrent fetches inside one task")


class ShardConfig(_Section):
    """The WebDataset output of prepare and the input of train/evaluate."""

    dir: str = "outputs/shards"
    samples_per_shard: int = Field(256, ge=1, description="catalog rows planned into each shard (in id-hash "
                                   "order); a shard holds fewer samples when some of its rows are rejected")
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    split_salt: str = "vlmtune-split-v1"
    rows_per_task: int = Field(32, ge=1, description="catalog rows per fetch batch when predicting from a "
                               "catalog (prepare fetches one shard per task)")
    max_concurrent_tasks: int | None = Field(None, ge=1, description="shard tasks running at once (default: the "
                                             "cluster's CPUs)")


class PromptConfig(_Section):
    """The question asked about each image and how the answer is written (see data/prompts.py)."""

    question: str = "What is shown in this image?"
    category_format: Literal["path", "leaf"] = "path"


class LoaderConfig(_Section):
    """The per-worker shard stream."""

    seed: int = 0
    shuffle_buffer: int = Field(64, ge=0, description="raw-sample shuffle buffer (0 = shard order only)")
    num_workers: int = Field(1, ge=0, description="DataLoader processes decoding images per training worker")


class BatchingConfig(_Section):
    """How training micro-batches are formed (see data/batching.py).

    pad: `train.micro_batch_size` samples, padded to the longest. length: samples of similar length from a
    look-ahead buffer, as many as fit `max_tokens` once padded. packed: samples concatenated into one row of
    at most `max_tokens`, attention kept inside each sample (no padding at all). Packing saves compute only
    with `model.attn_implementation=flash_attention_2` (varlen kernels): with sdpa the block-diagonal mask
    spans the whole row and attention costs as much as one sample of the row's length (on an H200, 15 to 27 %
    fewer tokens/s than pad, docs/performance.md); there, `length` removes the padding at no such cost.
    """

    mode: Literal["pad", "length", "packed"] = "pad"
    max_tokens: int | None = Field(None, ge=16, description="token budget of a micro-batch (length, packed)")
    lookahead: int = Field(64, ge=1, description="samples read ahead and grouped into micro-batches (length, packed)")


class DataConfig(_Section):
    catalog: CatalogConfig = Field(default_factory=CatalogConfig)
    images: ImageConfig = Field(default_factory=ImageConfig)
    shards: ShardConfig = Field(default_factory=ShardConfig)
    prompt: PromptConfig = Field(default_factory=PromptConfig)
    loader: LoaderConfig = Field(default_factory=LoaderConfig)
    batching: BatchingConfig = Field(default_factory=BatchingConfig)


# ---------------------------------------------------------------------------------------------- model

LoraTarget = Literal["language_attention", "language_mlp", "lm_head", "projector", "vision_tower"]


class LoraConfig(_Section):
    """PEFT LoRA. Targets are named presets (see models/loading.py); `extra_target_modules` adds raw names."""

    enabled: bool = True
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    targets: list[LoraTarget] = Field(default_factory=lambda: ["language_attention", "language_mlp"])
    extra_target_modules: list[str] = Field(default_factory=list)
    quantize_4bit: bool = Field(False, description="QLoRA: load the base model in 4-bit nf4 (CUDA only)")


class FreezeConfig(_Section):
    """What stays frozen in a full fine-tune (LoRA freezes the base model anyway, see models/loading.py)."""

    vision_tower: bool = True
    projector: bool = False
    embeddings: bool = False


class ModelConfig(_Section):
    name_or_path: str = Field("tiny-phi3v", description="'tiny-phi3v', a hub id or a local directory")
    random_init: bool = Field(False, description="the architecture of name_or_path with random weights (seeded by "
                              "train.seed): rehearsals and benchmarks at real size without the checkpoint")
    num_crops: int | None = Field(None, ge=1, le=16, description="HD crops per image (default: the model's)")
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] = "sdpa"
    gradient_checkpointing: bool = False
    compile: bool = Field(False, description="torch.compile every text decoder and CLIP encoder layer when "
                          "training (inductor; docs/performance.md: 1.27-1.45x img/s on an H200); ZeRO 0-2")
    max_length: int = Field(2048, ge=16, description="longest tokenised sample; longer ones are skipped")
    lora: LoraConfig = Field(default_factory=LoraConfig)
    freeze: FreezeConfig = Field(default_factory=FreezeConfig)


# ---------------------------------------------------------------------------------------------- train


class TrainConfig(_Section):
    seed: int = 0
    max_steps: int = Field(100, ge=1, description="optimizer steps")
    micro_batch_size: int = Field(2, ge=1, description="samples per worker per forward pass")
    grad_accum_steps: int = Field(1, ge=1, description="micro-batches per optimizer step at the largest worker "
                                  "count; an elastic run on fewer workers accumulates more (see train.loop)")
    lr: float = Field(2e-4, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0, description="cosine floor as a fraction of lr")
    warmup_steps: int = Field(10, ge=0)
    weight_decay: float = Field(0.0, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-7
    grad_clip: float = Field(1.0, ge=0.0, description="0 disables clipping")
    zero_stage: Literal[0, 1, 2, 3] = 2
    bf16: bool = False
    offload_optimizer: bool = Field(False, description="ZeRO-Offload of optimizer state to CPU")
    log_every: int = Field(10, ge=1)
    eval_every: int = Field(50, ge=0, description="steps between evals (0 = only at the end)")
    eval_on_start: bool = Field(True, description="a fresh run evaluates once before its first step, the baseline "
                                "of every curve (false saves one eval pass, as transformers' eval_on_start)")
    eval_batches: int = Field(4, ge=1, description="val batches per worker per eval")
    table_samples: int = Field(4, ge=0, description="val samples generated into the W&B table per eval")
    checkpoint_every: int = Field(50, ge=1)


# The GPU types the planner knows (train/metrics.py GPU_SPECS holds their peak and memory; a test keeps both equal).
GpuType = Literal["A100-40GB", "A100-80GB", "H100-SXM", "H100-PCIe", "H200", "L40S", "A10G", "L4"]


class ClusterConfig(_Section):
    """Ray Train scaling and run storage (RAY_ADDRESS, if set, picks the cluster)."""

    num_workers: int | tuple[int, int] = Field(
        2, description="Ray Train workers (one per GPU), or [min, max] for an elastic run: it starts once min fit, "
        "grows up to max as nodes join and continues on fewer (from the last checkpoint) when nodes leave")
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(1.0, gt=0)
    storage_path: str = "outputs/runs"
    run_name: str = "vlmtune"
    max_failures: int = Field(0, ge=-1, description="restarts from the latest checkpoint (-1 = unlimited)")
    keep_checkpoints: int = Field(2, ge=2, description="newest checkpoints kept; at least 2, so a resume can fall "
                                  "back to the one before when the newest was not completed")
    resume_from: str | None = Field(None, description="checkpoint directory to start a new run from")
    gpu_type: GpuType | None = Field(None, description="the GPU every worker gets, for the memory and time plan "
                                     "(jobs/train.py --plan; training checks it before launch when use_gpu)")
    gpu_memory_gb: float | None = Field(None, gt=0, description="usable memory per GPU in GiB (default: the "
                                        "gpu_type's, see train/metrics.py GPU_SPECS)")
    assumed_mfu: float = Field(0.4, gt=0, le=1, description="model FLOPs utilisation the plan assumes for step "
                               "time and GPU-hours")
    resize_interval_s: float = Field(60.0, ge=0, description="elastic runs: how often Ray considers growing the "
                                     "worker group when more workers would fit")

    @model_validator(mode="after")
    def _check_workers(self) -> ClusterConfig:
        low, high = self.worker_range
        if low < 1 or low > high:
            raise ValueError(f"num_workers: {list(self.worker_range)} is not a worker count or a [min, max] range "
                             "with 1 <= min <= max")
        return self

    @property
    def worker_range(self) -> tuple[int, int]:
        """(min, max) workers; equal for a fixed-size run."""
        n = self.num_workers
        return (n, n) if isinstance(n, int) else n


class TrackingConfig(_Section):
    mode: Literal["online", "offline", "disabled"] = "offline"
    project: str = "vlmtune"
    entity: str | None = None
    dir: str | None = Field(None, description="W&B files (default: the run directory)")
    tags: list[str] = Field(default_factory=list)


class ExportConfig(_Section):
    enabled: bool = True
    dir: str | None = Field(None, description="default: <storage_path>/<run_name>/export")
    merge_lora: bool = Field(True, description="merge LoRA into the base weights; False writes the adapter")
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    max_shard_size: str = Field("5GB", description="largest weight file; larger models are written as "
                                "model-0000k-of-0000n.safetensors + model.safetensors.index.json")


class EvalConfig(_Section):
    split: Literal["train", "val"] = "val"
    max_samples: int | None = Field(None, ge=1)
    batch_size: int = Field(8, ge=1)
    max_new_tokens: int = Field(64, ge=1)
    num_actors: int = Field(1, ge=1, description="model replicas (one per GPU when use_gpu)")
    output_dir: str = "outputs/eval"


class Config(_Section):
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @model_validator(mode="after")
    def _check_consistency(self) -> Config:
        lora = self.model.lora
        if lora.quantize_4bit and not lora.enabled:
            raise ValueError("model.lora.quantize_4bit needs model.lora.enabled=true (QLoRA trains adapters)")
        if lora.quantize_4bit and self.train.zero_stage == 3:
            raise ValueError("model.lora.quantize_4bit does not work with train.zero_stage=3; use stage 0 or 2")
        if self.model.compile and self.train.zero_stage == 3:
            raise ValueError("model.compile does not work with train.zero_stage=3: DeepSpeed's parameter gathering "
                             "splits every compiled layer into one graph per linear layer, slower than without "
                             "compiling; use stage 0 or 2, or model.compile=false")
        if lora.enabled and not (lora.targets or lora.extra_target_modules):
            raise ValueError("model.lora.enabled=true but no targets: set model.lora.targets")
        batching = self.data.batching
        if batching.mode != "pad":
            if batching.max_tokens is None:
                raise ValueError(f"data.batching.mode={batching.mode} needs data.batching.max_tokens (the token "
                                 "budget of a micro-batch)")
            if batching.max_tokens < self.model.max_length:
                raise ValueError(f"data.batching.max_tokens={batching.max_tokens} is below model.max_length="
                                 f"{self.model.max_length}: the longest sample would not fit a micro-batch")
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_yaml())
        return path


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b.c=value` → (['a','b','c'], value parsed as a YAML scalar or flow list/dict: `3`, `true`, `null`,
    `[x, y]`; anything else stays the literal string)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form section.key=value")
    key, raw = item.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"override {item!r} has an empty key")
    if not raw.strip():
        return parts, ""
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        return parts, raw
    # Only explicit [..] / {..} make collections; "Describe it: price?" stays a string.
    if isinstance(value, (dict, list)) and not raw.strip().startswith(("[", "{")):
        return parts, raw
    return parts, value


def _set_dotted(tree: dict, parts: list[str], value: Any, origin: str) -> None:
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{origin}: {'.'.join(parts[: i + 1])} is a value, not a section")
        node = child
    node[parts[-1]] = value


def _valid_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """The field names valid at `loc` (a pydantic error location) of the tree rooted at `model`."""
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        field = current.model_fields.get(part) if isinstance(current, type) else None
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        current = annotation
    return list(current.model_fields)


def _explain(err: ValidationError, origin: str) -> str:
    lines = [f"invalid configuration ({origin}):"]
    for e in err.errors():
        loc = tuple(e["loc"])
        dotted = ".".join(str(p) for p in loc) or "<root>"
        if e["type"] == "extra_forbidden":
            valid = _valid_keys(Config, loc[:-1])
            guess = difflib.get_close_matches(str(loc[-1]), valid, n=1)
            hint = f"; did you mean '{'.'.join([*map(str, loc[:-1]), guess[0]])}'?" if guess else ""
            lines.append(f"  unknown key '{dotted}'{hint} (valid here: {', '.join(valid)})")
        else:
            lines.append(f"  {dotted}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read YAML (or start from defaults), apply dotted overrides, validate.

    Raises ConfigError naming the file, the bad key and the closest valid key.
    """
    tree: dict = {}
    origin = "defaults"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from e
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        origin = str(path)
    for item in overrides:
        parts, value = parse_override(item)
        _set_dotted(tree, parts, value, f"override {item!r}")
    if overrides:
        origin += " + overrides " + " ".join(overrides)
    try:
        return Config.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_explain(e, origin)) from None
