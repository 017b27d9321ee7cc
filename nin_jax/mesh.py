"""Devices and the data-parallel mesh."""

from __future__ import annotations

import importlib.util
import logging
import os

import jax
from jax.sharding import NamedSharding, PartitionSpec as P

from nin_jax.config import ConfigError

DATA_AXIS = "data"


def maybe_initialize_distributed() -> None:
    """Joins a multi-process run when one is configured.

    TPU pods and SLURM/Cloud jobs are detected by `jax.distributed.initialize()` with no arguments; a local
    multi-process run (see `launch/local_multiprocess.py`) passes JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES
    and JAX_PROCESS_ID.
    """
    env = os.environ
    if "JAX_COORDINATOR_ADDRESS" in env:
        jax.distributed.initialize(
            coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(env["JAX_NUM_PROCESSES"]),
            process_id=int(env["JAX_PROCESS_ID"]),
        )
    elif importlib.util.find_spec("libtpu") is not None:
        # On a TPU VM (jax[tpu] installed) jax discovers the slice's workers from the VM metadata; on a
        # single-worker VM this is a one-process job. Failure here means no slice metadata: run alone.
        try:
            jax.distributed.initialize()
        except (RuntimeError, ValueError) as e:
            logging.warning("jax.distributed.initialize() failed (%s); running as a single process.", e)


def create_mesh(devices: list | None = None) -> jax.sharding.Mesh:
    """A 1-D mesh with the batch axis `data`, over `devices` (default: every device of every process)."""
    n = len(devices) if devices is not None else jax.device_count()
    return jax.make_mesh((n,), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,), devices=devices)


def data_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def check_batch_divisible(batch_size: int, field: str = "config.batch_size") -> None:
    """A global batch must split evenly over processes and devices."""
    procs, devices = jax.process_count(), jax.device_count()
    if batch_size % devices or batch_size % procs:
        raise ConfigError(
            f"{field}={batch_size} is not divisible by the number of devices ({devices}) and processes ({procs}); "
            f"use a multiple of {devices}, e.g. {max(devices, (batch_size // devices) * devices)}."
        )
