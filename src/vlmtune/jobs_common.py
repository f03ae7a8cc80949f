"""What every job entry point does first: logging, and printing + saving the resolved config."""

from __future__ import annotations

import logging
import os

import fsspec

from vlmtune.config import Config


def setup_logging() -> None:
    logging.basicConfig(level=os.environ.get("VLMTUNE_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def announce_config(cfg: Config, out_dir: str, job: str) -> str:
    """Print the resolved config and store it as <out_dir>/<job>-config.yaml; returns that path."""
    text = cfg.to_yaml()
    print(f"# resolved config ({job})\n{text}", flush=True)
    fs, root = fsspec.core.url_to_fs(out_dir.rstrip("/"))
    fs.makedirs(root, exist_ok=True)
    path = f"{root}/{job}-config.yaml"
    with fs.open(path, "w") as fh:
        fh.write(text)
    return path
