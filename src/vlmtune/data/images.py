"""Fetch, validate and normalise product images.

Every failure becomes an `ImageError` with a reason a person can act on ("HTTP 404 Not Found", "not an image
(got text/html)", "decompression bomb: 40000x40000 pixels"), so prepare can record it in rejects.jsonl
instead of crashing or silently dropping the product.

Downloads are polite and go through urllib3: one `Fetcher` per task keeps connections alive, lets at most
`max_per_host` requests run against one host at a time, names itself with `user_agent`, and retries with
urllib3's `Retry` only what may succeed later (408, 429, 5xx, timeouts, connection errors), waiting as long
as the server's `Retry-After` asks on 429 and 503 (up to `retry_after_max_s`), with exponential backoff
otherwise.

Normalising costs far more than fetching, so it does as little pixel work as the output needs: a JPEG
at least twice the target size is decoded at 1/2, 1/4 or 1/8 scale in the DCT domain (`Image.draft`), the
image is decoded once (the structural `verify()` pass runs only for formats where it checks something, such
as PNG's chunk CRCs) and never copied at full size (EXIF orientation is applied in place), and the
downscaling filter is `resample` (box by default, see config.ImageConfig). docs/performance.md has the
measurements.
"""

from __future__ import annotations

import contextlib
import io
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import urllib3
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError
from urllib3.exceptions import HTTPError, MaxRetryError, NewConnectionError
from urllib3.exceptions import TimeoutError as RequestTimeout

from vlmtune.config import ImageConfig
from vlmtune.models.phi3v.image_processing import to_rgb

RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
RESAMPLE = {"box": Image.Resampling.BOX, "bilinear": Image.Resampling.BILINEAR,
            "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS}


class ImageError(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def check_image_source(value: str) -> str | None:
    """None if `value` is an accepted image source (http, https, or a local path), else the reason."""
    scheme = urlparse(value).scheme.lower()
    if scheme in {"http", "https"}:
        return None if urlparse(value).netloc else "URL has no host"
    if scheme in {"", "file"} or (len(scheme) == 1 and value[1:3] in {":\\", ":/"}):
        return None
    return f"unsupported image source scheme '{scheme}' (only http, https and local paths)"


class Fetcher:
    """Image bytes from http(s) URLs and local paths, for the threads of one task (thread-safe)."""

    def __init__(self, cfg: ImageConfig):
        self.cfg = cfg
        self.retry = urllib3.Retry(total=None, connect=cfg.retries, read=cfg.retries, status=cfg.retries,
                                   other=cfg.retries, redirect=10, backoff_factor=cfg.backoff_s,
                                   status_forcelist=RETRY_STATUS, allowed_methods={"GET"},
                                   respect_retry_after_header=True, retry_after_max=cfg.retry_after_max_s,
                                   raise_on_status=False)
        self.pool = urllib3.PoolManager(num_pools=32, maxsize=cfg.max_per_host,
                                        headers={"User-Agent": cfg.user_agent, "Accept": "image/*"},
                                        timeout=urllib3.Timeout(connect=cfg.timeout_s, read=cfg.timeout_s))
        self._hosts: dict[str, threading.BoundedSemaphore] = {}
        self._hosts_lock = threading.Lock()

    def fetch(self, source: str) -> bytes:
        why = check_image_source(source)
        if why:
            raise ImageError(why)
        scheme = urlparse(source).scheme.lower()
        if scheme in {"http", "https"}:
            return self._download(source)
        return self._read_local(Path(source[7:] if scheme == "file" else source))

    @contextlib.contextmanager
    def _host_slot(self, host: str) -> Iterator[None]:
        with self._hosts_lock:
            slot = self._hosts.setdefault(host, threading.BoundedSemaphore(self.cfg.max_per_host))
        with slot:
            yield

    def _download(self, url: str) -> bytes:
        cfg = self.cfg
        with self._host_slot(urlparse(url).netloc.lower()):
            try:
                response = self.pool.request("GET", url, retries=self.retry, preload_content=False)
            except MaxRetryError as e:
                raise ImageError(f"{_failure(e.reason, cfg)} (after {cfg.retries + 1} attempts)") from None
            except (HTTPError, OSError) as e:
                raise ImageError(_failure(e, cfg)) from None
            complete = False
            try:
                if response.status >= 400:
                    history = response.retries.history if response.retries else ()
                    retried = sum(1 for h in history if h.redirect_location is None)  # redirects are no retries
                    after = f" (after {retried + 1} attempts)" if retried else ""
                    raise ImageError(f"HTTP {response.status} {response.reason}{after}")
                length = response.headers.get("Content-Length", "")
                if length.isdigit() and int(length) > cfg.max_bytes:
                    raise ImageError(f"Content-Length {length} exceeds the {cfg.max_bytes} byte limit")
                content_type = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
                if content_type.startswith("text/"):
                    raise ImageError(f"not an image (got {content_type})")
                data = response.read(cfg.max_bytes + 1)
                if len(data) > cfg.max_bytes:
                    raise ImageError(f"larger than the {cfg.max_bytes} byte limit (images.max_bytes)")
                complete = True
            except (HTTPError, OSError) as e:
                raise ImageError(f"{_failure(e, cfg)} while reading the body") from None
            finally:
                if not complete:  # an unread body must not be left on a connection the pool reuses
                    response.close()
                response.release_conn()
        return data

    def _read_local(self, path: Path) -> bytes:
        if not path.is_file():
            raise ImageError(f"local file not found: {path}")
        size = path.stat().st_size
        if size > self.cfg.max_bytes:
            raise ImageError(f"file of {size} bytes exceeds the {self.cfg.max_bytes} byte limit (images.max_bytes)")
        return path.read_bytes()


def _failure(error: BaseException | None, cfg: ImageConfig) -> str:
    if isinstance(error, NewConnectionError):  # a subclass of urllib3's TimeoutError, for history's sake
        return f"connection failed: {str(error).split('): ', 1)[-1]}"
    if isinstance(error, RequestTimeout | TimeoutError):
        return f"timed out after {cfg.timeout_s:g}s"
    return f"connection failed: {error}"


def target_size(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    """`size` scaled so the longer side is at most `max_side` (never enlarged)."""
    width, height = size
    scale = max_side / max(width, height)
    if scale >= 1:
        return size
    return max(1, round(width * scale)), max(1, round(height * scale))


def decode_image(data: bytes, cfg: ImageConfig) -> Image.Image:
    """Decode and validate: a real image, not a bomb, fully decodable; EXIF orientation applied; RGB.

    A JPEG comes back at the smallest DCT scale that still covers `cfg.max_side` (so possibly smaller than
    stored, never smaller than the resize target)."""
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        head = data[:64].lstrip().lower()
        hint = "HTML" if head.startswith((b"<!doctype", b"<html")) else f"{len(data)} bytes"
        raise ImageError(f"not an image ({hint})") from None
    except Image.DecompressionBombError as e:
        raise ImageError(f"decompression bomb: {e}") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"corrupt image: {e}") from None
    width, height = image.size
    if width * height > cfg.max_pixels:
        raise ImageError(f"decompression bomb: {width}x{height} pixels exceeds images.max_pixels={cfg.max_pixels}")
    if min(width, height) < cfg.min_side:
        raise ImageError(f"too small: {width}x{height} (images.min_side={cfg.min_side})")
    try:
        if image.format == "JPEG":
            image.draft(None, target_size(image.size, cfg.max_side))
        else:
            image.verify()  # e.g. PNG chunk CRCs; verify() leaves the image unusable, so open it again
            image = Image.open(io.BytesIO(data))
        image.load()
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"corrupt image ({image.format}): {e}") from None
    ImageOps.exif_transpose(image, in_place=True)  # in place: no copy of the full-size pixels when upright
    return to_rgb(image)


def resize_max_side(image: Image.Image, max_side: int, resample: str = "box") -> Image.Image:
    size = target_size(image.size, max_side)
    if size == image.size:
        return image
    return image.resize(size, RESAMPLE[resample], reducing_gap=3.0)


def encode_jpeg(image: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality, optimize=True)  # ~1 ms more, ~17% smaller shards
    return buf.getvalue()


def normalise_image(data: bytes, cfg: ImageConfig) -> bytes:
    """Fetched bytes → JPEG of the validated RGB image, longer side at most `max_side`. Raises ImageError."""
    return encode_jpeg(resize_max_side(decode_image(data, cfg), cfg.max_side, cfg.resample), cfg.jpeg_quality)


@dataclass
class ProductImages:
    """A product's normalised images in catalog order, and why each of the others failed."""

    jpegs: list[bytes] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)  # the sources of `jpegs`
    failures: list[tuple[int, str]] = field(default_factory=list)  # (1-based position, "image <src>: <why>")


def load_product_images(sources: list[str], cfg: ImageConfig, fetcher: Fetcher) -> ProductImages:
    out = ProductImages()
    for position, source in enumerate(sources, 1):
        try:
            out.jpegs.append(normalise_image(fetcher.fetch(source), cfg))
            out.kept.append(source)
        except ImageError as e:
            out.failures.append((position, f"image {source}: {e.reason}"))
    return out


# Truncated files must fail loudly, whatever another library set globally.
ImageFile.LOAD_TRUNCATED_IMAGES = False
