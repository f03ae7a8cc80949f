"""The one family of expected failures.

Every failure a user can fix — a bad config, missing or altered shards, an unreadable catalog, a model
that cannot be reached, a checkpoint that does not fit the run — derives from `VlmtuneError`. Jobs print
such an error as one line (`error: …`) and exit 2; anything else is a bug and keeps its traceback. Inside
Ray Train workers the same errors end the run at once instead of being retried (see train/loop.py).
"""

from __future__ import annotations


class VlmtuneError(Exception):
    """A problem with the input or the environment, phrased for the person who can fix it."""

    exit_code = 2


class ConfigError(VlmtuneError, ValueError):
    """The configuration is invalid (file, key and closest valid key in the message)."""


class ShardError(VlmtuneError):
    """The shard directory cannot be used: missing manifest, missing or corrupted shard, wrong split."""


class CatalogError(VlmtuneError, ValueError):
    """The catalog as a whole cannot be read (missing file, missing column, unknown format, no usable row)."""


class ModelError(VlmtuneError, ValueError):
    """The model cannot be loaded or prepared as configured (unreachable name, bad LoRA target, …)."""


class CheckpointError(VlmtuneError):
    """A checkpoint is missing, incomplete or does not belong to this run."""


class PreflightError(VlmtuneError, ValueError):
    """The run cannot work as configured; found before any Ray Train worker starts."""


class Stopped(VlmtuneError):
    """Training stopped on request (SIGTERM: a preemption notice, a time limit) after saving a checkpoint.

    Exit code 75 (EX_TEMPFAIL, "try again later"): a launcher that retries (Slurm requeue, KubeRay's backoffLimit)
    runs the job again, and the run resumes from that checkpoint."""

    exit_code = 75
