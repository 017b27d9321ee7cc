"""Orbax checkpoints: asynchronous saves, the latest N plus the best by eval/top1, robust restore.

A checkpoint step directory holds `state` (the TrainState arrays) and `meta` (JSON: step, data position,
metrics). Orbax writes each step into a temporary directory and renames it when complete, so a crash during
a save leaves no step behind. A step that is present but unreadable (truncated files, a disk error) is moved
aside to `<step>.unreadable` and the previous step is restored; nothing is deleted.
"""

from __future__ import annotations

import logging
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

BEST_METRIC = "eval/top1"


class CheckpointError(RuntimeError):
    """No checkpoint could be restored from a directory that has some."""


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


def save(mngr: ocp.CheckpointManager, step: int, state: Any, meta: dict, metrics: dict | None = None) -> None:
    """Starts an asynchronous save of `state` and `meta` at `step` (returns once arrays are copied off device)."""
    mngr.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
        metrics=metrics,
        force=True,
    )


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """Restores `step` onto the shardings of `abstract_state` (any topology: the arrays are re-laid out)."""
    restored = mngr.restore(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()),
    )
    return restored.state, dict(restored.meta)


def restore_latest(mngr: ocp.CheckpointManager, abstract_state: Any) -> tuple[Any, dict] | None:
    """Restores the newest readable step, moving unreadable ones aside; None if there is no checkpoint."""
    steps = sorted(mngr.all_steps(), reverse=True)
    for step in steps:
        try:
            return restore(mngr, step, abstract_state)
        except Exception as e:  # noqa: BLE001 — any read failure means "try the previous step"
            path = epath.Path(mngr.directory) / str(step)
            logging.warning("Checkpoint step %d in %s is unreadable (%s: %s); falling back to the previous one.",
                            step, path, type(e).__name__, str(e).splitlines()[0] if str(e) else "")
            print(f"WARNING: checkpoint {path} is unreadable ({type(e).__name__}); "
                  "moved aside, resuming from the previous one.", flush=True)
            if jax.process_index() == 0 and path.exists():
                path.rename(path.parent / f"{step}.unreadable")
            mngr.reload()
    if steps:
        raise CheckpointError(
            f"None of the checkpoints {steps} in {mngr.directory} could be read (moved aside as *.unreadable). "
            "Restore a good copy, or use a new --workdir to start over."
        )
    return None
