"""Batch inference with Ray Data: shards or a raw catalog in, a resumable Parquet dataset out.

Rows are read inside Ray tasks (one task per shard, or the prepare image pipeline for a raw catalog), so
nothing but ids and results passes through the driver. Generation runs in an actor pool
(`map_batches` with a callable class): each actor loads the model once — one per GPU on a GPU cluster,
CPU actors locally — and answers batches with left-padded greedy decoding.

The output is a Parquet dataset directory written part by part (`part-NNNNN.parquet`, each written to
a temporary name and renamed). A rerun reads the ids already written and only predicts the rest, so an
interrupted prediction resumes without duplicates.
"""

from __future__ import annotations

import io
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from vlmtune.config import Config, ImageConfig
from vlmtune.console import console
from vlmtune.data.catalog import CatalogRows
from vlmtune.data.collate import SampleEncoder
from vlmtune.data.images import Fetcher, load_product_images
from vlmtune.data.prompts import answer_text, has_answer, parse_answer
from vlmtune.data.shards import raw_samples, sample_images, split_shards

log = logging.getLogger(__name__)

COLUMNS = ["id", "image", "target", "generated", "title", "category", "full_price", "currency",
           "pred_title", "pred_category", "pred_full_price", "pred_currency", "parse_error", "error"]


def shard_rows(row: dict, skip: frozenset = frozenset()) -> list[dict]:
    """Ray Data flat_map: one shard URL → its samples as {id, image_ref, images, meta}, minus the `skip` ids."""
    rows = []
    for raw in raw_samples(row["url"]):
        try:
            meta = json.loads(raw["json"])
        except (KeyError, json.JSONDecodeError, UnicodeDecodeError) as e:
            meta = {"id": raw["__key__"], "error": f"bad JSON ({e})"}
        if str(meta["id"]) in skip:
            continue
        rows.append({"id": str(meta["id"]), "image_ref": f"{row['url']}#{raw['__key__']}",
                     "images": sample_images(raw), "meta": json.dumps(meta, ensure_ascii=False)})
    return rows


def catalog_rows(batch: dict[str, np.ndarray], images: ImageConfig) -> dict[str, np.ndarray]:
    """Ray Data map_batches: catalog records → fetched and normalised like prepare's → rows like `shard_rows`.
    A product predicts from the images that pass; only a product with none gets an error instead."""
    metas = [json.loads(r) for r in batch["record"]]
    fetcher = Fetcher(images)
    with ThreadPoolExecutor(max_workers=min(images.fetch_threads, len(metas))) as pool:
        products = list(pool.map(lambda m: load_product_images(m["images"], images, fetcher), metas))
    for meta, product in zip(metas, products, strict=True):
        if not product.jpegs:
            meta["error"] = "; ".join(reason for _, reason in product.failures)
    return {"id": np.array([m["id"] for m in metas], dtype=object),
            "image_ref": np.array([m["images"][0] for m in metas], dtype=object),
            "images": _object_array([p.jpegs for p in products]),
            "meta": np.array([json.dumps(m, ensure_ascii=False) for m in metas], dtype=object)}


def _object_array(items: list) -> np.ndarray:
    """A 1-D object array of `items` (np.array would turn equally long lists into a 2-D array)."""
    out = np.empty(len(items), dtype=object)
    for i, item in enumerate(items):
        out[i] = item
    return out


class AnswerGenerator:
    """Ray Data actor: loads the model once, answers batches of rows."""

    def __init__(self, model: str, cfg: dict, use_gpu: bool):
        from vlmtune.models.loading import load

        self.cfg = Config.model_validate(cfg)
        self.device = torch.device("cuda" if use_gpu else "cpu")
        dtype = torch.bfloat16 if use_gpu else torch.float32
        self.model, self.processor = load(model, num_crops=self.cfg.model.num_crops, dtype=dtype,
                                          attn_implementation=self.cfg.model.attn_implementation)
        self.model.to(self.device).eval()
        self.encoder = SampleEncoder(self.processor, self.cfg.data.prompt, self.cfg.model.max_length,
                                     with_answer=False)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from vlmtune.eval.generate import generate_answers

        metas = [json.loads(m) for m in batch["meta"]]
        samples, errors, where = [], [""] * len(metas), []
        for i, (meta, jpegs) in enumerate(zip(metas, batch["images"], strict=True)):
            if meta.get("error"):
                errors[i] = meta["error"]
                continue
            try:
                images = [Image.open(io.BytesIO(jpeg)).convert("RGB") for jpeg in jpegs]
                samples.append(self.encoder({"images": images, "meta": meta, "key": meta["id"]}))
                where.append(i)
            except Exception as e:  # one bad image must not lose the batch; it is recorded per row
                errors[i] = f"{type(e).__name__}: {e}"
        texts = [""] * len(metas)
        if samples:
            answers = generate_answers(self.model, self.processor, samples, self.cfg.eval.max_new_tokens,
                                       self.device)
            for i, text in zip(where, answers, strict=True):
                texts[i] = text
        return _result_columns(batch, metas, texts, errors, self.cfg)


def _result_columns(batch, metas, texts, errors, cfg: Config) -> dict[str, np.ndarray]:
    """One output row per input row. Target columns hold what the input knows: a catalog of new products
    has no title, category or price yet, and those columns stay empty (the target text too, unless all are
    there)."""
    out: dict[str, list] = {c: [] for c in COLUMNS}
    for meta, ref, text, error in zip(metas, batch["image_ref"], texts, errors, strict=True):
        parsed = parse_answer(text)
        out["id"].append(str(meta["id"]))
        out["image"].append(ref)
        out["target"].append(answer_text(meta, cfg.data.prompt) if has_answer(meta) else "")
        out["generated"].append(text)
        out["title"].append(meta.get("title"))
        out["category"].append(json.dumps(meta["category"]) if meta.get("category") else None)
        out["full_price"].append(float(meta["full_price"]) if meta.get("full_price") is not None else None)
        out["currency"].append(meta.get("currency"))
        out["pred_title"].append(parsed.title)
        out["pred_category"].append(parsed.category)
        out["pred_full_price"].append(parsed.full_price)
        out["pred_currency"].append(parsed.currency)
        out["parse_error"].append(parsed.error if not error else None)
        out["error"].append(error or None)
    return {k: np.array(v, dtype=object) for k, v in out.items()}


SCHEMA = pa.schema([(c, pa.float64() if c in ("full_price", "pred_full_price") else pa.string()) for c in COLUMNS])


class PartWriter:
    """Appends row groups to a Parquet dataset directory as numbered, atomically renamed part files."""

    def __init__(self, directory: str | Path, rows_per_part: int = 256):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.rows_per_part = rows_per_part
        self.pending: list[dict] = []
        self.next_part = len(list(self.dir.glob("part-*.parquet")))

    def done_ids(self) -> set[str]:
        parts = sorted(self.dir.glob("part-*.parquet"))
        return {i for p in parts for i in pq.read_table(p, columns=["id"]).column("id").to_pylist()}

    def add(self, row: dict) -> None:
        self.pending.append(row)
        if len(self.pending) >= self.rows_per_part:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        table = pa.Table.from_pylist(self.pending, schema=SCHEMA)
        final = self.dir / f"part-{self.next_part:05d}.parquet"
        tmp = self.dir / f"_{final.name}.partial"  # "_" files are skipped by Parquet dataset readers
        pq.write_table(table, tmp)
        tmp.rename(final)
        self.next_part += 1
        self.pending = []


def predict(cfg: Config, model: str, source: str, output: str, split: str = "val",
            max_samples: int | None = None, rows_per_part: int = 256) -> pd.DataFrame:
    """Predict every sample of `source` (a shard directory's `split`, or a catalog file) into `output`.

    Returns all predictions in `output` (earlier parts included), sorted by id.
    """
    import ray

    if not ray.is_initialized():
        ray.init()
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    writer = PartWriter(output, rows_per_part)
    done = writer.done_ids()

    if (Path(source) / "manifest.json").exists() or "://" in source:
        shards = split_shards(source, split)
        ds = ray.data.from_items([{"url": s.url} for s in shards]).flat_map(shard_rows,
                                                                            fn_kwargs={"skip": frozenset(done)})
        total = sum(s.count for s in shards)
    else:
        from vlmtune.data.catalog import read_catalog

        catalog = cfg.data.catalog.model_copy(update={"source": source})
        rows = read_catalog(catalog, "predict", cfg.data.images.max_per_product)
        _report_catalog(source, rows)
        records = [r for r in rows.records if r["id"] not in done][: max_samples and max_samples - len(done)]
        if not records:
            return _read(writer.dir)
        ds = ray.data.from_items([{"record": json.dumps(r, ensure_ascii=False)} for r in records])
        ds = ds.map_batches(catalog_rows, fn_kwargs={"images": cfg.data.images},
                            batch_size=cfg.data.shards.rows_per_task)
        total = len(rows.records)
    if max_samples:
        ds = ds.limit(max(0, max_samples - len(done)))
        total = min(total, max_samples)
    use_gpu = cfg.cluster.use_gpu
    # one block per batch, so every actor of the pool gets work even when a few shards hold everything
    ds = ds.repartition(target_num_rows_per_block=cfg.eval.batch_size)
    ds = ds.map_batches(AnswerGenerator, fn_constructor_kwargs={"model": model, "cfg": cfg.model_dump(mode="json"),
                                                                "use_gpu": use_gpu},
                        batch_size=cfg.eval.batch_size, compute=ray.data.ActorPoolStrategy(size=cfg.eval.num_actors),
                        num_gpus=1 if use_gpu else 0, num_cpus=1)
    with console.progress(total=total, initial=min(len(done), total), desc="predict", unit="sample") as bar:
        for row in ds.iter_rows():
            writer.add({c: row[c] for c in COLUMNS})
            bar.update()
    writer.flush()
    return _read(writer.dir)


def _report_catalog(source: str, rows: CatalogRows) -> None:
    """Rows that cannot be predicted (no id, no usable image, a repeated id) and label values that cannot
    serve as targets, said once each with the first examples (no id is silently left out)."""
    for what, items in (("row(s) not predicted", rows.rejects),
                        ("row(s) without a usable target value (predicted all the same)", rows.target_notes)):
        if items:
            examples = "; ".join(f"row {r.row}: {r.reason}" for r in items[:3])
            log.warning("%s: %d %s, e.g. %s", source, len(items), what, examples)


def _read(directory: Path) -> pd.DataFrame:
    frame = pd.read_parquet(directory) if any(directory.glob("part-*.parquet")) else pd.DataFrame(columns=COLUMNS)
    return frame.sort_values("id").reset_index(drop=True)
