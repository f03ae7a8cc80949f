"""Evaluation report: metrics.json, predictions.parquet and pictures, locally and in W&B.

Pictures: predicted vs true full price (log axes), per-category price error with error bars, the
category confusion matrix, and a grid of the best and worst examples with their images.
"""

from __future__ import annotations

import io
import json
import math
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter
from PIL import Image

from vlmtune.data.prompts import CATEGORY_SEPARATOR
from vlmtune.data.shards import raw_samples
from vlmtune.eval.metrics import baselines, category_key, normalize, score, score_by_category

UNPARSED = "<unparsed>"
OTHER = "<other>"


def records_of(frame: pd.DataFrame) -> list[dict]:
    """Prediction rows with a target → the record form `vlmtune.eval.metrics` scores."""
    rows = frame[frame["category"].notna() & frame["error"].isna()]
    return [{"id": r.id, "title": r.title, "category": json.loads(r.category), "full_price": r.full_price,
             "generated": r.generated} for r in rows.itertuples()]


def build_metrics(frame: pd.DataFrame, train_meta: list[dict]) -> dict:
    records = records_of(frame)
    return {"overall": score(records), "baselines": baselines(train_meta, records),
            "per_category": score_by_category(records), "errors": int(frame["error"].notna().sum()),
            "samples": len(frame)}


def _ape(frame: pd.DataFrame) -> pd.Series:
    return (frame["pred_full_price"] - frame["full_price"]).abs() / frame["full_price"]


def price_scatter(frame: pd.DataFrame, path: Path) -> Path:
    ok = frame.dropna(subset=["pred_full_price", "full_price"])
    ok = ok[(ok["pred_full_price"] > 0) & (ok["full_price"] > 0)]
    fig = Figure(figsize=(5.5, 5))
    ax = fig.subplots()
    ax.scatter(ok["full_price"], ok["pred_full_price"], s=14, alpha=0.7)
    if len(ok):
        lo = min(ok["full_price"].min(), ok["pred_full_price"].min()) * 0.8
        hi = max(ok["full_price"].max(), ok["pred_full_price"].max()) * 1.25
        ax.plot([lo, hi], [lo, hi], color="grey", lw=1, ls="--", label="exact")
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.set_xscale("log")
        ax.set_yscale("log")
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            axis.set_major_formatter(FormatStrFormatter("%g"))
            axis.set_minor_formatter(NullFormatter())
        ax.legend(loc="upper left")
    else:
        ax.text(0.5, 0.5, "no answer contained a price", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("true full price")
    ax.set_ylabel("predicted full price")
    ax.set_title(f"Full price: {len(ok)} of {len(frame)} answers with a price")
    return _save(fig, path)


def category_errors(frame: pd.DataFrame, path: Path) -> Path:
    data = frame.dropna(subset=["pred_full_price", "category"]).copy()
    data["cat"] = data["category"].map(lambda c: CATEGORY_SEPARATOR.join(json.loads(c)))
    data["ape"] = _ape(data)
    stats = data.groupby("cat")["ape"].agg(["mean", "std", "count"]).sort_values("mean")
    fig = Figure(figsize=(7, 0.45 * max(len(stats), 2) + 1.2))
    ax = fig.subplots()
    err = (stats["std"].fillna(0) / np.sqrt(stats["count"])).to_numpy()
    ax.barh(stats.index, stats["mean"] * 100, xerr=err * 100, capsize=3, color="#4c72b0")
    ax.set_xlabel("mean absolute percentage error of full price (%), ± standard error")
    ax.set_title("Price error per true category")
    return _save(fig, path)


def confusion_matrix(frame: pd.DataFrame) -> tuple[list[str], list[str], np.ndarray]:
    """(true labels, predicted columns, counts); predictions outside the true labels go to <other>."""
    data = frame[frame["category"].notna()]
    truth = data["category"].map(lambda c: CATEGORY_SEPARATOR.join(json.loads(c)))
    labels = sorted(truth.unique())
    known = {tuple(category_key(label)): label for label in labels}
    pred = data["pred_category"].map(
        lambda c: UNPARSED if pd.isna(c) else known.get(tuple(category_key(c)), OTHER))
    cols = [*labels, OTHER, UNPARSED]
    matrix = np.zeros((len(labels), len(cols)), dtype=int)
    for t, p in zip(truth, pred, strict=True):
        matrix[labels.index(t), cols.index(p)] += 1
    return labels, cols, matrix


def confusion(frame: pd.DataFrame, path: Path) -> Path:
    labels, cols, matrix = confusion_matrix(frame)
    fig = Figure(figsize=(1.0 + 0.7 * len(cols), 1.0 + 0.55 * len(labels)))
    ax = fig.subplots()
    ax.imshow(matrix, cmap="Blues")
    for (i, j), v in np.ndenumerate(matrix):
        if v:
            ax.text(j, i, str(v), ha="center", va="center", fontsize=8,
                    color="white" if v > matrix.max() / 2 else "black")
    ax.set_xticks(range(len(cols)), [textwrap.shorten(c, 28) for c in cols], rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(labels)), [textwrap.shorten(c, 28) for c in labels], fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("Category confusion")
    return _save(fig, path)


def load_images(frame: pd.DataFrame) -> dict[str, Image.Image]:
    """Images for rows whose `image` is a shard reference (`<shard url>#<key>`)."""
    wanted: dict[str, set[str]] = {}
    for ref in frame["image"]:
        if "#" in ref:
            url, key = ref.rsplit("#", 1)
            wanted.setdefault(url, set()).add(key)
    images = {}
    for url, keys in wanted.items():
        for raw in raw_samples(url):
            if raw["__key__"] in keys and "jpg" in raw:
                images[f"{url}#{raw['__key__']}"] = Image.open(io.BytesIO(raw["jpg"])).convert("RGB")
    return images


def example_ranking(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows ordered best first: category right, then smallest price error (unparsed prices last)."""
    data = frame[frame["category"].notna()].copy()
    truth = data["category"].map(lambda c: [normalize(p) for p in json.loads(c)])
    data["category_ok"] = truth == data["pred_category"].map(lambda c: [] if pd.isna(c) else category_key(c))
    data["ape"] = _ape(data).fillna(math.inf)
    return data.sort_values(["category_ok", "ape"], ascending=[False, True])


def examples_grid(frame: pd.DataFrame, images: dict[str, Image.Image], path: Path, n: int = 6) -> Path:
    ranked = example_ranking(frame)
    picks = [("best", r) for r in ranked.head(n).itertuples()] + [("worst", r) for r in ranked.tail(n).itertuples()]
    fig = Figure(figsize=(3.0 * n, 7.5))
    axes = fig.subplots(2, n)
    for ax, (kind, row) in zip(axes.flat, picks, strict=False):
        if row.image in images:
            ax.imshow(images[row.image])
        ax.set_axis_off()
        generated = "".join(c if c.isprintable() else "·" for c in row.generated)  # raw model bytes
        ax.set_title(
            f"{kind}: {row.id}\n" + "\n".join(textwrap.wrap(f"true: {row.target}", 38)[:4])
            + "\n" + "\n".join(textwrap.wrap(f"pred: {generated}", 38)[:4]), fontsize=6.5, loc="left")
    for ax in list(axes.flat)[len(picks):]:
        ax.set_axis_off()
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def write_report(frame: pd.DataFrame, train_meta: list[dict], out_dir: str | Path, tracker=None) -> dict:
    """Write metrics.json, predictions.parquet and the PNGs to `out_dir`; log them to W&B if tracking."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics = build_metrics(frame, train_meta)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, ensure_ascii=False))
    frame.to_parquet(out / "predictions.parquet", index=False)
    images = load_images(frame)
    plots = {"price_scatter": price_scatter(frame, out / "price_scatter.png"),
             "category_errors": category_errors(frame, out / "category_errors.png"),
             "confusion": confusion(frame, out / "confusion.png"),
             "examples": examples_grid(frame, images, out / "examples.png")}
    if tracker is not None:
        overall = {f"eval/{k}": v for k, v in metrics["overall"].items()}
        overall.update({f"eval/baseline_{k}": v for k, v in metrics["baselines"].items()})
        tracker.log(overall, step=0)
        columns = ["id", "image", "target", "generated", "pred_category", "pred_full_price", "parse_error"]
        rows = [[r.id, images.get(r.image), r.target, r.generated, r.pred_category, r.pred_full_price,
                 r.parse_error] for r in frame.itertuples()]
        tracker.log_table("eval/predictions", columns, rows, step=0)
        tracker.log_images({f"eval/{k}": p for k, p in plots.items()}, step=0)
    return metrics
