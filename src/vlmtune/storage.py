"""Paths that may be local or remote (`s3://`, `gs://`, NFS mounts), in one place.

Shards, runs and exports live wherever the user points them. Local paths are resolved to absolute ones
before they travel to Ray workers (whose working directory differs); remote URLs pass through fsspec.
Writes that readers may race with are atomic: a temporary name, then a rename.

A remote URL may carry the query options that Ray Train's pyarrow filesystems read, so one
`cluster.storage_path` serves Ray Train and vlmtune alike, e.g. an S3-compatible server:
`s3://bucket/runs?endpoint_override=minio.local:9000&scheme=http`. Paths are joined before the query, and
the S3 options `endpoint_override`, `scheme` and `region` are handed to fsspec's s3fs as well; the other
pyarrow options concern only pyarrow (bucket creation, TLS files) and fsspec ignores them.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO
from urllib.parse import parse_qs

import fsspec


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def split_query(url: str) -> tuple[str, str]:
    """(path, query) of a remote URL: `s3://b/runs?scheme=http` → (`s3://b/runs`, `scheme=http`)."""
    if is_local(url):
        return url, ""
    path, _, query = url.partition("?")
    return path, query


def with_query(path: str, query: str) -> str:
    return f"{path}?{query}" if query else path


def resolve(url: str) -> str:
    """An absolute path for a local path (file:// stripped); remote URLs unchanged, without a trailing slash."""
    if not is_local(url):
        path, query = split_query(url)
        return with_query(path.rstrip("/"), query)
    return str(Path(url.removeprefix("file://")).resolve())


def join(base: str, *parts: str) -> str:
    path, query = split_query(base)
    return with_query("/".join([path.rstrip("/"), *parts]), query)


def parent(url: str) -> str:
    path, query = split_query(url)
    return with_query(path.rstrip("/").rsplit("/", 1)[0], query)


def basename(url: str) -> str:
    return split_query(url)[0].rstrip("/").rsplit("/", 1)[-1]


def fsspec_options(path: str, query: str) -> dict:
    """fsspec's spelling of the pyarrow query options that say where an S3-compatible server is."""
    options = {k: v[-1] for k, v in parse_qs(query).items()}
    if not path.startswith(("s3://", "s3a://")) or not options:
        return {}
    kwargs: dict = {}
    if endpoint := options.get("endpoint_override"):
        kwargs["endpoint_url"] = endpoint if "://" in endpoint else f"{options.get('scheme', 'https')}://{endpoint}"
    if region := options.get("region"):
        kwargs["client_kwargs"] = {"region_name": region}
    return kwargs


def filesystem(url: str):
    """(fsspec filesystem, path inside it) for a local path or URL."""
    path, query = split_query(url)
    return fsspec.core.url_to_fs(path.rstrip("/"), **fsspec_options(path, query))


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
    fs, path = filesystem(url)
    with fs.open(path, "r", encoding="utf-8") as fh:
        return fh.read()


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    fs.invalidate_cache(path)  # other processes (Ray Train's uploads) write there too
    return fs.exists(path)


def file_sizes(url: str) -> dict[str, int]:
    """Every file under the directory `url` (relative path → size in bytes); empty when it does not exist."""
    fs, root = filesystem(url)
    fs.invalidate_cache(root)
    if not fs.exists(root):
        return {}
    found = fs.find(root, detail=True)
    prefix = root.rstrip("/") + "/"
    return {path.removeprefix(prefix): int(info["size"]) for path, info in found.items() if info["type"] == "file"}


def subdirectories(url: str) -> list[str]:
    """The URLs of the directories directly under `url` (none when it does not exist)."""
    fs, root = filesystem(url)
    fs.invalidate_cache(root)
    if not fs.exists(root):
        return []
    return [join(url, entry["name"].rstrip("/").rsplit("/", 1)[-1]) for entry in fs.ls(root, detail=True)
            if entry["type"] == "directory"]


def upload_dir(local_dir: str | Path, url: str) -> None:
    """Copy a local directory's contents to `url` (local or remote)."""
    fs, path = filesystem(url)
    fs.put(str(local_dir).rstrip("/") + "/", path, recursive=True)


@contextlib.contextmanager
def staging_dir(kind: str) -> Iterator[Path]:
    """A local temporary directory (`<tmp>/vlmtune-staging-<kind>-*`) for files on their way to storage.

    A worker killed while it holds one (preempted mid-save, OOM-killed) cannot remove it, and a node that
    keeps its /tmp across restarts would collect them: a checkpoint part of a real-size run is gigabytes.
    So each one is held under an exclusive lock on `<dir>.lock` beside it (flock: the kernel releases it
    when the holder dies), and a new one first removes those of its kind whose lock is free.
    """
    root = Path(tempfile.gettempdir())
    # directories, and lock files whose directory is gone
    for other in {p.with_suffix("") for p in root.glob(f"vlmtune-staging-{kind}-*")}:
        _remove_if_abandoned(other)
    path = Path(tempfile.mkdtemp(prefix=f"vlmtune-staging-{kind}-", dir=root))
    lock_path = _lock_of(path)
    lock = os.open(lock_path, os.O_CREAT | os.O_WRONLY, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        lock_path.unlink(missing_ok=True)
        os.close(lock)


def _remove_if_abandoned(path: Path, grace_s: float = 60.0) -> None:
    """Remove a staging directory whose holder is gone: its lock is free, or it has had no lock file for
    `grace_s` (its creator makes the directory first, then the lock, within microseconds)."""
    lock_path = _lock_of(path)
    try:
        lock = os.open(lock_path, os.O_WRONLY)
    except FileNotFoundError:
        with contextlib.suppress(OSError):
            if time.time() - path.stat().st_mtime > grace_s:
                shutil.rmtree(path, ignore_errors=True)
        return
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # held: in use
        os.close(lock)
        return
    shutil.rmtree(path, ignore_errors=True)
    lock_path.unlink(missing_ok=True)
    os.close(lock)


def _lock_of(staging: Path) -> Path:
    return staging.with_name(staging.name + ".lock")


def sha256_file(url: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    fs, path = filesystem(str(url))
    with fs.open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()
