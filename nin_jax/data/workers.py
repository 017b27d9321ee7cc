"""Decoding of large images on a pool: threads of this process, or worker processes where the GIL binds.

Batches are submitted ahead of use, so the pool decodes the next batches while the current one is placed on
the devices. Which worker decodes an example never changes its pixels: every example's crop and flip come
from its own seed (`order.example_seeds`), so batches are the same for any number or kind of workers.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
from collections.abc import Sequence

import numpy as np

from nin_jax.data import decode

_MAX_THREADS = 64  # beyond this the GIL binds: use worker processes
Item = tuple[bytes | str, str, int | None]  # (encoded image or path, name for messages, crop seed or None)


class DecodePool:
    """Decodes batches of `Item`s with `decode.decode_crops` on ``workers`` processes, or on threads of this
    process when ``workers`` is 0."""

    def __init__(self, workers: int):
        if workers < 0:
            raise ValueError(f"workers={workers} must be >= 0")
        self.workers = workers
        if workers:
            # spawn, not fork: forking a process that runs JAX's threads can deadlock the child.
            self._executor: concurrent.futures.Executor = concurrent.futures.ProcessPoolExecutor(
                workers, mp_context=multiprocessing.get_context("spawn")
            )
            self._tasks_per_batch = 2 * workers  # two chunks per worker per batch balance the load
        else:
            # Two threads per core keep every core decoding while a thread waits for the GIL or its next chunk;
            # four per core only added switching (measurements in docs/input.md).
            threads = min(2 * (os.cpu_count() or 1), _MAX_THREADS)
            self._executor = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="nin_jax-decode")
            self._tasks_per_batch = 2 * threads  # threads share memory: small chunks cost nothing to hand over

    def submit(self, items: Sequence[Item], spec: decode.CropSpec) -> PendingBatch:
        """Starts decoding ``items`` (in order) into one uint8 [len(items), *spec.item_shape] array."""
        chunk = max(1, -(-len(items) // self._tasks_per_batch))
        starts = range(0, len(items), chunk)
        if self.workers:  # each worker returns its chunk, concatenated on arrival
            return PendingBatch([self._executor.submit(decode.decode_crops, items[i:i + chunk], spec) for i in starts])
        # Threads write their chunks straight into the batch.
        batch = np.empty((len(items), *spec.item_shape), np.uint8)
        return PendingBatch([self._executor.submit(decode.decode_crops, items[i:i + chunk], spec, batch[i:i + chunk])
                             for i in starts], batch)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


class PendingBatch:
    def __init__(self, futures: list[concurrent.futures.Future], batch: np.ndarray | None = None):
        self._futures, self._batch = futures, batch

    def result(self) -> np.ndarray:
        chunks = [f.result() for f in self._futures]  # waits for every chunk, and re-raises a decoding error
        return np.concatenate(chunks) if self._batch is None else self._batch

    def cancel(self) -> None:
        for f in self._futures:
            f.cancel()
