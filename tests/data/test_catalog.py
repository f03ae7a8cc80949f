"""Catalog reading and row normalisation: CSV / Parquet / JSONL in the Burberry schema."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from vlmtune.config import CatalogConfig, ColumnMapping
from vlmtune.data.catalog import CatalogError, parse_price, read_catalog

HEADER = "product_code,title,category1_code,category2_code,category3_code,full_price,price,currency_code,imageurl"
ROWS = [
    "100,Trench Coat,Women,Coats,Trench Coats,\"$1,234.00\",1234,USD,https://shop.example/a.jpg",  # 0 ok
    "101,Check Scarf,Women,Scarves,,450,,usd,https://shop.example/b.jpg",  # 1 ok: 2-level path, price = full
    "102,Bag,Women,Bags,Totes,,100,USD,https://shop.example/c.jpg",  # 2 missing full price
    "103,Bag,Women,Bags,Totes,NaN,100,USD,https://shop.example/c.jpg",  # 3 NaN
    "104,Bag,Women,Bags,Totes,-20,10,USD,https://shop.example/c.jpg",  # 4 negative
    "105,Bag,Women,Bags,Totes,free,10,USD,https://shop.example/c.jpg",  # 5 not a price
    "100,Duplicate,Women,Coats,Trench Coats,99,99,USD,https://shop.example/d.jpg",  # 6 duplicate of row 0
    "106,Café Crème Trench – “Heritage”,Women,Coats,Trench Coats,2 390.00,,EUR,img/e.jpg",  # 7 ok, local path
    "107,Bag,Women,Bags,Totes,100,100,USD,ftp://shop.example/f.jpg",  # 8 bad scheme
    "108,,Women,Bags,Totes,100,100,USD,https://shop.example/g.jpg",  # 9 missing title
    ",No id,Women,Bags,Totes,100,100,USD,https://shop.example/h.jpg",  # 10 missing id
    "109,No category,,,,100,100,USD,https://shop.example/i.jpg",  # 11 missing category
    "110,Sale,Men,Shoes,Sneakers,500,-1,USD,https://shop.example/j.jpg",  # 12 bad sale price
    "0042,Leading zeros,Men,Shoes,Sneakers,1.234,,,https://shop.example/k.jpg",  # 13 ok, id kept as text
]


@pytest.fixture
def messy_csv(tmp_path):
    path = tmp_path / "catalog.csv"
    path.write_text("\n".join([HEADER, *ROWS]) + "\n", encoding="utf-8")
    return path


def test_messy_burberry_csv(messy_csv):
    rows = read_catalog(CatalogConfig(source=str(messy_csv)))
    ids = [r["id"] for r in rows.records]
    assert ids == ["100", "101", "106", "0042"]
    first = rows.records[0]
    assert first["full_price"] == 1234.0 and first["price"] == 1234.0 and first["category"] == [
        "Women", "Coats", "Trench Coats"]
    assert rows.records[1]["category"] == ["Women", "Scarves"] and rows.records[1]["price"] == 450.0
    assert rows.records[1]["currency"] == "USD"
    cafe = rows.records[2]
    assert cafe["title"] == "Café Crème Trench – “Heritage”" and cafe["full_price"] == 2390.0
    assert cafe["image"] == str(messy_csv.parent / "img" / "e.jpg")
    assert rows.records[3]["full_price"] == 1234.0 and rows.records[3]["currency"] == "USD"

    reasons = {r.row: r.reason for r in rows.rejects}
    assert reasons == {
        2: "full_price missing (column 'full_price')",
        3: "full_price missing (column 'full_price')",
        4: "full_price negative (-20) (column 'full_price')",
        5: "full_price not a price: 'free' (column 'full_price')",
        6: "duplicate id (kept row 0)",
        8: "unsupported image source scheme 'ftp' (only http, https and local paths)",
        9: "missing title (column 'title')",
        10: "missing id (column 'product_code')",
        11: "missing category (columns category1_code, category2_code, category3_code)",
        12: "price negative (-1) (column 'price')",
    }
    assert {r.id for r in rows.rejects if r.row == 6} == {"100"}


def test_same_records_from_parquet_and_jsonl(messy_csv, tmp_path):
    frame = pd.read_csv(messy_csv, dtype=str, keep_default_na=False)
    frame.to_parquet(tmp_path / "catalog.parquet")
    with (tmp_path / "catalog.jsonl").open("w", encoding="utf-8") as fh:
        for row in frame.to_dict(orient="records"):
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        fh.write("{not json\n")
    base = read_catalog(CatalogConfig(source=str(messy_csv)))
    for name in ("catalog.parquet", "catalog.jsonl"):
        other = read_catalog(CatalogConfig(source=str(tmp_path / name)))
        assert other.records == base.records, name
    jsonl = read_catalog(CatalogConfig(source=str(tmp_path / "catalog.jsonl")))
    assert jsonl.rejects[-1].reason == (
        "catalog.jsonl line 15: invalid JSON (Expecting property name enclosed in double quotes)")


def test_numeric_columns_from_typed_sources(tmp_path):
    frame = pd.DataFrame({"product_code": [7, 8], "title": ["A", "B"], "category1_code": ["x", "y"],
                          "category2_code": [None, None], "category3_code": [None, None],
                          "full_price": [10.0, float("nan")], "price": [9.0, 1.0], "currency_code": ["USD", "USD"],
                          "imageurl": ["https://e.x/a.jpg", "https://e.x/b.jpg"]})
    frame.to_parquet(tmp_path / "typed.parquet")
    rows = read_catalog(CatalogConfig(source=str(tmp_path / "typed.parquet")))
    assert [r["id"] for r in rows.records] == ["7"]
    assert rows.rejects[0].reason.startswith("full_price missing")


def test_column_mapping_and_missing_columns(tmp_path):
    path = tmp_path / "c.csv"
    path.write_text("sku,name,cat,cost,pic\n1,Hat,Hats,10,https://e.x/1.jpg\n")
    with pytest.raises(CatalogError, match=r"columns \['product_code', 'title', 'full_price', 'imageurl'\] not found"):
        read_catalog(CatalogConfig(source=str(path)))
    mapping = ColumnMapping(id="sku", title="name", category=["cat"], full_price="cost", price=None, currency=None,
                            image="pic")
    rows = read_catalog(CatalogConfig(source=str(path), columns=mapping, default_currency="EUR"))
    assert rows.records[0] | {"image": None} == {"id": "1", "title": "Hat", "category": ["Hats"], "full_price": 10.0,
                                                 "price": 10.0, "currency": "EUR", "image": None, "row": 0}


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(CatalogError, match="catalog file not found"):
        read_catalog(CatalogConfig(source=str(tmp_path / "nope.csv")))
    (tmp_path / "c.xlsx").write_text("x")
    with pytest.raises(CatalogError, match=r"unknown catalog format '\.xlsx'"):
        read_catalog(CatalogConfig(source=str(tmp_path / "c.xlsx")))


@pytest.mark.parametrize(("value", "expected"), [
    ("$1,234.00", (1234.0, None)), (1234, (1234.0, None)), ("", (None, "missing")),
    (float("nan"), (None, "missing")), (-3.0, (None, "negative (-3)")), ("0.00", (None, "zero")),
    ("€ 99,90", (99.9, None)),
])
def test_parse_price(value, expected):
    assert parse_price(value) == expected
