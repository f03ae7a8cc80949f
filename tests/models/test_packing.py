"""Packed rows are exact: each sample's loss in a packed row equals its loss alone (fp32, CPU), on both sides
of the LongRoPE switch; and the rule that keeps the two sides apart is needed."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vlmtune.config import PromptConfig
from vlmtune.data.collate import SampleEncoder, pack

TITLES = ["Tote", "Vintage Check Cotton Scarf", "Horseferry Print Cotton T-shirt in Black", "Trench", "Belt",
          "Quilted Leather Crossbody Bag with Chain Strap and Monogram Motif"]


def samples(processor, make_image) -> list[dict]:
    encoder = SampleEncoder(processor, PromptConfig(), max_length=4096)
    sizes = [(60, 40), (120, 50), (40, 100), (200, 200), (56, 56), (90, 140)]
    return [encoder({"key": str(i), "image": make_image(*size, seed=i),
                     "meta": {"id": str(i), "title": title, "category": ["Women", "Bags"], "full_price": 100.0 * i + 5,
                              "currency": "USD"}})
            for i, (title, size) in enumerate(zip(TITLES, sizes, strict=True))]


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of one sample's answer tokens (logits and labels of that sample only)."""
    return F.cross_entropy(logits[:-1].float(), labels[1:], ignore_index=-100, reduction="sum")


@torch.no_grad()
def alone(model, sample: dict) -> float:
    out = model(input_ids=sample["input_ids"][None], pixel_values=sample["pixel_values"],
                image_sizes=sample["image_sizes"])
    return token_losses(out.logits[0], sample["labels"]).item()


@torch.no_grad()
def in_a_row(model, row: list[dict]) -> list[float]:
    batch = pack(row)
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[0]
    losses, start = [], 0
    for sample in row:
        n = len(sample["input_ids"])
        losses.append(token_losses(logits[start : start + n], sample["labels"]).item())
        start += n
    return losses


def test_packed_losses_equal_each_sample_alone(tiny, make_image):
    model, processor = tiny
    encoded = samples(processor, make_image)
    for row in (encoded[:3], encoded[3:], encoded):
        assert in_a_row(model, row) == pytest.approx([alone(model, s) for s in row], rel=1e-5, abs=1e-5)


@pytest.fixture
def switch_at_136():
    """The tiny model with its LongRoPE switch among the test samples' lengths (126–189 tokens)."""
    from vlmtune.models.loading import load, tiny_config
    from vlmtune.models.phi3v import Phi3VForCausalLM

    _, processor = load("tiny-phi3v")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        config = tiny_config(processor.tokenizer, original_max_position_embeddings=136)
        model = Phi3VForCausalLM._from_config(config, attn_implementation="sdpa")
    return model.eval(), processor


def test_packing_past_the_longrope_switch_is_exact_when_the_sides_stay_apart(switch_at_136, make_image):
    model, processor = switch_at_136
    switch = model.config.original_max_position_embeddings
    encoded = samples(processor, make_image)
    long = [s for s in encoded if len(s["input_ids"]) > switch]
    short = [s for s in encoded if len(s["input_ids"]) <= switch]
    assert len(long) >= 2 and len(short) >= 2, [len(s["input_ids"]) for s in encoded]
    worst = 0.0
    for row in (long, short):
        packed, single = in_a_row(model, row), [alone(model, s) for s in row]
        assert packed == pytest.approx(single, rel=1e-5, abs=1e-5)
        worst = max(worst, *(abs(a - b) for a, b in zip(packed, single, strict=True)))
    # mixed, the short sample would get the long factors (what data/batching.py prevents): a real difference,
    # two orders of magnitude above the float noise of the exact rows
    mixed = in_a_row(model, [short[0], long[0]])[0]
    assert abs(mixed - alone(model, short[0])) > 100 * max(worst, 1e-6)


def test_the_model_loss_over_a_packed_row_is_the_token_mean(tiny, make_image):
    model, processor = tiny
    row = samples(processor, make_image)[:4]
    batch = pack(row)
    tokens = sum(int((s["labels"] != -100).sum()) for s in row)
    with torch.no_grad():
        loss = model(**batch).loss.item()
        summed = model(**batch, num_items_in_batch=torch.tensor(1.0)).loss.item()
    assert loss == pytest.approx(sum(alone(model, s) for s in row) / tokens, rel=1e-5)
    assert summed == pytest.approx(loss * tokens, rel=1e-5)
