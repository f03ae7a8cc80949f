"""A synthetic, seeded product catalog in the Burberry schema, for demos and tests.

Each product is a drawing whose visible attributes determine its labels, so even a tiny model can
learn them: the silhouette fixes the category path (and every category has its own two colours, so
even a low-resolution view separates them), the fill colour names the title's colour word, a
check pattern adds "Check" to the title and 40% to the price, and a large drawing adds "Large" and 20%.
Images vary in size and aspect ratio (and a few are PNG) so the HD transform and the image pipeline see
realistic variety. The catalog is a CSV with the same columns as the DBQ Burberry price data set, so
demos exercise exactly the path a real catalog takes.
"""

from __future__ import annotations

import csv
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

Box = tuple[float, float, float, float]

BURBERRY_COLUMNS = [
    "website_name", "competence_date", "country_code", "currency_code", "brand", "category1_code",
    "category2_code", "category3_code", "product_code", "title", "itemurl", "imageurl", "full_price",
    "price", "full_price_eur", "price_eur", "flg_discount",
]


def _tote(d: ImageDraw.ImageDraw, b: Box, ink) -> None:
    x0, y0, x1, y1 = b
    w, h = x1 - x0, y1 - y0
    d.arc((x0 + 0.25 * w, y0, x1 - 0.25 * w, y0 + 0.6 * h), 180, 360, fill=ink, width=max(2, int(w * 0.04)))


def _tote_body(b: Box) -> list[tuple[float, float]]:
    x0, y0, x1, y1 = b
    w, h = x1 - x0, y1 - y0
    return [(x0 + 0.1 * w, y0 + 0.3 * h), (x1 - 0.1 * w, y0 + 0.3 * h), (x1, y1), (x0, y1)]


def _scarf_body(b: Box) -> list[tuple[float, float]]:
    x0, y0, x1, y1 = b
    h = y1 - y0
    return [(x0, y0 + 0.35 * h), (x1, y0 + 0.35 * h), (x1, y0 + 0.65 * h), (x0, y0 + 0.65 * h)]


def _scarf(d: ImageDraw.ImageDraw, b: Box, ink) -> None:
    x0, y0, x1, y1 = b
    h = y1 - y0
    for x in (x0, x1):
        for i in range(7):
            y = y0 + 0.37 * h + i * 0.26 * h / 6
            d.line((x, y, x + (0.06 if x == x1 else -0.06) * (x1 - x0), y), fill=ink, width=2)


def _coat_body(b: Box) -> list[tuple[float, float]]:
    x0, y0, x1, y1 = b
    w, h = x1 - x0, y1 - y0
    return [(x0 + 0.3 * w, y0), (x1 - 0.3 * w, y0), (x1, y0 + 0.15 * h), (x1 - 0.05 * w, y0 + 0.55 * h),
            (x1 - 0.2 * w, y0 + 0.5 * h), (x1 - 0.15 * w, y1), (x0 + 0.15 * w, y1), (x0 + 0.2 * w, y0 + 0.5 * h),
            (x0 + 0.05 * w, y0 + 0.55 * h), (x0, y0 + 0.15 * h)]


def _coat(d: ImageDraw.ImageDraw, b: Box, ink) -> None:
    x0, y0, x1, y1 = b
    w, h = x1 - x0, y1 - y0
    d.line((x0 + 0.2 * w, y0 + 0.45 * h, x1 - 0.2 * w, y0 + 0.45 * h), fill=ink, width=max(2, int(h * 0.03)))
    for i in range(3):
        cy, r = y0 + (0.2 + 0.12 * i) * h, max(2, w * 0.025)
        d.ellipse((x0 + 0.42 * w - r, cy - r, x0 + 0.42 * w + r, cy + r), fill=ink)
        d.ellipse((x1 - 0.42 * w - r, cy - r, x1 - 0.42 * w + r, cy + r), fill=ink)


def _sneaker_body(b: Box) -> list[tuple[float, float]]:
    x0, y0, x1, y1 = b
    w, h = x1 - x0, y1 - y0
    return [(x0, y0 + 0.35 * h), (x0 + 0.35 * w, y0 + 0.3 * h), (x0 + 0.55 * w, y0 + 0.55 * h),
            (x1, y0 + 0.65 * h), (x1, y0 + 0.8 * h), (x0, y0 + 0.8 * h)]


def _sneaker(d: ImageDraw.ImageDraw, b: Box, ink) -> None:
    x0, y0, x1, y1 = b
    _w, h = x1 - x0, y1 - y0
    d.rectangle((x0, y0 + 0.8 * h, x1, y0 + 0.88 * h), fill=(245, 245, 245), outline=ink, width=2)


def _belt_body(b: Box) -> list[tuple[float, float]]:
    x0, y0, x1, y1 = b
    h = y1 - y0
    return [(x0, y0 + 0.44 * h), (x1, y0 + 0.44 * h), (x1, y0 + 0.56 * h), (x0, y0 + 0.56 * h)]


def _belt(d: ImageDraw.ImageDraw, b: Box, ink) -> None:
    x0, y0, x1, y1 = b
    w, h = x1 - x0, y1 - y0
    d.rectangle((x0 + 0.15 * w, y0 + 0.38 * h, x0 + 0.27 * w, y0 + 0.62 * h), outline=(200, 170, 60), width=4)


def _card_case_body(b: Box) -> list[tuple[float, float]]:
    x0, y0, x1, y1 = b
    w, h = x1 - x0, y1 - y0
    return [(x0 + 0.2 * w, y0 + 0.25 * h), (x1 - 0.2 * w, y0 + 0.25 * h), (x1 - 0.2 * w, y1 - 0.25 * h),
            (x0 + 0.2 * w, y1 - 0.25 * h)]


def _card_case(d: ImageDraw.ImageDraw, b: Box, ink) -> None:
    x0, y0, x1, y1 = b
    w, h = x1 - x0, y1 - y0
    for i in range(3):
        y = y0 + (0.35 + 0.1 * i) * h
        d.line((x0 + 0.25 * w, y, x1 - 0.25 * w, y), fill=ink, width=2)


def _hat_body(b: Box) -> list[tuple[float, float]]:
    x0, y0, x1, y1 = b
    w, h = x1 - x0, y1 - y0
    return [(x0 + 0.3 * w, y0 + 0.25 * h), (x1 - 0.3 * w, y0 + 0.25 * h), (x1 - 0.2 * w, y0 + 0.6 * h),
            (x1, y0 + 0.75 * h), (x0, y0 + 0.75 * h), (x0 + 0.2 * w, y0 + 0.6 * h)]


def _hat(d: ImageDraw.ImageDraw, b: Box, ink) -> None:
    x0, y0, x1, y1 = b
    w, h = x1 - x0, y1 - y0
    d.line((x0 + 0.22 * w, y0 + 0.58 * h, x1 - 0.22 * w, y0 + 0.58 * h), fill=ink, width=max(2, int(h * 0.03)))


@dataclass(frozen=True)
class Product:
    path: tuple[str, str, str]
    noun: str
    material: str
    base_price: float
    colours: tuple[tuple[str, tuple[int, int, int]], ...]
    body: Callable[[Box], list[tuple[float, float]]]
    details: Callable[[ImageDraw.ImageDraw, Box, tuple[int, int, int]], None]


PRODUCTS = [
    Product(("Women", "Bags", "Tote Bags"), "Tote", "Leather", 1890.0,
            (("Honey", (201, 144, 66)), ("Black", (30, 30, 30))), _tote_body, _tote),
    Product(("Women", "Scarves", "Cashmere Scarves"), "Scarf", "Cashmere", 590.0,
            (("Archive Beige", (214, 190, 150)), ("Crème", (243, 229, 200))), _scarf_body, _scarf),
    Product(("Women", "Coats", "Trench Coats"), "Trench Coat", "Gabardine", 2390.0,
            (("Camel", (160, 120, 80)), ("Navy", (30, 40, 90))), _coat_body, _coat),
    Product(("Men", "Shoes", "Sneakers"), "Sneakers", "Canvas", 690.0,
            (("White", (235, 235, 235)), ("Burgundy", (120, 25, 40))), _sneaker_body, _sneaker),
    Product(("Men", "Accessories", "Belts"), "Belt", "Leather", 450.0,
            (("Chocolate", (80, 45, 25)), ("Olive", (110, 110, 40))), _belt_body, _belt),
    Product(("Men", "Wallets", "Card Cases"), "Card Case", "Grainy Leather", 390.0,
            (("Plum", (90, 30, 90)), ("Forest Green", (30, 80, 50))), _card_case_body, _card_case),
    Product(("Children", "Hats", "Bucket Hats"), "Bucket Hat", "Cotton", 290.0,
            (("Sky Blue", (130, 180, 230)), ("Pink", (230, 150, 170))), _hat_body, _hat),
]
ASPECTS = (0.6, 0.75, 1.0, 1.0, 1.33, 1.6)


def draw_product(product: Product, colour: tuple[int, int, int], check: bool, large: bool,
                 size: tuple[int, int], rng: random.Random) -> Image.Image:
    """Render one product photo: neutral background, silhouette filled with colour (and check), details."""
    width, height = size
    background = tuple(rng.randint(236, 252) for _ in range(3))
    canvas = Image.new("RGB", size, background)
    side = min(width, height) * (0.9 if large else 0.6)
    cx = width / 2 + rng.uniform(-0.04, 0.04) * width
    cy = height / 2 + rng.uniform(-0.04, 0.04) * height
    box = (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)

    fill = Image.new("RGB", size, colour)
    if check:
        lines = ImageDraw.Draw(fill)
        step = max(4, int(side / 8))
        contrast = (235, 225, 200) if sum(colour) < 380 else (40, 30, 30)
        for offset in range(0, max(width, height), step):
            lines.line((offset, 0, offset, height), fill=contrast, width=max(1, step // 5))
            lines.line((0, offset, width, offset), fill=contrast, width=max(1, step // 5))
            lines.line((offset + step // 2, 0, offset + step // 2, height), fill=(180, 30, 30), width=1)
    mask = Image.new("L", size, 0)
    ImageDraw.Draw(mask).polygon(product.body(box), fill=255)
    canvas.paste(fill, mask=mask)
    ink = tuple(max(0, c - 70) for c in colour)
    product.details(ImageDraw.Draw(canvas), box, ink)
    return canvas


def generate_sample_catalog(out_dir: str | Path, n: int, seed: int = 0) -> Path:
    """Write `n` products (images under out_dir/images, catalog.csv) and return the CSV path."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    codes = rng.sample(range(10_000_000, 99_999_999), n)
    rows = []
    for code in codes:
        product = rng.choice(PRODUCTS)
        colour_name, colour = rng.choice(product.colours)
        check, large = rng.random() < 0.4, rng.random() < 0.4
        aspect = rng.choice(ASPECTS)
        long_side = rng.randint(240, 720)
        size = (long_side, round(long_side / aspect)) if aspect >= 1 else (round(long_side * aspect), long_side)
        image = draw_product(product, colour, check, large, size, rng)
        suffix = ".png" if rng.random() < 0.1 else ".jpg"
        image.save(out / "images" / f"{code}{suffix}", quality=92)

        words = [w for w in ("Large" if large else "", colour_name, "Check" if check else "", product.material,
                             product.noun) if w]
        full_price = round(product.base_price * (1.4 if check else 1.0) * (1.2 if large else 1.0), -1)
        price = round(full_price * 0.7, -1) if rng.random() < 0.2 else full_price
        rows.append({
            "website_name": "SAMPLE", "competence_date": "2026-01-01", "country_code": "USA",
            "currency_code": "USD", "brand": "SAMPLE",
            "category1_code": product.path[0], "category2_code": product.path[1], "category3_code": product.path[2],
            "product_code": code, "title": " ".join(words), "itemurl": f"https://example.invalid/p/{code}",
            "imageurl": f"images/{code}{suffix}", "full_price": f"{full_price:.2f}", "price": f"{price:.2f}",
            "full_price_eur": f"{full_price * 0.92:.2f}", "price_eur": f"{price * 0.92:.2f}",
            "flg_discount": int(price < full_price),
        })
    csv_path = out / "catalog.csv"
    with csv_path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=BURBERRY_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return csv_path
