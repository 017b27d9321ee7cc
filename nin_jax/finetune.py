"""Fine-tuning: a run that starts from the weights of another run (`config.init_from`, that run's workdir).

Every parameter and BatchNorm statistic comes from the other run's checkpoint `config.init_checkpoint`
(latest | best | a step) where name and shape agree: its weights' moving average when that run kept one
(`config.optim.ema_decay`); this run's own average, if it keeps one, starts from the same weights. The
class-map layer and its BatchNorm (`models.class_count_paths`) start fresh when their shapes differ, i.e. for
another class count (or, with an FC head, another image size); any other difference is another architecture
and is refused. The optimiser starts fresh at step 0 of this run's schedule, and this run's own preprocessing
is fitted to its own data. Once the run has saved a checkpoint, a rerun resumes from it and `init_from` is not
read again. Both fields belong to the experiment's identity.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from flax import traverse_util

from nin_jax import models
from nin_jax.config import ConfigError
from nin_jax.data import run_record
from nin_jax.runtime import record, recovery, remote


def _source(config: ml_collections.ConfigDict) -> tuple[ml_collections.ConfigDict, run_record.RunData]:
    """The saved config and data record of `config.init_from`; `ConfigError` naming the field otherwise."""
    where = f"config.init_from={config.init_from}"
    remote.check_access(config.init_from, "config.init_from")
    path = epath.Path(config.init_from)
    saved = record.read_config(path) if path.is_dir() else None
    data = run_record.load(path) if saved is not None else None
    if saved is None or data is None or not (path / "checkpoints").is_dir():
        raise ConfigError(f"{where} holds no trained run (config.json, {run_record.DATASET_FILE} and checkpoints/ "
                          "of `python -m nin_jax.main`); pass the workdir of the run to start from.")
    checkpoint = str(config.init_checkpoint)
    if checkpoint not in ("latest", "best") and not checkpoint.isdigit():
        raise ConfigError(f"config.init_checkpoint={config.init_checkpoint!r}; choose latest, best or a step number.")
    return saved, data


def check(config: ml_collections.ConfigDict) -> None:
    """Fails early (before any data is read) when `config.init_from` cannot be used."""
    _source(config)


def _merge(fresh: Any, loaded: Any, head: tuple[tuple[str, ...], ...], where: str) -> tuple[Any, list[str]]:
    """`fresh` with each leaf replaced by the leaf of `loaded` at its path; head leaves of another shape are kept
    fresh (returned by name)."""
    ours, theirs = traverse_util.flatten_dict(fresh), traverse_util.flatten_dict(loaded)
    if set(ours) != set(theirs):
        extra = sorted("/".join(k) for k in set(ours) ^ set(theirs))
        raise ConfigError(f"{where} is another architecture: {', '.join(extra[:4])} exist in only one of the two "
                          "models; fine-tuning keeps config.model as that run had it (the class count may change).")
    out, kept_fresh = {}, []
    for path, value in ours.items():
        if theirs[path].shape == value.shape:
            out[path] = theirs[path]
        elif any(path[:len(h)] == h for h in head):
            out[path] = value
            kept_fresh.append("/".join(path))
        else:
            raise ConfigError(f"{where}: {'/'.join(path)} has shape {tuple(theirs[path].shape)} there and "
                              f"{tuple(value.shape)} here; fine-tuning keeps config.model and the number of image "
                              "channels as that run had them.")
    return traverse_util.unflatten_dict(out), kept_fresh


def initialize(config: ml_collections.ConfigDict, state: Any, model: models.NIN,
               mesh: jax.sharding.Mesh) -> tuple[Any, dict[str, Any]]:
    """`state` (fresh) with the weights of `config.init_from`, and what was taken, for results.json."""
    from nin_jax import train  # pylint: disable=g-import-not-at-top  (it imports this module)

    saved, data = _source(config)
    where = f"config.init_from={config.init_from}"
    theirs = models.create_model(saved.model, len(data.class_names))
    target = train.abstract_train_state(saved, theirs, tuple(data.image_shape), None, mesh)
    saved_state, step, _ = recovery.restore_readonly(config.init_from, target, str(config.init_checkpoint),
                                                     best_metric=saved.run.best_metric)
    variables = train.inference_variables(saved_state)
    head = models.class_count_paths(model)
    params, fresh = _merge(state.params, variables["params"], head, where)
    stats, fresh_stats = _merge(state.batch_stats, variables.get("batch_stats", {}), head, where)
    taken = sum(int(np.prod(x.shape)) for p, x in traverse_util.flatten_dict(params).items()
                if "/".join(p) not in fresh)
    print(f"Fine-tuning from {config.init_from} (checkpoint step {step}, {len(data.class_names)} classes): "
          f"{taken:,} parameters taken" + (f", {', '.join(fresh + fresh_stats)} initialised fresh" if fresh else ""),
          flush=True)
    summary = {"workdir": str(config.init_from), "step": step, "fresh": fresh + fresh_stats}
    state = state.replace(params=params, batch_stats=stats)
    if hasattr(state, "ema"):  # this run's moving average starts from the same weights
        state = state.replace(ema=jax.tree.map(jnp.copy, {"params": params, "batch_stats": stats}))
    return state, summary
