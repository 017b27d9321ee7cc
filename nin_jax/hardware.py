"""Accelerator peak FLOP/s, for model FLOPs utilisation (MFU)."""

from __future__ import annotations

import jax

# Dense peak FLOP/s per JAX device (bf16 / fp32 matmul), from the vendors' data sheets. On TPU v2/v3 a JAX
# device is one core (half a chip); from v4 on it is a chip.
PEAK_FLOPS: dict[str, tuple[float, float]] = {
    "TPU v2": (22.5e12, 22.5e12 / 2),
    "TPU v3": (61.5e12, 61.5e12 / 2),
    "TPU v4": (275e12, 275e12 / 2),
    "TPU v5 lite": (197e12, 197e12 / 2),
    "TPU v5e": (197e12, 197e12 / 2),
    "TPU v5p": (459e12, 459e12 / 2),
    "TPU v6 lite": (918e12, 918e12 / 2),
    "TPU v6e": (918e12, 918e12 / 2),
    "NVIDIA A100": (312e12, 19.5e12),
    "NVIDIA H100": (989e12, 67e12),
    "NVIDIA H200": (989e12, 67e12),
}


def peak_flops_per_device(half_precision: bool) -> float | None:
    """The device's peak from `PEAK_FLOPS`, or None when unknown (CPUs: measure it with nin_jax.benchmark)."""
    kind = jax.devices()[0].device_kind
    for name, (bf16, fp32) in PEAK_FLOPS.items():
        if kind.startswith(name):
            return bf16 if half_precision else fp32
    return None


def mfu(model_flops_per_second: float, half_precision: bool) -> float | None:
    """Achieved model FLOP/s over the peak of all devices, or None when the peak is unknown."""
    peak = peak_flops_per_device(half_precision)
    return None if peak is None else model_flops_per_second / (peak * jax.device_count())
