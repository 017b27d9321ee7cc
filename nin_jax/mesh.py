"""Devices and the data-parallel mesh."""

from __future__ import annotations

import collections
import importlib.util
import logging
import os
from typing import Any, Mapping

import jax
from jax.sharding import NamedSharding, PartitionSpec as P

from nin_jax.config import ConfigError

DATA_AXIS = "data"

# How many loop iterations of dispatched work may be unfinished before the host waits (`RunAheadBound`).
# Why bound at all: XLA's CPU client lets each device have 32 executions in flight, and the 33rd blocks one of
# the threads that must also run every participant of a collective, which can deadlock the collective and
# abort the process (docs/cpu_collectives.md). Every multi-device execution counts, not only steps: an
# iteration of the loops here dispatches up to 8 (the step, then clu's metric merges, 2 additions per
# Average and 1 for the collection), so 2 iterations keep at most (2 + 1) * 8 = 24 in flight, with room for
# the input thread. Why 2 and not 1: the next step is always queued behind the running one, so the devices
# never wait for the host between steps.
RUN_AHEAD_DEPTH = 2


# What each of jax's cluster detectors (jax/_src/clusters/, jax 0.10.2) needs in the environment, by the name
# `jax.distributed.initialize(cluster_detection_method=...)` accepts. Only the yes/no is decided here; jax
# derives the coordinator, process count and id, and each process's local GPU from the same variables.
CLUSTER_ENV_VARS: dict[str, tuple[str, ...]] = {
    "ompi": ("OMPI_MCA_orte_hnp_uri",),  # set by the mpirun of Open MPI 4 (ORTE)
    "slurm": ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID"),  # srun
}
# Set by local launchers (launch/local_multiprocess.py); they win over any cluster environment.
EXPLICIT_ENV_VARS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
# The process count each cluster environment states (jax reads the same variable).
_PROCESS_COUNT_VAR = {"ompi": "OMPI_COMM_WORLD_SIZE", "slurm": "SLURM_NTASKS"}


def detected_cluster(env: Mapping[str, str] = os.environ) -> str | None:
    """The cluster environment of `CLUSTER_ENV_VARS` that `env` describes, in jax's order of preference."""
    return next((name for name, names in CLUSTER_ENV_VARS.items() if all(n in env for n in names)), None)


def _explicit_process(env: Mapping[str, str]) -> tuple[str, int, int]:
    """(coordinator address, process count, process id) from `EXPLICIT_ENV_VARS`."""
    missing = [n for n in EXPLICIT_ENV_VARS if n not in env]
    if missing:
        raise ConfigError(f"JAX_COORDINATOR_ADDRESS is set but {', '.join(missing)} is not; set all of "
                          f"{', '.join(EXPLICIT_ENV_VARS)} (or launch with launch/local_multiprocess.py).")
    try:
        count, pid = int(env["JAX_NUM_PROCESSES"]), int(env["JAX_PROCESS_ID"])
    except ValueError:
        raise ConfigError(f"JAX_NUM_PROCESSES={env['JAX_NUM_PROCESSES']!r} and JAX_PROCESS_ID="
                          f"{env['JAX_PROCESS_ID']!r} must be integers, e.g. 2 and 0.") from None
    if not 0 <= pid < count:
        raise ConfigError(f"JAX_PROCESS_ID={pid} must be in [0, JAX_NUM_PROCESSES={count}).")
    return env["JAX_COORDINATOR_ADDRESS"], count, pid


def maybe_initialize_distributed(env: Mapping[str, str] = os.environ) -> str | None:
    """Joins a multi-process job when one is configured; returns how it was found (None: a single process).

    * "explicit": JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID (local multi-process runs).
      Cluster detection is switched off, so inside a SLURM allocation every process keeps all its devices.
    * "slurm", "ompi": `srun` or Open MPI's `mpirun` started more than one process. jax's own detection
      then finds the coordinator (SLURM: the first node of the step, port SLURM_JOB_ID % 4096 + 61440;
      JAX_COORDINATOR_PORT overrides it) and gives each process one GPU, number SLURM_LOCALID (Open MPI:
      the local rank); JAX_LOCAL_DEVICE_IDS=0,1,... overrides that, e.g. for one process per node. One task
      alone keeps every device it sees and needs no coordinator.
    * "tpu": jax[tpu] is installed; jax finds the slice's workers in the TPU VM metadata (one worker is a
      one-process job). Without slice metadata, training continues as a single process, with a warning.
    """
    if "JAX_COORDINATOR_ADDRESS" in env:
        address, count, pid = _explicit_process(env)
        jax.distributed.initialize(address, count, pid, cluster_detection_method="deactivate")
        return "explicit"
    cluster = detected_cluster(env)
    if cluster is not None:
        count = env.get(_PROCESS_COUNT_VAR[cluster], "1")
        if count == "1":
            return None
        jax.distributed.initialize(cluster_detection_method=cluster)
        return cluster
    if importlib.util.find_spec("libtpu") is not None:
        try:
            jax.distributed.initialize()
        except (RuntimeError, ValueError) as e:
            logging.warning("jax.distributed.initialize() failed (%s); running as a single process.", e)
            return None
        return "tpu"
    return None


class RunAheadBound:
    """Bounds dispatched-but-unfinished work: `add(outputs)` waits (`jax.block_until_ready`) for the outputs
    added `depth` calls earlier, so the host is never more than `depth` calls ahead of the devices.

    Add each loop iteration's outputs right after dispatching them; `depth=0` waits for every call's own outputs.
    Outputs are kept until waited for: add small ones (metrics), and none that a later call donates.
    """

    def __init__(self, depth: int = RUN_AHEAD_DEPTH):
        if depth < 0:
            raise ValueError(f"depth={depth} must be >= 0")
        self.depth = depth
        self._pending: collections.deque[Any] = collections.deque()

    def add(self, outputs: Any) -> None:
        self._pending.append(outputs)
        while len(self._pending) > self.depth:
            jax.block_until_ready(self._pending.popleft())


def create_mesh(devices: list | None = None) -> jax.sharding.Mesh:
    """A 1-D mesh with the batch axis `data`, over `devices` (default: every device of every process)."""
    n = len(devices) if devices is not None else jax.device_count()
    return jax.make_mesh((n,), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,), devices=devices)


def data_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
