"""A tiny byte-level tokenizer with the Phi-3 special tokens, built in code.

The tiny test model needs a tokenizer that exists offline, round-trips any UTF-8 text and keeps the
vocabulary (hence the embedding and LM head) small. A byte-level BPE with no merges does that: every byte
is one token, so 256 byte tokens plus the special tokens make the whole vocabulary. The special tokens
mirror Phi-3's (same strings, same roles: BOS `<s>`, EOS and PAD `<|endoftext|>`) so prompts, chat
templates and stop conditions behave as with the real tokenizer. `<|image_1|>` is deliberately not a
token, as in Phi-3: the processor's regex gives it meaning.
"""

from __future__ import annotations

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

UNK, BOS, EOS_SENTENCE = "<unk>", "<s>", "</s>"
# Phi-3's chat and image tokens, in Phi-3's id order.
CHAT_TOKENS = ("<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>", "<|image|>")


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """`<unk>` `<s>` `</s>` (ids 0-2), the 256 bytes (3-258), then the Phi-3 chat tokens (259-264)."""
    byte_symbols = sorted(pre_tokenizers.ByteLevel.alphabet())  # one printable symbol per byte
    vocab = {tok: i for i, tok in enumerate([UNK, BOS, EOS_SENTENCE, *byte_symbols])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    specials = [UNK, BOS, EOS_SENTENCE, *CHAT_TOKENS]
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    bos_id = vocab[BOS]
    # Llama-style: one BOS in front, nothing at the end (Phi-3 prompts never get an EOS appended).
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token=UNK,
        clean_up_tokenization_spaces=False,
        model_max_length=131072,
    )
