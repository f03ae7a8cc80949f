"""The byte-level tiny tokenizer with Phi-3's special tokens."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from vlmtune.models.phi3v.tokenizer import build_tiny_tokenizer

SPECIALS = ["<unk>", "<s>", "</s>", "<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>", "<|image|>"]


def test_special_tokens_and_vocabulary():
    tok = build_tiny_tokenizer()
    assert 260 <= len(tok) <= 280
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == (
        "<s>",
        "<|endoftext|>",
        "<|endoftext|>",
        "<unk>",
    )
    ids = [tok.convert_tokens_to_ids(t) for t in SPECIALS]
    assert len(set(ids)) == len(SPECIALS) and tok.unk_token_id not in ids[1:]
    for token, token_id in zip(SPECIALS, ids, strict=True):
        assert tok(token, add_special_tokens=False)["input_ids"] == [token_id]
    # like Phi-3, image tags are plain text: the processor's regex gives them meaning
    assert len(tok("<|image_1|>", add_special_tokens=False)["input_ids"]) > 1


@pytest.mark.parametrize(
    "text",
    [
        "Café Trench – 1 234 €",
        "日本語のテキスト 🎉 naïve façade",
        "<|user|>\n<|image_1|>\nWhat is shown?<|end|>\n<|assistant|>\nProduct: Coat<|end|>\n<|endoftext|>",
        "  leading and trailing spaces  \t\n",
        "",
    ],
)
def test_decode_encode_round_trip(text):
    tok = build_tiny_tokenizer()
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id  # BOS on, as Phi-3's Llama tokenizer
    assert tok.decode(ids[1:]) == text
    assert tok.decode(ids, skip_special_tokens=False) == "<s>" + text


def test_save_and_reload(tmp_path):
    tok = build_tiny_tokenizer()
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    text = "<|user|>\nCafé – 12 €<|end|>"
    assert again(text)["input_ids"] == tok(text)["input_ids"]
    assert (again.bos_token_id, again.eos_token_id, again.pad_token_id) == (
        tok.bos_token_id,
        tok.eos_token_id,
        tok.pad_token_id,
    )
