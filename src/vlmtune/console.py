"""What a person sees while a job runs, and the log file that keeps everything else.

The console shows vlmtune's own messages: stage headers, progress bars, results, warnings that need the
user's action, and errors. Everything else — library INFO lines from Ray, Ray Data, DeepSpeed and
transformers, worker output forwarded by Ray, FutureWarnings, C++ log lines — goes to the job's log file,
whose path is printed as soon as the job knows where its outputs go. `--verbose` (or VLMTUNE_LOG=debug)
turns this off: everything is printed, nothing is redirected.

How: the process's file descriptors 1 and 2 (where every library, C++ code and child process writes) are
pointed at the log file, and the console keeps its own duplicates of the terminal's. Python logging sends
every record to the log file and, on the console, vlmtune's records at INFO and above plus other
libraries' errors. Until the log directory is known (the config is not loaded yet), the log is a temporary
file; `open_log` moves it into place, and a job that ends before that (`close`) removes it when it is empty,
else prints its path.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import TextIO

from tqdm import tqdm

from vlmtune import storage

LOG_ENV = "VLMTUNE_LOG"
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def verbose_requested() -> bool:
    return os.environ.get(LOG_ENV, "").lower() == "debug"


class _ConsoleFilter(logging.Filter):
    """On the console: vlmtune's own records (INFO+), and errors of anything else."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name.split(".")[0] == "vlmtune" or record.levelno >= logging.ERROR


class Console:
    """The terminal, while fd 1/2 belong to the log file. One per process (see `console`)."""

    def __init__(self) -> None:
        self.out: TextIO = sys.stdout
        self.err: TextIO = sys.stderr
        self.verbose = True
        self.log_path: Path | None = None
        self.log_is_temporary = False  # still in the temp dir: the job has not said where its outputs go
        self.log_shown = False  # its path was printed

    def start(self, job: str, verbose: bool = False) -> None:
        """Take over fd 1/2 (unless verbose) and set up logging for `job`."""
        self.job = job
        self.verbose = verbose or verbose_requested()
        root = logging.getLogger()
        root.setLevel(logging.INFO)
        if self.verbose:
            os.environ[LOG_ENV] = "debug"  # Ray workers inherit it through the runtime environment
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter(FORMAT))
            root.addHandler(handler)
            return
        os.environ.setdefault("WANDB_SILENT", "true")
        sys.stdout.flush()
        sys.stderr.flush()
        self.out = os.fdopen(os.dup(1), "w", buffering=1)
        self.err = os.fdopen(os.dup(2), "w", buffering=1)
        fd, path = tempfile.mkstemp(prefix=f"vlmtune-{job}-", suffix=".log")
        self._redirect(fd, Path(path))
        self.log_is_temporary = True
        file_handler = logging.StreamHandler(sys.stderr)  # fd 2, the log file
        file_handler.setFormatter(logging.Formatter(FORMAT))
        console_handler = logging.StreamHandler(self.err)
        console_handler.setFormatter(logging.Formatter("%(message)s"))
        console_handler.addFilter(_ConsoleFilter())
        root.handlers[:] = [file_handler, console_handler]
        logging.captureWarnings(True)  # library warnings: to the log file, like their other output

    def _redirect(self, fd: int, path: Path) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        self.log_path = path

    def open_log(self, directory: str) -> Path | None:
        """Move the log to `<directory>/<job>-<time>.log` (a local temp dir when `directory` is remote) and print
        its path. Returns the path (None when verbose: nothing is redirected)."""
        if self.verbose or self.log_path is None:
            return None
        base = Path(storage.resolve(directory)) if storage.is_local(directory) else \
            Path(tempfile.gettempdir()) / "vlmtune-logs"
        base.mkdir(parents=True, exist_ok=True)
        path = base / f"{self.job}-{time.strftime('%Y%m%d-%H%M%S')}.log"
        sys.stdout.flush()
        sys.stderr.flush()
        previous = self.log_path
        with previous.open("rb") as src, path.open("wb") as dst:
            shutil.copyfileobj(src, dst)
        self._redirect(os.open(path, os.O_WRONLY | os.O_APPEND), path)
        previous.unlink()
        self.log_is_temporary = False
        self.show_log()
        return path

    def show_log(self, after_error: bool = False) -> None:
        """Print the log's path: once as a result line, and on stderr below an error's traceback, where the
        reader is looking."""
        if self.log_path is None or (self.log_shown and not after_error):
            return
        if after_error:
            self.error(f"(log: {self.log_path})")
        else:
            self.say(f"log: {self.log_path}")
        self.log_shown = True

    def close(self) -> None:
        """At the job's end: a log still in the temp dir (the job ended before it knew where its outputs go: a
        config error, `train.py --plan`) is removed when nothing was written to it, else its path is printed:
        no job leaves a file behind unsaid."""
        if self.verbose or self.log_path is None or not self.log_is_temporary:
            return
        sys.stdout.flush()
        sys.stderr.flush()
        if self.log_path.stat().st_size == 0:
            self.log_path.unlink()
        else:
            self.show_log()

    def say(self, text: str = "") -> None:
        """A result line for the person running the job (stdout)."""
        tqdm.write(text, file=self.out)

    def note(self, text: str) -> None:
        """A progress line (stderr, beside the progress bars, which it does not break)."""
        tqdm.write(text, file=self.err)

    def error(self, text: str) -> None:
        self.err.write(text + "\n")
        self.err.flush()
        if not self.verbose:
            logging.getLogger("vlmtune").debug(text)

    def progress(self, **kwargs) -> tqdm:
        """A progress bar on the console (tqdm arguments)."""
        return tqdm(file=self.err, mininterval=kwargs.pop("mininterval", 1.0), dynamic_ncols=True, **kwargs)


console = Console()
