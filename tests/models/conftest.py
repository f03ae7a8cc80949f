"""Shared fixtures: the tiny model (fresh per test, it builds in milliseconds) and synthetic images."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlmtune.models.loading import load

DATA = Path(__file__).parent / "data"


@pytest.fixture
def tiny():
    """(model, processor) of "tiny-phi3v", eval mode, fp32, sdpa."""
    return load("tiny-phi3v")


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
