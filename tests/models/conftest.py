"""Shared fixtures: the tiny model (fresh per test, it builds in milliseconds) and synthetic images."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vlmtune.models.loading import load

DATA = Path(__file__).parent / "data"


@pytest.fixture
def tiny():
    """(model, processor) of "tiny-phi3v", eval mode, fp32, sdpa."""
    return load("tiny-phi3v")


@pytest.fixture
def tiny_rope_switch():
    """The tiny model with original_max_position_embeddings=64: test prompts cross the LongRoPE switch."""
    from vlmtune.models.loading import tiny_config
    from vlmtune.models.phi3v import Phi3VForCausalLM

    _, processor = load("tiny-phi3v")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Phi3VForCausalLM._from_config(tiny_config(processor.tokenizer, original_max_position_embeddings=64),
                                              attn_implementation="sdpa")
    return model.eval(), processor


@pytest.fixture
def make_image() -> Callable[..., Image.Image]:
    """Random RGB noise image of a given size (seeded), so every crop differs from every other."""

    def make(width: int, height: int, seed: int = 0) -> Image.Image:
        pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        return Image.fromarray(pixels)

    return make


@pytest.fixture
def official_configs() -> dict[str, dict]:
    """The published config.json files, keyed by hub id."""
    return {
        "microsoft/Phi-3-vision-128k-instruct": json.loads(
            (DATA / "phi3_vision_128k_instruct.config.json").read_text()
        ),
        "microsoft/Phi-3.5-vision-instruct": json.loads((DATA / "phi35_vision_instruct.config.json").read_text()),
    }
