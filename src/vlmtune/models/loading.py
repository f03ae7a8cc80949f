"""Load Phi-3-Vision models and processors, add LoRA adapters, freeze parts for full fine-tuning.

One entry point, `load(name_or_path)`, serves every place a model is needed:

- `"tiny-phi3v"`: a seeded random model of a few hundred thousand parameters with a byte-level tokenizer,
  built in code. Tests, CPU smoke runs and CI use it; it has the exact structure of the real model.
- an official hub id or a local directory with `config.json`: `from_pretrained`, official key layout.
- a directory holding a PEFT adapter: its base model (from `adapter_config.json`) plus the adapter.
- `random_init=True` with an official id: the real-size architecture from the embedded official config
  with random weights, for benchmarks and rehearsals without downloading 8 GB.

Random weights depend only on (config, seed, dtype): each module is initialised from its own generator,
seeded by the seed and the module's name, so a model built partitioned under ZeRO-3 holds exactly the
weights of one built whole (export rebuilds the base of a random-init run that way).

`prepare_model(cfg.model)` is what training (and export, which rebuilds the trained model) calls: `load`,
then 4-bit quantisation for QLoRA, gradient checkpointing, and LoRA adapters or the full fine-tune freeze
policy. Given a ZeRO-3 DeepSpeed config, it builds the model partitioned as it is built
(`deepspeed.zero.Init`): no rank ever holds the whole model, which is what lets a 4.2B-parameter model train
on workers that could not hold two copies of it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import unittest.mock
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init

from vlmtune.errors import ModelError

from .phi3v import Phi3VConfig, Phi3VForCausalLM, Phi3VImageProcessor, Phi3VProcessor
from .phi3v.presets import OFFICIAL_CONFIGS, OFFICIAL_PREPROCESSORS
from .phi3v.tokenizer import build_tiny_tokenizer

if TYPE_CHECKING:
    from vlmtune.config import FreezeConfig, LoraConfig, ModelConfig

logger = logging.getLogger(__name__)

TINY = "tiny-phi3v"
ADAPTER_CONFIG = "adapter_config.json"

# Module-name patterns per LoRA preset (full names, as PEFT matches them with re.fullmatch). Anchored on
# the top-level path so language presets never reach CLIP's layers and vice versa.
_VISION = r"model\.vision_embed_tokens\.img_processor\.vision_model\.encoder\.layers"
LORA_PRESETS: dict[str, str] = {
    "language_attention": r"model\.layers\.\d+\.self_attn\.(?:qkv_proj|o_proj)",
    "language_mlp": r"model\.layers\.\d+\.mlp\.(?:gate_up_proj|down_proj)",
    "lm_head": r"lm_head",
    "projector": r"model\.vision_embed_tokens\.img_projection\.(?:0|2)",
    "vision_tower": _VISION + r"\.(?:{layers})\.(?:self_attn\.(?:q_proj|k_proj|v_proj|out_proj)|mlp\.(?:fc1|fc2))",
}


def tiny_config(tokenizer: Any, original_max_position_embeddings: int = 4096) -> Phi3VConfig:
    """The tiny architecture: 56-px tiles of 4x4 patches, CLIP width 32, text width 64, LongRoPE on.

    RoPE lengths are the real model's (4096 → 131072), so training and generation of catalog-sized samples
    stay on the short factors, as they do at real size. Tests of the short/long switch pass a small
    `original_max_position_embeddings`.
    """
    return Phi3VConfig(
        architectures=["Phi3VForCausalLM"],
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32 * original_max_position_embeddings,
        original_max_position_embeddings=original_max_position_embeddings,
        rope_scaling={
            "type": "su",
            "short_factor": [1.0 + 0.125 * i for i in range(16)],
            "long_factor": [1.0 + 0.5 * i for i in range(16)],
        },
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        image_token_id=tokenizer.convert_tokens_to_ids("<|image|>"),
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 56,
            "patch_size": 14,
            "hidden_act": "quick_gelu",
            "layer_norm_eps": 1e-5,
            "projection_dim": 32,
        },
    )


def load(
    name_or_path: str | Path,
    *,
    num_crops: int | None = None,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
    random_init: bool = False,
    seed: int = 0,
    device: str | torch.device | None = None,
    quantize_4bit: bool = False,
) -> tuple[nn.Module, Phi3VProcessor]:
    """(model, processor) for a name (see the module docstring); `num_crops` overrides the processor's.

    `seed` only matters for random weights (tiny or `random_init`); `device` builds random weights in
    place (e.g. "cuda", or "meta" for shape checks) and moves loaded ones there. `quantize_4bit` loads a
    pretrained checkpoint's language model in 4-bit NF4 for QLoRA (see `quantization_config`).
    """
    name = str(name_or_path)
    if quantize_4bit and (name == TINY or random_init):
        raise ModelError("quantize_4bit (QLoRA) applies to pretrained checkpoints, not random weights")
    options = {"attn_implementation": attn_implementation, "dtype": dtype, "seed": seed, "device": device}
    if name == TINY:
        tokenizer = build_tiny_tokenizer()
        config = tiny_config(tokenizer)
        config.name_or_path = TINY
        image_processor = Phi3VImageProcessor(
            num_crops=num_crops or 4,
            num_img_tokens=config.tokens_per_side**2,
            tile_size=config.vision_config.image_size,
        )
        processor = Phi3VProcessor(image_processor, tokenizer, image_token_id=config.image_token_id)
        return _random_model(config, **options), processor

    path = Path(name)
    if (path / ADAPTER_CONFIG).is_file():
        return _load_adapter(path, num_crops=num_crops, random_init=random_init, **options)
    if random_init:
        if name in OFFICIAL_CONFIGS:
            config = Phi3VConfig.from_dict(dict(OFFICIAL_CONFIGS[name]))
        else:
            config = Phi3VConfig.from_pretrained(name)
        config.name_or_path = name
        return _random_model(config, **options), _processor_for_random(name, config, num_crops)

    extra = {"quantization_config": quantization_config(dtype), "device_map": {"": torch.cuda.current_device()}} \
        if quantize_4bit else {}
    try:
        model = Phi3VForCausalLM.from_pretrained(name, dtype=dtype, attn_implementation=attn_implementation, **extra)
        processor = Phi3VProcessor.from_pretrained(name, num_crops=num_crops)
    except OSError as e:  # not a directory, not on the hub, or the hub is unreachable
        raise ModelError(f"cannot load model {name!r}: {e}") from e
    if device is not None and not quantize_4bit:
        model.to(device)
    processor.image_token_id = model.config.image_token_id  # the model decides which id it reads as a slot
    return model, processor


def quantization_config(compute_dtype: torch.dtype):
    """QLoRA: NF4 with double quantisation for the language model's linear layers; CLIP, the projector and
    lm_head stay in `compute_dtype` (they are small, and the vision tower is sensitive to quantisation)."""
    if not torch.cuda.is_available():
        raise ModelError("model.lora.quantize_4bit (QLoRA) needs CUDA GPUs (bitsandbytes 4-bit kernels)")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ModelError("model.lora.quantize_4bit needs bitsandbytes: pip install 'vlmtune[qlora]'") from None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype, bnb_4bit_quant_storage=compute_dtype,
                              llm_int8_skip_modules=["img_processor", "img_projection", "lm_head"])


def _random_model(
    config: Phi3VConfig,
    *,
    attn_implementation: str,
    dtype: torch.dtype,
    seed: int,
    device: str | torch.device | None,
) -> Phi3VForCausalLM:
    """Random weights, identical for identical (config, seed, dtype), partitioned or not (see `seeded_init`);
    the global RNG is left untouched. Under ZeRO-3 (a live `HfDeepSpeedConfig`, see `zero3_construction`)
    transformers builds the model inside `deepspeed.zero.Init`."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    # Built without drawing weights: seeded_init draws them once. (Under ZeRO-3 transformers builds without
    # drawing, then draws every module's weights on rank 0 through gathers; that pass is skipped too.)
    if device == "meta":
        skip_init = contextlib.nullcontext()
    elif is_deepspeed_zero3_enabled():
        import transformers.integrations.deepspeed as hf_deepspeed

        skip_init = unittest.mock.patch.object(hf_deepspeed, "initialize_weights_zero3", lambda model: None) \
            if hasattr(hf_deepspeed, "initialize_weights_zero3") else contextlib.nullcontext()
    else:
        skip_init = init.no_init_weights()
    with torch.random.fork_rng(devices=[]), torch.device(device or "cpu"), skip_init:
        torch.manual_seed(seed)
        model = Phi3VForCausalLM._from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    if device != "meta":
        seeded_init(model, seed)
    return model.eval()


def _module_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & (2**63 - 1)


@torch.no_grad()
def seeded_init(model: PreTrainedModel, seed: int) -> None:
    """Initialise every module with the model's own rule (`_init_weights`), each from a generator seeded by
    (seed, module name): the weights do not depend on the order in which modules are visited nor on where
    they live. Under ZeRO-3 each module's parameters are gathered, one rank draws them (the ranks take
    turns), and DeepSpeed partitions them again."""
    partitioned = any(hasattr(p, "ds_id") for p in model.parameters())
    rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if partitioned else (0, 1)
    if partitioned:
        import deepspeed
    for i, (name, module) in enumerate(model.named_modules()):
        params = list(module.parameters(recurse=False))
        for child in module.children():  # `_init_weights` may set a direct child's parameters
            if not isinstance(child, PreTrainedModel):
                params += list(child.parameters(recurse=False))
        for tensor in [*params, *module.buffers(recurse=False)]:
            if hasattr(tensor, "_is_hf_initialized"):
                del tensor._is_hf_initialized
        drawer = i % world  # ranks take turns: the draws are spread over them
        gathered = deepspeed.zero.GatheredParameters(params, modifier_rank=drawer) if partitioned and params \
            else contextlib.nullcontext()
        with gathered:
            if rank == drawer or not params:  # buffers (not partitioned) are set on every rank
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(_module_seed(seed, name))
                    model._init_weights(module)


def _processor_for_random(name: str, config: Phi3VConfig, num_crops: int | None) -> Phi3VProcessor:
    """The real processor if it is cached; else the official image processor with the byte-level tokenizer.

    Random weights do not care which tokenizer produced the ids, so benchmarks keep working offline.
    """
    try:
        processor = Phi3VProcessor.from_pretrained(name, num_crops=num_crops, local_files_only=True)
    except (OSError, ValueError):
        if name not in OFFICIAL_PREPROCESSORS:
            raise
        logger.warning("%s: tokenizer not available offline; using the byte-level tokenizer", name)
        image_processor = Phi3VImageProcessor(**OFFICIAL_PREPROCESSORS[name])
        if num_crops is not None:
            image_processor.num_crops = num_crops
        processor = Phi3VProcessor(image_processor, build_tiny_tokenizer())
    processor.image_token_id = config.image_token_id
    return processor


def _load_adapter(path: Path, **options: Any) -> tuple[PeftModel, Phi3VProcessor]:
    """Base model named in `adapter_config.json` + the adapter; the directory's processor if it has one.

    The adapter is loaded for inference (frozen), as PEFT does by default.
    """
    base = json.loads((path / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    if not base:
        raise ModelError(f"{path / ADAPTER_CONFIG} does not name its base model (base_model_name_or_path)")
    model, processor = load(base, **options)
    model = PeftModel.from_pretrained(model, path)
    if (path / "preprocessor_config.json").is_file():
        processor = Phi3VProcessor.from_pretrained(path, num_crops=options["num_crops"])
        processor.image_token_id = model.config.image_token_id
    return model, processor


def prepare_model(cfg: ModelConfig, dtype: torch.dtype, seed: int = 0, random_init: bool | None = None,
                  device: str | torch.device | None = None,
                  deepspeed_config: dict | None = None) -> tuple[nn.Module, Phi3VProcessor]:
    """The model a run trains: load (4-bit for QLoRA), gradient checkpointing, then LoRA (base frozen) or the
    full fine-tune freeze policy. Export calls it too, to rebuild exactly what a checkpoint's run trained.
    `random_init` (default: `cfg.random_init`) builds the architecture with random weights.

    `deepspeed_config`: the run's DeepSpeed config. Under ZeRO-3 the model is built partitioned across the
    ranks as it is built (the process group must exist): parameters are DeepSpeed's placeholders (`ds_id`,
    `ds_numel`, empty local data), loaded or initialised through gathers, and LoRA adapters added
    afterwards are partitioned by `deepspeed.initialize`. The returned model keeps transformers' ZeRO-3
    switch (`HfDeepSpeedConfig`) alive, as generation and saving under ZeRO-3 need it.
    """
    random_init = cfg.random_init if random_init is None else random_init
    qlora = cfg.lora.enabled and cfg.lora.quantize_4bit
    with zero3_construction(None if qlora else deepspeed_config) as zero3:
        model, processor = load(cfg.name_or_path, num_crops=cfg.num_crops, dtype=dtype, random_init=random_init,
                                device=device, attn_implementation=cfg.attn_implementation, seed=seed,
                                quantize_4bit=qlora)
    if qlora:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    elif cfg.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model = apply_lora(model, cfg.lora) if cfg.lora.enabled else apply_freeze(model, cfg.freeze)
    if zero3 is not None:
        model._vlmtune_zero3 = zero3  # transformers holds only a weak reference
    return model, processor


@contextlib.contextmanager
def zero3_construction(deepspeed_config: dict | None):
    """Within: models built by transformers (`from_pretrained`, `_from_config`) are partitioned as they are
    built (`deepspeed.zero.Init`), when `deepspeed_config` is a ZeRO-3 config; yields the `HfDeepSpeedConfig`
    that must stay alive as long as the model (None otherwise)."""
    stage = ((deepspeed_config or {}).get("zero_optimization") or {}).get("stage", 0)
    if stage != 3:
        yield None
        return
    from transformers.integrations import HfDeepSpeedConfig

    yield HfDeepSpeedConfig(deepspeed_config)


def compile_layers(model: nn.Module) -> int:
    """`torch.compile` every Phi-3 decoder layer and CLIP encoder layer in place (LoRA-wrapped ones too), as
    torchtune compiles its transformer layers; returns how many modules were compiled. Compiling happens on
    first use.

    Why layers and not the whole model: the layers are where the time goes, they are all alike (one graph
    serves every layer of a class), and the code around them (image slots, the loss, DeepSpeed's hooks) stays
    eager. On an H200 an eager step spent a quarter to two fifths of its device time in unfused elementwise
    kernels (RMSNorm, rotary embeddings, SwiGLU, residual adds), which inductor fuses (docs/performance.md).

    With gradient checkpointing, each layer's attention and MLP blocks are compiled instead: transformers
    checkpoints inside the layer's own forward, and inductor refuses to recompute a region holding sdpa's
    attention kernel (an op that may draw random numbers, for dropout) inside a compiled graph. Around the
    blocks, the checkpoint stays outside every graph and simply calls them again; the norms and residual
    adds between the blocks then run eagerly.

    Every compiled module runs through one code object (`nn.Module._call_impl`), and dynamo keeps at most
    `recompile_limit` graphs per code object (8) before it falls back to eager for good: two layer classes,
    a static then a dynamic length, training and no-grad evaluation, padded and packed batches pass that, so
    the limit is raised. Generation runs eagerly (see eval/generate.py)."""
    from transformers.models.clip.modeling_clip import CLIPEncoderLayer
    from transformers.models.phi3.modeling_phi3 import Phi3DecoderLayer

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    layers = [m for m in model.modules() if isinstance(m, Phi3DecoderLayer | CLIPEncoderLayer)]
    compiled = layers
    if any(layer.gradient_checkpointing for layer in layers):
        compiled = [block for layer in layers for block in (layer.self_attn, layer.mlp)]
    for module in compiled:
        module.compile()
    return len(compiled)


# ------------------------------------------------------------------------------------------------ LoRA


def lora_target_pattern(model: nn.Module, targets: Sequence[str], extra_target_modules: Sequence[str] = ()) -> str:
    """One regex (PEFT full-matches it) for the preset `targets` plus raw module names.

    Raw names follow PEFT's list semantics (the name or a dotted suffix of it). Every preset and raw name
    must match at least one module, so a typo or an architecture change fails here, not silently.
    """
    names = [name for name, _ in model.named_modules()]
    linear = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    parts = []
    for target in targets:
        if target not in LORA_PRESETS:
            raise ModelError(f"unknown LoRA target preset {target!r}; known: {sorted(LORA_PRESETS)}")
        pattern = LORA_PRESETS[target]
        if target == "vision_tower":
            pattern = pattern.format(layers="|".join(map(str, range(vision_tower(model).num_layers_used))))
        if not any(re.fullmatch(pattern, name) for name in linear):
            raise ModelError(f"LoRA target preset {target!r} matches no linear layer of {type(model).__name__}")
        parts.append(pattern)
    for raw in extra_target_modules:
        pattern = rf"(?:.*\.)?{re.escape(raw)}"
        if not any(re.fullmatch(pattern, name) for name in names):
            raise ModelError(f"LoRA extra target module {raw!r} matches no module of {type(model).__name__}")
        parts.append(pattern)
    if not parts:
        raise ModelError("no LoRA targets: set targets or extra_target_modules")
    return "|".join(f"(?:{p})" for p in parts)


def apply_lora(model: Phi3VForCausalLM, lora_cfg: LoraConfig) -> PeftModel:
    """Wrap `model` with LoRA adapters on the configured targets; everything else is frozen."""
    pattern = lora_target_pattern(model, lora_cfg.targets, lora_cfg.extra_target_modules)
    peft_config = PeftLoraConfig(
        r=lora_cfg.r,
        lora_alpha=lora_cfg.alpha,
        lora_dropout=lora_cfg.dropout,
        target_modules=pattern,
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, peft_config)


def vision_tower(model: nn.Module) -> nn.Module:
    """The CLIP transformer inside `model` (plain or PEFT-wrapped)."""
    for name, module in model.named_modules():
        if name.endswith("img_processor.vision_model"):
            return module
    raise ValueError(f"{type(model).__name__} has no vision tower")


# ------------------------------------------------------------------------------------------- freezing


def parameter_group(name: str) -> str:
    """Group of a parameter name (works on plain and PEFT-wrapped models)."""
    if ".lora_" in name:
        return "lora"
    name = name.removeprefix("base_model.model.")
    if name.startswith("model.vision_embed_tokens.img_processor."):
        return "vision_tower"
    if name.startswith("model.vision_embed_tokens."):
        return "projector"  # img_projection and the glb_GN / sub_GN separators
    if name.startswith("model.embed_tokens."):
        return "embeddings"
    if name.startswith("lm_head."):
        return "lm_head"
    return "language_model"


def apply_freeze(model: Phi3VForCausalLM, freeze_cfg: FreezeConfig) -> Phi3VForCausalLM:
    """Full fine-tuning policy: train everything except the groups `freeze_cfg` names.

    Groups are disjoint by parameter name, so freezing the vision tower never touches the text embedding
    (the official module shares `embed_tokens` inside `vision_embed_tokens`, and freezing that module
    froze both). The CLIP layers past the feature layer stay frozen: they never run.
    """
    frozen = {
        "vision_tower": freeze_cfg.vision_tower,
        "projector": freeze_cfg.projector,
        "embeddings": freeze_cfg.embeddings,
    }
    tower = vision_tower(model)
    unused_modules = [*tower.encoder.layers[tower.num_layers_used :], tower.post_layernorm]
    unused = {id(p) for m in unused_modules for p in m.parameters()}
    for name, param in model.named_parameters():
        param.requires_grad_(not frozen.get(parameter_group(name), False) and id(param) not in unused)
    return model


def trainable_parameter_summary(model: nn.Module) -> dict[str, dict[str, int]]:
    """{group: {"trainable": n, "total": n}} for the groups present, plus "all"."""
    summary: dict[str, dict[str, int]] = {}
    for name, param in model.named_parameters():
        numel = getattr(param, "ds_numel", param.numel())  # ZeRO-3 keeps the full size aside
        for group in (parameter_group(name), "all"):
            counts = summary.setdefault(group, {"trainable": 0, "total": 0})
            counts["total"] += numel
            counts["trainable"] += numel if param.requires_grad else 0
    return summary
