"""Orbax checkpoints: asynchronous saves, the latest N plus the best by eval/top1, robust restore.

A checkpoint step directory holds `state` (the TrainState arrays) and `meta` (JSON: step, data position,
metrics). Orbax writes each step into a temporary directory and renames it when complete, so a crash during
a save leaves no step behind. A step that is present but unreadable (truncated files, a disk error) or whose
arrays differ from the SHA-256 digest saved in its meta (bytes changed on disk) is moved aside to
`<step>.unreadable` and the previous step is restored; nothing is deleted.
"""

from __future__ import annotations

import hashlib
import logging
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


class CheckpointError(ConfigError):
    """A checkpoint the user pointed at cannot be restored (the message names it and what to do)."""


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
        raise CheckpointError(f"checkpoint step {step} in {mngr.directory} does not match its saved digest: "
                              "its files were changed or damaged after it was written.")
    return restored.state, meta


def restore_latest(mngr: ocp.CheckpointManager, abstract_state: Any) -> tuple[Any, dict] | None:
    """Restores the newest readable step; None if there is no checkpoint.

    Steps newer than the restored one failed to read: they are moved aside to `<step>.unreadable` (nothing is
    deleted) so that the run can save those step numbers again. If no step can be read, nothing is moved: the
    cause is then more likely the current config (e.g. a different optimizer) than the files.
    """
    steps = sorted(mngr.all_steps(), reverse=True)
    failures = []
    for step in steps:
        try:
            restored = restore(mngr, step, abstract_state)
        except Exception as e:  # noqa: BLE001 — any read failure means "try the previous step"
            reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            logging.warning("Checkpoint step %d in %s could not be restored (%s).", step, mngr.directory, reason)
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
            f"No checkpoint in {mngr.directory} could be restored ({details}). If the config changed since they "
            "were written, rerun with the original config; otherwise restore a good copy, or use a new --workdir."
        )
    return None
