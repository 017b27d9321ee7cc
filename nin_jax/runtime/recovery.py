"""Which checkpoint step to restore, and what a damaged or unreachable one costs: one policy for training and
for the tools.

A step is *damaged* when its files are missing or unparsable, its arrays fail their digest, or reading them
fails although its metadata describes the requested arrays (`checkpointing.check_step`); a damaged newest
step is passed over for the newest step that reads. Training moves the damaged steps aside to
`<step>.unreadable` (nothing is deleted) so that it can save those step numbers again; the tools only warn.
A read error that may be *transient* (the storage did not answer) is retried with backoff and then raised:
it never passes a step over. Arrays of another model (*mismatch*) are refused: no other step would read.
A step that reads but holds non-finite parameters or BatchNorm statistics is refused as well: training never
saves one, so it is not damage to pass over. If no step reads, nothing is moved.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import time
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from nin_jax import checkpointing
from nin_jax.config import ConfigError
from nin_jax.runtime import quiet
from nin_jax.runtime.record import exception_chain

CHOICES = "latest | best | best:<metric> | a step number"
# Attempts and first backoff (doubled each time) for reads that fail with a possibly transient error.
RESTORE_ATTEMPTS = 4
RESTORE_BACKOFF_S = 1.0
# TensorStore raises every error as ValueError('<ABSL_STATUS_CODE>: ...'), with no exception type per code.
# These codes mean the storage did not answer (pinned by tests/test_runtime.py for requirements.txt's versions).
_TRANSIENT_CODES = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "ABORTED", "CANCELLED", "RESOURCE_EXHAUSTED", "INTERNAL",
                    "UNKNOWN", "PERMISSION_DENIED", "UNAUTHENTICATED")
_STATUS_RE = re.compile(r"^\s*([A-Z_]+):")


class CheckpointError(ConfigError):
    """A checkpoint cannot be restored; the message names it and the `--checkpoint=` or fix that works."""


class CheckpointUnavailableError(OSError):
    """Reading a step failed with a possibly transient storage error in every attempt; nothing was moved."""


def classify(error: BaseException) -> str:
    """'mismatch', 'damaged' or 'transient', by the error and the exceptions it was explicitly raised from
    (Orbax re-raises a failed TensorStore read as a plain Exception from it)."""
    causes = list(exception_chain(error, implicit=False))
    if any(isinstance(e, checkpointing.StructureMismatchError) for e in causes):
        return "mismatch"
    if any(isinstance(e, (checkpointing.CorruptCheckpointError, FileNotFoundError)) for e in causes):
        return "damaged"
    for e in causes:
        found = _STATUS_RE.match(str(e))
        if isinstance(e, (OSError, TimeoutError, ConnectionError)) or (found and found.group(1) in _TRANSIENT_CODES):
            return "transient"
    return "damaged"  # the step's files describe the requested arrays, yet their bytes do not read


def short_error(error: BaseException, limit: int = 300) -> str:
    """`Type: message` of the innermost cause on one line, without the TensorStore specs (kilobytes of JSON)
    that Orbax's read errors carry."""
    while error.__cause__ is not None:
        error = error.__cause__
    lines = str(error).strip().splitlines()
    text = re.split(r"\s*\[(?:tensorstore_spec|source locations)|\.? See full TensorStore details",
                    lines[0] if lines else "")[0]
    if len(text) > limit:
        code = re.match(r"[A-Z_]{3,}: ", text)
        tail = text.rsplit(": ", 1)[-1]
        text = (code.group(0) if code else "") + (tail if len(tail) < limit else tail[: limit - 3] + "...")
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def read_step(mngr: ocp.CheckpointManager, step: int, target: Any) -> tuple[Any, dict]:
    """`checkpointing.restore`, retrying possibly transient errors (`RESTORE_ATTEMPTS` tries, backoff doubling
    from `RESTORE_BACKOFF_S`), then raising `CheckpointUnavailableError`."""
    for attempt in range(1, RESTORE_ATTEMPTS + 1):
        try:
            return checkpointing.restore(mngr, step, target)
        except Exception as e:  # noqa: BLE001 — classified: only a possibly transient error is retried
            if classify(e) != "transient":
                raise
            if attempt == RESTORE_ATTEMPTS:
                raise CheckpointUnavailableError(
                    f"checkpoint step {step} in {mngr.directory} could not be read in {attempt} attempts "
                    f"({short_error(e)}); it was kept as it is (a storage error is not proof of damage). Check that "
                    "the storage is reachable and rerun the same command.") from e
            delay = RESTORE_BACKOFF_S * 2 ** (attempt - 1)
            logging.warning("Reading checkpoint step %d in %s failed (%s); retrying in %.1f s.", step,
                            mngr.directory, short_error(e), delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def select_step(mngr: ocp.CheckpointManager, checkpoint: str, best_metric: str = checkpointing.BEST_METRIC) -> int:
    """The saved step that `checkpoint` (`CHOICES`) names; `best` ranks by `best_metric`, `best:<metric>` by
    that metric (e.g. best:eval/test/top1)."""
    steps, checkpoint = sorted(mngr.all_steps()), str(checkpoint)
    if checkpoint.startswith("best:"):
        checkpoint, best_metric = "best", checkpoint.removeprefix("best:")
    if not steps:
        raise ConfigError(f"no checkpoint in {mngr.directory}: the run has not saved one yet (train longer, or "
                          "lower config.run.checkpoint_every_steps).")
    if checkpoint == "latest":
        return steps[-1]
    if checkpoint == "best":
        score = checkpointing.metric_score(best_metric)
        scored = [(score(m), s) for s in steps if (m := _saved_metrics(mngr, s)) and best_metric in m]
        if not scored:
            raise ConfigError(f"no checkpoint in {mngr.directory} carries {best_metric}; use "
                              "--checkpoint=latest.")
        return max(scored)[1]
    if checkpoint.isdigit():
        if int(checkpoint) not in steps:
            raise ConfigError(f"--checkpoint={checkpoint}: no such step in {mngr.directory}; saved steps are {steps}.")
        return int(checkpoint)
    raise ConfigError(f"--checkpoint={checkpoint!r}; choose {CHOICES}.")


def _saved_metrics(mngr: ocp.CheckpointManager, step: int) -> dict:
    try:
        return mngr.metrics(step) or {}
    except Exception:  # noqa: BLE001 — a damaged metrics file: the step cannot be "best"
        return {}


def restore(mngr: ocp.CheckpointManager, target: Any, checkpoint: str = "latest", *, move_aside: bool = False,
            warn: Callable[[str], None] | None = None,
            best_metric: str = checkpointing.BEST_METRIC) -> tuple[Any, dict, int] | None:
    """Restores (state, meta, step) of `checkpoint` onto `target`'s shapes and shardings; None if training
    finds no step (`move_aside`); every other caller gets a `ConfigError` then.

    `latest` passes over damaged newer steps: with `move_aside` (training) they are renamed to
    `<step>.unreadable`, otherwise `warn` (default: stderr) names them. A damaged `best` or numbered step
    raises `CheckpointError` naming the newest readable step; a step of non-finite variables raises it naming
    the other saved steps.
    """
    if move_aside and not mngr.all_steps():
        return None
    warn = warn or (lambda line: print(line, file=sys.stderr, flush=True))
    chosen = select_step(mngr, checkpoint, best_metric)
    failures: list[tuple[int, str]] = []
    for step in [chosen] + sorted((s for s in mngr.all_steps() if s < chosen), reverse=True):
        try:
            state, meta = read_step(mngr, step, target)
        except CheckpointUnavailableError:
            raise
        except Exception as e:  # noqa: BLE001 — classified below
            kind = classify(e)
            if kind == "mismatch":
                raise CheckpointError(
                    f"checkpoint step {step} in {mngr.directory} does not hold the arrays that the config describes "
                    f"({short_error(e).split(': ', 1)[-1]}); nothing was moved. If the config changed since it was "
                    "written, use the workdir's own config (config.json); otherwise use a new --workdir.") from e
            failures.append((step, short_error(e)))
            continue
        _check_finite(mngr, step, state, move_aside)
        if step != chosen and str(checkpoint) != "latest":
            path = epath.Path(mngr.directory) / str(chosen)
            raise CheckpointError(f"checkpoint {path} (--checkpoint={checkpoint}) is unreadable ({failures[0][1]}); "
                                  f"the newest readable step is {step}: pass --checkpoint={step}.")
        _report(mngr, failures, step, move_aside, warn)
        return state, meta, step
    details = "; ".join(f"step {s}: {r}" for s, r in failures)
    raise CheckpointError(f"no checkpoint in {mngr.directory} can be read ({details}); nothing was moved. Restore a "
                          "good copy of the checkpoints, or use a new --workdir.")


def nonfinite_leaves(tree: Any) -> list[tuple[str, int, int]]:
    """(path, non-finite count, size) of every floating-point array of `tree` holding a NaN or an infinity."""
    found = []
    for path, value in jax.tree_util.tree_leaves_with_path(tree):
        value = np.asarray(jax.device_get(value))
        if np.issubdtype(value.dtype, np.inexact):
            bad = int(value.size - np.count_nonzero(np.isfinite(value)))
            if bad:
                found.append(("/".join(checkpointing.leaf_names(path)), bad, int(value.size)))
    return found


def _check_finite(mngr: ocp.CheckpointManager, step: int, state: Any, training: bool) -> None:
    """Refuses a step whose parameters or BatchNorm statistics hold NaN or infinities.

    Such a step read intact, so it is not damage to pass over: training never saves it, so it was written by
    another program or by hand, and the caller must choose what to use instead.
    """
    variables = {k: getattr(state, k) for k in ("params", "batch_stats") if hasattr(state, k)}
    bad = nonfinite_leaves(variables or state)
    if not bad:
        return
    path = epath.Path(mngr.directory) / str(step)
    shown = "; ".join(f"{name}: {n} of {size} values" for name, n, size in bad[:2])
    more = f"; and {len(bad) - 2} more arrays" if len(bad) > 2 else ""
    others = [s for s in sorted(mngr.all_steps()) if s != step]
    if training:
        fix = f"move {path} out of {mngr.directory} to resume from the step before it, or use a new --workdir."
    elif others:
        fix = f"pass another saved step, e.g. --checkpoint={others[-1]} (saved: {others})."
    else:
        fix = "no other step is saved; retrain, or restore a good copy of the checkpoints."
    raise CheckpointError(f"checkpoint {path} holds NaN or infinite model variables ({shown}{more}); training "
                          f"never saves such a state, so it was written by another program or by hand: {fix}")


def _report(mngr: ocp.CheckpointManager, failures: list[tuple[int, str]], step: int, move_aside: bool,
            warn: Callable[[str], None]) -> None:
    for bad, reason in failures:
        path = epath.Path(mngr.directory) / str(bad)
        if not move_aside:
            warn(f"warning: checkpoint {path} is unreadable ({reason}); using step {step}, the newest readable one.")
            continue
        print(f"WARNING: checkpoint {path} is unreadable ({reason}); moved aside to {path.name}.unreadable, "
              f"resuming from step {step}.", flush=True)
        if jax.process_index() == 0 and path.exists():
            path.rename(path.parent / f"{bad}.unreadable")
    if failures and move_aside:
        mngr.reload()


class _QuietOrbaxWarnings(logging.Filter):
    """Orbax's warnings below ERROR (a read-only manager, optional metadata absent): noise for a reader."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or "/orbax/" not in record.pathname.replace(os.sep, "/")


@contextlib.contextmanager
def reading_quietly():
    """While restoring for the tools: Orbax's warnings are dropped."""
    logger, quiet = logging.getLogger("absl"), _QuietOrbaxWarnings()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


def restore_readonly(workdir: str, target: Any, checkpoint: str = "latest", *,
                     warn: Callable[[str], None] | None = None,
                     best_metric: str = checkpointing.BEST_METRIC) -> tuple[Any, int, str]:
    """(state, step, step directory) of `checkpoint` of the run in `workdir`, read by the tools and by
    fine-tuning with `restore`'s policy; nothing in the workdir is modified."""
    ckpt_dir = epath.Path(workdir) / "checkpoints"
    if not ckpt_dir.exists():
        raise ConfigError(f"no checkpoint in {ckpt_dir}: the run in --workdir={workdir} has not saved one yet "
                          "(train longer, or lower config.run.checkpoint_every_steps).")
    if not ckpt_dir.is_dir():
        raise ConfigError(f"{ckpt_dir} is a file, not the run's checkpoint directory; restore the checkpoints there.")
    quiet.install()
    with reading_quietly():
        mngr = checkpointing.create_manager(ckpt_dir, keep=1, read_only=True)
        try:
            state, _, step = restore(mngr, target, str(checkpoint), warn=warn, best_metric=best_metric)
        finally:
            mngr.close()
    return state, step, str(ckpt_dir / str(step))
