"""Phi-3-Vision processor: prompts with `<|image_k|>` tags + images → model inputs.

A small plain class rather than transformers' `ProcessorMixin`, for two reasons. The official tokenisation
splits the prompt at the image tags and tokenises every chunk on its own with BOS (so a chunk after an
image starts with `<s>` again); `ProcessorMixin.__call__` instead expands placeholders in the text and
tokenises once, and would have to be replaced wholesale. And transformers 5's `ProcessorMixin` saves the
image processor nested inside `processor_config.json`, while the official checkpoints and tools read a
top-level `preprocessor_config.json`; this class writes exactly the official files (plus the tokenizer's).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.nn.utils.rnn import pad_sequence
from transformers import AutoTokenizer, BatchFeature, PreTrainedTokenizerBase
from transformers.utils import cached_file

from .image_processing import Phi3VImageProcessor

IMAGE_TAG = re.compile(r"<\|image_(\d+)\|>")
IMAGE_TOKEN = "<|image|>"
DEFAULT_IMAGE_TOKEN_ID = 32044  # Phi-3-Vision's `<|image|>` row of the embedding
PROCESSOR_CONFIG = "processor_config.json"

# Phi-3-Vision's template: `<|{role}|>\n{content}<|end|>\n` per message, then `<|assistant|>\n` to generate.
# No BOS: the processor adds it to every text chunk.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|' + message['role'] + '|>' + '\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt and messages[-1]['role'] != 'assistant' %}"
    "{{- '<|assistant|>\\n' -}}{% endif %}"
)

ImagesArg = Image.Image | Sequence[Image.Image] | Sequence[Sequence[Image.Image]] | None


class Phi3VProcessor:
    """Tokenizer + `Phi3VImageProcessor` → `input_ids`, `attention_mask`, `pixel_values`, `image_sizes`.

    Tag `<|image_k|>` becomes `num_img_tokens[k-1]` copies of `image_token_id` (the official processor writes
    -k instead; the model accepts both). In each prompt the tags must be `<|image_1|>` ... `<|image_n|>`,
    in this order, once each, with n images for that prompt.
    """

    def __init__(
        self,
        image_processor: Phi3VImageProcessor,
        tokenizer: PreTrainedTokenizerBase,
        image_token_id: int | None = None,
        chat_template: str | None = None,
    ) -> None:
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.image_token_id = image_token_id if image_token_id is not None else _image_token_id(tokenizer)
        self.chat_template = chat_template or tokenizer.chat_template or CHAT_TEMPLATE

    def __call__(
        self,
        text: str | Sequence[str],
        images: ImagesArg = None,
        *,
        padding_side: str | None = None,
        num_crops: int | None = None,
        return_tensors: str = "pt",
    ) -> BatchFeature:
        """Tokenise one prompt or a batch (padded to the longest, on `padding_side`, default the tokenizer's).

        `images`: for one prompt, an image or a list of images; for a batch, one list per prompt, or a flat
        list consumed prompt by prompt in tag order. Only PyTorch tensors are returned.
        """
        if return_tensors != "pt":
            raise ValueError(f"return_tensors must be 'pt', got {return_tensors!r}")
        texts = [text] if isinstance(text, str) else list(text)
        per_text = self._split_images(texts, images)
        for i, (prompt, imgs) in enumerate(zip(texts, per_text, strict=True)):
            _check_tags(prompt, len(imgs), i)
        flat = [im for imgs in per_text for im in imgs]
        features = self.image_processor(flat, num_crops=num_crops) if flat else None
        counts = iter(features["num_img_tokens"] if features else [])
        rows = [self._ids(prompt, [next(counts) for _ in imgs]) for prompt, imgs in zip(texts, per_text, strict=True)]
        data = self._pad(rows, padding_side or self.tokenizer.padding_side)
        if features is not None:
            data["pixel_values"] = features["pixel_values"]
            data["image_sizes"] = features["image_sizes"]
        return BatchFeature(data=data)

    def _split_images(self, texts: list[str], images: ImagesArg) -> list[list[Image.Image]]:
        if images is None:
            return [[] for _ in texts]
        if isinstance(images, Image.Image):
            images = [images]
        images = list(images)
        if images and all(isinstance(im, list | tuple) for im in images):
            if len(images) != len(texts):
                raise ValueError(f"got image lists for {len(images)} prompts but {len(texts)} prompts")
            return [list(im) for im in images]
        if len(texts) == 1:
            return [images]
        needed = [len(IMAGE_TAG.findall(t)) for t in texts]
        if sum(needed) != len(images):
            raise ValueError(f"the prompts have {sum(needed)} image tags in total but {len(images)} images were given")
        it = iter(images)
        return [[next(it) for _ in range(n)] for n in needed]

    def _ids(self, prompt: str, image_tokens: list[int]) -> list[int]:
        """Official layout: every text chunk tokenised with BOS, image slots between the chunks."""
        chunks = IMAGE_TAG.split(prompt)[::2]  # split() also returns the captured numbers
        ids: list[int] = []
        for i, chunk in enumerate(chunks):
            ids += self.tokenizer(chunk, add_special_tokens=True)["input_ids"]
            if i < len(image_tokens):
                ids += [self.image_token_id] * image_tokens[i]
        return ids

    def _pad(self, rows: list[list[int]], side: str) -> dict[str, torch.Tensor]:
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
        ids = [torch.tensor(row, dtype=torch.long) for row in rows]
        return {"input_ids": pad_sequence(ids, batch_first=True, padding_value=self.tokenizer.pad_token_id,
                                          padding_side=side),
                "attention_mask": pad_sequence([torch.ones_like(i) for i in ids], batch_first=True,
                                               padding_side=side)}

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The prompt string for `messages` ([{"role": ..., "content": ...}]); pass it to `__call__`."""
        return self.tokenizer.apply_chat_template(
            messages,
            chat_template=self.chat_template,
            add_generation_prompt=add_generation_prompt,
            tokenize=False,
        )

    def decode(self, *args: Any, **kwargs: Any) -> str:
        return self.tokenizer.decode(*args, **kwargs)

    def batch_decode(self, *args: Any, **kwargs: Any) -> list[str]:
        return self.tokenizer.batch_decode(*args, **kwargs)

    def calc_num_image_tokens_from_image_size(self, width: int, height: int) -> int:
        return self.image_processor.calc_num_image_tokens_from_image_size(width, height)

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write `preprocessor_config.json`, the tokenizer files (chat template included) and the image id."""
        path = Path(save_directory)
        path.mkdir(parents=True, exist_ok=True)
        self.image_processor.save_pretrained(path)
        self.tokenizer.chat_template = self.chat_template
        self.tokenizer.save_pretrained(path)
        config = {"processor_class": type(self).__name__, "image_token_id": self.image_token_id}
        (path / PROCESSOR_CONFIG).write_text(json.dumps(config, indent=2) + "\n")

    @classmethod
    def from_pretrained(
        cls, name_or_path: str | os.PathLike, *, num_crops: int | None = None, **kwargs: Any
    ) -> Phi3VProcessor:
        """Load from a directory or hub id (official checkpoints too); `kwargs` go to the file lookups."""
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, **kwargs)
        image_processor = Phi3VImageProcessor.from_pretrained(name_or_path, **kwargs)
        if num_crops is not None:
            image_processor.num_crops = num_crops
        config_file = cached_file(name_or_path, PROCESSOR_CONFIG, _raise_exceptions_for_missing_entries=False, **kwargs)
        config = json.loads(Path(config_file).read_text()) if config_file else {}
        return cls(image_processor, tokenizer, image_token_id=config.get("image_token_id"))

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values", "image_sizes"]


def _image_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The tokenizer's `<|image|>` id if it has one, else Phi-3-Vision's reserved row."""
    token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    return DEFAULT_IMAGE_TOKEN_ID if token_id in (None, tokenizer.unk_token_id) else token_id


def _check_tags(prompt: str, num_images: int, index: int) -> None:
    numbers = [int(n) for n in IMAGE_TAG.findall(prompt)]
    if numbers == list(range(1, num_images + 1)):
        return
    found = ", ".join(f"<|image_{n}|>" for n in numbers) or "no image tags"
    if num_images == 0:
        raise ValueError(f"prompt {index} has {found} but no images were given for it")
    raise ValueError(
        f"prompt {index}: {num_images} image(s) need the tags <|image_1|> ... <|image_{num_images}|>, "
        f"in this order and once each; found {found}"
    )
