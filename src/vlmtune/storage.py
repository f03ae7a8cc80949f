"""Paths that may be local or remote (`s3://`, `gs://`, NFS mounts), in one place.

Shards, runs and exports live wherever the user points them. Local paths are resolved to absolute ones
before they travel to Ray workers (whose working directory differs); remote URLs pass through fsspec.
Writes that readers may race with are atomic: a temporary name, then a rename.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import fsspec


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def resolve(url: str) -> str:
    """An absolute path for a local path (file:// stripped); remote URLs unchanged, without a trailing slash."""
    if not is_local(url):
        return url.rstrip("/")
    return str(Path(url.removeprefix("file://")).resolve())


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


def filesystem(url: str):
    """(fsspec filesystem, path inside it) for a local path or URL."""
    return fsspec.core.url_to_fs(url.rstrip("/"))


@contextlib.contextmanager
def open_atomic(url: str, mode: str = "wb") -> Iterator[IO]:
    """A file to write `url` through, whole or not at all: it is written under `<url>.partial` and renamed when
    the block ends without an exception (removed when it raises). A reader never sees a half-written file
    (works on object stores, where the rename is a copy of the finished object)."""
    fs, path = filesystem(url)
    try:
        with fs.open(path + ".partial", mode) as fh:
            yield fh
    except BaseException:
        with contextlib.suppress(OSError):
            fs.rm(path + ".partial")
        raise
    fs.mv(path + ".partial", path)


def write_atomic(url: str, data: str | bytes) -> None:
    """Write `url` whole or not at all (see `open_atomic`)."""
    with open_atomic(url, "wb" if isinstance(data, bytes) else "w") as fh:
        fh.write(data)


def read_text(url: str) -> str:
    with fsspec.open(url, "r", encoding="utf-8") as fh:
        return fh.read()


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    return fs.exists(path)


def sha256_file(url: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with fsspec.open(str(url), "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()
