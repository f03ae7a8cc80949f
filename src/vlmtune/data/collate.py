"""Shard sample → model inputs with loss only on the answer, and batches of them: padded or packed.

`SampleEncoder` runs inside the shard stream (so in DataLoader worker processes): the HD image transform
and tokenisation happen next to the JPEG decode, off the training process. The prompt is the chat
template around `<|image_1|>` (`<|image_1|>\n<|image_2|>` … for a product with several images) + the
question; the target is the answer followed by `<|end|>\n<|endoftext|>`
(Phi-3-V's fine-tuning convention), and every prompt position — BOS, role tags, image slots, the
question — gets label -100, so the model learns to answer, not to repeat the prompt.
"""

from __future__ import annotations

import torch
from torch.nn.utils.rnn import pad_sequence

from vlmtune.config import PromptConfig
from vlmtune.data.prompts import ANSWER_END, answer_text, has_answer, user_messages
from vlmtune.data.shards import SampleSkipped

IGNORE_INDEX = -100


class SampleEncoder:
    """Callable for `ShardStream(transform=...)`: {'images' (or 'image'), 'meta', 'key'} → tensors for one
    sample. A sample's images fill its prompt's tags in order; `pixel_values` and `image_sizes` hold one row
    per image, which `collate` concatenates sample after sample, the order the model fills image slots in."""

    def __init__(self, processor, prompt: PromptConfig, max_length: int, with_answer: bool = True):
        self.processor = processor
        self.prompt_cfg = prompt
        self.prompts: dict[int, str] = {}
        self.max_length = max_length
        self.with_answer = with_answer

    def prompt_text(self, num_images: int) -> str:
        if num_images not in self.prompts:
            self.prompts[num_images] = self.processor.apply_chat_template(
                user_messages(self.prompt_cfg, num_images), add_generation_prompt=True)
        return self.prompts[num_images]

    def __call__(self, sample: dict) -> dict:
        meta = sample["meta"]
        images = sample.get("images") or [sample["image"]]
        encoded = self.processor(text=self.prompt_text(len(images)), images=images, return_tensors="pt")
        prompt_ids = encoded["input_ids"][0]
        target = answer_text(meta, self.prompt_cfg) if has_answer(meta) else ""  # "": a product to predict
        out = {"id": meta.get("id", sample["key"]), "meta": meta, "target": target,
               "pixel_values": encoded["pixel_values"], "image_sizes": encoded["image_sizes"],
               "image_tokens": int((prompt_ids == self.processor.image_token_id).sum())}
        if self.with_answer:
            if not target:
                raise SampleSkipped(f"{out['id']}: no answer to learn (title, category or full price missing)")
            answer_ids = self.processor.tokenizer(target + ANSWER_END, add_special_tokens=False,
                                                  return_tensors="pt")["input_ids"][0]
            out["input_ids"] = torch.cat([prompt_ids, answer_ids])
            out["labels"] = torch.cat([torch.full_like(prompt_ids, IGNORE_INDEX), answer_ids])
        else:
            out["input_ids"] = prompt_ids
        if len(out["input_ids"]) > self.max_length:
            raise SampleSkipped(f"{out['id']}: {len(out['input_ids'])} tokens > model.max_length={self.max_length}")
        return out


def cat_rows(tensors: list[torch.Tensor]) -> torch.Tensor:
    """`torch.cat` along the first dimension, without a copy when the tensors already lie back to back in one
    buffer: the samples of a DataLoader hand-over block (data/batching.py) in their order. A micro-batch's
    pixel values are the bulk of its bytes (~23 MB a sample at real size and num_crops 16); copying eight
    samples' worth into fresh memory took ~100 ms on one CPU core, mostly page faults of the new memory."""
    first = tensors[0]
    storage, shape = first.untyped_storage(), first.shape[1:]
    offset = first.storage_offset()
    for tensor in tensors:
        if (not tensor.is_contiguous() or tensor.dtype != first.dtype or tensor.shape[1:] != shape
                or tensor.untyped_storage().data_ptr() != storage.data_ptr() or tensor.storage_offset() != offset):
            return torch.cat(tensors)
        offset += tensor.numel()
    rows = sum(len(tensor) for tensor in tensors)
    return first.new_empty(0).set_(storage, first.storage_offset(), (rows, *shape))


def collate(samples: list[dict], pad_id: int, padding_side: str = "right") -> dict:
    """Pad to the longest sample (right for training, left for generation) and stack images.

    A generation batch (left-padded, no labels) carries an attention mask made from the true lengths, not
    from `input_ids != pad_id`: Phi-3's pad id is also its end-of-text id, which must stay visible at the end
    of every target.

    A right-padded batch with labels carries none: under causal attention a real token only sees the tokens
    before it, all real, so the mask changes nothing but the padding's own outputs, which have label -100.
    Without it the attention kernels run in causal mode (sdpa's `is_causal`, flash-attn without unpadding)
    and skip the blocks above the diagonal, where a mask makes them compute the whole square. It is also
    `use_cache=False`, or the text model (whose config says `use_cache: true`) would build a KV cache in every
    training forward, which nothing reads and whose per-layer state makes `torch.compile` recompile each
    decoder layer.
    """

    def pad(rows: list[torch.Tensor], value: int) -> torch.Tensor:
        return pad_sequence(rows, batch_first=True, padding_value=value, padding_side=padding_side)

    ids = [s["input_ids"] for s in samples]
    batch = {"input_ids": pad(ids, pad_id), "pixel_values": cat_rows([s["pixel_values"] for s in samples]),
             "image_sizes": torch.cat([s["image_sizes"] for s in samples])}
    if "labels" in samples[0]:
        batch["labels"] = pad([s["labels"] for s in samples], IGNORE_INDEX)
        batch["use_cache"] = False
    if "labels" not in samples[0] or padding_side == "left":
        batch["attention_mask"] = pad([torch.ones_like(i) for i in ids], 0)
    return batch


def pack(samples: list[dict]) -> dict:
    """Samples concatenated into one row, each with positions restarting at 0.

    No attention mask and no cache: transformers then reads the packed layout from `position_ids` (a new
    sequence starts where the position drops back) and keeps attention inside each sample (flash-attn
    varlen, or a block-diagonal mask for sdpa/eager); with a cache it would build a plain causal mask.
    Labels stay per sample: each sample starts with its prompt, whose labels are -100, so no position
    learns to predict the next sample. Images follow in sample order, the
    order in which their slots appear in the row.
    """
    batch = {"input_ids": torch.cat([s["input_ids"] for s in samples])[None],
             "position_ids": torch.cat([torch.arange(len(s["input_ids"])) for s in samples])[None],
             "pixel_values": cat_rows([s["pixel_values"] for s in samples]),
             "image_sizes": torch.cat([s["image_sizes"] for s in samples]), "use_cache": False}
    if "labels" in samples[0]:
        batch["labels"] = torch.cat([s["labels"] for s in samples])[None]
    return batch
