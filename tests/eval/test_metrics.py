"""Metrics on small hand-computed cases."""

from __future__ import annotations

import pytest

from vlmtune.eval.metrics import baselines, price_errors, score, score_by_category

BAG = ["Women", "Bags", "Totes"]
HAT = ["Children", "Hats", "Bucket Hats"]


def rec(title, category, price, generated):
    return {"id": title, "title": title, "category": category, "full_price": price, "generated": generated}


RECORDS = [
    rec("Tote", BAG, 100.0, "Product: Tote, Category: Women > Bags > Totes, Full Price: 110.00 USD"),  # APE .10
    rec("Hat", HAT, 200.0, "Product: Cap, Category: Children > Hats > Caps, Full Price: 150 USD"),  # APE .25
    rec("Bag", BAG, 400.0, "Product: Bag, Category: women > bags > totes, Full Price: $1,000.00"),  # APE 1.5
    rec("Hat 2", HAT, 300.0, "I do not know"),  # unparsed
]


def test_score_by_hand():
    m = score(RECORDS)
    assert m["n"] == 4
    assert m["parse_rate"] == 0.75 and m["price_parse_rate"] == 0.75
    assert m["category_path_acc"] == 0.5  # Tote, Bag (case-insensitive)
    assert m["category_top_acc"] == 0.75  # + Children for the cap
    assert m["category_leaf_acc"] == 0.5
    assert m["title_exact"] == 0.5  # Tote, Bag
    assert m["price_n"] == 3
    assert m["price_mae"] == pytest.approx((10 + 50 + 600) / 3)
    assert m["price_mape"] == pytest.approx((0.10 + 0.25 + 1.5) / 3)
    assert m["price_median_ape"] == pytest.approx(0.25)
    assert m["price_within_10pct"] == pytest.approx(1 / 3)  # 0.10 counts as within
    assert m["price_within_25pct"] == pytest.approx(2 / 3)
    assert 0 < m["title_chrf"] < 100


def test_perfect_answers_score_perfectly():
    perfect = [rec("Tote", BAG, 100.0, "Product: Tote, Category: Women > Bags > Totes, Full Price: 100.00 USD")]
    m = score(perfect)
    assert m["category_path_acc"] == m["title_exact"] == m["parse_rate"] == 1.0
    assert m["price_mape"] == 0.0 and m["title_chrf"] == pytest.approx(100.0)


def test_per_category_groups_by_true_path():
    groups = score_by_category(RECORDS)
    assert set(groups) == {"Children > Hats > Bucket Hats", "Women > Bags > Totes"}
    assert groups["Women > Bags > Totes"]["category_path_acc"] == 1.0
    assert groups["Children > Hats > Bucket Hats"]["n"] == 2


def test_baselines():
    train = [{"category": BAG, "full_price": 100.0}, {"category": BAG, "full_price": 300.0},
             {"category": HAT, "full_price": 50.0}]
    b = baselines(train, RECORDS)
    assert b["majority_category_path_acc"] == 0.5  # the two bags
    # medians: bags 200, global 100 (unknown "Caps" category and the unparsed answer)
    # predictions 200, 100, 200, 100 against 100, 200, 400, 300 → APE 1.0, 0.5, 0.5, 0.667
    assert b["median_by_predicted_category_price_mape"] == pytest.approx((1.0 + 0.5 + 0.5 + 2 / 3) / 4)


def test_empty_inputs():
    assert score([]) == {"n": 0}
    assert price_errors([]) == {"price_n": 0}
