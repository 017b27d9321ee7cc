"""Orbax checkpoints: asynchronous saves, the latest N plus the best by eval/top1, robust restore.

A checkpoint step directory holds `state` (the TrainState arrays) and `meta` (JSON: step, data position,
metrics). Orbax writes each step into a temporary directory and renames it when complete, so a crash during
a save leaves no step behind. A step proven damaged (missing or unparsable files, or arrays that differ from
the SHA-256 digest saved in its meta) is moved aside to `<step>.unreadable` and the previous step is
restored; nothing is deleted. A read error that may be transient (I/O, network, timeouts) is retried with
backoff and then raised: it never demotes a step.

The best-checkpoint metric is attached to a step after its evaluation (`attach_metrics`), so that a step is
committed before the evaluation that follows it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import sys
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from nin_jax.config import ConfigError

BEST_METRIC = "eval/top1"
DIGEST_KEY = "state_sha256"  # in each step's meta

# Orbax's default replica-parallel save slices every replicated array into one piece per device with eager
# ops, compiled on the first save of each process: 6-8 s on a 2-core CPU for nin_digits (0.1 s without), time
# a preemption notice may not leave. NIN's arrays are too small to gain from parallel writes, so each
# replicated array is written whole by one replica.
ocp.type_handlers.register_type_handler(
    jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True)


class _MetricsAttachedLater(logging.Filter):
    """Drops Orbax's warning for a save without metrics: `attach_metrics` adds them after the evaluation."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "did not provide metrics" not in str(record.msg)


logging.getLogger("absl").addFilter(_MetricsAttachedLater())


def _in_orbax(filename: str) -> bool:
    return "/orbax/" in filename.replace(os.sep, "/")


def silence_failed_read_leftovers() -> None:
    """Silences the leftovers of a failed Orbax read, which the restore functions report in one line each.

    When one array of a checkpoint fails to read, Orbax closes its event loop while TensorStore still holds
    the other reads: each of those later reports its completion to the closed loop (`RuntimeError: Event loop
    is closed`), and Orbax's abandoned read coroutines raise again when they are finalised, often at exit.
    Python prints both through `sys.unraisablehook`, one traceback (with the whole TensorStore spec) per
    array. This hook drops exactly those two kinds and passes everything else on.
    """
    previous = sys.unraisablehook
    if getattr(previous, "_nin_jax_orbax_filter", False):
        return

    def hook(unraisable):
        error, obj = unraisable.exc_value, unraisable.object
        code = getattr(obj, "cr_code", None)  # a coroutine finalised with its exception
        if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
            return
        if code is not None and _in_orbax(code.co_filename):
            return
        previous(unraisable)

    hook._nin_jax_orbax_filter = True
    sys.unraisablehook = hook
    logging.getLogger("asyncio").addFilter(_DropOrbaxReadLeftovers())


_UNRETRIEVED = ("Task exception was never retrieved", "Future exception was never retrieved")
_TENSORSTORE_ERROR_MARK = "[tensorstore_spec="  # TensorStore appends the spec of the failed operation


class _DropOrbaxReadLeftovers(logging.Filter):
    """asyncio's "Task/Future exception was never retrieved" for the same abandoned Orbax reads (logged when the
    task or future is garbage-collected, so some runs print it and some do not). A read is an Orbax coroutine,
    a TensorStore future that Orbax handed to asyncio (its traceback holds only asyncio's frame awaiting it), or
    the asyncio Future carrying a TensorStore read's outcome (its error is TensorStore's, no frame needed)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not (record.exc_info and record.getMessage().startswith(_UNRETRIEVED)):
            return True
        if _TENSORSTORE_ERROR_MARK in str(record.exc_info[1]):
            return False
        tb = record.exc_info[2]
        while tb is not None:
            frame = tb.tb_frame
            if _in_orbax(frame.f_code.co_filename):
                return False
            if type(frame.f_locals.get("awaitable")).__module__.split(".")[0] == "tensorstore":
                return False
            tb = tb.tb_next
        return True


class CheckpointError(ConfigError):
    """A checkpoint the user pointed at cannot be restored (the message names it and what to do)."""


class CorruptCheckpointError(CheckpointError):
    """A step's files are missing, unparsable or differ from their digest: proven damage, not a read hiccup."""


class CheckpointUnavailableError(CheckpointError):
    """Reading a step failed with a storage error that may be transient, every retry; the step was kept."""


# Attempts and first backoff (doubled each time) for reads that fail with a possibly transient error.
RESTORE_ATTEMPTS = 4
RESTORE_BACKOFF_S = 1.0

# Tensorstore reports errors as ValueError('<ABSL_STATUS_CODE>: ...'). These codes mean the bytes on storage are
# missing or not what was written; UNAVAILABLE, DEADLINE_EXCEEDED, ABORTED etc. mean the storage did not answer.
_DAMAGE_CODES = ("NOT_FOUND", "DATA_LOSS", "OUT_OF_RANGE")
# Stored bytes that no longer decompress (e.g. a damaged zstd frame header) are reported as FAILED_PRECONDITION.
_UNDECODABLE_TEXT = "decompress"
_TRANSIENT_CODES = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "ABORTED", "CANCELLED", "RESOURCE_EXHAUSTED", "INTERNAL",
                    "UNKNOWN", "PERMISSION_DENIED", "UNAUTHENTICATED")
_STATUS_RE = re.compile(r"^\s*([A-Z_]+):")
_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_DISK_FULL_TEXT = ("No space left on device", "Disk quota exceeded")


def _status_code(error: BaseException) -> str | None:
    found = _STATUS_RE.match(str(error))
    return found.group(1) if found else None


def exception_chain(error: BaseException, *, implicit: bool = True):
    """`error`, then the exceptions it was raised from (and, if ``implicit``, while handling), innermost last."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or (error.__context__ if implicit else None)


def is_disk_full(error: BaseException) -> bool:
    """Whether `error` (or an exception it was raised from) is a full disk or an exhausted quota."""
    return any((isinstance(e, OSError) and e.errno in _DISK_FULL_ERRNOS) or any(t in str(e) for t in _DISK_FULL_TEXT)
               for e in exception_chain(error))


def classify_read_error(error: BaseException) -> str:
    """'damaged' (proven: missing or unparsable files, digest mismatch), 'transient' (storage did not answer:
    retry) or 'other' (e.g. a restore target that does not match the saved structure: a config change).

    Orbax re-raises a failed TensorStore read as a plain `Exception` *from* it, so the explicit causes
    (`raise ... from`) are classified too; the implicit context is not, as it may be an unrelated error.
    """
    causes = list(exception_chain(error, implicit=False))
    for e in causes:
        if isinstance(e, (CorruptCheckpointError, FileNotFoundError, json.JSONDecodeError)):
            return "damaged"
        if isinstance(e, KeyError) and "was not found in the checkpoint" in str(e):
            return "damaged"  # a whole item directory is missing
        code = _status_code(e)
        if code in _DAMAGE_CODES or (code == "FAILED_PRECONDITION" and _UNDECODABLE_TEXT in str(e)):
            return "damaged"
    for e in causes:
        if _status_code(e) in _TRANSIENT_CODES or isinstance(e, (OSError, TimeoutError, ConnectionError)):
            return "transient"
    return "other"


def _reason(error: BaseException) -> str:
    return f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}"


def create_manager(directory: str | epath.Path, *, keep: int, read_only: bool = False) -> ocp.CheckpointManager:
    """A manager keeping the latest `keep` steps and the one with the best `eval/top1`."""
    policy = ocp.checkpoint_managers.AnyPreservationPolicy([
        ocp.checkpoint_managers.LatestN(n=keep),
        ocp.checkpoint_managers.BestN(
            get_metric_fn=lambda m: m[BEST_METRIC], n=1, keep_checkpoints_without_metrics=False
        ),
    ])
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy, enable_async_checkpointing=True, read_only=read_only, create=not read_only,
        cleanup_tmp_directories=not read_only,
        # Orbax writes a step's metrics to disk only when best_fn is set: without it the best step is forgotten
        # on resume (BestN then sees no metrics) and `evaluate --checkpoint=best` cannot find it.
        best_fn=lambda m: m[BEST_METRIC], best_mode="max",
    )
    return ocp.CheckpointManager(epath.Path(directory), options=options)


def state_digest(state: Any) -> str:
    """SHA-256 of the arrays of `state` in tree order (dtype, shape, bytes), identical on any device layout."""
    digest = hashlib.sha256()
    for value in jax.tree.leaves(state):
        value = np.ascontiguousarray(jax.device_get(value))
        digest.update(f"{value.dtype}{value.shape};".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def save(mngr: ocp.CheckpointManager, step: int, state: Any, meta: dict, metrics: dict | None = None) -> None:
    """Starts an asynchronous save of `state` and `meta` at `step` (returns once arrays are copied off device).

    `meta` gets the state's digest: Orbax's files carry no checksum, and bytes changed on disk would otherwise
    restore silently as different parameters.
    """
    meta = {**meta, DIGEST_KEY: state_digest(state)}
    mngr.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
        metrics=metrics,
        force=True,
    )


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """Restores `step` onto the shardings of `abstract_state` (any topology: the arrays are re-laid out).

    Raises CheckpointError if the arrays differ from the digest saved with them.
    """
    restored = mngr.restore(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()),
    )
    meta = dict(restored.meta)
    if DIGEST_KEY in meta and state_digest(restored.state) != meta[DIGEST_KEY]:
        raise CorruptCheckpointError(f"checkpoint step {step} in {mngr.directory} does not match its saved digest: "
                                     "its files were changed or damaged after it was written.")
    return restored.state, meta


def restore_with_retries(mngr: ocp.CheckpointManager, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """`restore`, retrying errors that may be transient (`RESTORE_ATTEMPTS` tries, backoff doubling from
    `RESTORE_BACKOFF_S`); then raises `CheckpointUnavailableError`. Other errors are raised at once."""
    for attempt in range(1, RESTORE_ATTEMPTS + 1):
        try:
            return restore(mngr, step, abstract_state)
        except Exception as e:  # noqa: BLE001 — classified: only a possibly transient error is retried
            if classify_read_error(e) != "transient":
                raise
            if attempt == RESTORE_ATTEMPTS:
                raise CheckpointUnavailableError(
                    f"checkpoint step {step} in {mngr.directory} could not be read in {attempt} attempts "
                    f"({_reason(e)}); it was kept as it is (a storage error is not proof of damage). Check that "
                    "the storage is reachable and rerun the same command."
                ) from e
            delay = RESTORE_BACKOFF_S * 2 ** (attempt - 1)
            logging.warning("Reading checkpoint step %d in %s failed (%s); retrying in %.1f s.", step,
                            mngr.directory, _reason(e), delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def restore_latest(mngr: ocp.CheckpointManager, abstract_state: Any) -> tuple[Any, dict] | None:
    """Restores the newest readable step; None if there is no checkpoint.

    Steps newer than the restored one are proven damaged (`classify_read_error`): they are moved aside to
    `<step>.unreadable` (nothing is deleted) so that the run can save those step numbers again. A read error
    that may be transient is retried and then raised, and any other error (e.g. a config that does not match
    the saved arrays) is raised: neither moves a step. If no step can be read, nothing is moved.
    """
    silence_failed_read_leftovers()
    steps = sorted(mngr.all_steps(), reverse=True)
    failures = []
    for step in steps:
        try:
            restored = restore_with_retries(mngr, step, abstract_state)
        except CheckpointUnavailableError:
            raise
        except Exception as e:  # noqa: BLE001 — classified below
            reason = _reason(e)
            logging.warning("Checkpoint step %d in %s could not be restored (%s).", step, mngr.directory, reason)
            if classify_read_error(e) != "damaged":
                earlier = "; ".join(f"step {s}: {r}" for s, r in failures)
                raise CheckpointError(
                    f"checkpoint step {step} in {mngr.directory} could not be restored ({reason})"
                    f"{'; newer steps are damaged (' + earlier + ')' if earlier else ''}; nothing was moved. If the "
                    "config changed since it was written, rerun with the original config; otherwise restore a good "
                    "copy, or use a new --workdir."
                ) from e
            failures.append((step, reason))
            continue
        for bad, reason in failures:
            path = epath.Path(mngr.directory) / str(bad)
            print(f"WARNING: checkpoint {path} is unreadable ({reason}); moved aside to {path.name}.unreadable, "
                  f"resuming from step {step}.", flush=True)
            if jax.process_index() == 0 and path.exists():
                path.rename(path.parent / f"{bad}.unreadable")
        if failures:
            mngr.reload()
        return restored
    if steps:
        details = "; ".join(f"step {s}: {r}" for s, r in failures)
        raise CheckpointError(
            f"No checkpoint in {mngr.directory} could be restored ({details}); nothing was moved. If the config "
            "changed since they were written, rerun with the original config; otherwise restore a good copy, or use "
            "a new --workdir."
        )
    return None


def attach_metrics(mngr: ocp.CheckpointManager, step: int, metrics: dict) -> None:
    """Records `metrics` (e.g. {BEST_METRIC: top1}) for a committed `step`, as if `save` had been given them.

    Orbax keeps a step's metrics in `<step>/metrics/metrics` (JSON) and reads them from there (`mngr.metrics`,
    the best-step policy, `evaluate --checkpoint=best`); it has no call to add them after a save, so the file is
    written here (process 0, write then rename) and the manager reloads its step list.
    """
    mngr.wait_until_finished()
    if jax.process_index() == 0:
        item = epath.Path(mngr.directory) / str(step) / "metrics"
        item.mkdir(parents=True, exist_ok=True)
        tmp = item / "metrics.tmp"
        tmp.write_text(json.dumps(metrics))
        tmp.replace(item / "metrics")
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

        multihost_utils.sync_global_devices(f"nin_jax:attach_metrics:{step}")
    mngr.reload()
