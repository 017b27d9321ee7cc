"""The 1x1 layers' matrix product as one 2-D GEMM, the form whose gradients are cheap on XLA:CPU."""

from __future__ import annotations

import jax
from jax import lax


def dot_general(inputs: jax.Array, kernel: jax.Array, dimension_numbers, precision=None,
                preferred_element_type=None) -> jax.Array:
    """`lax.dot_general` for `flax.linen.Dense` (contract the input's last axis with the kernel's first) over
    the input flattened to [pixels, channels].

    The same product on the 4-D [N, H, W, C] input makes its kernel gradient contract three axes; XLA:CPU then
    writes the output gradient out a second time, transposed, for the GEMM. Over 2-D operands the kernel
    gradient is one GEMM on the untransposed gradient.
    """
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
    if lhs_batch or rhs_batch or tuple(lhs_contract) != (inputs.ndim - 1,) or tuple(rhs_contract) != (0,):
        raise ValueError(f"dot_general supports Dense's contraction only, got {dimension_numbers}")
    flat = inputs.reshape(-1, inputs.shape[-1])
    out = lax.dot_general(flat, kernel, (((1,), (0,)), ((), ())), precision=precision,
                          preferred_element_type=preferred_element_type)
    return out.reshape(*inputs.shape[:-1], kernel.shape[-1])
