"""Phi3VProcessor: tag expansion, per-chunk BOS, validation, batching, chat template, save/load."""

from __future__ import annotations

import json

import pytest
import torch

from vlmtune.models.phi3v import Phi3VProcessor

PHI3V_TEMPLATE = (
    "{% for message in messages %}{{'<|' + message['role'] + '|>' + '\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt and messages[-1]['role'] != 'assistant' %}"
    "{{- '<|assistant|>\\n' -}}{% endif %}"
)


def test_image_tag_becomes_slots_and_every_chunk_starts_with_bos(tiny, make_image):
    _, processor = tiny
    tok, image = processor.tokenizer, make_image(100, 150)
    out = processor("<|user|>\n<|image_1|>\nWhat is this?<|end|>", [image])
    n = processor.image_processor.calc_num_image_tokens_from_image_size(100, 150)
    expected = (
        tok("<|user|>\n")["input_ids"] + [processor.image_token_id] * n + tok("\nWhat is this?<|end|>")["input_ids"]
    )
    assert out["input_ids"].tolist() == [expected]
    assert out["input_ids"][0].tolist().count(tok.bos_token_id) == 2
    assert out["attention_mask"].tolist() == [[1] * len(expected)]
    assert out["pixel_values"].shape == (1, 5, 3, 56, 56)
    assert out["image_sizes"].tolist() == processor.image_processor(image)["image_sizes"].tolist()


def test_two_images_in_one_prompt(tiny, make_image):
    _, processor = tiny
    images = [make_image(60, 60), make_image(200, 70, seed=1)]
    out = processor("<|image_1|>\n<|image_2|>\nCompare.", images)
    counts = [processor.image_processor.calc_num_image_tokens_from_image_size(*im.size) for im in images]
    assert counts[0] != counts[1]
    ids = out["input_ids"][0].tolist()
    assert ids.count(processor.image_token_id) == sum(counts)
    first = ids.index(processor.image_token_id)
    assert ids[first : first + counts[0]] == [processor.image_token_id] * counts[0]
    assert ids[first + counts[0]] == processor.tokenizer.bos_token_id  # the "\n" chunk between the images


@pytest.mark.parametrize(
    ("prompt", "num_images", "message"),
    [
        ("<|image_2|> hi", 1, "found <|image_2|>"),
        ("<|image_1|><|image_1|> hi", 1, "once each"),
        ("<|image_2|><|image_1|> hi", 2, "in this order"),
        ("<|image_1|> hi", 0, "no images"),
        ("no tag", 1, "found no image tags"),
        ("<|image_1|> only one tag", 2, "<|image_2|>"),
    ],
)
def test_tag_validation(tiny, make_image, prompt, num_images, message):
    _, processor = tiny
    with pytest.raises(ValueError, match=message.replace("|", r"\|")):
        processor(prompt, [make_image(60, 60, seed=i) for i in range(num_images)] or None)


@pytest.mark.parametrize("side", ["left", "right"])
def test_batch_padding(tiny, make_image, side):
    _, processor = tiny
    prompts = ["<|image_1|>\nshort", "<|image_1|>\na much longer question about the product"]
    images = [[make_image(60, 60)], [make_image(300, 80, seed=1)]]
    out = processor(prompts, images, padding_side=side)
    singles = [processor(p, im)["input_ids"][0] for p, im in zip(prompts, images, strict=True)]
    length = max(len(s) for s in singles)
    assert out["input_ids"].shape == (2, length)
    for row, mask, single in zip(out["input_ids"], out["attention_mask"], singles, strict=True):
        pad = length - len(single)
        real = slice(pad, None) if side == "left" else slice(0, len(single))
        assert row[real].tolist() == single.tolist()
        assert mask.sum() == len(single) and mask[real].all()
        assert (row[mask == 0] == processor.tokenizer.pad_token_id).all()
    assert out["pixel_values"].shape[0] == 2
    # a flat image list is consumed prompt by prompt
    flat = processor(prompts, [im for ims in images for im in ims], padding_side=side)
    assert torch.equal(flat["input_ids"], out["input_ids"])


def test_text_only_and_mixed_batches(tiny, make_image):
    _, processor = tiny
    out = processor(["hello", "a longer text"])
    assert set(out) == {"input_ids", "attention_mask"}
    mixed = processor(["<|image_1|> hi", "no image here"], [[make_image(60, 60)], []])
    assert mixed["pixel_values"].shape[0] == 1


def test_chat_template(tiny):
    _, processor = tiny
    messages = [
        {"role": "system", "content": "You are a helpful assistant"},
        {"role": "user", "content": "<|image_1|>\nWhat is shown?"},
    ]
    expected = (
        "<|system|>\nYou are a helpful assistant<|end|>\n<|user|>\n<|image_1|>\nWhat is shown?<|end|>\n<|assistant|>\n"
    )
    assert processor.apply_chat_template(messages) == expected
    assert processor.apply_chat_template(messages, add_generation_prompt=False) == expected.removesuffix(
        "<|assistant|>\n"
    )
    assert processor.chat_template == PHI3V_TEMPLATE


def test_save_and_reload(tiny, make_image, tmp_path):
    _, processor = tiny
    processor.save_pretrained(tmp_path)
    assert {"preprocessor_config.json", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in tmp_path.iterdir()
    }
    preprocessor = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert preprocessor["num_crops"] == 4 and preprocessor["tile_size"] == 56
    assert preprocessor["image_processor_type"] == "Phi3VImageProcessor"
    again = Phi3VProcessor.from_pretrained(tmp_path)
    assert again.image_token_id == processor.image_token_id
    assert again.chat_template == processor.chat_template
    prompt = again.apply_chat_template([{"role": "user", "content": "<|image_1|>\nWhat?"}])
    a, b = processor(prompt, [make_image(90, 70)]), again(prompt, [make_image(90, 70)])
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert Phi3VProcessor.from_pretrained(tmp_path, num_crops=2).image_processor.num_crops == 2
