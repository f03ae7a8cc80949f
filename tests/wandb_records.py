"""Read a W&B offline run file (run-<id>.wandb) back: the SDK has no public reader for it.

The file is a LevelDB-style log: a 7-byte file header (':W&B', magic, version), then 32 KiB blocks of
chunks, each with a 7-byte header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last) and a
protobuf `Record` payload.
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

from google.protobuf.message import DecodeError
from wandb.proto import wandb_internal_pb2

BLOCK = 32 * 1024
HEADER = 7


def records(path: str | Path):
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < HEADER:
            pos += left_in_block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        chunk = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind == 0 and length == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record
            pending = b""


def history(path: str | Path) -> list[dict]:
    """Every logged history row as {key: value}."""
    rows = []
    for record in records(path):
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    return rows


def run_id(path: str | Path) -> str:
    for record in records(path):
        if record.WhichOneof("record_type") == "run":
            return record.run.run_id
    raise AssertionError(f"{path} has no run record")


def branch_point(path: str | Path) -> tuple[str, str, float] | None:
    """(run id, metric, value) of the point a run file rewinds or forks its run to, None when it has none."""
    for record in records(path):
        if record.WhichOneof("record_type") == "run" and record.run.HasField("branch_point"):
            point = record.run.branch_point
            return point.run, point.metric, point.value
    return None


def finished(path: Path) -> bool:
    try:
        return any(record.WhichOneof("record_type") == "exit" for record in records(path))
    except (AssertionError, DecodeError):  # no header yet, or a record still being written
        return False


def run_files(directory: str | Path, timeout_s: float = 60.0) -> list[Path]:
    """The offline run files under `directory/wandb`, in the order they were started, each once its exit
    record is on disk: `run.finish()` can return before W&B's writer process has flushed the file.
    W&B names each run's directory offline-run-<time>-<run id>, adding -<n> when a run of the same id
    started in the same second."""

    def started(path: Path) -> tuple[str, int]:
        _, _, stamp, _, *taken = path.parent.name.split("-")
        return stamp, int(taken[0]) if taken else 0

    files = sorted(Path(directory).glob("wandb/offline-run-*/run-*.wandb"), key=started)
    deadline = time.monotonic() + timeout_s
    while not all(finished(f) for f in files):
        assert time.monotonic() < deadline, f"a W&B run file under {directory} has no exit record after {timeout_s} s"
        time.sleep(0.2)
    return files
