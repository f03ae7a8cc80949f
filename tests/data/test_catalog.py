"""Catalog reading and row normalisation: CSV / Parquet / JSONL in the Burberry schema."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from vlmtune.config import CatalogConfig, ColumnMapping
from vlmtune.data.catalog import CatalogError, Reject, parse_price, read_catalog, stream_catalog

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
    assert cafe["images"] == [str(messy_csv.parent / "img" / "e.jpg")]
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
    assert rows.records[0] == {"id": "1", "title": "Hat", "category": ["Hats"], "full_price": 10.0, "price": 10.0,
                               "currency": "EUR", "images": ["https://e.x/1.jpg"], "row": 0}


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


@pytest.mark.parametrize("suffix", ["csv", "parquet", "jsonl"])
def test_streaming_reads_a_catalog_larger_than_its_chunks(messy_csv, tmp_path, suffix):
    """14 rows read 3 at a time: chunks never exceed 3 rows, row numbers run on across chunks, a duplicate
    in a later chunk is still found, and the result is what one big chunk gives."""
    frame = pd.read_csv(messy_csv, dtype=str, keep_default_na=False)
    path = tmp_path / f"catalog.{suffix}"
    if suffix == "parquet":
        frame.to_parquet(path, row_group_size=5)
    elif suffix == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in frame.to_dict(orient="records")))
    else:
        path = messy_csv
    chunks = list(stream_catalog(CatalogConfig(source=str(path), chunk_rows=3)))
    assert [len(c) for c in chunks] == [3, 3, 3, 3, 2]
    items = [item for chunk in chunks for item in chunk]
    rows = [item.row if isinstance(item, Reject) else item["row"] for item in items]
    assert rows == list(range(14))
    assert items[6] == Reject(6, "100", "duplicate id (kept row 0)")
    whole = read_catalog(CatalogConfig(source=str(path), chunk_rows=1000))
    assert [i for i in items if not isinstance(i, Reject)] == whole.records
    limited = list(stream_catalog(CatalogConfig(source=str(path), chunk_rows=3, limit=7)))
    assert [len(c) for c in limited] == [3, 3, 1]


MULTI = [
    {"product_code": "1", "title": "Tote", "category1_code": "Bags", "full_price": "100",
     "imageurl": '["https://e.x/1a.jpg", "https://e.x/1b.jpg", "https://e.x/1c.jpg"]', "back": "https://e.x/1z.jpg"},
    {"product_code": "2", "title": "Belt", "category1_code": "Belts", "full_price": "50",
     "imageurl": "https://e.x/2a.jpg", "back": "https://e.x/2b.jpg"},
    {"product_code": "3", "title": "Hat", "category1_code": "Hats", "full_price": "30", "imageurl": "",
     "back": "https://e.x/3b.jpg"},
    {"product_code": "4", "title": "Cap", "category1_code": "Hats", "full_price": "30",
     "imageurl": "https://e.x/4a.jpg | https://e.x/4a.jpg | ftp://e.x/4b.jpg", "back": ""},
    {"product_code": "5", "title": "Scarf", "category1_code": "Scarves", "full_price": "80",
     "imageurl": "ftp://e.x/5a.jpg", "back": ""},
    {"product_code": "6", "title": "Bag", "category1_code": "Bags", "full_price": "80", "imageurl": "", "back": ""},
]


def test_several_images_per_product(tmp_path):
    path = tmp_path / "multi.csv"
    pd.DataFrame(MULTI).to_csv(path, index=False)
    columns = ColumnMapping(category=["category1_code"], price=None, currency=None, image=["imageurl", "back"],
                            image_separator="|")
    rows = read_catalog(CatalogConfig(source=str(path), columns=columns), max_images=2)
    images = {r["id"]: r["images"] for r in rows.records}
    assert images == {"1": ["https://e.x/1a.jpg", "https://e.x/1b.jpg"],  # the first two listed, JSON array
                      "2": ["https://e.x/2a.jpg", "https://e.x/2b.jpg"],  # one per column, in column order
                      "3": ["https://e.x/3b.jpg"],
                      "4": ["https://e.x/4a.jpg", "ftp://e.x/4b.jpg"]}  # repeats dropped; ftp fails when fetched
    assert {r.id: r.reason for r in rows.rejects} == {
        "5": "unsupported image source scheme 'ftp' (only http, https and local paths)",
        "6": "missing image (columns imageurl, back)"}
    one = read_catalog(CatalogConfig(source=str(path), columns=columns))
    assert {r["id"]: r["images"] for r in one.records}["1"] == ["https://e.x/1a.jpg"]


def test_list_columns_of_typed_sources(tmp_path):
    frame = pd.DataFrame({"product_code": [1], "title": ["Tote"], "category1_code": ["Bags"], "full_price": [10.0],
                          "imageurl": [["https://e.x/a.jpg", None, "https://e.x/b.jpg"]]})
    frame.to_parquet(tmp_path / "list.parquet")
    columns = ColumnMapping(category=["category1_code"], price=None, currency=None)
    rows = read_catalog(CatalogConfig(source=str(tmp_path / "list.parquet"), columns=columns), max_images=4)
    assert rows.records[0]["images"] == ["https://e.x/a.jpg", "https://e.x/b.jpg"]


def test_new_products_without_labels_can_be_predicted_but_not_trained_on(tmp_path):
    path = tmp_path / "new.csv"
    path.write_text("product_code,imageurl\nN1,https://e.x/n1.jpg\nN2,\n")
    with pytest.raises(CatalogError, match=r"columns \['title', 'full_price'\] not found"):
        read_catalog(CatalogConfig(source=str(path)))
    rows = read_catalog(CatalogConfig(source=str(path)), purpose="predict")
    assert rows.records == [{"id": "N1", "title": None, "category": None, "full_price": None, "price": None,
                             "currency": "USD", "images": ["https://e.x/n1.jpg"], "row": 0}]
    assert [(r.row, r.reason) for r in rows.rejects] == [(1, "missing image (column 'imageurl')")]


def test_labels_present_in_a_prediction_catalog_are_kept_as_targets(messy_csv):
    rows = read_catalog(CatalogConfig(source=str(messy_csv)), purpose="predict")
    by_id = {r["id"]: r for r in rows.records}
    assert by_id["100"]["full_price"] == 1234.0 and by_id["100"]["title"] == "Trench Coat"
    assert by_id["102"]["full_price"] is None and by_id["102"]["price"] == 100.0  # no full price: still predicted
    assert by_id["105"]["full_price"] is None and by_id["108"]["title"] is None and by_id["109"]["category"] is None
    assert {r.row: r.reason for r in rows.rejects} == {
        6: "duplicate id (kept row 0)", 8: "unsupported image source scheme 'ftp' (only http, https and local paths)",
        10: "missing id (column 'product_code')"}
    assert {(n.row, n.reason) for n in rows.target_notes} == {
        (4, "full_price negative (-20) (column 'full_price')"), (5, "full_price not a price: 'free' (column "
                                                                   "'full_price')"),
        (12, "price negative (-1) (column 'price')")}
