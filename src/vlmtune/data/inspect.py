"""A contact sheet of shard samples with their labels, so a person can check the data by eye."""

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
        thumb = item["image"].copy()
        thumb.thumbnail((CELL - 8, CELL - 8))
        sheet.paste(thumb, (x + (CELL - thumb.width) // 2, y + (CELL - thumb.height) // 2))
        meta = item["meta"]
        label = f"{meta['title']} | {' > '.join(meta['category'])} | {meta['full_price']:.2f} {meta['currency']}"
        for j, line in enumerate(textwrap.wrap(label, 36)[:LABEL_LINES]):
            draw.text((x + 4, y + CELL + j * line_h), line, fill="black", font=font)
    with fsspec.open(out, "wb") as fh:
        sheet.save(fh, format="PNG")
    return len(items)
