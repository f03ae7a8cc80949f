"""Prompt/answer encoding with label masking, and batching."""

from __future__ import annotations

import copy

import pytest
import torch
from PIL import Image

from vlmtune.config import PromptConfig
from vlmtune.data.collate import IGNORE_INDEX, SampleEncoder, cat_rows, collate
from vlmtune.data.shards import SampleSkipped
from vlmtune.models.loading import load

META = {"id": "7", "title": "Honey Check Leather Tote", "category": ["Women", "Bags", "Tote Bags"],
        "full_price": 2650.0, "price": 2650.0, "currency": "USD"}


@pytest.fixture(scope="module")
def tiny():
    return load("tiny-phi3v")


@pytest.fixture(scope="module")
def processor(tiny):
    return tiny[1]


def sample(size=(120, 90)):
    return {"key": "k7", "image": Image.new("RGB", size, (200, 150, 60)), "meta": META}


def test_loss_only_on_the_answer(processor):
    out = SampleEncoder(processor, PromptConfig(), max_length=512)(sample())
    ids, labels = out["input_ids"], out["labels"]
    answered = labels != IGNORE_INDEX
    first = int(answered.nonzero()[0])
    assert not answered[:first].any() and answered[first:].all()
    tok = processor.tokenizer
    assert tok.decode(ids[first:]) == out["target"] + "<|end|>\n<|endoftext|>"
    assert torch.equal(labels[first:], ids[first:])
    prompt = tok.decode(ids[:first])
    assert prompt.startswith("<s><|user|>\n")
    assert prompt.endswith("What is shown in this image?<|end|>\n<|assistant|>\n")
    assert (ids[:first] == processor.image_token_id).sum() > 0
    assert out["pixel_values"].shape[:2] == (1, 5) and out["image_sizes"].shape == (1, 2)


def test_generation_prompt_has_no_answer(processor):
    out = SampleEncoder(processor, PromptConfig(), max_length=512, with_answer=False)(sample())
    assert "labels" not in out
    assert processor.tokenizer.decode(out["input_ids"]).endswith("<|assistant|>\n")


def test_a_new_product_without_labels_gets_a_prompt_but_nothing_to_learn(processor):
    new = {"key": "n1", "image": sample()["image"], "meta": {"id": "n1", "title": None, "category": None,
                                                               "full_price": None, "currency": "USD"}}
    out = SampleEncoder(processor, PromptConfig(), max_length=512, with_answer=False)(new)
    assert out["target"] == "" and processor.tokenizer.decode(out["input_ids"]).endswith("<|assistant|>\n")
    with pytest.raises(SampleSkipped, match="n1: no answer to learn"):
        SampleEncoder(processor, PromptConfig(), max_length=512)(new)


def test_too_long_samples_are_skipped(processor):
    with pytest.raises(SampleSkipped, match=r"tokens > model\.max_length=40"):
        SampleEncoder(processor, PromptConfig(), max_length=40)(sample())


def test_collate_pads_and_masks_by_length(processor):
    encoder = SampleEncoder(processor, PromptConfig(), max_length=512)
    a, b = encoder(sample((120, 90))), encoder(sample((60, 200)))
    a["input_ids"], a["labels"] = a["input_ids"][:-5], a["labels"][:-5]  # make lengths differ
    pad = processor.tokenizer.pad_token_id
    right = collate([a, b], pad)
    n = len(a["input_ids"])
    assert right["input_ids"].shape[1] == len(b["input_ids"]) > n and "attention_mask" not in right
    assert (right["labels"][0, n:] == IGNORE_INDEX).all() and (right["input_ids"][0, n:] == pad).all()
    assert right["pixel_values"].shape[0] == 2 and right["image_sizes"].tolist()[1] != right["image_sizes"].tolist()[0]
    prompts = [{k: v for k, v in s.items() if k != "labels"} for s in (a, b)]
    left = collate(prompts, pad, padding_side="left")
    assert left["attention_mask"][0, : left["input_ids"].shape[1] - n].sum() == 0
    assert torch.equal(left["input_ids"][0, -n:], a["input_ids"])
    # the real end-of-text token (== pad id) at the end of b stays visible
    assert left["input_ids"][1, -1] == pad and left["attention_mask"][1, -1] == 1


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_a_right_padded_training_batch_without_a_mask_gives_the_masked_loss_and_gradients(attn):
    """Causal attention keeps every real token away from the padding after it, so dropping the mask changes
    only the padding's outputs, which carry no loss: loss, gradients and the real tokens' logits stay."""
    model, processor = load("tiny-phi3v", attn_implementation=attn)
    encoder = SampleEncoder(processor, PromptConfig(), max_length=512)
    a, b = encoder(sample((120, 90))), encoder(sample((60, 200)))
    a["input_ids"], a["labels"] = a["input_ids"][:-7], a["labels"][:-7]
    batch = collate([a, b], processor.tokenizer.pad_token_id)
    real = torch.arange(batch["input_ids"].shape[1]) < torch.tensor([len(a["input_ids"]), len(b["input_ids"])])[:, None]
    assert not real.all()
    results = []
    for inputs in (batch, {**batch, "attention_mask": real.long()}):
        model.zero_grad()
        out = model(**inputs)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out.loss, out.logits[real], grads))
    (loss, logits, grads), (masked_loss, masked_logits, masked_grads) = results
    assert grads and grads.keys() == masked_grads.keys()
    torch.testing.assert_close(loss, masked_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(logits, masked_logits, rtol=1e-5, atol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, masked_grads[name], rtol=1e-5, atol=1e-6, msg=name)


def test_a_training_batch_builds_no_kv_cache_and_a_generation_batch_leaves_it_to_generate(tiny):
    model, processor = tiny
    encoder = SampleEncoder(processor, PromptConfig(), max_length=512)
    pad = processor.tokenizer.pad_token_id
    training = collate([encoder(sample()), encoder(sample((60, 200)))], pad)
    assert model.config.use_cache and training["use_cache"] is False
    with torch.no_grad():
        out = model(**training)
    assert out.loss is not None and out.get("past_key_values", out.get("cache")) is None
    prompts = [SampleEncoder(processor, PromptConfig(), max_length=512, with_answer=False)(sample())]
    assert "use_cache" not in collate(prompts, pad, padding_side="left")


def test_one_image_gives_exactly_the_single_image_prompt(processor):
    encoder = SampleEncoder(processor, PromptConfig(), max_length=512)
    assert encoder.prompt_text(1) == processor.apply_chat_template(
        [{"role": "user", "content": "<|image_1|>\nWhat is shown in this image?"}])
    one = encoder(sample())
    same = encoder({**sample(), "images": [sample()["image"]]})
    assert torch.equal(one["input_ids"], same["input_ids"]) and torch.equal(one["pixel_values"], same["pixel_values"])


def two_images(size=(120, 90)):
    return {"key": "k7", "meta": META,
            "images": [Image.new("RGB", size, (200, 150, 60)), Image.new("RGB", (60, 200), (20, 40, 160))]}


def test_two_images_fill_two_tags_in_order(processor):
    encoder = SampleEncoder(processor, PromptConfig(), max_length=1024)
    out = encoder(two_images())
    assert "<|image_1|>\n<|image_2|>\nWhat is shown in this image?" in encoder.prompt_text(2)
    assert out["pixel_values"].shape[0] == 2 and out["image_sizes"].shape == (2, 2)
    slots = int((out["input_ids"] == processor.image_token_id).sum())
    per_image = [processor.calc_num_image_tokens_from_image_size(w, h) for w, h in ((120, 90), (60, 200))]
    assert slots == sum(per_image)
    assert processor.tokenizer.decode(out["input_ids"][out["labels"] != IGNORE_INDEX]).startswith("Product: ")


def test_batches_mixing_one_and_two_image_samples_stay_aligned_and_train(tiny):
    """collate concatenates images sample after sample; the model fills each row's slots with that row's
    images, and a few optimizer steps on such a batch bring its loss down."""
    model, processor = tiny
    encoder = SampleEncoder(processor, PromptConfig(), max_length=1024)
    batch = collate([encoder(two_images()), encoder(sample((80, 80)))], processor.tokenizer.pad_token_id)
    assert batch["pixel_values"].shape[0] == 3
    assert model.images_by_row(batch["input_ids"], batch["image_sizes"]) == [[0, 1], [2]]
    model = copy.deepcopy(model).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(6):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_cat_rows_takes_a_view_of_rows_that_lie_back_to_back_and_copies_otherwise():
    block = torch.arange(4 * 2 * 3, dtype=torch.float32)
    rows = [block[i * 6 : (i + 1) * 6].view(1, 2, 3) for i in range(4)]
    whole = cat_rows(rows)
    assert torch.equal(whole, torch.cat(rows)) and whole.data_ptr() == block.data_ptr()
    assert cat_rows(rows[1:3]).data_ptr() == rows[1].data_ptr()
    for others in ([rows[1], rows[0]], [rows[0], rows[2]], [rows[0], rows[1].clone()]):
        joined = cat_rows(others)
        assert torch.equal(joined, torch.cat(others)) and joined.data_ptr() != block.data_ptr()
    mixed = cat_rows([torch.zeros(2, 3), torch.ones(1, 3)])
    assert mixed.tolist() == [[0, 0, 0], [0, 0, 0], [1, 1, 1]]
