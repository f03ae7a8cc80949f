"""Training progress from the workers to the driver's console, and stop requests back to the workers.

Ray forwards every line a worker prints to the driver, where it lands in the job's log file. What a person
follows instead is one progress bar and a line per eval, per checkpoint and per warning: the workers post
these as small events to a `ProgressBoard` actor, and the driver polls it while `fit()` runs. An expected
failure (a `VlmtuneError` the ranks agreed on) travels the same way, so the driver can raise it as such.

The other direction: SIGTERM to the driver (a preemption notice, a pod deletion), or SIGUSR1 (what
slurm/train.sh passes on: Slurm treats a TERM sent to a job step as the step's end) sets a flag on the
board; rank 0 reads it between steps and the ranks agree on it through the step's all_reduce
(train/loop.py), save a checkpoint and stop.
"""

from __future__ import annotations

import signal
import threading
import time

import ray

from vlmtune.console import console

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


@ray.remote(num_cpus=0)
class ProgressBoard:
    """A mailbox: workers post (kind, data) events, the driver takes them in order."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict]] = []
        self.stop = False

    def post(self, kind: str, data: dict) -> None:
        self.events.append((kind, data))

    def request_stop(self) -> None:
        self.stop = True

    def stop_requested(self) -> bool:
        return self.stop

    def take(self) -> list[tuple[str, dict]]:
        events, self.events = self.events, []
        return events


class Progress:
    """Worker side: fire-and-forget posts (nothing when the driver gave no board)."""

    def __init__(self, board, rank: int, poll_s: float = 1.0):
        self.board, self.rank, self.poll_s = board, rank, poll_s
        self.last_poll = 0.0
        self.stop = False

    def post(self, kind: str, everyone: bool = False, **data) -> None:
        if self.board is not None and (everyone or self.rank == 0):
            self.board.post.remote(kind, data)

    def start(self, step: int, max_steps: int) -> None:
        self.post("start", step=step, max_steps=max_steps)

    def step(self, step: int, metrics: dict) -> None:
        self.post("step", step=step, loss=metrics["loss"], tokens_per_s=metrics["tokens_per_s"])

    def evaluated(self, step: int, metrics: dict) -> None:
        self.post("eval", step=step, metrics=metrics)

    def saved(self, step: int) -> None:
        self.post("checkpoint", step=step)

    def warn(self, message: str) -> None:
        self.post("warning", everyone=True, message=message)

    def warn_once(self, message: str) -> None:
        """A warning about the run as a whole, which every rank comes to alike: posted by rank 0 only."""
        self.post("warning", message=message)

    def stopping(self) -> bool:
        """Rank 0: whether the driver asked the run to stop (asks the board at most once per `poll_s`)."""
        if self.board is None or self.rank != 0 or self.stop:
            return self.stop
        if time.monotonic() - self.last_poll >= self.poll_s:
            self.last_poll = time.monotonic()
            self.stop = ray.get(self.board.stop_requested.remote())
        return self.stop

    def stopped(self, step: int) -> None:
        self.post("stopped", step=step)

    def fail(self, message: str) -> None:
        """The run cannot go on (an expected failure every rank agreed on): waits until the driver has it."""
        if self.board is not None and self.rank == 0:
            ray.get(self.board.post.remote("failed", {"message": message}))


EVAL_SHOWN = [("eval_loss", "val loss", "{:.4f}"), ("eval_parse_rate", "parses", "{:.2f}"),
              ("eval_category_path_acc", "category", "{:.2f}"), ("eval_price_mape", "price MAPE", "{:.3f}"),
              ("eval_title_chrf", "title chrF", "{:.1f}")]


def describe_eval(step: int, metrics: dict) -> str:
    shown = [f"{label} {fmt.format(metrics[key])}" for key, label, fmt in EVAL_SHOWN if key in metrics]
    return f"step {step}: " + ", ".join(shown)


class ProgressView:
    """Driver side: polls the board in a thread and draws a bar plus one line per event worth a line; while it
    is open, SIGTERM or SIGUSR1 asks the workers to checkpoint and stop (a second one acts as usual)."""

    def __init__(self, board, poll_s: float = 0.5):
        self.board, self.poll_s = board, poll_s
        self.bar = None
        self.failure: str | None = None  # an expected failure a worker reported
        self.stopped_at: int | None = None  # the step the run stopped at on request
        self.done = threading.Event()
        self.stop_signal: str | None = None
        self.previous_handlers: dict = {}
        self.thread = threading.Thread(target=self._run, name="vlmtune-progress", daemon=True)

    def __enter__(self) -> ProgressView:
        if threading.current_thread() is threading.main_thread():
            self.previous_handlers = {sig: signal.signal(sig, self._on_stop_signal) for sig in STOP_SIGNALS}
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._restore_handlers()
        self.done.set()
        self.thread.join(timeout=10)
        self._show(ray.get(self.board.take.remote()))
        if self.bar is not None:
            self.bar.close()

    def _on_stop_signal(self, signum, frame) -> None:
        self.stop_signal = signal.Signals(signum).name  # the polling thread tells the board: no Ray calls here
        self._restore_handlers()

    def _restore_handlers(self) -> None:
        for sig, handler in self.previous_handlers.items():
            signal.signal(sig, handler)
        self.previous_handlers = {}

    def _run(self) -> None:
        asked = False
        while not self.done.wait(self.poll_s):
            if self.stop_signal and not asked:
                asked = True
                self.board.request_stop.remote()
                console.note(f"{self.stop_signal}: the workers save a checkpoint after their current step, then the "
                             f"run stops (another {self.stop_signal} stops at once)")
            self._show(ray.get(self.board.take.remote()))

    def _show(self, events: list[tuple[str, dict]]) -> None:
        for kind, data in events:
            if kind == "start":
                if self.bar is not None:
                    self.bar.close()
                    console.note(f"training restarted from step {data['step']}")
                elif data["step"]:
                    console.note(f"resuming from step {data['step']}")
                self.bar = console.progress(total=data["max_steps"], initial=data["step"], desc="train", unit="step")
            elif kind == "step" and self.bar is not None:
                self.bar.update(data["step"] - self.bar.n)
                self.bar.set_postfix(loss=f"{data['loss']:.4f}", tok_s=f"{data['tokens_per_s']:.0f}", refresh=False)
            elif kind == "eval":
                console.note(describe_eval(data["step"], data["metrics"]))
            elif kind == "checkpoint":
                console.note(f"step {data['step']}: checkpoint saved")
            elif kind == "warning":
                console.note(f"warning: {data['message']}")
            elif kind == "stopped":
                self.stopped_at = data["step"]
            elif kind == "failed":
                self.failure = data["message"]
