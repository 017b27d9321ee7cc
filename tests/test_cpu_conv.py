"""nin_jax.cpu.conv: every formulation matches XLA's convolution in value and in both gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nin_jax.cpu import conv as conv_ops, winograd

pytestmark = pytest.mark.cpu  # host devices or the CPU kernels


@pytest.fixture(autouse=True, scope="module")
def _fast_compile():
    # Many tiny programs: XLA's optimisation passes dominate run time and are not under test.
    previous = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", previous)

# (batch, height, width, cin, cout, kernel, stride, padding): the NIN layer kinds in small sizes.
SHAPES = [
    (2, 9, 9, 3, 8, 5, 1, 2),     # CIFAR conv1: 5x5 pad 2, cin=3, odd size
    (2, 8, 7, 6, 5, 5, 1, 2),     # conv2-like, non-square input
    (2, 5, 5, 4, 6, 3, 1, 1),     # conv3: 3x3 pad 1
    (1, 7, 7, 1, 4, 3, 1, 0),     # cin=1 (MNIST), no padding
    (2, 27, 27, 3, 4, 11, 4, 0),  # ImageNet conv1: 11x11 stride 4 pad 0
    (2, 9, 10, 3, 4, 3, 2, 1),    # stride 2 with padding, odd sizes
    (2, 6, 5, 4, 3, 1, 1, 0),     # 1x1
    (1, 4, 4, 2, 3, 5, 1, 3),     # padding > k//2
    (1, 6, 5, 24, 8, 5, 1, 2),    # k*k*cin = 600: hybrid's weight gradient goes row by row
    (2, 4, 4, 64, 8, 3, 1, 1),    # k*k*cin = 576, 3x3
]


# Winograd F(4x4, k x k) scales terms by up to ~100 (5x5) before they cancel, so in float32 its values and
# gradients round to ~1e-5 of the tensor's scale rather than of each element (XLA's direct convolution: ~5e-7).
WINOGRAD_TOL = 3e-5


def _assert_within_scale(actual, desired, tol, err_msg):
    """max |actual - desired| <= tol * max |desired|: the error relative to the tensor's scale."""
    error = float(np.max(np.abs(np.asarray(actual, np.float64) - np.asarray(desired, np.float64))))
    scale = float(np.max(np.abs(desired)))
    assert error <= tol * scale, f"{err_msg}: max abs error {error:.3g} > {tol} * max |reference| {scale:.3g}"


def _reference_and_grads(impl, x, kernel, stride, padding, cotangent):
    def loss(x, kernel):
        y = conv_ops.conv2d(x, kernel, stride=stride, padding=padding, impl=impl)
        return jnp.sum(y * cotangent), y

    (_, y), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(x, kernel)
    return y, grads


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "b{}h{}w{}c{}d{}k{}s{}p{}".format(*s))
def test_impls_match_xla(shape):
    b, h, w, cin, cout, k, stride, padding = shape
    rng = np.random.default_rng(sum(shape))
    x = jnp.asarray(rng.standard_normal((b, h, w, cin)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((k, k, cin, cout)) / k, jnp.float32)
    out = [(n + 2 * padding - k) // stride + 1 for n in (h, w)]
    cotangent = jnp.asarray(rng.standard_normal((b, *out, cout)), jnp.float32)
    y_ref, (dx_ref, dk_ref) = _reference_and_grads("xla", x, kernel, stride, padding, cotangent)
    assert y_ref.shape == (b, *out, cout)
    for impl in conv_ops.IMPLS[1:]:
        y, (dx, dk) = _reference_and_grads(impl, x, kernel, stride, padding, cotangent)
        assert y.shape == y_ref.shape and y.dtype == jnp.float32, impl
        if impl == "winograd":
            for name, got, want in [("value", y, y_ref), ("d/dx", dx, dx_ref), ("d/dkernel", dk, dk_ref)]:
                _assert_within_scale(got, want, WINOGRAD_TOL, f"{impl} {name}")
            continue
        np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5, err_msg=f"{impl} value")
        np.testing.assert_allclose(dx, dx_ref, rtol=1e-5, atol=1e-5, err_msg=f"{impl} d/dx")
        np.testing.assert_allclose(dk, dk_ref, rtol=1e-5, atol=1e-5, err_msg=f"{impl} d/dkernel")


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "b{}h{}w{}c{}d{}k{}s{}p{}".format(*s))
def test_values_without_gradients_match_xla(shape):
    # Outside differentiation each impl runs its primal path ("winograd": the Winograd transform).
    b, h, w, cin, cout, k, stride, padding = shape
    rng = np.random.default_rng(sum(shape) + 1)
    x = jnp.asarray(rng.standard_normal((b, h, w, cin)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((k, k, cin, cout)) / k, jnp.float32)
    ref = conv_ops.conv2d(x, kernel, stride=stride, padding=padding, impl="xla")
    for impl in conv_ops.IMPLS[1:]:
        y = jax.jit(lambda a, c: conv_ops.conv2d(a, c, stride=stride, padding=padding, impl=impl))(x, kernel)
        if impl == "winograd":
            _assert_within_scale(y, ref, WINOGRAD_TOL, impl)
        else:
            np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5, err_msg=impl)


def test_winograd_matrices_are_exact_and_nin_sized_layers_stay_within_tolerance():
    rng = np.random.default_rng(0)
    for m in (2, 4):
        for k in range(1, 8):
            a_t, g, b_t = winograd.matrices(k, m)
            d, f = rng.standard_normal(m + k - 1), rng.standard_normal(k)
            direct = np.array([f @ d[i:i + k] for i in range(m)])
            np.testing.assert_allclose(a_t @ ((g @ f) * (b_t @ d)), direct, atol=1e-9)
    # NIN-CIFAR10's conv2 (5x5, 96 -> 192 channels) and conv3 (3x3, 192 -> 192) on post-ReLU inputs with
    # He-scaled weights, against a float64 reference. Measured with F(4x4, k x k) (batch 2 here; batch 64 gives
    # the same): at most 1.5e-5 of the scale for 5x5 (conv2's d/dx), 5e-6 for 3x3.
    for k, cin, cout in [(5, 96, 192), (3, 192, 192)]:
        x = np.maximum(rng.standard_normal((2, 16, 16, cin)), 0)
        kernel = rng.standard_normal((k, k, cin, cout)) * np.sqrt(2 / (k * k * cin))
        cotangent = rng.standard_normal((2, 16, 16, cout))

        def value_and_grads(impl, *args):
            def loss(x, kernel):
                y = conv_ops.conv2d(x, kernel, padding=k // 2, impl=impl)
                return jnp.sum(y * args[2]), y
            (_, y), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(*args[:2])
            return y, *grads

        with jax.enable_x64(True):
            ref = [np.asarray(a) for a in value_and_grads("xla", *map(jnp.asarray, (x, kernel, cotangent)))]
        got = value_and_grads("winograd", *(jnp.asarray(a, jnp.float32) for a in (x, kernel, cotangent)))
        for name, actual, desired in zip(("value", "d/dx", "d/dkernel"), got, ref):
            _assert_within_scale(actual, desired, WINOGRAD_TOL, f"{k}x{k} {name}")


def test_eager_matches_jit_and_auto_resolves():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((1, 6, 6, 3)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((3, 3, 3, 2)), jnp.float32)
    eager = conv_ops.conv2d(x, kernel, stride=1, padding=1, impl="auto")
    jitted = jax.jit(lambda a, b: conv_ops.conv2d(a, b, stride=1, padding=1, impl="auto"))(x, kernel)
    np.testing.assert_allclose(eager, jitted, rtol=1e-6, atol=1e-6)
    # Winograd for stride-1 3x3/5x5 layers with many input channels, XLA's convolution with GEMM weight
    # gradients for the others.
    assert conv_ops.resolve_impl("auto", (5, 5, 3, 192)) == "hybrid"
    assert conv_ops.resolve_impl("auto", (5, 5, 96, 192)) == "winograd"
    assert conv_ops.resolve_impl("auto", (3, 3, 192, 192)) == "winograd"
    assert conv_ops.resolve_impl("auto", (3, 3, 192, 192), stride=2) == "hybrid"
    assert conv_ops.resolve_impl("auto", (11, 11, 96, 96)) == "hybrid"  # float32 error not tested
    assert conv_ops.resolve_impl("xla", (5, 5, 96, 192)) == "xla"


def test_flax_conv_with_the_cpu_formulation_equals_flax_conv():
    import flax.linen as nn  # pylint: disable=g-import-not-at-top

    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((2, 8, 8, 64)), jnp.float32)
    plain = nn.Conv(8, (3, 3), padding=((1, 1), (1, 1)))
    cpu = nn.Conv(8, (3, 3), padding=((1, 1), (1, 1)), conv_general_dilated=conv_ops.conv_general_dilated)
    params = plain.init(jax.random.key(0), x)
    np.testing.assert_allclose(cpu.apply(params, x), plain.apply(params, x), rtol=1e-5, atol=1e-5)
    # A convolution outside NIN's kinds (dilated) is passed to XLA unchanged.
    dilated = dict(kernel_dilation=(2, 2), padding=((2, 2), (2, 2)))
    np.testing.assert_allclose(
        nn.Conv(8, (3, 3), conv_general_dilated=conv_ops.conv_general_dilated, **dilated).apply(params, x),
        nn.Conv(8, (3, 3), **dilated).apply(params, x), rtol=1e-6, atol=1e-6)


def test_bfloat16_follows_input_dtype():
    x = jnp.ones((1, 5, 5, 2), jnp.bfloat16)
    kernel = jnp.ones((3, 3, 2, 4), jnp.bfloat16)
    for impl in conv_ops.IMPLS:
        y = conv_ops.conv2d(x, kernel, stride=1, padding=1, impl=impl)
        assert y.dtype == jnp.bfloat16, impl
        assert float(y[0, 2, 2, 0]) == 18.0 and float(y[0, 0, 0, 0]) == 8.0, impl


@pytest.mark.parametrize("kwargs, match", [
    (dict(impl="fast"), "conv impl"),
    (dict(stride=0), "stride"),
    (dict(padding=-1), "padding"),
])
def test_bad_arguments_raise(kwargs, match):
    x, kernel = jnp.ones((1, 4, 4, 2)), jnp.ones((3, 3, 2, 1))
    args = dict(stride=1, padding=1, impl="hybrid") | kwargs
    with pytest.raises(ValueError, match=match):
        conv_ops.conv2d(x, kernel, **args)


def test_channel_mismatch_raises():
    with pytest.raises(ValueError, match="channels"):
        conv_ops.conv2d(jnp.ones((1, 4, 4, 3)), jnp.ones((3, 3, 2, 1)), stride=1, padding=1, impl="xla")
