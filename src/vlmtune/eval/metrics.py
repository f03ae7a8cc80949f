"""Domain metrics for catalog answers: category, price, title, and how often the answer parses at all.

Inputs are plain records, so the same code scores training's periodic eval, the evaluate job and any
predictions file:
    {"id", "title", "category": [path], "full_price", "generated": "<model text>"}

Price errors are computed over the answers whose price parsed (`price_n` says how many); an unparsed
price is not silently scored as zero error or dropped: it lowers `price_parse_rate`. Baselines that
need no model (majority category; the training set's median price for the predicted category) are
scored on the same records so a fine-tuned model's gain is visible.
"""

from __future__ import annotations

import statistics
from collections import Counter, defaultdict

from sacrebleu.metrics import CHRF

from vlmtune.data.prompts import CATEGORY_SEPARATOR, ParsedAnswer, parse_answer


def normalize(text: str | None) -> str:
    """Case and whitespace do not count when answers are compared."""
    return " ".join((text or "").lower().split())


def category_key(text: str | None) -> list[str]:
    """A category as written in an answer ('Women > Bags', 'women>bags') → its normalised path."""
    return [normalize(p) for p in (text or "").split(CATEGORY_SEPARATOR.strip())] if text else []


def price_errors(pairs: list[tuple[float, float]]) -> dict:
    """(predicted, true) → MAE, MAPE, median APE and the share within 10% / 25%."""
    if not pairs:
        return {"price_n": 0}
    abs_err = [abs(p - t) for p, t in pairs]
    ape = [abs(p - t) / t for p, t in pairs]
    return {"price_n": len(pairs), "price_mae": sum(abs_err) / len(pairs), "price_mape": sum(ape) / len(pairs),
            "price_median_ape": statistics.median(ape), "price_within_10pct": sum(a <= 0.10 for a in ape) / len(ape),
            "price_within_25pct": sum(a <= 0.25 for a in ape) / len(ape)}


def score(records: list[dict]) -> dict:
    """Overall metrics for records with a `generated` answer (or a precomputed `parsed` ParsedAnswer)."""
    if not records:
        return {"n": 0}
    parsed: list[ParsedAnswer] = [r.get("parsed") or parse_answer(r["generated"]) for r in records]
    n = len(records)
    path_hits = top_hits = leaf_hits = 0
    for rec, ans in zip(records, parsed, strict=True):
        want, got = [normalize(c) for c in rec["category"]], category_key(ans.category)
        path_hits += got == want
        leaf_hits += bool(got) and got[-1] == want[-1]
        top_hits += bool(got) and got[0] == want[0]
    titles = [(ans.title or "", rec["title"]) for rec, ans in zip(records, parsed, strict=True)]
    chrf = CHRF().corpus_score([p for p, _ in titles], [[t for _, t in titles]]).score
    pairs = [(ans.full_price, float(rec["full_price"])) for rec, ans in zip(records, parsed, strict=True)
             if ans.full_price is not None]
    return {
        "n": n,
        "parse_rate": sum(a.ok for a in parsed) / n,
        "price_parse_rate": len(pairs) / n,
        "category_path_acc": path_hits / n,
        "category_top_acc": top_hits / n,
        "category_leaf_acc": leaf_hits / n,
        "title_exact": sum(normalize(p) == normalize(t) for p, t in titles) / n,
        "title_chrf": chrf,
        **price_errors(pairs),
    }


def score_by_category(records: list[dict]) -> dict[str, dict]:
    """`score` per true category path (joined), so weak categories stand out."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for rec in records:
        groups[CATEGORY_SEPARATOR.join(rec["category"])].append(rec)
    return {cat: score(recs) for cat, recs in sorted(groups.items())}


def baselines(train_meta: list[dict], records: list[dict]) -> dict:
    """Model-free references on the same records.

    - majority: always the training set's most common category path.
    - median price per predicted category: the model's category (full path) mapped to the training
      median full price of that category (global median when the category is unknown or unparsed).
    """
    paths = Counter(tuple(normalize(c) for c in m["category"]) for m in train_meta)
    majority = list(paths.most_common(1)[0][0]) if paths else []
    by_cat: dict[tuple, list[float]] = defaultdict(list)
    for m in train_meta:
        by_cat[tuple(normalize(c) for c in m["category"])].append(float(m["full_price"]))
    global_median = statistics.median(float(m["full_price"]) for m in train_meta) if train_meta else 0.0
    medians = {k: statistics.median(v) for k, v in by_cat.items()}
    pairs = []
    for rec in records:
        ans = rec.get("parsed") or parse_answer(rec["generated"])
        guess = medians.get(tuple(category_key(ans.category)), global_median)
        pairs.append((guess, float(rec["full_price"])))
    n = max(len(records), 1)
    majority_hits = sum([normalize(c) for c in r["category"]] == majority for r in records)
    return {"majority_category_path_acc": majority_hits / n,
            **{f"median_by_predicted_category_{k}": v for k, v in price_errors(pairs).items() if k != "price_n"}}
