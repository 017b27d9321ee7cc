"""cpu.dense: the 1x1 layers' product over flattened pixels equals flax's Dense, in value and both gradients."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nin_jax.cpu import dense


def _dense(dot_general):
    return nn.Dense(7, use_bias=True, dot_general=dot_general)


def test_value_and_gradients_equal_flax_dense_on_nhwc_input():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((3, 5, 4, 6)), jnp.float32)
    dy = jnp.asarray(rng.standard_normal((3, 5, 4, 7)), jnp.float32)
    params = _dense(None).init(jax.random.key(0), x)

    def run(dot_general):
        y, pullback = jax.vjp(lambda x, p: _dense(dot_general).apply(p, x), x, params)
        return y, *pullback(dy)

    y_ref, dx_ref, dp_ref = run(None)
    y, dx, dp = run(dense.dot_general)
    assert y.shape == (3, 5, 4, 7)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-5, atol=1e-5)
    for name in ("kernel", "bias"):
        np.testing.assert_allclose(dp["params"][name], dp_ref["params"][name], rtol=1e-5, atol=1e-5)


def test_other_contractions_are_refused():
    a, b = jnp.ones((4, 3)), jnp.ones((4, 5))
    with pytest.raises(ValueError, match="Dense's contraction only"):
        dense.dot_general(a, b, (((0,), (0,)), ((), ())))
