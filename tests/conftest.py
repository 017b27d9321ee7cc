"""Test-wide setup: eight host CPU devices, so meshes and shardings are exercised without accelerators."""

import os

# Must happen before jax is imported anywhere in the test process.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402  (after XLA_FLAGS)

# Tests use tiny models, where XLA compile time dominates run time.
jax.config.update("jax_disable_most_optimizations", True)
