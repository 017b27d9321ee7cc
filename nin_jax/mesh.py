"""Devices and the data-parallel mesh."""

from __future__ import annotations

import collections
from typing import Any

import jax
from jax.sharding import NamedSharding, PartitionSpec as P

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
