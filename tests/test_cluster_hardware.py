"""The peak table is keyed by the device_kind strings JAX reports on each TPU and GPU generation."""

import jax
import pytest

from nin_jax import hardware

# device_kind -> (bf16, float32 at default precision) FLOP/s per JAX device.
EXPECTED = {
    "TPU v4": (275e12, 275e12),
    "TPU v5 lite": (197e12, 197e12),  # v5e
    "TPU v5": (459e12, 459e12),  # v5p on a TPU VM
    "TPU v5p": (459e12, 459e12),  # v5p under Pathways
    "TPU v6 lite": (918e12, 918e12),  # v6e
    "NVIDIA A100-SXM4-40GB": (312e12, 156e12),
    "NVIDIA A100-SXM4-80GB": (312e12, 156e12),
    "NVIDIA H100 80GB HBM3": (989e12, 494.5e12),
    "NVIDIA H100 PCIe": (756e12, 378e12),
    "NVIDIA H200": (989e12, 494.5e12),
}


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_peak_flops_of_each_generation(kind):
    assert (hardware.peak_flops(kind, True), hardware.peak_flops(kind, False)) == EXPECTED[kind]


@pytest.mark.parametrize("kind", ["cpu", "TPU v5e lite", "H100", "NVIDIA H100", "tpu v4", ""])
def test_unknown_kinds_have_no_peak(kind):
    assert hardware.peak_flops(kind, True) is None and hardware.peak_flops(kind, False) is None


def test_every_tpu_key_is_a_kind_jax_knows():
    """Cross-check against JAX's own device_kind table (a private module, read only by this test)."""
    from jax._src.pallas.mosaic import tpu_info

    for kind in hardware.PEAK_FLOPS:
        if kind.startswith("TPU"):
            assert tpu_info.chip_version_from_device_kind(kind) is not None, kind


def test_mfu_on_this_cpu_is_unknown():
    assert jax.devices()[0].platform == "cpu"
    assert hardware.peak_flops_per_device(False) is None and hardware.mfu(1e12, False) is None
