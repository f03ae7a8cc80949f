"""Read a product catalog in chunks and normalise each row into a record, or a reject with its reason.

Sources: a Hugging Face data set id (through `datasets`, streamed), or a local CSV / Parquet / JSONL file.
Every source is read `chunk_rows` rows at a time, so a catalog of millions of rows never sits in memory
whole: only the normalised records (a few fields each) outlive their chunk. CSV files are read with every
column as text so that the normalisation rules below, not a parser's type guessing, decide what a price
like "$1,234.00" or an id like "0042" means.

What a row must have depends on what the records are for. Training data (`purpose="labels"`: prepare,
and through its shards evaluate) needs the labels: title, category and full price. Prediction
(`purpose="predict"`) needs only an id and an image; labels present in the file are kept as targets, so
the same file can be scored, and an unusable one is left out of the targets rather than losing the row.

A record is what prepare fetches images for and writes into a shard:
    {id, title, category: [..], full_price, price, currency, images: [..], row}
`images` holds the first `max_images` sources the row lists (one or several image columns; a cell may hold
several URLs as a list, a JSON array or text split at `image_separator`).
"""

from __future__ import annotations

import json
import math
import os
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

from vlmtune.config import CatalogConfig
from vlmtune.data.images import check_image_source
from vlmtune.data.prompts import parse_amount
from vlmtune.errors import CatalogError

LOCAL_SUFFIXES = {".csv": "csv", ".tsv": "csv", ".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl",
                  ".ndjson": "jsonl", ".json": "jsonl"}
Purpose = Literal["labels", "predict"]


@dataclass
class Reject:
    row: int
    id: str | None
    reason: str
    stage: str = "catalog"

    def to_dict(self) -> dict:
        return {"row": self.row, "id": self.id, "stage": self.stage, "reason": self.reason}


@dataclass
class CatalogRows:
    """A whole catalog's records in catalog order, everything rejected on the way, and (for prediction) the
    label values that could not be used as targets."""

    records: list[dict] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)
    target_notes: list[Reject] = field(default_factory=list)
    source: str = ""


def _is_missing(value) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and value.strip().lower() in {"", "nan", "none", "null", "n/a", "na"}


def _text(value) -> str:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return unicodedata.normalize("NFC", " ".join(str(value).split()))


def parse_price(value) -> tuple[float | None, str | None]:
    """→ (amount, None) or (None, reason). Accepts numbers and strings like '$1,234.00' or '1.234,50 €'."""
    if _is_missing(value):
        return None, "missing"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        amount = float(value)
    else:
        amount = parse_amount(str(value))
        if amount is None:
            return None, f"not a price: {str(value)[:40]!r}"
    if math.isinf(amount):
        return None, f"not a price: {value!r}"
    if amount < 0:
        return None, f"negative ({amount:g})"
    if amount == 0:
        return None, "zero"
    return round(amount, 2), None


def image_columns(cfg: CatalogConfig) -> list[str]:
    image = cfg.columns.image
    return [image] if isinstance(image, str) else list(image)


def _cell_items(value, separator: str | None) -> list:
    """One image cell → the sources it holds (a list, a JSON array, separated text, or one value)."""
    if value is None:
        return []
    if hasattr(value, "tolist") and not isinstance(value, str):  # numpy arrays from pandas / pyarrow
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        return list(value)
    text = str(value).strip()
    if text.startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError:
            items = None
        if isinstance(items, list):
            return items
    return text.split(separator) if separator else [text]


def image_sources(raw: dict, cfg: CatalogConfig) -> list[str]:
    """All image sources of a row, in column order then cell order, blanks and repeats left out."""
    sources: list[str] = []
    for column in image_columns(cfg):
        for item in _cell_items(raw.get(column), cfg.columns.image_separator):
            if not _is_missing(item) and str(item).strip() not in sources:
                sources.append(str(item).strip())
    return sources


def _local_image(source: str, base: str | None) -> str:
    """Relative local image paths are relative to `base` (image_root, or the catalog file's folder; absolute).
    Plain string operations: this runs for every row of catalogs with millions."""
    if base is None or urlparse(source).scheme.lower() not in {"", "file"}:
        return source  # URLs, and sources the fetch will reject with their reason
    return os.path.normpath(os.path.join(base, source.removeprefix("file://")))


def normalise_row(raw: dict, row: int, cfg: CatalogConfig, purpose: Purpose = "labels", max_images: int = 1,
                  image_base: str | None = None, notes: list[Reject] | None = None) -> dict | Reject:
    """One raw row → a record, or a Reject saying which field is wrong. With purpose 'predict', label fields
    that are missing become None, and unusable ones too, with the reason appended to `notes`."""
    cols = cfg.columns
    raw_id = raw.get(cols.id)
    if _is_missing(raw_id):
        return Reject(row, None, f"missing id (column '{cols.id}')")
    rid = _text(raw_id)
    labels = purpose == "labels"

    def problem(reason: str) -> Reject | None:
        """A reject for training data; for prediction the row stays, the reason is noted."""
        if labels:
            return Reject(row, rid, reason)
        if notes is not None:
            notes.append(Reject(row, rid, reason, stage="target"))
        return None

    title = raw.get(cols.title)
    if _is_missing(title) and labels:
        return Reject(row, rid, f"missing title (column '{cols.title}')")
    path = [_text(raw[c]) for c in cols.category if not _is_missing(raw.get(c))]
    if not path and labels:
        return Reject(row, rid, f"missing category (columns {', '.join(cols.category)})")
    full_price, why = parse_price(raw.get(cols.full_price))
    if why == "missing" and not labels:
        why = None  # a new product without a price yet: what predict is for
    if why and (reject := problem(f"full_price {why} (column '{cols.full_price}')")):
        return reject
    price = full_price
    if cols.price and not _is_missing(raw.get(cols.price)):
        price, why = parse_price(raw.get(cols.price))
        if why and (reject := problem(f"price {why} (column '{cols.price}')")):
            return reject
    currency = cfg.default_currency
    if cols.currency and not _is_missing(raw.get(cols.currency)):
        currency = _text(raw[cols.currency]).upper()
    sources = image_sources(raw, cfg)[:max_images]
    if not sources:
        names = image_columns(cfg)
        where = f"column '{names[0]}'" if len(names) == 1 else f"columns {', '.join(names)}"
        return Reject(row, rid, f"missing image ({where})")
    reasons = [check_image_source(s) for s in sources]
    if all(reasons):
        return Reject(row, rid, reasons[0])
    return {"id": rid, "title": None if _is_missing(title) else _text(title), "category": path or None,
            "full_price": full_price, "price": price, "currency": currency,
            "images": [_local_image(s, image_base) for s in sources], "row": row}


def required_columns(cfg: CatalogConfig, purpose: Purpose) -> list[str]:
    cols = cfg.columns
    labels = [cols.title, cols.full_price] if purpose == "labels" else []
    return [cols.id, *labels, *image_columns(cfg)]


# ------------------------------------------------------------------------------------------ raw chunks


def _csv_chunks(path: Path, chunk: int, limit: int | None) -> Iterator[list[dict]]:
    import pandas as pd

    sep = "\t" if path.suffix == ".tsv" else ","
    with pd.read_csv(path, dtype=str, keep_default_na=False, sep=sep, nrows=limit, chunksize=chunk) as reader:
        for frame in reader:
            yield frame.to_dict(orient="records")


def _parquet_chunks(path: Path, chunk: int, limit: int | None) -> Iterator[list[dict]]:
    import pyarrow.parquet as pq

    left = limit
    for batch in pq.ParquetFile(path).iter_batches(batch_size=chunk):
        rows = batch.to_pylist()
        if left is not None:
            rows, left = rows[:left], left - len(rows)
        yield rows
        if left is not None and left <= 0:
            return


def _jsonl_row(line: str, where: str) -> dict:
    if not line.strip():
        return {"__error__": f"{where}: empty line"}
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        return {"__error__": f"{where}: invalid JSON ({e.msg})"}
    return obj if isinstance(obj, dict) else {"__error__": f"{where}: not an object"}


def _jsonl_chunks(path: Path, chunk: int, limit: int | None) -> Iterator[list[dict]]:
    rows: list[dict] = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if limit is not None and lineno > limit:
                break
            rows.append(_jsonl_row(line, f"{path.name} line {lineno}"))
            if len(rows) == chunk:
                yield rows
                rows = []
    if rows:
        yield rows


def _hf_chunks(cfg: CatalogConfig) -> Iterator[list[dict]]:
    import datasets

    try:
        ds = datasets.load_dataset(cfg.source, split=cfg.hf_split, streaming=True)
    except Exception as e:  # datasets raises many types; the message is what the user needs
        raise CatalogError(f"could not load Hugging Face data set '{cfg.source}' split '{cfg.hf_split}': {e}") from e
    if cfg.limit:
        ds = ds.take(cfg.limit)
    for batch in ds.iter(batch_size=cfg.chunk_rows):
        names = list(batch)
        yield [dict(zip(names, values, strict=True)) for values in zip(*batch.values(), strict=True)]


def _raw_chunks(cfg: CatalogConfig) -> tuple[Iterator[list[dict]], str | None, str | None]:
    """(chunks of raw rows, local kind or None for a HF data set, absolute base directory of relative image
    paths)."""
    source = cfg.source
    path = Path(source)
    kind = LOCAL_SUFFIXES.get(path.suffix.lower())
    if kind and not path.is_file():
        raise CatalogError(f"catalog file not found: {source}")
    if path.is_file() and not kind:
        raise CatalogError(f"{source}: unknown catalog format '{path.suffix}' (use .csv, .parquet or .jsonl)")
    root = str(Path(cfg.image_root).resolve()) if cfg.image_root else None
    if not kind:
        return _hf_chunks(cfg), None, root
    readers = {"csv": _csv_chunks, "parquet": _parquet_chunks, "jsonl": _jsonl_chunks}
    return readers[kind](path, cfg.chunk_rows, cfg.limit), kind, root or str(path.parent.resolve())


def stream_catalog(cfg: CatalogConfig, purpose: Purpose = "labels", max_images: int = 1,
                   notes: list[Reject] | None = None) -> Iterator[list[dict | Reject]]:
    """The catalog as chunks of records and rejects, in catalog order (duplicate ids kept once, the first).

    Only ids cross chunk boundaries (to find duplicates); `notes` collects unusable targets when predicting.
    """
    chunks, kind, image_base = _raw_chunks(cfg)
    first_row: dict[str, int] = {}
    checked_columns = kind == "jsonl"  # JSONL rows may each have other keys: checked row by row
    row = 0
    for raw_rows in chunks:
        out: list[dict | Reject] = []
        for raw in raw_rows:
            i, row = row, row + 1
            if "__error__" in raw:
                out.append(Reject(i, None, raw["__error__"]))
                continue
            if not checked_columns:
                missing = [c for c in required_columns(cfg, purpose) if c not in raw]
                if missing:
                    raise CatalogError(f"{cfg.source}: columns {missing} not found (have {sorted(raw)}); set "
                                       "data.catalog.columns.*")
                checked_columns = True
            item = normalise_row(raw, i, cfg, purpose, max_images, image_base, notes)
            if isinstance(item, dict):
                if item["id"] in first_row:
                    item = Reject(i, item["id"], f"duplicate id (kept row {first_row[item['id']]})")
                else:
                    first_row[item["id"]] = i
            out.append(item)
        yield out


def read_catalog(cfg: CatalogConfig, purpose: Purpose = "labels", max_images: int = 1) -> CatalogRows:
    """The whole catalog in memory: for catalogs that fit (prediction inputs, tests); prepare streams."""
    out = CatalogRows(source=cfg.source)
    for chunk in stream_catalog(cfg, purpose, max_images, out.target_notes):
        for item in chunk:
            (out.rejects if isinstance(item, Reject) else out.records).append(item)
    return out
