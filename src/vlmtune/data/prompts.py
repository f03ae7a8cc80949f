"""The question, the target answer and the parser that reads an answer back into fields.

Training, evaluation and prediction all go through this module, so the text the model learns and the
text the metrics parse can never drift apart. The answer format is

    Product: <title>, Category: <category>, Full Price: <amount> <currency>

Titles may contain commas and the model may add currency symbols or thousands separators, so the parser
anchors on the field labels, not on commas.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from vlmtune.config import PromptConfig

CATEGORY_SEPARATOR = " > "
ANSWER_END = "<|end|>\n<|endoftext|>"

CURRENCY_SYMBOLS = {"$": "USD", "€": "EUR", "£": "GBP", "¥": "JPY", "₩": "KRW", "₹": "INR", "CHF": "CHF"}


def format_category(path: list[str], fmt: str) -> str:
    return CATEGORY_SEPARATOR.join(path) if fmt == "path" else path[-1]


def format_price(amount: float, currency: str) -> str:
    return f"{amount:.2f} {currency}".strip()


ANSWER_FIELDS = ("title", "category", "full_price", "currency")


def has_answer(meta: dict) -> bool:
    """Whether a record holds every field of the answer (a new product to price does not)."""
    return all(meta.get(k) is not None for k in ANSWER_FIELDS)


def answer_text(meta: dict, cfg: PromptConfig) -> str:
    """The target answer for one shard sample's metadata (see data/shards.py for the record fields)."""
    category = format_category(meta["category"], cfg.category_format)
    price = format_price(meta["full_price"], meta["currency"])
    return f"Product: {meta['title']}, Category: {category}, Full Price: {price}"


def image_tags(num_images: int) -> str:
    """`<|image_1|>\n<|image_2|>\n…`: one tag per image on its own line, as Phi-3-Vision's own multi-image
    prompts write them (one image gives exactly the single-image prompt)."""
    return "".join(f"<|image_{k}|>\n" for k in range(1, num_images + 1))


def user_messages(cfg: PromptConfig, num_images: int = 1) -> list[dict]:
    """Chat messages for a product's images; the processor's chat template turns them into the prompt."""
    return [{"role": "user", "content": f"{image_tags(num_images)}{cfg.question}"}]


@dataclass(frozen=True)
class ParsedAnswer:
    title: str | None
    category: str | None
    full_price: float | None
    currency: str | None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


_FIELD = re.compile(r"(?i)\b(product|category|full\s*price)\s*:")
_NUMBER = re.compile(r"[-+]?\d[\d,.\s']*")


def parse_amount(text: str) -> float | None:
    """Parse '$1,234.00', '1.234,50 €', '1234', '1 234' → float; None when there is no number.

    The decimal separator is the last '.' or ',' when followed by exactly 1–2 digits (or when both kinds
    appear); any other separator is a thousands separator.
    """
    match = _NUMBER.search(text)
    if not match:
        return None
    raw = re.sub(r"[\s']", "", match.group(0)).rstrip(".,")
    sign = -1.0 if raw.startswith("-") else 1.0
    raw = raw.lstrip("+-")
    last_dot, last_comma = raw.rfind("."), raw.rfind(",")
    decimal_at = max(last_dot, last_comma)
    if decimal_at >= 0:
        tail = raw[decimal_at + 1 :]
        both = last_dot >= 0 and last_comma >= 0
        single_kind_repeated = raw.count(raw[decimal_at]) > 1
        if not both and (single_kind_repeated or len(tail) == 3):
            decimal_at = -1
    if decimal_at >= 0:
        whole = re.sub(r"[.,]", "", raw[:decimal_at])
        value = float(f"{whole or '0'}.{raw[decimal_at + 1 :]}")
    else:
        value = float(re.sub(r"[.,]", "", raw) or "nan")
    return None if math.isnan(value) else sign * value


def parse_currency(text: str) -> str | None:
    code = re.search(r"\b([A-Z]{3})\b", text)
    if code:
        return code.group(1)
    for symbol, iso in CURRENCY_SYMBOLS.items():
        if symbol in text:
            return iso
    return None


def parse_answer(text: str) -> ParsedAnswer:
    """Read a generated answer back into fields; never raises, reports what is missing in `error`."""
    text = text.split("<|end|>")[0].replace("<|endoftext|>", "").strip()
    fields: dict[str, str] = {}
    marks = list(_FIELD.finditer(text))
    for i, mark in enumerate(marks):
        name = re.sub(r"\s+", "", mark.group(1).lower())
        end = marks[i + 1].start() if i + 1 < len(marks) else len(text)
        value = text[mark.end() : end].strip().rstrip(",").strip()
        fields.setdefault(name, value)
    title = fields.get("product") or None
    category = fields.get("category") or None
    price_text = fields.get("fullprice")
    price = parse_amount(price_text) if price_text else None
    currency = parse_currency(price_text) if price_text else None
    missing = [
        n for n, v in (("product", title), ("category", category), ("full price", price)) if v is None
    ]
    error = f"missing {', '.join(missing)}" if missing else None
    return ParsedAnswer(title=title, category=category, full_price=price, currency=currency, error=error)
