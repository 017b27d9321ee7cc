"""Learning-rate schedules and optimisers: the original Caffe NIN solver and a modern recipe.

Both are SGD with momentum in Caffe's form, `v <- m v - lr * mult * (g + wd * w)`, `w <- w + v` (the
learning rate is applied before the momentum, so a step drop in LR does not rescale the velocity already
accumulated). Weight decay acts on weights only; per-layer multipliers reproduce Caffe's `blobs_lr`
(bias x2, the class-map layer x0.1).
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from nin_jax.config import RECIPES, ConfigError

MAX_WARMUP_FRACTION = 0.1  # of the run's steps


def create_learning_rate_fn(config: ml_collections.ConfigDict, steps_per_epoch: int, total_steps: int) -> optax.Schedule:
    """caffe: piecewise-constant steps at `optim.lr_boundaries_epochs`; modern: linear warmup then cosine to 0."""
    o = config.optim
    if config.recipe not in RECIPES:
        raise ConfigError(f"config.recipe={config.recipe!r}; choose one of {RECIPES}.")
    if config.recipe == "caffe":
        boundaries = {int(round(e * steps_per_epoch)): o.lr_decay for e in o.lr_boundaries_epochs}
        return optax.piecewise_constant_schedule(o.learning_rate, boundaries)
    warmup = warmup_steps(o.warmup_epochs, steps_per_epoch, total_steps)
    return optax.warmup_cosine_decay_schedule(0.0, o.learning_rate, warmup, total_steps)


def warmup_steps(warmup_epochs: float, steps_per_epoch: int, total_steps: int) -> int:
    """`warmup_epochs` in steps, capped at `MAX_WARMUP_FRACTION` of the run.

    A warmup sized for a full schedule (e.g. 5 of 200 epochs) would otherwise take all of a short run (a
    400-step CPU run is ~1 epoch of CIFAR-10) and train it at a fraction of the learning rate throughout.
    """
    warmup = int(round(warmup_epochs * steps_per_epoch))
    cap = int(MAX_WARMUP_FRACTION * total_steps)
    if warmup > cap:
        logging.warning("config.optim.warmup_epochs=%s is %d steps, more than %d%% of this %d-step run: warming "
                        "up for %d steps.", warmup_epochs, warmup, round(100 * MAX_WARMUP_FRACTION), total_steps, cap)
        return cap
    return warmup


def _path_names(path) -> tuple[str, ...]:
    return tuple(getattr(k, "key", str(k)) for k in path)


def weight_decay_mask(params: Any) -> Any:
    """True for conv/dense kernels, False for biases and BatchNorm parameters."""
    return jax.tree_util.tree_map_with_path(lambda p, _: _path_names(p)[-1] == "kernel", params)


def lr_multipliers(params: Any, output_path: tuple[str, ...], *, bias_mult: float, output_mult: float) -> Any:
    """Per-parameter LR multipliers: `output_mult` on the class-map layer, `bias_mult` on other biases."""

    def mult(path, _):
        names = _path_names(path)
        if names[: len(output_path)] == output_path:
            return output_mult
        is_bn = any(n.startswith("bn") for n in names)
        return bias_mult if names[-1] == "bias" and not is_bn else 1.0

    return jax.tree_util.tree_map_with_path(mult, params)


def _scale_by_tree(multipliers: Any) -> optax.GradientTransformation:
    def update_fn(updates, state, params=None):
        del params
        return jax.tree.map(lambda u, m: u * jnp.asarray(m, u.dtype), updates, multipliers), state

    return optax.GradientTransformation(lambda _: optax.EmptyState(), update_fn)


def create_optimizer(
    config: ml_collections.ConfigDict,
    params: Any,
    learning_rate_fn: Callable[[jax.Array], jax.Array],
    output_path: tuple[str, ...],
) -> optax.GradientTransformation:
    """The optimiser of `config.recipe` (see module docstring); gradient clipping first when enabled."""
    o = config.optim
    parts = []
    if o.grad_clip_norm > 0:
        parts.append(optax.clip_by_global_norm(o.grad_clip_norm))
    if o.weight_decay > 0:
        parts.append(optax.add_decayed_weights(o.weight_decay, mask=weight_decay_mask(params)))
    mults = lr_multipliers(params, output_path, bias_mult=o.bias_lr_mult, output_mult=o.output_lr_mult)
    if any(m != 1.0 for m in jax.tree.leaves(mults)):
        parts.append(_scale_by_tree(mults))
    parts.append(optax.scale_by_learning_rate(learning_rate_fn))
    if o.momentum > 0:
        parts.append(optax.trace(decay=o.momentum, nesterov=o.nesterov))
    return optax.chain(*parts)


def cross_entropy_loss(logits: jax.Array, labels: jax.Array, num_classes: int, label_smoothing: float = 0.0) -> jax.Array:
    """Per-example softmax cross-entropy in float32, with optional label smoothing."""
    targets = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    if label_smoothing > 0:
        targets = optax.smooth_labels(targets, label_smoothing)
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)
