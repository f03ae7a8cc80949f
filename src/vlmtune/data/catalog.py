"""Read a product catalog and normalise each row into a record, or a reject with its reason.

Sources: a Hugging Face data set id (through `datasets`), or a local CSV / Parquet / JSONL file. Local
files are read with every column as text so that the normalisation rules below, not a parser's type
guessing, decide what a price like "$1,234.00" or an id like "0042" means.

A record is what prepare fetches an image for and writes into a shard:
    {id, title, category: [..], full_price, price, currency, image, row}
"""

from __future__ import annotations

import hashlib
import json
import math
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from vlmtune.config import CatalogConfig
from vlmtune.data.prompts import parse_amount
from vlmtune.errors import CatalogError

LOCAL_SUFFIXES = {".csv": "csv", ".tsv": "csv", ".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl",
                  ".ndjson": "jsonl", ".json": "jsonl"}


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
    """Normalised records in catalog order plus everything that was rejected on the way."""

    records: list[dict] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)
    source: str = ""

    def fingerprint(self) -> str:
        """Changes whenever the set or content of records changes; guards resuming into a different catalog."""
        h = hashlib.sha256()
        for rec in self.records:
            h.update(json.dumps(rec, sort_keys=True, ensure_ascii=False).encode())
        return h.hexdigest()[:16]


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


def check_image_source(value: str) -> str | None:
    """None if `value` is an accepted image source (http, https, or a local path), else the reason."""
    scheme = urlparse(value).scheme.lower()
    if scheme in {"http", "https"}:
        return None if urlparse(value).netloc else "URL has no host"
    if scheme in {"", "file"} or (len(scheme) == 1 and value[1:3] in {":\\", ":/"}):
        return None
    return f"unsupported image source scheme '{scheme}' (only http, https and local paths)"


def normalise_row(raw: dict, row: int, cfg: CatalogConfig) -> dict | Reject:
    cols = cfg.columns
    raw_id = raw.get(cols.id)
    if _is_missing(raw_id):
        return Reject(row, None, f"missing id (column '{cols.id}')")
    rid = _text(raw_id)

    def reject(reason: str) -> Reject:
        return Reject(row, rid, reason)

    title = raw.get(cols.title)
    if _is_missing(title):
        return reject(f"missing title (column '{cols.title}')")
    path = [_text(raw[c]) for c in cols.category if not _is_missing(raw.get(c))]
    if not path:
        return reject(f"missing category (columns {', '.join(cols.category)})")
    full_price, why = parse_price(raw.get(cols.full_price))
    if why:
        return reject(f"full_price {why} (column '{cols.full_price}')")
    price = full_price
    if cols.price and not _is_missing(raw.get(cols.price)):
        price, why = parse_price(raw.get(cols.price))
        if why:
            return reject(f"price {why} (column '{cols.price}')")
    currency = cfg.default_currency
    if cols.currency and not _is_missing(raw.get(cols.currency)):
        currency = _text(raw[cols.currency]).upper()
    image = raw.get(cols.image)
    if _is_missing(image):
        return reject(f"missing image (column '{cols.image}')")
    image = str(image).strip()
    why = check_image_source(image)
    if why:
        return reject(why)
    return {"id": rid, "title": _text(title), "category": path, "full_price": full_price, "price": price,
            "currency": currency, "image": image, "row": row}


def _iter_local(path: Path, kind: str, limit: int | None) -> Iterator[dict]:
    import pandas as pd

    if kind == "csv":
        sep = "\t" if path.suffix == ".tsv" else ","
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, sep=sep, nrows=limit)
        yield from frame.to_dict(orient="records")
    elif kind == "parquet":
        frame = pd.read_parquet(path)
        yield from frame.head(limit).to_dict(orient="records") if limit else frame.to_dict(orient="records")
    else:
        with path.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if limit is not None and lineno > limit:
                    break
                if not line.strip():
                    yield {"__error__": "empty line"}
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    yield {"__error__": f"{path.name} line {lineno}: invalid JSON ({e.msg})"}
                    continue
                yield obj if isinstance(obj, dict) else {"__error__": f"{path.name} line {lineno}: not an object"}


def _iter_hf(cfg: CatalogConfig) -> Iterator[dict]:
    import datasets

    try:
        ds = datasets.load_dataset(cfg.source, split=cfg.hf_split)
    except Exception as e:  # datasets raises many types; the message is what the user needs
        raise CatalogError(f"could not load Hugging Face data set '{cfg.source}' split '{cfg.hf_split}': {e}") from e
    if cfg.limit:
        ds = ds.select(range(min(cfg.limit, len(ds))))
    yield from ds


def resolve_local_images(records: list[dict], base: Path) -> None:
    """Relative local image paths are relative to `base` (image_root, or the catalog file's folder)."""
    for rec in records:
        image = rec["image"]
        if urlparse(image).scheme in {"http", "https"}:
            continue
        local = Path(image[7:] if image.startswith("file://") else image)
        rec["image"] = str(local if local.is_absolute() else (base / local).resolve())


def read_catalog(cfg: CatalogConfig) -> CatalogRows:
    """All rows → records (catalog order, duplicates kept once) and rejects (row, id, reason)."""
    source = cfg.source
    path = Path(source)
    kind = LOCAL_SUFFIXES.get(path.suffix.lower())
    if kind and not path.is_file():
        raise CatalogError(f"catalog file not found: {source}")
    if path.is_file() and not kind:
        raise CatalogError(f"{source}: unknown catalog format '{path.suffix}' (use .csv, .parquet or .jsonl)")
    rows = _iter_local(path, kind, cfg.limit) if kind else _iter_hf(cfg)

    out = CatalogRows(source=source)
    first_row: dict[str, int] = {}
    checked_columns = False
    for i, raw in enumerate(rows):
        if "__error__" in raw:
            out.rejects.append(Reject(i, None, raw["__error__"]))
            continue
        if not checked_columns and kind != "jsonl":
            needed = [cfg.columns.id, cfg.columns.title, cfg.columns.full_price, cfg.columns.image]
            missing = [c for c in needed if c not in raw]
            if missing:
                raise CatalogError(
                    f"{source}: columns {missing} not found (have {sorted(raw)}); set data.catalog.columns.*"
                )
            checked_columns = True
        item = normalise_row(raw, i, cfg)
        if isinstance(item, Reject):
            out.rejects.append(item)
            continue
        if item["id"] in first_row:
            out.rejects.append(Reject(i, item["id"], f"duplicate id (kept row {first_row[item['id']]})"))
            continue
        first_row[item["id"]] = i
        out.records.append(item)
    if kind:
        resolve_local_images(out.records, Path(cfg.image_root) if cfg.image_root else path.parent.resolve())
    elif cfg.image_root:
        resolve_local_images(out.records, Path(cfg.image_root))
    return out
