"""Throughput, model FLOPs utilisation and memory of a training step.

FLOPs follow the usual matmul accounting (2 FLOPs per parameter per token forward, plus causal
attention). The backward pass costs 2× the forward when weights get gradients and 1× when only
activations do (frozen weights under LoRA: adapters are negligible). The vision tower runs on every
real crop (global view + hc·wc tiles) and gets a backward pass only if something in it trains.
"""

from __future__ import annotations

import math
import re
import resource
import sys
import time
from dataclasses import dataclass

import torch

from vlmtune.models.loading import vision_tower

# Dense bf16 tensor-core peaks (TFLOP/s) from the vendors' data sheets; matched on the device name (first match).
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0,
                    "L4": 121.0, "A6000": 155.0, "V100": 125.0}


@dataclass(frozen=True)
class GpuSpec:
    peak_bf16_tflops: float  # dense (no 2:4 sparsity)
    memory_gib: float  # what the driver reports as total memory (nvidia-smi), in GiB


# The GPU types of `cluster.gpu_type` (config.GpuType). Peaks are the data sheets' dense BF16 tensor figures (the
# sheets print the 2:4-sparse figure, twice these, with an asterisk); memory is the card's total as the driver
# reports it. Sources: NVIDIA A100 data sheet (nvidia-a100-datasheet-us-nvidia-1758950-r4), H100 data sheet
# (SXM 989 / PCIe 756 TFLOPS, 80 GB), H200 product page (141 GB HBM3e, same compute as H100 SXM), L40S data sheet
# (362 TFLOPS, 48 GB), A10 data sheet (125 TFLOPS, 24 GB; AWS's A10G is listed at the A10's figures here and
# is likely slower, its clocks are lower), L4 data sheet (121 TFLOPS, 24 GB).
GPU_SPECS: dict[str, GpuSpec] = {
    "A100-40GB": GpuSpec(312.0, 40.0),
    "A100-80GB": GpuSpec(312.0, 80.0),
    "H100-SXM": GpuSpec(989.0, 79.6),
    "H100-PCIe": GpuSpec(756.0, 79.6),
    "H200": GpuSpec(989.0, 140.4),
    "L40S": GpuSpec(362.0, 45.0),
    "A10G": GpuSpec(125.0, 22.5),
    "L4": GpuSpec(121.0, 22.5),
}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None


@dataclass(frozen=True)
class FlopCounter:
    text_params: int  # decoder + lm_head matmul weights (embedding lookups are free)
    text_layers: int
    text_hidden: int
    vision_params: int
    vision_tokens: int  # tokens per crop, CLS included
    vision_layers: int
    vision_hidden: int
    text_weights_train: bool
    vision_backward: bool
    tile: int

    @classmethod
    def for_model(cls, model: torch.nn.Module) -> FlopCounter:
        """Read sizes and what trains from a (possibly PEFT-wrapped, possibly ZeRO-3-partitioned)
        Phi3VForCausalLM. Only the CLIP layers up to the feature layer run, so only they count."""
        config = model.config
        vcfg = config.vision_config
        used = vision_tower(model).num_layers_used
        text_params = vision_params = 0
        text_weights_train = vision_backward = False
        for name, p in model.named_parameters():
            shape = getattr(p, "ds_shape", p.shape)  # ZeRO-3 keeps the full shape aside
            matmul = len(shape) >= 2 and "lora_" not in name
            if "img_processor" in name:
                layer = re.search(r"encoder\.layers\.(\d+)\.", name)
                runs = "post_layernorm" not in name and (layer is None or int(layer.group(1)) < used)
                vision_params += math.prod(shape) if matmul and runs else 0
                vision_backward |= p.requires_grad
            elif matmul and "embed_tokens" not in name and "vision_embed" not in name:
                text_params += math.prod(shape)
                text_weights_train |= p.requires_grad
        return cls(text_params, config.num_hidden_layers, config.hidden_size, vision_params,
                   (vcfg.image_size // vcfg.patch_size) ** 2 + 1, used, vcfg.hidden_size,
                   text_weights_train, vision_backward, vcfg.image_size)

    def step_flops(self, lengths: list[int], image_sizes: torch.Tensor) -> float:
        """FLOPs of one forward+backward over samples of these token counts (attention stays within each
        sample, packed or not) and these images (HD sizes, as the processor returns them)."""
        lengths = torch.tensor(lengths, dtype=torch.float64)
        tokens = float(lengths.sum())
        attention = float((2 * self.text_layers * self.text_hidden * lengths**2).sum())  # causal: QK^T + AV, halved
        text_fwd = 2 * self.text_params * tokens + attention
        crops = float(((image_sizes[:, 0] // self.tile) * (image_sizes[:, 1] // self.tile) + 1).sum())
        vis_tokens = crops * self.vision_tokens
        vis_fwd = 2 * self.vision_params * vis_tokens + 4 * self.vision_layers * self.vision_hidden * crops * (
            self.vision_tokens**2)
        return text_fwd * (3 if self.text_weights_train else 2) + vis_fwd * (3 if self.vision_backward else 1)


class Throughput:
    """Accumulates samples, tokens and FLOPs between two `snapshot()` calls."""

    def __init__(self, device: torch.device, world_size: int):
        self.device = device
        self.world_size = world_size
        self.peak = peak_flops(device)
        self.reset()

    def reset(self) -> None:
        self.start = time.perf_counter()
        self.samples = self.tokens = self.image_tokens = self.positions = 0
        self.flops = 0.0

    def add(self, samples: int, tokens: int, image_tokens: int, positions: int, flops: float) -> None:
        """`tokens` real tokens, `image_tokens` of them image slots, over `positions` input positions (padding
        included)."""
        self.samples += samples
        self.tokens += tokens
        self.image_tokens += image_tokens
        self.positions += positions
        self.flops += flops

    def snapshot(self) -> dict:
        """Rates since the last snapshot: throughput for the whole cluster (this rank's × world size, ranks
        run in lockstep), TFLOP/s and MFU per worker, and the share of input positions that were padding."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = max(time.perf_counter() - self.start, 1e-9)
        scale = self.world_size / seconds
        stats = {"samples_per_s": self.samples * scale, "tokens_per_s": self.tokens * scale,
                 "image_tokens_per_s": self.image_tokens * scale,
                 "text_tokens_per_s": (self.tokens - self.image_tokens) * scale,
                 "padding_share": 1 - self.tokens / self.positions if self.positions else 0.0,
                 "tflops_per_worker": self.flops / seconds / 1e12}
        if self.peak:
            stats["mfu"] = self.flops / seconds / self.peak
        stats.update(memory_stats(self.device))
        self.reset()
        return stats


def memory_stats(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"gpu_mem_alloc_gb": torch.cuda.max_memory_allocated(device) / 2**30,
                "gpu_mem_reserved_gb": torch.cuda.max_memory_reserved(device) / 2**30}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"cpu_max_rss_gb": rss / (2**30 if sys.platform == "darwin" else 2**20)}
