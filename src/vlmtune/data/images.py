"""Fetch, validate and normalise one product image.

Every failure becomes an `ImageError` with a reason a person can act on ("HTTP 404", "not an image
(got text/html)", "decompression bomb: 40000x40000 pixels"), so prepare can record it in rejects.jsonl
instead of crashing or silently dropping the product. Only transient failures (5xx, 429, timeouts,
connection errors) are retried, with exponential backoff.
"""

from __future__ import annotations

import http.client
import io
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from vlmtune.config import ImageConfig
from vlmtune.models.phi3v.image_processing import to_rgb

USER_AGENT = "vlmtune-prepare/0.1 (+https://github.com/vlmtune/vlmtune)"
RETRIABLE_STATUS = {408, 429, 500, 502, 503, 504}


class ImageError(Exception):
    def __init__(self, reason: str, retriable: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.retriable = retriable


def _read_capped(stream, limit: int) -> bytes:
    data = stream.read(limit + 1)
    if len(data) > limit:
        raise ImageError(f"larger than the {limit} byte limit (images.max_bytes)")
    return data


def _download_once(url: str, cfg: ImageConfig) -> bytes:
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT, "Accept": "image/*"})
    try:
        with urllib.request.urlopen(request, timeout=cfg.timeout_s) as response:
            length = response.headers.get("Content-Length")
            if length and length.isdigit() and int(length) > cfg.max_bytes:
                raise ImageError(f"Content-Length {length} exceeds the {cfg.max_bytes} byte limit")
            content_type = response.headers.get_content_type()
            data = _read_capped(response, cfg.max_bytes)
    except urllib.error.HTTPError as e:
        raise ImageError(f"HTTP {e.code} {e.reason}", retriable=e.code in RETRIABLE_STATUS) from None
    except TimeoutError:
        raise ImageError(f"timed out after {cfg.timeout_s}s", retriable=True) from None
    except urllib.error.URLError as e:
        retriable = isinstance(e.reason, (TimeoutError, socket.timeout, ConnectionError, OSError))
        raise ImageError(f"connection failed: {e.reason}", retriable=retriable) from None
    except (ConnectionError, http.client.HTTPException) as e:
        raise ImageError(f"connection failed: {e}", retriable=True) from None
    if content_type.startswith("text/"):
        raise ImageError(f"not an image (got {content_type})")
    return data


def fetch_bytes(source: str, cfg: ImageConfig) -> bytes:
    """Bytes of an http(s) URL (with retries) or a local file (absolute path or file:// URL)."""
    scheme = urlparse(source).scheme.lower()
    if scheme in {"http", "https"}:
        delay = cfg.backoff_s
        for attempt in range(cfg.retries + 1):
            try:
                return _download_once(source, cfg)
            except ImageError as e:
                if not e.retriable or attempt == cfg.retries:
                    if e.retriable:
                        raise ImageError(f"{e.reason} (after {attempt + 1} attempts)") from None
                    raise
            time.sleep(delay)
            delay *= 2
    path = Path(source[7:] if scheme == "file" else source)
    if not path.is_file():
        raise ImageError(f"local file not found: {path}")
    size = path.stat().st_size
    if size > cfg.max_bytes:
        raise ImageError(f"file of {size} bytes exceeds the {cfg.max_bytes} byte limit (images.max_bytes)")
    return path.read_bytes()


def decode_image(data: bytes, cfg: ImageConfig) -> Image.Image:
    """Decode and validate: a real image, not a bomb, fully decodable; EXIF orientation applied; RGB."""
    try:
        probe = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        head = data[:64].lstrip().lower()
        hint = "HTML" if head.startswith((b"<!doctype", b"<html")) else f"{len(data)} bytes"
        raise ImageError(f"not an image ({hint})") from None
    except Image.DecompressionBombError as e:
        raise ImageError(f"decompression bomb: {e}") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"corrupt image: {e}") from None
    width, height = probe.size
    if width * height > cfg.max_pixels:
        raise ImageError(f"decompression bomb: {width}x{height} pixels exceeds images.max_pixels={cfg.max_pixels}")
    try:
        probe.verify()
        image = Image.open(io.BytesIO(data))
        image.load()
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"corrupt image ({probe.format}): {e}") from None
    image = ImageOps.exif_transpose(image)
    if min(image.size) < cfg.min_side:
        raise ImageError(f"too small: {image.size[0]}x{image.size[1]} (images.min_side={cfg.min_side})")
    return to_rgb(image)


def resize_max_side(image: Image.Image, max_side: int) -> Image.Image:
    width, height = image.size
    scale = max_side / max(width, height)
    if scale >= 1:
        return image
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)


def encode_jpeg(image: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality, optimize=True)
    return buf.getvalue()


def load_product_image(source: str, cfg: ImageConfig) -> tuple[bytes, tuple[int, int]]:
    """source → (JPEG bytes of the normalised image, (width, height)). Raises ImageError."""
    image = resize_max_side(decode_image(fetch_bytes(source, cfg), cfg), cfg.max_side)
    return encode_jpeg(image, cfg.jpeg_quality), image.size


# Truncated files must fail loudly, whatever another library set globally.
ImageFile.LOAD_TRUNCATED_IMAGES = False
