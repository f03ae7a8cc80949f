"""prepare: catalog → validated, resized images → train/val WebDataset shards + manifest + rejects.

The driver plans the shards (data/plan.py: rows in id-hash order, `samples_per_shard` catalog rows per
shard) and hands each shard to a Ray task. The task fetches, validates and resizes the shard's images with
`fetch_threads` threads, writes the whole shard straight to its destination (local disk, NFS or `s3://`)
under a temporary name renamed when complete, records it in the journal, and returns only that entry
(count, bytes, sha256, rejects). No image passes through the driver, whose memory holds the plan and the
entries; tasks are spread over the cluster's nodes.

Resuming: shards whose journal entry exists and whose file has the recorded size are not planned again,
so a rerun after an interruption fetches only the unfinished shards. Because a shard's bytes depend only on
its planned rows and their images, the result is byte-identical whatever the interruptions, the order in
which tasks finish or the number of nodes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from vlmtune import __version__, storage
from vlmtune.config import DataConfig, ImageConfig
from vlmtune.console import console
from vlmtune.data.images import Fetcher, load_product_images
from vlmtune.data.plan import Plan, PlannedShard, plan_shards
from vlmtune.data.sample import generate_sample_catalog
from vlmtune.data.shards import SCHEMA_VERSION, SPLITS, Journal, write_manifest, write_rejects, write_shard
from vlmtune.errors import VlmtuneError

log = logging.getLogger(__name__)

META_FIELDS = ("id", "title", "category", "full_price", "price", "currency")


def sample_catalog_source(cfg: DataConfig) -> str:
    """For `source: sample`, draw the synthetic catalog (once; it is seeded) next to local shards, or in the
    user's cache when the shards go to remote storage (the images are read locally by the fetch tasks)."""
    n, seed = cfg.catalog.sample_size, cfg.catalog.sample_seed
    base = cfg.shards.dir.rstrip("/")
    local = Path(base) / "_catalog" if storage.is_local(base) else Path.home() / ".cache/vlmtune" / f"sample-{n}-{seed}"
    csv_path = local / "catalog.csv"
    stamp = local / "generated.json"
    wanted = {"n": n, "seed": seed}
    if not (csv_path.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == wanted):
        generate_sample_catalog(local, cfg.catalog.sample_size, cfg.catalog.sample_seed)
        stamp.write_text(json.dumps(wanted))
    return str(csv_path)


def build_shard(shard: PlannedShard, images: ImageConfig, journal: Journal) -> dict:
    """Fetch and normalise a planned shard's images, write the shard and its journal entry; → the entry.

    Products are fetched by `fetch_threads` threads and written in plan order, each as soon as its turn
    comes: a task holds at most its own shard's resized images. A product keeps the images that pass; it
    becomes a reject only when none does. Every failed image is recorded with its position and reason."""
    records = [json.loads(r) for r in shard.records]
    fetcher = Fetcher(images)
    ids, rejects = [], []

    def samples():
        with ThreadPoolExecutor(max_workers=min(images.fetch_threads, len(records))) as pool:
            loaded = pool.map(lambda r: load_product_images(r["images"], images, fetcher), records)
            for record, product in zip(records, loaded, strict=True):
                for position, reason in product.failures:
                    rejects.append({"row": record["row"], "id": record["id"], "stage": "image", "image": position,
                                    "product_kept": bool(product.jpegs), "reason": reason})
                if product.jpegs:
                    ids.append(record["id"])
                    meta = {k: record[k] for k in META_FIELDS}
                    meta["source"] = {"row": record["row"], "images": product.kept}
                    yield meta, product.jpegs

    written = write_shard(storage.join(journal.out_dir, shard.name), samples())
    entry = {"shard": shard.name, "split": shard.split, "rows": len(records), "count": written.count,
             "images": written.images, "bytes": written.bytes, "sha256": written.sha256, "ids": ids,
             "rejects": rejects}
    journal.record(entry)
    return entry


def _shard_task(shard: PlannedShard, images: ImageConfig, journal: Journal) -> tuple[dict, str]:
    """Ray task body: the entry (without its ids, which only the journal keeps) and the node it ran on."""
    import ray

    entry = build_shard(shard, images, journal)
    return {k: v for k, v in entry.items() if k != "ids"}, ray.get_runtime_context().get_node_id()


def _run_tasks(todo: list[PlannedShard], cfg: DataConfig, journal: Journal) -> tuple[dict[str, dict], Counter]:
    """Build the `todo` shards as Ray tasks, spread over the nodes; → (entries by shard, shards per node)."""
    import ray

    if not ray.is_initialized():
        ray.init()
    task = ray.remote(num_cpus=1, scheduling_strategy="SPREAD")(_shard_task)
    limit = cfg.shards.max_concurrent_tasks or max(1, int(ray.cluster_resources().get("CPU", 1)))
    entries: dict[str, dict] = {}
    nodes: Counter = Counter()
    queue = list(reversed(todo))
    running: dict = {}
    counts = {"ok": 0, "rejected": 0}
    try:
        with console.progress(total=sum(len(s.records) for s in todo), desc="prepare", unit="row") as bar:
            while queue or running:
                while queue and len(running) < limit:
                    shard = queue.pop()
                    running[task.remote(shard, cfg.images, journal)] = shard
                done, _ = ray.wait(list(running), num_returns=1)
                shard = running.pop(done[0])
                try:
                    entry, node = ray.get(done[0])
                except ray.exceptions.RayTaskError as e:
                    if isinstance(e.cause, VlmtuneError):
                        raise e.cause from None
                    raise
                entries[shard.name], nodes[node] = entry, nodes[node] + 1
                counts["ok"] += entry["count"]
                counts["rejected"] += entry["rows"] - entry["count"]
                bar.update(entry["rows"])
                bar.set_postfix(counts, refresh=False)
    finally:
        for ref in running:
            ray.cancel(ref)
    return entries, nodes


def settings_hash(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def prepare(cfg: DataConfig) -> dict:
    """Run (or resume) prepare; returns the manifest written to `cfg.shards.dir`."""
    if cfg.catalog.source == "sample":
        cfg = cfg.model_copy(deep=True)
        cfg.catalog.source = sample_catalog_source(cfg)
    out_dir = storage.resolve(cfg.shards.dir)
    plan = plan_shards(cfg)
    config_hash = settings_hash(shard_settings(cfg))
    journal = Journal(out_dir, {"catalog": plan.fingerprint, "config": config_hash})
    entries = journal.open()
    todo = [shard for shard in plan.shards if shard.name not in entries]
    if not todo:
        log.info("%s: all %d records are in finished shards, nothing to fetch", cfg.shards.dir, plan.records)
    else:
        if entries:
            log.info("resuming: %d of %d shards are finished, %d to go", len(plan.shards) - len(todo),
                     len(plan.shards), len(todo))
        built, nodes = _run_tasks(todo, cfg, journal)
        entries.update(built)
        per_node = ", ".join(f"{count} on {node[:8]}" for node, count in sorted(nodes.items()))
        log.info("wrote %d shard(s) with tasks on %d node(s): %s", len(built), len(nodes), per_node)
    return _finish(out_dir, plan, cfg, config_hash, [entries[s.name] for s in plan.shards])


def shard_settings(cfg: DataConfig) -> dict:
    """The settings that change shard contents; a resumed run must match them exactly."""
    return {
        "catalog": cfg.catalog.model_dump(mode="json", include={"columns", "default_currency", "limit"}),
        "images": cfg.images.model_dump(mode="json", include={"max_side", "min_side", "jpeg_quality", "max_bytes",
                                                              "max_pixels", "resample", "max_per_product"}),
        "shards": cfg.shards.model_dump(mode="json", include={"samples_per_shard", "val_fraction", "split_salt"}),
    }


def reason_kind(reject: dict) -> str:
    """The reason without its specifics, for the manifest's histogram: 'image https://…/a.jpg: HTTP 404
    Not Found' → 'HTTP 404 Not Found', 'duplicate id (kept row 3)' → 'duplicate id'."""
    reason = reject["reason"].split(": ", 1)[-1] if reject["stage"] == "image" else reject["reason"]
    reason = re.sub(r"^\S+ line \d+: ", "", reason)  # JSONL rows: 'catalog.jsonl line 15: invalid JSON (…)'
    return re.split(r" \(|: ", reason, maxsplit=1)[0]


def _finish(out_dir: str, plan: Plan, cfg: DataConfig, config_hash: str, entries: list[dict]) -> dict:
    """Manifest and rejects from the plan's catalog rejects and every shard's entry (earlier runs' included)."""
    rejects = list(plan.rejects)
    shards = []
    for entry in entries:
        rejects += entry["rejects"]
        if entry["count"]:
            shards.append({"name": entry["shard"], "split": entry["split"], "count": entry["count"],
                           "images": entry["images"], "bytes": entry["bytes"], "sha256": entry["sha256"]})
    rejects.sort(key=lambda r: (r["row"], r["stage"], r.get("image", 0)))
    totals = {s: {"shards": sum(1 for x in shards if x["split"] == s),
                  "samples": sum(x["count"] for x in shards if x["split"] == s),
                  "images": sum(x["images"] for x in shards if x["split"] == s),
                  "bytes": sum(x["bytes"] for x in shards if x["split"] == s)} for s in SPLITS}
    kept = sum(t["samples"] for t in totals.values())
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "vlmtune_version": __version__,
        "source": {"catalog": cfg.catalog.source, "rows": plan.rows, "fingerprint": plan.fingerprint},
        "config_hash": config_hash,
        "settings": shard_settings(cfg),
        "totals": {**totals, "rejected": plan.rows - kept,
                   "images_dropped": sum(1 for r in rejects if r.get("product_kept"))},
        "reject_reasons": dict(Counter(reason_kind(r) for r in rejects).most_common()),
        "shards": shards,
    }
    write_rejects(out_dir, rejects)
    write_manifest(out_dir, manifest)
    return manifest
