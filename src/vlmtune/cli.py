"""What every job entry point shares: arguments, console and log file, the resolved config, error handling.

A job is `run_job(name, parser, main)`: `main(args)` does the work and returns the exit code. Expected
failures (`VlmtuneError`: bad config, missing or altered shards, unreadable catalog, unreachable model,
…) print one line, `error: …`, and exit 2 (75 for a run stopped by SIGTERM after its checkpoint, see
`errors.Stopped`); anything else is a bug and keeps its traceback (exit 1).
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from collections.abc import Callable, Sequence

from vlmtune import storage
from vlmtune.config import Config, load_config
from vlmtune.console import console
from vlmtune.errors import VlmtuneError

log = logging.getLogger(__name__)


def job_parser(doc: str | None, config: bool = True, default_config: str | None = None) -> argparse.ArgumentParser:
    """A parser with the common options: `--verbose`, and (for config-driven jobs) `--config` + overrides."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="print everything (library logs, worker output) instead of writing it to the log file")
    if config:
        where = default_config or "the built-in defaults"
        parser.add_argument("--config", default=default_config, help=f"YAML config (default: {where})")
        parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=50")
    return parser


def load_job_config(args: argparse.Namespace, extra: Sequence[str] = ()) -> Config:
    """The config of `--config` (or the built-in defaults, which are the CPU demo recipe) with the overrides."""
    if args.config is None:
        console.say("no --config given: using the built-in defaults (tiny-phi3v, sample catalog, local CPU "
                    "workers: the CPU demo recipe)")
    return load_config(args.config, [*args.overrides, *extra])


def announce_config(cfg: Config, out_dir: str, job: str) -> str:
    """Open the job's log next to its outputs, store the resolved config there as `<job>-config.yaml`, say where
    both are. The full YAML goes to the log file (and to the console with --verbose)."""
    console.open_log(storage.join(out_dir, "logs") if storage.is_local(out_dir) else out_dir)
    text = cfg.to_yaml()
    path = storage.join(out_dir, f"{job}-config.yaml")
    fs, root = storage.filesystem(out_dir)
    fs.makedirs(root, exist_ok=True)
    storage.write_atomic(path, text)
    logging.getLogger("vlmtune.config").debug("resolved config (%s):\n%s", job, text)
    console.say(f"config: {path}")
    return path


def run_job(name: str, parser: argparse.ArgumentParser, main: Callable[[argparse.Namespace], int],
            argv: Sequence[str] | None = None) -> int:
    args = parser.parse_args(argv)
    console.start(name, verbose=args.verbose)
    try:
        return main(args)
    except VlmtuneError as e:
        console.error(f"error: {e}")
        return e.exit_code
    except KeyboardInterrupt:
        console.error("interrupted")
        return 130
    except Exception:
        console.error(traceback.format_exc().rstrip())
        console.show_log(after_error=True)
        return 1
    finally:
        console.close()


def exit_with(name: str, parser: argparse.ArgumentParser, main: Callable[[argparse.Namespace], int]) -> None:
    """`if __name__ == "__main__": exit_with(...)` in every job script."""
    sys.exit(run_job(name, parser, main))
