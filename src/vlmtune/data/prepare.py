"""prepare: catalog → validated, resized images → train/val WebDataset shards + manifest + rejects.

The expensive part, fetching and normalising images, runs as Ray Data tasks (`map_batches`), so on a
cluster every node downloads; locally it uses the local Ray. The driver receives the small resized
JPEGs in catalog-hash order and writes the shards with `webdataset.ShardWriter` (see data/shards.py),
which keeps shard contents deterministic and the run resumable.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from vlmtune import __version__
from vlmtune.config import DataConfig, ImageConfig
from vlmtune.console import console
from vlmtune.data.catalog import CatalogRows, read_catalog
from vlmtune.data.images import ImageError, load_product_image
from vlmtune.data.sample import generate_sample_catalog
from vlmtune.data.shards import (
    SCHEMA_VERSION,
    SPLITS,
    SplitWriter,
    order_key,
    read_journal,
    split_of,
    write_manifest,
    write_rejects,
)
from vlmtune.errors import CatalogError
from vlmtune.storage import is_local

log = logging.getLogger(__name__)


def fetch_batch(batch: dict[str, np.ndarray], images: ImageConfig) -> dict[str, np.ndarray]:
    """Ray Data UDF: one batch of records → JPEG bytes or the reason each image was rejected."""
    records = [json.loads(r) for r in batch["record"]]

    def one(record: dict) -> tuple[bytes, str]:
        try:
            jpeg, _ = load_product_image(record["image"], images)
            return jpeg, ""
        except ImageError as e:
            return b"", f"image {record['image']}: {e.reason}"

    with ThreadPoolExecutor(max_workers=min(images.fetch_threads, len(records))) as pool:
        results = list(pool.map(one, records))
    return {
        "record": batch["record"],
        "jpeg": np.array([r[0] for r in results], dtype=object),
        "error": np.array([r[1] for r in results], dtype=object),
    }


def sample_catalog_source(cfg: DataConfig) -> str:
    """For `source: sample`, draw the synthetic catalog (once; it is seeded) next to local shards, or in the
    user's cache when the shards go to remote storage (the images are read locally by the fetch tasks)."""
    n, seed = cfg.catalog.sample_size, cfg.catalog.sample_seed
    base = cfg.shards.dir.rstrip("/")
    local = Path(base) / "_catalog" if is_local(base) else Path.home() / ".cache/vlmtune" / f"sample-{n}-{seed}"
    csv_path = local / "catalog.csv"
    stamp = local / "generated.json"
    wanted = {"n": n, "seed": seed}
    if not (csv_path.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == wanted):
        generate_sample_catalog(local, cfg.catalog.sample_size, cfg.catalog.sample_seed)
        stamp.write_text(json.dumps(wanted))
    return str(csv_path)


def _ordered_splits(rows: CatalogRows, cfg: DataConfig) -> dict[str, list[dict]]:
    salt = cfg.shards.split_salt
    splits: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for rec in rows.records:
        splits[split_of(rec["id"], cfg.shards.val_fraction, salt)].append(rec)
    for recs in splits.values():
        recs.sort(key=lambda r: order_key(r["id"], salt))
    return splits


def _fetch_in_order(records: list[dict], cfg: DataConfig):
    """Yield (record, jpeg, error) in input order, fetched by Ray Data tasks across the cluster."""
    import ray

    if not ray.is_initialized():
        ray.init()
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False
    ds = ray.data.from_items([{"record": json.dumps(r, ensure_ascii=False)} for r in records])
    ds = ds.map_batches(fetch_batch, batch_size=cfg.shards.rows_per_task, fn_kwargs={"images": cfg.images},
                        compute=ray.data.TaskPoolStrategy(size=cfg.shards.max_concurrent_tasks), num_cpus=1)
    for row in ds.iter_rows():
        yield json.loads(row["record"]), row["jpeg"], row["error"]


def settings_hash(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def prepare(cfg: DataConfig) -> dict:
    """Run (or resume) prepare; returns the manifest written to `cfg.shards.dir`."""
    if cfg.catalog.source == "sample":
        cfg = cfg.model_copy(deep=True)
        cfg.catalog.source = sample_catalog_source(cfg)
    out_dir = cfg.shards.dir.rstrip("/")
    rows = read_catalog(cfg.catalog)
    if not rows.records:
        raise CatalogError(f"{cfg.catalog.source}: no usable rows ({len(rows.rejects)} rejected); first reasons: "
                         + "; ".join(r.reason for r in rows.rejects[:3]))
    splits = _ordered_splits(rows, cfg)
    fingerprint, config_hash = rows.fingerprint(), settings_hash(shard_settings(cfg))
    headers = {split: {"split": split, "catalog": fingerprint, "config": config_hash} for split in SPLITS}
    writers: dict[str, SplitWriter] = {}
    todo: list[dict] = []
    for split, records in splits.items():
        journal = read_journal(out_dir, split, headers[split])
        writers[split] = SplitWriter(out_dir, split, cfg.shards.samples_per_shard, cfg.shards.max_shard_bytes,
                                     journal, headers[split])
        todo += [dict(r, split=split) for r in records[writers[split].position :]]
    done = sum(w.position for w in writers.values())
    if done:
        log.info("resuming: %d of %d records already in finished shards", done, len(rows.records))

    ok = False
    counts = {"ok": 0, "rejected": 0}
    try:
        with console.progress(total=len(todo), desc="prepare", unit="img", disable=not todo) as bar:
            for record, jpeg, error in _fetch_in_order(todo, cfg) if todo else ():
                writer = writers[record.pop("split")]
                if error:
                    writer.reject(record, error)
                    counts["rejected"] += 1
                else:
                    writer.write(record, jpeg)
                    counts["ok"] += 1
                bar.update()
                bar.set_postfix(counts, refresh=False)
        ok = True
    finally:
        for writer in writers.values():
            writer.close(ok)

    return _finish(out_dir, rows, cfg, fingerprint, config_hash, {s: w.journal for s, w in writers.items()})


def shard_settings(cfg: DataConfig) -> dict:
    """The settings that change shard contents; a resumed run must match them exactly."""
    return {
        "catalog": cfg.catalog.model_dump(mode="json", include={"columns", "default_currency", "limit"}),
        "images": cfg.images.model_dump(mode="json", include={"max_side", "min_side", "jpeg_quality", "max_bytes",
                                                              "max_pixels"}),
        "shards": cfg.shards.model_dump(mode="json", include={"samples_per_shard", "max_shard_bytes",
                                                              "val_fraction", "split_salt"}),
    }


def reason_kind(reject: dict) -> str:
    """The reason without its specifics, for the manifest's histogram: 'image https://…/a.jpg: HTTP 404
    Not Found' → 'HTTP 404 Not Found', 'duplicate id (kept row 3)' → 'duplicate id'."""
    reason = reject["reason"].split(": ", 1)[-1] if reject["stage"] == "image" else reject["reason"]
    reason = re.sub(r"^\S+ line \d+: ", "", reason)  # JSONL rows: 'catalog.jsonl line 15: invalid JSON (…)'
    return re.split(r" \(|: ", reason, maxsplit=1)[0]


def _finish(out_dir: str, rows: CatalogRows, cfg: DataConfig, fingerprint: str, config_hash: str,
            journals: dict[str, list[dict]]) -> dict:
    """Manifest and rejects from the complete journals (earlier runs' entries included)."""
    rejects = [r.to_dict() for r in rows.rejects]
    shards = []
    for split in SPLITS:
        for entry in journals[split]:
            rejects += entry["rejects"]
            if entry["shard"]:
                shards.append({"name": entry["shard"], "split": split, "count": entry["count"],
                               "bytes": entry["bytes"], "sha256": entry["sha256"]})
    rejects.sort(key=lambda r: (r["row"], r["stage"]))
    totals = {s: {"shards": sum(1 for x in shards if x["split"] == s),
                  "samples": sum(x["count"] for x in shards if x["split"] == s),
                  "bytes": sum(x["bytes"] for x in shards if x["split"] == s)} for s in SPLITS}
    reasons = Counter(reason_kind(r) for r in rejects)
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "vlmtune_version": __version__,
        "source": {"catalog": cfg.catalog.source, "rows": len(rows.records) + len(rows.rejects),
                   "fingerprint": fingerprint},
        "config_hash": config_hash,
        "settings": shard_settings(cfg),
        "totals": {**totals, "rejected": len(rejects)},
        "reject_reasons": dict(reasons.most_common()),
        "shards": shards,
    }
    write_rejects(out_dir, rejects)
    write_manifest(out_dir, manifest)
    return manifest
