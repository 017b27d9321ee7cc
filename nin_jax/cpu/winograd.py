"""Winograd F(m x m, k x k) convolution: m x m output tiles from (m+k-1) x (m+k-1) input tiles.

A stride-1 k x k correlation computes each m x m output tile with (m+k-1)^2 products per channel pair instead
of m^2 k^2 (5x5 with m=4: 64 instead of 400, 6.25x fewer): the input tile and the kernel are mapped by
constant matrices (``B^T d B`` and ``G w G^T``), multiplied elementwise and summed over input channels (one
GEMM per tile position), and mapped back (``A^T m A``). The matrices come from Toom-Cook interpolation at the
points of `_POINTS` (and infinity), computed exactly with fractions; 0, +-1, +-2, +-1/2 (m=4, k=5) gave the
smallest float32 error of the symmetric sets tried. `TILES` gives m per kernel size.

Rounding: the transforms scale terms by up to ~100 before they cancel, so float32 results are accurate to a
fraction of the tensor's scale, not of each element. Against float64 at NIN-CIFAR10's conv2 (5x5, 96 -> 192)
and conv3 (3x3, 192 -> 192), per-device batch 64, max error / max |value|: with m=4 up to 1e-5 (5x5) and 5e-6
(3x3) for the value and both gradients; with m=2 4e-6 and 6e-7; XLA's direct float32 convolution 5e-7-8e-7.

`kernel_grad` is the weight gradient by the same transforms (transposed); the input gradient is itself a
correlation (of the output gradient with the flipped kernel), so `conv_valid` computes it too.
"""

from __future__ import annotations

import functools
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_POINTS = (0, 1, -1, 2, Fraction(-1, 2), -2, Fraction(1, 2), 3, Fraction(-1, 3))
# Output tile size m of F(m x m, k x k) by kernel size k (others: DEFAULT_TILE). Per output pixel a larger tile
# needs fewer products and, what dominates on a CPU, fewer transformed elements written and read: (m+k-1)^2/m^2,
# for 5x5 4.0 with m=4 against 9.0 with m=2. The price is rounding (module docstring); measurements in
# docs/performance.md.
TILES = {3: 4, 5: 4}
DEFAULT_TILE = 2


def tile_size(k: int) -> int:
    """The output tile size m used for a k x k kernel."""
    return TILES.get(k, DEFAULT_TILE)


def _poly_from_roots(roots: list[Fraction]) -> list[Fraction]:
    """Coefficients (lowest power first) of prod (x - root)."""
    coeffs = [Fraction(1)]
    for root in roots:
        coeffs = [Fraction(0)] + coeffs
        for i in range(len(coeffs) - 1):
            coeffs[i] -= root * coeffs[i + 1]
    return coeffs


@functools.lru_cache(maxsize=None)
def matrices(k: int, m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(A^T, G, B^T)`` of F(m, k) for correlation: ``y = A^T ((G g) * (B^T d))`` for a length-(m+k-1) input d
    and a length-k kernel g, with shapes (m, n), (n, k), (n, n), n = m + k - 1."""
    n = m + k - 1
    if not 1 <= n - 1 <= len(_POINTS):
        raise ValueError(f"Winograd F({m}, {k}) needs {n - 1} interpolation points; {len(_POINTS)} are defined.")
    pts = [Fraction(p) for p in _POINTS[:n - 1]]
    a_t = [[p ** i for p in pts] + [Fraction(int(i == m - 1))] for i in range(m)]
    g = []
    for i, p in enumerate(pts):
        norm = Fraction(1)
        for j, q in enumerate(pts):
            if j != i:
                norm *= p - q
        g.append([p ** j / norm for j in range(k)])
    g.append([Fraction(int(j == k - 1)) for j in range(k)])
    b_t = [_poly_from_roots([q for j, q in enumerate(pts) if j != i]) for i in range(n - 1)]
    b_t.append(_poly_from_roots(pts))
    b_t = [row + [Fraction(0)] * (n - len(row)) for row in b_t]
    as_array = lambda rows: np.array([[float(v) for v in row] for row in rows])
    return as_array(a_t), as_array(g), as_array(b_t)


def _combine(terms: list[jax.Array], weights: np.ndarray) -> jax.Array:
    """``sum_j weights[j] * terms[j]``, skipping zero weights (the matrices are sparse)."""
    out = None
    for w, t in zip(weights, terms):
        if w == 0:
            continue
        t = t if w == 1 else (-t if w == -1 else t * jnp.asarray(w, t.dtype))
        out = t if out is None else out + t
    return out if out is not None else jnp.zeros_like(terms[0])


def tile_grid(out_h: int, out_w: int, m: int) -> tuple[int, int]:
    """Tiles ``(th, tw)`` of size m x m covering an out_h x out_w output (a partial last tile counts)."""
    return -(-out_h // m), -(-out_w // m)


def _tiles(xp: jax.Array, k: int, m: int) -> tuple[int, int, int, int]:
    """Output size and tile grid ``(out_h, out_w, th, tw)`` of a valid k x k correlation of NHWC ``xp``."""
    out_h, out_w = xp.shape[1] - k + 1, xp.shape[2] - k + 1
    return out_h, out_w, *tile_grid(out_h, out_w, m)


def input_tiles(xp: jax.Array, k: int) -> list[jax.Array]:
    """``V = B^T d B`` of every input tile d of ``xp``: n*n arrays (one per tile position), each (b*th*tw, cin).

    Kept as separate arrays, not stacked: XLA computes each in one fused pass, and a stack would copy all.
    """
    m = tile_size(k)
    n = m + k - 1
    b_t = matrices(k, m)[2]
    b, h, w, cin = xp.shape
    _, _, th, tw = _tiles(xp, k, m)
    # Pad so that every tile, including a partial last one, has its full input window.
    xp = lax.pad(xp, jnp.zeros((), xp.dtype),
                 ((0, 0, 0), (0, th * m + k - 1 - h, 0), (0, tw * m + k - 1 - w, 0), (0, 0, 0)))
    # Input tile element (r, c) of every tile: a strided slice, (b, th, tw, cin).
    cols = [[lax.slice(xp, (0, r, c, 0), (b, r + (th - 1) * m + 1, c + (tw - 1) * m + 1, cin), (1, m, m, 1))
             for c in range(n)] for r in range(n)]
    # Row transform then column transform, as sparse constant combinations XLA fuses.
    rows_t = [[_combine([cols[r][c] for r in range(n)], b_t[i]) for c in range(n)] for i in range(n)]
    return [_combine(rows_t[i], b_t[j]).reshape(-1, cin) for i in range(n) for j in range(n)]


def _g_matrix(k: int, m: int) -> np.ndarray:
    return matrices(k, m)[1].astype(np.float32)


def conv_valid(xp: jax.Array, kernel: jax.Array, tiles: list[jax.Array] | None = None) -> jax.Array:
    """Valid stride-1 correlation of NHWC ``xp`` with HWIO ``kernel`` (square k x k), by F(m x m, k x k).

    ``tiles``: ``input_tiles(xp, k)`` if already computed; ``m`` is `tile_size(k)`.
    """
    k, _, cin, cout = kernel.shape
    m = tile_size(k)
    n = m + k - 1
    a_t, g = matrices(k, m)[0], _g_matrix(k, m)
    b = xp.shape[0]
    out_h, out_w, th, tw = _tiles(xp, k, m)
    tiles = input_tiles(xp, k) if tiles is None else tiles
    u = jnp.einsum("ia,abcd,jb->ijcd", g, kernel, g,
                   precision=lax.Precision.HIGHEST).astype(kernel.dtype).reshape(n * n, cin, cout)
    # One GEMM per tile position, summing over input channels.
    prod = [(tiles[t] @ u[t]).reshape(b, th, tw, cout) for t in range(n * n)]
    # Y = A^T M A, then the m x m output phases interleave into the image.
    rows_y = [[_combine([prod[i * n + j] for i in range(n)], a_t[p]) for j in range(n)] for p in range(m)]
    y = jnp.stack([jnp.stack([_combine(rows_y[p], a_t[q]) for q in range(m)], axis=3) for p in range(m)], axis=2)
    return y.reshape(b, th * m, tw * m, cout)[:, :out_h, :out_w]


def kernel_grad(tiles: list[jax.Array], g: jax.Array, k: int) -> jax.Array:
    """Gradient of ``sum(conv_valid(xp, kernel) * g)`` with respect to the (k, k, cin, cout) kernel, given the
    input's ``tiles = input_tiles(xp, k)``.

    The transposes of `conv_valid`'s maps, written out: the output gradient's tile phases go through
    ``A`` (``dM = A g A^T`` per tile), each tile position is one GEMM ``dU = V^T dM`` contracting over all tiles
    of the batch, and ``dW = G^T dU G``. (JAX's own transpose of `conv_valid` computes the same but lays out
    the GEMMs ~10x slower on XLA:CPU.)
    """
    m = tile_size(k)
    n = m + k - 1
    a_t, gm = matrices(k, m)[0], _g_matrix(k, m)
    cin, cout = tiles[0].shape[-1], g.shape[-1]
    out_h, out_w = g.shape[1:3]
    th, tw = tile_grid(out_h, out_w, m)
    g = lax.pad(g, jnp.zeros((), g.dtype), ((0, 0, 0), (0, th * m - out_h, 0), (0, tw * m - out_w, 0), (0, 0, 0)))
    phases = [[g[:, p::m, q::m] for q in range(m)] for p in range(m)]
    rows = [[_combine([phases[p][q] for p in range(m)], a_t[:, i]) for q in range(m)] for i in range(n)]
    dm = [_combine(rows[i], a_t[:, j]).reshape(-1, cout) for i in range(n) for j in range(n)]
    du = jnp.stack([tiles[t].T @ dm[t] for t in range(n * n)]).reshape(n, n, cin, cout)
    return jnp.einsum("ia,ijcd,jb->abcd", gm, du, gm, precision=lax.Precision.HIGHEST).astype(g.dtype)
