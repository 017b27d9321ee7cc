"""cpu.batchnorm: training-mode BatchNorm + ReLU with a hand-written gradient equals flax's BatchNorm + ReLU."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from nin_jax import mesh as mesh_lib
from nin_jax.cpu import batchnorm

MOMENTUM, EPSILON = 0.9, 1e-3


def _reference(relu, axis_name=None):
    class Ref(nn.Module):
        @nn.compact
        def __call__(self, x):
            y = nn.BatchNorm(use_running_average=False, momentum=MOMENTUM, epsilon=EPSILON, axis_name=axis_name,
                             name="bn")(x)
            return nn.relu(y) if relu else y
    return Ref()


def _fused(relu, axis_name=None):
    class Fused(nn.Module):
        @nn.compact
        def __call__(self, x):
            return batchnorm.BatchNormReLU(MOMENTUM, EPSILON, relu, axis_name, name="bn")(x)
    return Fused()


def _inputs(shape=(6, 5, 4, 8)):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(shape) * 3 + 1, jnp.float32)
    dy = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    return x, dy


def _params(channels):
    rng = np.random.default_rng(1)
    return {"bn": {"scale": jnp.asarray(rng.uniform(0.5, 2, channels), jnp.float32),
                   "bias": jnp.asarray(rng.standard_normal(channels), jnp.float32)}}


def _run(model, variables, x, dy):
    """Output, updated batch_stats, and the gradients (of x, of the params) of <output, dy>."""
    def apply(x, params):
        return model.apply({**variables, "params": params}, x, mutable=["batch_stats"])

    y, pullback, updates = jax.vjp(apply, x, variables["params"], has_aux=True)
    return y, updates, pullback(dy)


@pytest.mark.parametrize("relu", [True, False])
def test_values_gradients_and_running_averages_equal_flax(relu):
    x, dy = _inputs()
    ref, fused = _reference(relu), _fused(relu)
    variables = ref.init(jax.random.key(0), x)
    assert jax.tree.structure(variables) == jax.tree.structure(fused.init(jax.random.key(0), x))
    variables = {**variables, "params": _params(x.shape[-1])}
    # Non-trivial running averages, so that the update is checked, not just the initial values.
    variables["batch_stats"] = {"bn": {"mean": jnp.full(8, 0.3), "var": jnp.full(8, 2.0)}}
    y_ref, stats_ref, grads_ref = _run(ref, variables, x, dy)
    y_fused, stats_fused, grads_fused = _run(fused, variables, x, dy)
    np.testing.assert_allclose(y_fused, y_ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(stats_fused), jax.tree.leaves(stats_ref)):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads_fused), jax.tree.leaves(grads_ref)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(np.max(np.abs(b))))
    if relu:
        assert float(jnp.mean(y_fused == 0)) > 0.2  # the mask is exercised


@pytest.mark.cpu
def test_per_device_statistics_over_axis_name_equal_global_batch_statistics():
    """Under shard_map the statistics and the gradient sums are reduced over the devices of the data axis."""
    mesh = mesh_lib.create_mesh()
    n = mesh.devices.size
    assert n > 1, "conftest gives the tests several host devices"
    x, dy = _inputs((2 * n, 3, 3, 4))
    fused_global, fused_sharded = _fused(True), _fused(True, axis_name=mesh_lib.DATA_AXIS)
    variables = {**fused_global.init(jax.random.key(0), x), "params": _params(4)}
    y_g, stats_g, grads_g = _run(fused_global, variables, x, dy)

    def per_device(x, dy):
        y, stats, (gx, gp) = _run(fused_sharded, variables, x, dy)
        return y, stats, gx, gp

    y_s, stats_s, gx_s, gp_s = jax.shard_map(
        per_device, mesh=mesh, in_specs=(P(mesh_lib.DATA_AXIS), P(mesh_lib.DATA_AXIS)),
        out_specs=(P(mesh_lib.DATA_AXIS), P(), P(mesh_lib.DATA_AXIS), P()), check_vma=False)(x, dy)
    np.testing.assert_allclose(y_s, y_g, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gx_s, grads_g[0], rtol=1e-4, atol=1e-5)
    # Per device the parameter gradient is the psum over devices of the local terms, i.e. the global one.
    for a, b in zip(jax.tree.leaves(gp_s), jax.tree.leaves(grads_g[1])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    for a, b in zip(jax.tree.leaves(stats_s), jax.tree.leaves(stats_g)):
        np.testing.assert_allclose(a, b, rtol=1e-5)
