"""Orbax checkpoints of the training state: asynchronous saves, the latest N plus the best by a metric, and
restores verified against a SHA-256 digest of the arrays.

A step directory holds `state` (the TrainState arrays) and `meta` (JSON: step, data position, digest). Orbax
writes a step into a temporary directory and renames it when complete, so a crash during a save leaves no
step behind. Which step to restore, and what to do with a damaged one, is `nin_jax.runtime.recovery`'s.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

BEST_METRIC = "eval/top1"  # the default of config.run.best_metric


def metric_score(name: str) -> Any:
    """Checkpoint metrics -> a score, higher is better: `name`'s value (negated for a loss), -inf without it."""
    sign = -1.0 if name.endswith("loss") else 1.0
    return lambda metrics: sign * float(metrics[name]) if name in (metrics or {}) else -float("inf")


DIGEST_KEY = "state_sha256"  # in each step's meta


class CorruptCheckpointError(Exception):
    """A step's files are missing or unparsable, or its arrays differ from their digest: proven damage."""


class StructureMismatchError(ValueError):
    """A step holds other arrays than the restore target (the model or optimizer the config describes)."""


def _handler_registry() -> Any:
    # Orbax's default replica-parallel save slices every replicated array into one piece per device with eager
    # ops compiled at each process's first save: seconds of compilation that a preemption notice may not leave.
    # NIN's arrays are small, so each replicated array is written whole by one replica.
    th = ocp.type_handlers
    return th.create_type_handler_registry(
        (int, th.ScalarHandler()), (float, th.ScalarHandler()), (np.number, th.ScalarHandler()),
        (np.ndarray, th.NumpyHandler()), (jax.Array, th.ArrayHandler(use_replica_parallel=False)))


def create_manager(directory: str | epath.Path, *, keep: int, read_only: bool = False,
                   best_metric: str = BEST_METRIC) -> ocp.CheckpointManager:
    """A manager keeping the latest `keep` steps and the one with the best `best_metric` (a loss: the lowest)."""
    score = metric_score(best_metric)
    policy = ocp.checkpoint_managers.AnyPreservationPolicy([
        ocp.checkpoint_managers.LatestN(n=keep),
        ocp.checkpoint_managers.BestN(get_metric_fn=score, n=1, keep_checkpoints_without_metrics=False),
    ])
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy, enable_async_checkpointing=not read_only, read_only=read_only,
        create=not read_only, cleanup_tmp_directories=not read_only, save_interval_steps=0 if read_only else 1,
        # Orbax writes a step's metrics to disk only when best_fn is set: without it the best step is forgotten
        # on resume (BestN then sees no metrics) and `evaluate --checkpoint=best` cannot find it.
        best_fn=score, best_mode="max",
    )
    handlers = {"state": ocp.PyTreeCheckpointHandler(type_handler_registry=_handler_registry()),
                "meta": ocp.JsonCheckpointHandler()}
    # Orbax's TensorStore specs refuse a relative path, and only when the first save commits: resolve it here.
    directory = epath.Path(directory)
    directory = directory if directory.is_absolute() else directory.absolute()
    return ocp.CheckpointManager(directory, options=options, item_handlers=handlers)


def state_digest(state: Any) -> str:
    """SHA-256 of the arrays of `state` in tree order (dtype, shape, bytes), identical on any device layout."""
    digest = hashlib.sha256()
    for value in jax.tree.leaves(state):
        value = np.ascontiguousarray(jax.device_get(value))
        digest.update(f"{value.dtype}{value.shape};".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def save(mngr: ocp.CheckpointManager, step: int, state: Any, meta: dict) -> None:
    """Starts an asynchronous save of `state` and `meta` (with the state's digest: Orbax's files carry no
    checksum) at `step`; returns once the arrays are copied off the devices."""
    meta = {**meta, DIGEST_KEY: state_digest(state)}
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.PyTreeSave(state), meta=ocp.args.JsonSave(meta)),
              force=True)


def leaf_names(path: tuple) -> tuple[str, ...]:
    """The keys of a tree path as strings, e.g. ("params", "block1", "conv", "kernel")."""
    return tuple(str(getattr(k, "name", getattr(k, "key", getattr(k, "idx", k)))) for k in path)


def check_step(mngr: ocp.CheckpointManager, step: int, target: Any) -> None:
    """Raises `CorruptCheckpointError` if a file Orbax needs is missing or unparsable, `StructureMismatchError`
    if the saved arrays differ from `target`'s in names or shapes (Orbax would pad or cut them to fit)."""
    step_dir = epath.Path(mngr.directory) / str(step)
    for name in ("state/_METADATA", "state/manifest.ocdbt", "meta/metadata"):
        if not (step_dir / name).exists():
            raise CorruptCheckpointError(f"{step_dir / name} is missing")
    try:
        json.loads((step_dir / "meta" / "metadata").read_text())
        saved = mngr.item_metadata(step)["state"].tree
    except (ValueError, TypeError, AttributeError) as e:
        raise CorruptCheckpointError(f"the metadata in {step_dir} cannot be parsed ({type(e).__name__})") from e
    shapes = {leaf_names(p): tuple(v.shape) for p, v in jax.tree_util.tree_leaves_with_path(saved)}
    problems = []
    for path, want in jax.tree_util.tree_leaves_with_path(target):
        have = shapes.pop(leaf_names(path), None)
        where = "/".join(leaf_names(path))
        if have is None:
            problems.append(f"{where} is missing")
        elif have != tuple(want.shape):
            problems.append(f"{where} is {have} in the checkpoint, {tuple(want.shape)} in the model")
    problems += [f"{'/'.join(p)} is not in the model" for p in shapes]
    if problems:
        raise StructureMismatchError("; ".join(problems[:3]) + ("; ..." if len(problems) > 3 else ""))


def restore(mngr: ocp.CheckpointManager, step: int, target: Any) -> tuple[Any, dict]:
    """Restores `step` onto the shapes, dtypes and shardings of `target` (any topology: the arrays are laid out
    anew), after `check_step`; raises `CorruptCheckpointError` if the arrays differ from their saved digest."""
    check_step(mngr, step, target)
    restore_args = jax.tree.map(
        lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape, dtype=x.dtype), target)
    restored = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(item=target, restore_args=restore_args), meta=ocp.args.JsonRestore()))
    meta = dict(restored.meta)
    if DIGEST_KEY in meta and state_digest(restored.state) != meta[DIGEST_KEY]:
        raise CorruptCheckpointError(f"checkpoint step {step} in {mngr.directory} does not match its saved digest: "
                                     "its files were changed or damaged after it was written.")
    return restored.state, meta


def attach_metrics(mngr: ocp.CheckpointManager, step: int, metrics: dict) -> None:
    """Records `metrics` (e.g. {BEST_METRIC: top1}) for a committed `step`, as if `save` had been given them.

    Orbax reads a step's metrics from `<step>/metrics/metrics` (JSON; the format is pinned by
    tests/test_checkpointing.py) and has no call to add them after a save, so process 0 writes that file
    (then renames it into place) and the manager reloads its step list.
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
