"""A contact sheet of shard samples with their labels, so a person can check the data by eye (a product with
several images shows them side by side, in prompt order)."""

from __future__ import annotations

import itertools
import textwrap

import fsspec
from PIL import Image, ImageDraw, ImageFont

from vlmtune.data.shards import ShardStream, split_shards

CELL = 220
LABEL_LINES = 4


def label_font(size: int) -> ImageFont.FreeTypeFont:
    """DejaVu Sans from matplotlib (a dependency already): PIL's built-in font lacks accented letters."""
    from matplotlib import font_manager

    return ImageFont.truetype(font_manager.findfont("DejaVu Sans"), size)


def paste_images(sheet: Image.Image, images: list[Image.Image], x: int, y: int) -> None:
    """A sample's images side by side in its cell, in prompt order (image 1 on the left)."""
    width = (CELL - 4) // len(images)
    for k, image in enumerate(images):
        thumb = image.copy()
        thumb.thumbnail((width - 4, CELL - 8))
        left = x + 2 + k * width
        sheet.paste(thumb, (left + (width - thumb.width) // 2, y + (CELL - thumb.height) // 2))


def contact_sheet(shard_dir: str, split: str, n: int, out: str, columns: int = 6) -> int:
    """Write a PNG grid of the first `n` samples of `split` (in shard order); returns how many it shows."""
    stream = ShardStream(split_shards(shard_dir, split), shuffle=False, infinite=False)
    items = [it for it in itertools.islice(iter(stream), n) if "skipped" not in it]
    rows = max(1, -(-len(items) // columns))
    line_h = 12
    sheet = Image.new("RGB", (columns * CELL, rows * (CELL + LABEL_LINES * line_h)), "white")
    draw = ImageDraw.Draw(sheet)
    font = label_font(11)
    for i, item in enumerate(items):
        x, y = (i % columns) * CELL, (i // columns) * (CELL + LABEL_LINES * line_h)
        paste_images(sheet, item["images"], x, y)
        meta = item["meta"]
        label = f"{meta['title']} | {' > '.join(meta['category'])} | {meta['full_price']:.2f} {meta['currency']}"
        if len(item["images"]) > 1:
            label = f"[{len(item['images'])} images] {label}"
        for j, line in enumerate(textwrap.wrap(label, 36)[:LABEL_LINES]):
            draw.text((x + 4, y + CELL + j * line_h), line, fill="black", font=font)
    with fsspec.open(out, "wb") as fh:
        sheet.save(fh, format="PNG")
    return len(items)
