"""The answer template and the parser that reads model output back into fields."""

from __future__ import annotations

import pytest

from vlmtune.config import PromptConfig
from vlmtune.data.prompts import answer_text, parse_amount, parse_answer, user_messages
from vlmtune.eval.metrics import category_key

META = {"title": "Vintage Check, Cotton Scarf", "category": ["Women", "Scarves", "Cashmere Scarves"],
        "full_price": 1234.5, "currency": "USD"}


def test_answer_round_trips_through_the_parser():
    text = answer_text(META, PromptConfig())
    assert text == ("Product: Vintage Check, Cotton Scarf, Category: Women > Scarves > Cashmere Scarves, "
                    "Full Price: 1234.50 USD")
    parsed = parse_answer(text + "<|end|>\n<|endoftext|>")
    assert parsed.ok
    assert parsed.title == META["title"]
    assert category_key(parsed.category) == [c.lower() for c in META["category"]]
    assert parsed.full_price == 1234.5 and parsed.currency == "USD"


def test_leaf_category_format():
    assert "Category: Cashmere Scarves," in answer_text(META, PromptConfig(category_format="leaf"))


@pytest.mark.parametrize(
    ("text", "title", "category", "price", "currency", "error"),
    [
        ("Product: A, B, C, Category: Bags, Full Price: $1,234.00", "A, B, C", "Bags", 1234.0, "USD", None),
        ("product: Tote category: Bags full price: 1.234,50 €", "Tote", "Bags", 1234.5, "EUR", None),
        ("Product: Tote, Category: Bags, Full Price: £990", "Tote", "Bags", 990.0, "GBP", None),
        ("Product: Tote, Category: Bags, Full Price: 1 250 USD", "Tote", "Bags", 1250.0, "USD", None),
        ("Product: Tote, Category: Bags, FullPrice: 450", "Tote", "Bags", 450.0, None, None),
        ("Product: Tote, Category: Bags", "Tote", "Bags", None, None, "missing full price"),
        ("Product: Tote, Category: Bags, Full Price: call us", "Tote", "Bags", None, None, "missing full price"),
        ("I think this is a bag.", None, None, None, None, "missing product, category, full price"),
        ("", None, None, None, None, "missing product, category, full price"),
        ("Product: Tote, Category: Bags, Full Price: 450.00 USD<|end|>Product: X", "Tote", "Bags", 450.0, "USD",
         None),
        ("Product: , Category: Bags, Full Price: 10", None, "Bags", 10.0, None, "missing product"),
        ("Category: Bags, Product: Tote, Full Price: 10", "Tote", "Bags", 10.0, None, None),
    ],
)
def test_parser_on_nasty_outputs(text, title, category, price, currency, error):
    parsed = parse_answer(text)
    assert (parsed.title, parsed.category, parsed.full_price, parsed.currency, parsed.error) == (
        title, category, price, currency, error)


@pytest.mark.parametrize(
    ("raw", "value"),
    [("$1,234.00", 1234.0), ("1234", 1234.0), ("1,234", 1234.0), ("1.234", 1234.0), ("1.5", 1.5),
     ("12,5", 12.5), ("1.234.567,89", 1234567.89), ("1,234,567", 1234567.0), ("USD 99.99", 99.99),
     ("-5", -5.0), ("n/a", None), ("", None)],
)
def test_parse_amount(raw, value):
    assert parse_amount(raw) == value


def test_image_tags_one_per_line_before_the_question():
    cfg = PromptConfig(question="Price?")
    assert user_messages(cfg) == [{"role": "user", "content": "<|image_1|>\nPrice?"}]
    assert user_messages(cfg, 3)[0]["content"] == "<|image_1|>\n<|image_2|>\n<|image_3|>\nPrice?"
