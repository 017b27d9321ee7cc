"""The layer bundle (`models.Layers`) built from this package's kernels, and the choice of bundle for a run.

The same math and variables as flax's layers, with gradients that are cheap on XLA:CPU: the convolutions by
`conv.conv_general_dilated`, the 1x1 layers by `dense.dot_general`, training-mode BatchNorm + ReLU by
`batchnorm.BatchNormReLU` (evaluation uses flax's BatchNorm on the running averages), pooling by `pooling`.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax

from nin_jax import models
from nin_jax.cpu import batchnorm, conv, dense, pooling


def batch_norm_relu(x: jax.Array, *, train: bool, relu: bool, momentum: float, epsilon: float,
                    axis_name: str | None, dtype: Any, name: str) -> jax.Array:
    """`models.flax_batch_norm_relu` whose training mode runs `batchnorm.BatchNormReLU` (the same variables)."""
    if not train:
        return models.flax_batch_norm_relu(x, train=False, relu=relu, momentum=momentum, epsilon=epsilon,
                                           axis_name=axis_name, dtype=dtype, name=name)
    return batchnorm.BatchNormReLU(momentum, epsilon, relu, axis_name, dtype, name=name)(x)


def pool(x: jax.Array, kind: str, window: int, stride: int, padding: models.Padding) -> jax.Array:
    """`models.flax_pool` by `pooling.max_pool` or `pooling.avg_pool`."""
    return (pooling.max_pool if kind == "max" else pooling.avg_pool)(x, window, stride, padding)


LAYERS = models.Layers(
    conv=functools.partial(nn.Conv, conv_general_dilated=conv.conv_general_dilated),
    dense=functools.partial(nn.Dense, dot_general=dense.dot_general),
    norm_relu=batch_norm_relu,
    pool=pool,
)


def model_layers(cpu_kernels: bool) -> models.Layers:
    """The bundle a run's model is built from: `LAYERS` when `cpu_kernels` (`config.run.cpu_kernels`) is on and jax
    runs on the CPU, else flax's own (`models.Layers()`)."""
    return LAYERS if cpu_kernels and jax.default_backend() == "cpu" else models.Layers()
