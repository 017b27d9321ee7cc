"""2-D convolution (NHWC x HWIO, no bias) with formulations that are fast on XLA:CPU.

On XLA:CPU the native `lax.conv_general_dilated` forward pass and its input gradient run near the matmul
rate, but its kernel (weight) gradient does not, least of all for few input channels (NIN's first layer has
3); the same math as GEMMs over patch matrices, or in Winograd's domain, runs much closer to it (the figures,
per machine, are in docs/performance.md). The implementations:

* ``"xla"``: `lax.conv_general_dilated` for the value and (via autodiff) both gradients.
* ``"hybrid"``: XLA's convolution for the value and for dX (a forward convolution of the output
  gradient with the flipped kernel), and the weight gradient ``dW = patches^T @ g`` as GEMMs over patch
  matrices gathered by slicing (`_patch_gemm_dw`); a `jax.custom_vjp`.
* ``"winograd"``: the value, dX and dW by Winograd F(4x4, kxk) (see `nin_jax.cpu.winograd`: 6.25x fewer
  multiplies for 5x5, float32 error within ~1e-5 of the tensor's scale); a `jax.custom_vjp`.
* ``"auto"`` (what the model uses): ``"winograd"`` for stride-1 layers with a kernel size in
  `WINOGRAD_KERNEL_SIZES` and at least `WINOGRAD_MIN_CHANNELS` input channels, ``"hybrid"`` for the others.

`conv_general_dilated` plugs ``"auto"`` into `flax.linen.Conv`.

Strides > 1 are reduced to stride 1 by space-to-depth for every non-"xla" impl (an s x s pixel block
becomes s*s*cin channels, the kernel is zero-padded to a multiple of s and rearranged the same way), so
e.g. ImageNet's 11x11/4 conv on 3 channels becomes a 3x3/1 conv on 48 channels.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from nin_jax.cpu import winograd

IMPLS = ("xla", "hybrid", "winograd")
CHOICES = ("auto",) + IMPLS
# The weight gradient of "hybrid" builds the full im2col matrix up to this contraction length k*k*cin
# (NIN-CIFAR10 conv1: 75), and one patch matrix per kernel row beyond it (conv2: 2400, conv3: 1728).
FULL_IM2COL_MAX_CONTRACTION = 512
# "auto" uses "winograd" for KxK convs with at least this many input channels (NIN's conv2 and conv3, 96 and
# 192 channels); on few channels (conv1: 3) the transformed 192-channel output tiles cost more memory traffic
# than the multiplies saved (docs/performance.md).
WINOGRAD_MIN_CHANNELS = 64
# Kernel sizes "auto" computes by Winograd: those whose float32 error is tested (tests/test_cpu_conv.py);
# the error grows quickly with larger kernels (more, and larger, interpolation points).
WINOGRAD_KERNEL_SIZES = (3, 5)


def resolve_impl(impl: str, kernel_shape: tuple[int, ...], stride: int = 1) -> str:
    """Map ``impl`` (one of `CHOICES`) to a concrete formulation for a layer with HWIO ``kernel_shape``."""
    if impl not in CHOICES:
        raise ValueError(f"conv impl {impl!r} is not one of {CHOICES}")
    if impl != "auto":
        return impl
    if stride == 1 and kernel_shape[0] in WINOGRAD_KERNEL_SIZES and kernel_shape[2] >= WINOGRAD_MIN_CHANNELS:
        return "winograd"
    return "hybrid"


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides: tuple[int, int],
                         padding: tuple[tuple[int, int], tuple[int, int]], lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count: int = 1, precision=None,
                         preferred_element_type=None) -> jax.Array:
    """`lax.conv_general_dilated`'s signature (as `flax.linen.Conv` calls it) running `conv2d(impl="auto")`.

    Takes the NHWC x HWIO square-kernel convolutions with equal strides and symmetric padding that NIN uses;
    anything else goes to `lax.conv_general_dilated` unchanged.
    """
    (top, bottom), (left, right) = padding
    plain = (lhs.ndim == 4 and rhs.shape[0] == rhs.shape[1] and window_strides[0] == window_strides[1]
             and top == bottom == left == right and feature_group_count == 1 and preferred_element_type is None
             and all(d is None or tuple(d) == (1, 1) for d in (lhs_dilation, rhs_dilation))
             and dimension_numbers == lax.conv_dimension_numbers(lhs.shape, rhs.shape, ("NHWC", "HWIO", "NHWC")))
    if not plain:
        return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                        dimension_numbers, feature_group_count, precision=precision,
                                        preferred_element_type=preferred_element_type)
    return conv2d(lhs, rhs, stride=window_strides[0], padding=top)


def conv2d(x: jax.Array, kernel: jax.Array, *, stride: int = 1, padding: int = 0,
           impl: str = "auto") -> jax.Array:
    """Cross-correlation of NHWC ``x`` with HWIO ``kernel`` (square k x k), symmetric zero padding.

    Output size is ``(H + 2*padding - k) // stride + 1`` per spatial dim (floor, like
    `lax.conv_general_dilated` with explicit padding). Output dtype follows `jnp` promotion.
    """
    if x.ndim != 4 or kernel.ndim != 4:
        raise ValueError(f"conv2d wants x NHWC and kernel HWIO, got shapes {x.shape} and {kernel.shape}")
    k, k2, cin, _ = kernel.shape
    if k != k2:
        raise ValueError(f"conv2d supports square kernels only, got kernel shape {kernel.shape}")
    if x.shape[-1] != cin:
        raise ValueError(f"input has {x.shape[-1]} channels but kernel expects {cin} (kernel {kernel.shape})")
    if stride < 1 or padding < 0:
        raise ValueError(f"conv2d needs stride >= 1 and padding >= 0, got stride={stride} padding={padding}")
    for size in x.shape[1:3]:
        if size + 2 * padding < k:
            raise ValueError(f"kernel {k} larger than padded input {size}+2*{padding} (x {x.shape})")
    impl = resolve_impl(impl, kernel_shape=kernel.shape, stride=stride)
    if impl == "xla":
        return lax.conv_general_dilated(
            x, kernel, window_strides=(stride, stride), padding=((padding, padding),) * 2,
            dimension_numbers=("NHWC", "HWIO", "NHWC"))
    dtype = jnp.result_type(x, kernel)
    x, kernel = x.astype(dtype), kernel.astype(dtype)
    if stride > 1:
        x, kernel, out_hw = _space_to_depth(x, kernel, stride, padding)
        return _CONV_S1[impl](x, kernel, 0)[:, :out_hw[0], :out_hw[1], :]
    return _CONV_S1[impl](x, kernel, padding)


def _space_to_depth(x: jax.Array, kernel: jax.Array, s: int, padding: int
                    ) -> tuple[jax.Array, jax.Array, tuple[int, int]]:
    """Rewrite a stride-s conv as a stride-1 conv on s x s pixel blocks (exact, zero taps added).

    Output pixel o reads padded rows o*s + i, i < k. Padding k up to k' = ceil(k/s)*s and writing
    i = s*a + r turns that into block row o + a, in-block row r: a stride-1 conv with kernel
    k'/s over s*s*cin channels. The returned conv yields >= the wanted output size; crop it.
    """
    b, h, w, cin = x.shape
    k, _, _, cout = kernel.shape
    out_hw = tuple((n + 2 * padding - k) // s + 1 for n in (h, w))
    kb = -(-k // s)  # kernel size in blocks
    # Blocks needed so that the last output's window (rows up to (o-1)*s + kb*s) exists.
    nb = tuple(o - 1 + kb for o in out_hw)
    hi = tuple(nb_i * s - n - padding for nb_i, n in zip(nb, (h, w)))  # may be negative: crop
    x = lax.pad(x, jnp.zeros((), x.dtype),
                ((0, 0, 0), (padding, hi[0], 0), (padding, hi[1], 0), (0, 0, 0)))
    x = x.reshape(b, nb[0], s, nb[1], s, cin).transpose(0, 1, 3, 2, 4, 5)
    x = x.reshape(b, nb[0], nb[1], s * s * cin)
    kernel = jnp.pad(kernel, ((0, kb * s - k), (0, kb * s - k), (0, 0), (0, 0)))
    kernel = kernel.reshape(kb, s, kb, s, cin, cout).transpose(0, 2, 1, 3, 4, 5)
    kernel = kernel.reshape(kb, kb, s * s * cin, cout)
    return x, kernel, out_hw


def _pad_hw(x: jax.Array, lo: int, hi: int | None = None) -> jax.Array:
    """Zero-pad (negative: crop) the two spatial dims of NHWC ``x``."""
    hi = lo if hi is None else hi
    return lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (lo, hi, 0), (lo, hi, 0), (0, 0, 0)))


def _window(xp: jax.Array, i: int, j: int, out_h: int, out_w: int) -> jax.Array:
    return lax.slice(xp, (0, i, j, 0), (xp.shape[0], i + out_h, j + out_w, xp.shape[3]))


def _xla_s1(x: jax.Array, kernel: jax.Array, padding: int) -> jax.Array:
    """Stride-1 XLA convolution; ``padding`` may be negative (crops)."""
    return lax.conv_general_dilated(x, kernel, window_strides=(1, 1), padding=((padding, padding),) * 2,
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _hybrid(x: jax.Array, kernel: jax.Array, padding: int) -> jax.Array:
    return _xla_s1(x, kernel, padding)


def _hybrid_fwd(x, kernel, padding):
    return _xla_s1(x, kernel, padding), (x, kernel)


def _hybrid_bwd(padding, res, g):
    x, kernel = res
    k = kernel.shape[0]
    # dX is a forward convolution of g with the flipped, transposed kernel: XLA's fast path.
    dx = _xla_s1(g, jnp.flip(kernel, (0, 1)).swapaxes(2, 3), k - 1 - padding)
    return dx, _patch_gemm_dw(_pad_hw(x, padding), g, kernel.shape)


def _patch_gemm_dw(xp: jax.Array, g: jax.Array, kernel_shape: tuple[int, ...]) -> jax.Array:
    """Weight gradient ``dW = patches^T @ g`` of a valid stride-1 conv of pre-padded ``xp``, as GEMMs.

    A short contraction (k*k*cin <= `FULL_IM2COL_MAX_CONTRACTION`) gets the whole im2col matrix and one GEMM.
    Longer ones get one GEMM per kernel row over that row's k*cin-wide patches: the GEMMs stay large
    while the patch matrix (k times smaller) no longer costs more memory traffic than it saves.
    Each GEMM is ``g^T @ patches`` with ``g^T`` transposed once: XLA:CPU then multiplies the patches in the
    layout they are built in instead of transposing each patch matrix.
    """
    k, _, cin, cout = kernel_shape
    out_h, out_w = g.shape[1], g.shape[2]
    g_t = g.reshape(-1, cout).T

    def gemm(taps: list[tuple[int, int]]) -> jax.Array:  # (len(taps) * cin, cout)
        patches = jnp.concatenate([_window(xp, i, j, out_h, out_w) for i, j in taps], axis=-1)
        return (g_t @ patches.reshape(-1, len(taps) * cin)).T

    if k * k * cin <= FULL_IM2COL_MAX_CONTRACTION:
        return gemm([(i, j) for i in range(k) for j in range(k)]).reshape(kernel_shape)
    return jnp.stack([gemm([(i, j) for j in range(k)]).reshape(k, cin, cout) for i in range(k)])


_hybrid.defvjp(_hybrid_fwd, _hybrid_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _winograd(x: jax.Array, kernel: jax.Array, padding: int) -> jax.Array:
    return winograd.conv_valid(_pad_hw(x, padding), kernel)


def _winograd_fwd(x, kernel, padding):
    xp = _pad_hw(x, padding)
    # The transformed input tiles are kept for the weight gradient rather than computed again there.
    tiles = winograd.input_tiles(xp, kernel.shape[0])
    return winograd.conv_valid(xp, kernel, tiles), (tiles, kernel)


def _winograd_bwd(padding, res, g):
    tiles, kernel = res
    k = kernel.shape[0]
    # dX: the correlation of g with the flipped, transposed kernel, by Winograd as well.
    dx = winograd.conv_valid(_pad_hw(g, k - 1 - padding), jnp.flip(kernel, (0, 1)).swapaxes(2, 3))
    return dx, winograd.kernel_grad(tiles, g, k)


_winograd.defvjp(_winograd_fwd, _winograd_bwd)

_CONV_S1 = {"hybrid": _hybrid, "winograd": _winograd}
