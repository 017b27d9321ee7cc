"""Accelerator peak FLOP/s, for model FLOPs utilisation (MFU).

`PEAK_FLOPS` is keyed by `jax.Device.device_kind`, the exact string JAX reports: the TPU runtime's name
(v5e is "TPU v5 lite", v5p is "TPU v5", v6e is "TPU v6 lite") or the CUDA device name on NVIDIA GPUs.
The names some runtimes use instead (Pathways reports "TPU v5p"; JAX's own tables accept "TPU v5e" and
"TPU v6e") are listed too. Values are dense (no sparsity) vendor data-sheet peaks per JAX device: on TPU
v2/v3 a device is one TensorCore (half a chip), from v4 on a chip.

The float32 column is the rate of the arithmetic XLA runs for a float32 matmul at JAX's default precision
(`jax.lax.Precision.DEFAULT`): one bfloat16 pass on the TPU's MXU, TF32 tensor cores on A100/H100/H200.
So on TPUs both columns are equal. CPUs have no entry: measure their peak with `nin_jax.tools.benchmark`.
"""

from __future__ import annotations

import jax

_TPU = {  # bf16 per JAX device; float32 at default precision runs at the same rate
    "TPU v2": 22.5e12,  # 45 per chip, 2 devices
    "TPU v3": 61.5e12,  # 123 per chip, 2 devices
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5e": 197e12,
    "TPU v5": 459e12,  # v5p on a TPU VM
    "TPU v5p": 459e12,  # v5p under Pathways
    "TPU v6 lite": 918e12,  # v6e (Trillium)
    "TPU v6e": 918e12,
}
_GPU = {  # (bf16 tensor core, TF32 tensor core), dense
    "NVIDIA A100-SXM4-40GB": (312e12, 156e12),
    "NVIDIA A100-SXM4-80GB": (312e12, 156e12),
    "NVIDIA A100-PCIE-40GB": (312e12, 156e12),
    "NVIDIA H100 80GB HBM3": (989e12, 494.5e12),  # H100 SXM5
    "NVIDIA H100 PCIe": (756e12, 378e12),
    "NVIDIA H200": (989e12, 494.5e12),  # H200 SXM
}
PEAK_FLOPS: dict[str, tuple[float, float]] = {**{k: (v, v) for k, v in _TPU.items()}, **_GPU}


def peak_flops(device_kind: str, half_precision: bool) -> float | None:
    """Peak FLOP/s of one device of `device_kind` (bf16 if `half_precision`, else float32), None if unknown."""
    peaks = PEAK_FLOPS.get(device_kind)
    if peaks is None:
        return None
    return peaks[0] if half_precision else peaks[1]


def peak_flops_per_device(half_precision: bool) -> float | None:
    """`peak_flops` of this process's first device."""
    return peak_flops(jax.devices()[0].device_kind, half_precision)


def mfu(model_flops_per_second: float, half_precision: bool) -> float | None:
    """Achieved model FLOP/s over the peak of all devices, or None when the peak is unknown."""
    peak = peak_flops_per_device(half_precision)
    return None if peak is None else model_flops_per_second / (peak * jax.device_count())
