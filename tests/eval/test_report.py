"""Report files from a predictions frame: metrics.json, parquet and PNGs, including degenerate cases."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from PIL import Image

from vlmtune.eval.predict import COLUMNS
from vlmtune.eval.report import UNPARSED, example_ranking, write_report

CATS = [["Women", "Bags", "Totes"], ["Men", "Shoes", "Sneakers"], ["Children", "Hats", "Bucket Hats"]]


def frame(generated: list[str]) -> pd.DataFrame:
    from vlmtune.data.prompts import parse_answer

    rows = []
    for i, text in enumerate(generated):
        parsed = parse_answer(text)
        cat = CATS[i % 3]
        rows.append({"id": f"p{i}", "image": f"catalog/p{i}.jpg", "target": "t", "generated": text, "title": f"T{i}",
                     "category": json.dumps(cat), "full_price": 100.0 * (i + 1), "currency": "USD",
                     "pred_title": parsed.title, "pred_category": parsed.category, "pred_full_price": parsed.full_price,
                     "pred_currency": parsed.currency, "parse_error": parsed.error, "error": None})
    return pd.DataFrame(rows, columns=COLUMNS)


GOOD = [f"Product: T{i}, Category: {' > '.join(CATS[i % 3])}, Full Price: {100.0 * (i + 1) * (1 + i / 10):.2f} USD"
        for i in range(9)]


@pytest.mark.parametrize("generated", [GOOD, ["P P P P"] * 6, [*GOOD[:4], "Product: x, Category: Nope, Full"]])
def test_report_files(tmp_path, generated):
    train = [{"category": c, "full_price": 100.0} for c in CATS]
    metrics = write_report(frame(generated), train, tmp_path)
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    assert metrics["overall"]["n"] == len(generated)
    assert len(pd.read_parquet(tmp_path / "predictions.parquet")) == len(generated)
    for name in ("price_scatter", "category_errors", "confusion", "examples"):
        image = Image.open(tmp_path / f"{name}.png")
        image.load()
        assert image.width > 200 and image.height > 200


def test_examples_are_ranked_best_first():
    data = frame(["Product: a, Category: Women > Bags > Totes, Full Price: 100",  # exact
                  "Product: b, Category: Men > Shoes > Sneakers, Full Price: 300",  # APE .5
                  "nothing"])
    assert list(example_ranking(data)["id"]) == ["p0", "p1", "p2"]


def test_confusion_matrix_counts():
    from vlmtune.eval.report import OTHER, confusion_matrix

    data = frame(["Product: a, Category: women>bags >  totes, Full Price: 1",  # right: case, spacing as metrics
                  "Product: b, Category: Women > Bags > Totes, Full Price: 1",  # wrong but a known label
                  "Product: c, Category: Hats, Full Price: 1",  # not a known label
                  "nothing"])  # unparsed
    labels, cols, matrix = confusion_matrix(data)
    assert cols[-2:] == [OTHER, UNPARSED]
    bags, shoes, hats = (labels.index(" > ".join(c)) for c in CATS)
    assert matrix[bags, bags] == 1 and matrix[shoes, bags] == 1
    assert matrix[hats, cols.index(OTHER)] == 1 and matrix[bags, cols.index(UNPARSED)] == 1
    assert matrix.sum() == 4
