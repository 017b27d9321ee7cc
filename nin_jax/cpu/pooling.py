"""Max and average pooling (NHWC) with gradients that are cheap on XLA:CPU.

JAX differentiates `lax.reduce_window` max through a variadic reduce-window that carries an int32 index
array per dimension and then scatters, and a window sum through a padded reduce-window; for NIN-CIFAR10 on
CPU they cost ~6% of the training step. Here both backward passes route the output gradient to the window
taps one input phase (row and column modulo the stride) at a time: each phase is a sum of shifted copies,
with no scatter. Max pooling sends each output's gradient to the first tap in row-major window order that
attains the maximum, the tap JAX's own gradient picks, ties included.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Padding = tuple[tuple[int, int], tuple[int, int]]  # ((top, bottom), (left, right))


def max_pool(x: jax.Array, window: int, stride: int, padding: Padding) -> jax.Array:
    """``window`` x ``window`` max pooling of NHWC ``x`` with ``stride``; ``padding`` is -inf, so a window
    overhanging the image takes the max of its in-bounds pixels."""
    return _max_pool(x, window, stride, _as_tuple(padding))


def avg_pool(x: jax.Array, window: int, stride: int, padding: Padding) -> jax.Array:
    """Average pooling that divides each window by its in-bounds pixel count (zero ``padding`` not counted)."""
    padding = _as_tuple(padding)
    rows, cols = (_in_bounds_counts(n, window, stride, p) for n, p in zip(x.shape[1:3], padding))
    counts = np.outer(rows, cols)[None, :, :, None]
    return _sum_pool(x, window, stride, padding) / jnp.asarray(counts, x.dtype)


def _as_tuple(padding) -> Padding:
    return tuple(tuple(int(p) for p in side) for side in padding)


def _pad(x, value, padding: Padding):
    (top, bottom), (left, right) = padding
    return lax.pad(x, jnp.array(value, x.dtype), ((0, 0, 0), (top, bottom, 0), (left, right, 0), (0, 0, 0)))


def _reduce(x, init, op, window: int, stride: int, padding: Padding):
    return lax.reduce_window(_pad(x, init, padding), jnp.array(init, x.dtype), op,
                             (1, window, window, 1), (1, stride, stride, 1), "VALID")


def _in_bounds_counts(size: int, window: int, stride: int, pad: tuple[int, int]) -> np.ndarray:
    """Per output position along one axis: how many of its window's pixels lie inside the image."""
    top, bottom = pad
    starts = np.arange((size + top + bottom - window) // stride + 1) * stride - top
    return np.minimum(starts + window, size) - np.maximum(starts, 0)


def _tap(xp, i: int, j: int, out_hw: tuple[int, int], stride: int):
    """The input each output window reads at window offset (i, j), from padded ``xp``."""
    b, _, _, c = xp.shape
    oh, ow = out_hw
    return lax.slice(xp, (0, i, j, 0), (b, i + (oh - 1) * stride + 1, j + (ow - 1) * stride + 1, c),
                     (1, stride, stride, 1))


def _route_back(tap_grad: Callable[[int], jax.Array], window: int, stride: int, padding: Padding,
                padded_hw: tuple[int, int], x_shape: tuple[int, ...]) -> jax.Array:
    """Input gradient from ``tap_grad(t)``, the gradient each output sends to its window tap t (row-major).

    Padded input row s*m + p is tap row i = p + s*q of output row m - q, so each of the s x s input phases
    is a sum of shifted tap gradients; the phases then interleave into the padded input and are cropped.
    """
    g0 = tap_grad(0)
    b, oh, ow, c = g0.shape
    hp, wp = padded_hw
    mh, mw = -(-hp // stride), -(-wp // stride)
    zero = jnp.zeros((), g0.dtype)
    phases = []
    for ph in range(stride):
        row = []
        for pw in range(stride):
            acc = jnp.zeros((b, mh, mw, c), g0.dtype)
            for qh in range(len(range(ph, window, stride))):
                for qw in range(len(range(pw, window, stride))):
                    part = tap_grad((ph + stride * qh) * window + pw + stride * qw)
                    acc = acc + lax.pad(part, zero, ((0, 0, 0), (qh, mh - oh - qh, 0), (qw, mw - ow - qw, 0),
                                                     (0, 0, 0)))
            row.append(acc)
        phases.append(jnp.stack(row, axis=3))  # (b, mh, mw, stride, c)
    dxp = jnp.stack(phases, axis=2).reshape(b, mh * stride, mw * stride, c)
    (top, _), (left, _) = padding
    return lax.slice(dxp, (0, top, left, 0), (b, top + x_shape[1], left + x_shape[2], c))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool(x, window, stride, padding):
    return _reduce(x, -jnp.inf, lax.max, window, stride, padding)


def _max_pool_fwd(x, window, stride, padding):
    y = _max_pool(x, window, stride, padding)
    return y, (x, y)


def _max_pool_bwd(window, stride, padding, res, g):
    x, y = res
    xp = _pad(x, -jnp.inf, padding)
    taps = [(i, j) for i in range(window) for j in range(window)]
    # Index of the first tap attaining the max; scanned in reverse so that earlier taps overwrite later ones.
    first = jnp.full(y.shape, len(taps), jnp.int32)
    for t in reversed(range(len(taps))):
        first = jnp.where(_tap(xp, *taps[t], y.shape[1:3], stride) == y, t, first)
    zero = jnp.zeros((), g.dtype)
    dx = _route_back(lambda t: jnp.where(first == t, g, zero), window, stride, padding, xp.shape[1:3], x.shape)
    return (dx,)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _sum_pool(x, window, stride, padding):
    return _reduce(x, 0.0, lax.add, window, stride, padding)


def _sum_pool_fwd(x, window, stride, padding):
    return _sum_pool(x, window, stride, padding), x.shape


def _sum_pool_bwd(window, stride, padding, x_shape, g):
    (top, bottom), (left, right) = padding
    padded_hw = (x_shape[1] + top + bottom, x_shape[2] + left + right)
    return (_route_back(lambda t: g, window, stride, padding, padded_hw, x_shape),)


_sum_pool.defvjp(_sum_pool_fwd, _sum_pool_bwd)
