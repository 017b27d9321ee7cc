"""Test-wide setup: the CPU backend split into eight host devices, so meshes and shardings are exercised
without accelerators.

The tests run on the CPU backend unless NIN_JAX_TEST_PLATFORM names another (e.g. `gpu`); tests marked
`cpu` (host devices, CPU kernels, host memory) are then skipped.
"""

import os

from nin_jax.cpu import hostenv  # imports no jax

# Must happen before jax is imported anywhere in the test process.
os.environ.setdefault("JAX_PLATFORMS", os.environ.get("NIN_JAX_TEST_PLATFORM", "cpu"))
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# As in training (`hostenv.prepare`): a participant of a collective slowed by a loaded machine must not abort
# the test process.
os.environ["XLA_FLAGS"] = hostenv.with_collective_timeouts(os.environ["XLA_FLAGS"])
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402  (after XLA_FLAGS)
import pytest  # noqa: E402

# Tests use tiny models, where XLA compile time dominates run time.
jax.config.update("jax_disable_most_optimizations", True)


def pytest_collection_modifyitems(config, items):
    del config
    if jax.default_backend() == "cpu":
        return
    skip = pytest.mark.skip(reason=f"assumes the CPU backend (host devices); running on {jax.default_backend()}")
    for item in items:
        if "cpu" in item.keywords:
            item.add_marker(skip)
