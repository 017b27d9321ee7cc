"""pooling: the same values and gradients as flax's pooling (max: ties included; avg: in-bounds counts)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nin_jax.cpu import pooling

pytestmark = pytest.mark.cpu  # host devices or the CPU kernels

# (input shape, window, stride, ((top, bottom), (left, right)) padding)
CASES = [
    ((2, 9, 9, 3), 3, 2, ((0, 0), (0, 0))),
    ((2, 16, 16, 5), 3, 2, ((0, 1), (0, 1))),  # NIN's Caffe ceil mode: 16 -> 8
    ((1, 7, 6, 2), 3, 2, ((0, 2), (0, 1))),    # odd sizes, a window hanging two pixels over the edge
    ((2, 8, 8, 4), 2, 2, ((0, 0), (0, 0))),
    ((1, 13, 13, 3), 3, 1, ((1, 1), (1, 1))),
    ((1, 12, 12, 2), 3, 3, ((0, 0), (0, 0))),  # window == stride
]


@pytest.mark.parametrize("shape,window,stride,padding", CASES, ids=lambda c: str(c).replace(" ", ""))
def test_max_pool_matches_flax_value_and_gradient(shape, window, stride, padding):
    rng = np.random.default_rng(sum(shape))
    # Small non-negative integers: after a ReLU most windows hold ties, often all zeros.
    x = jnp.asarray(np.maximum(rng.integers(-3, 3, shape), 0), jnp.float32)
    y_ref, vjp_ref = jax.vjp(lambda x: nn.max_pool(x, (window, window), (stride, stride), padding=padding), x)
    y, vjp = jax.vjp(lambda x: pooling.max_pool(x, window, stride, padding), x)
    np.testing.assert_array_equal(y, y_ref)
    g = jnp.asarray(rng.standard_normal(y.shape), jnp.float32)
    (dx_ref,), (dx,) = vjp_ref(g), vjp(g)
    assert dx.shape == x.shape
    # Each input gathers the same set of gradients; only the order of their sum may differ.
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-6, atol=1e-6)
    # Each output's gradient lands on exactly one input: the totals agree.
    np.testing.assert_allclose(dx.sum(), g.sum(), rtol=1e-5)


@pytest.mark.parametrize("shape,window,stride,padding", CASES, ids=lambda c: str(c).replace(" ", ""))
def test_avg_pool_matches_flax_without_padded_pixels(shape, window, stride, padding):
    rng = np.random.default_rng(sum(shape) + 1)
    x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    y_ref, vjp_ref = jax.vjp(lambda x: nn.avg_pool(x, (window, window), (stride, stride), padding=padding,
                                                   count_include_pad=False), x)
    y, vjp = jax.vjp(lambda x: pooling.avg_pool(x, window, stride, padding), x)
    np.testing.assert_allclose(y, y_ref, rtol=1e-6, atol=1e-6)
    g = jnp.asarray(rng.standard_normal(y.shape), jnp.float32)
    np.testing.assert_allclose(vjp(g)[0], vjp_ref(g)[0], rtol=1e-6, atol=1e-6)
