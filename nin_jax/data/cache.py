"""Per-process memo of expensive data values: decoded splits, folder listings, fitted normalisers, normalised arrays.

Every key is a value that identifies its content (dataset, location, split, image size, normaliser fingerprint),
so two Pipelines built from equal configs share entries and unequal ones never collide. The eval pass, a
second Pipeline (e.g. evaluation after training) and the benchmarks reuse what the first one decoded.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

T = TypeVar("T")


class Cache:
    """A thread-safe dict of values built on first use."""

    def __init__(self) -> None:
        self._values: dict[Hashable, Any] = {}
        self._lock = threading.Lock()

    def get(self, key: Hashable, build: Callable[[], T]) -> T:
        """The value under ``key``, built by ``build()`` if absent (two racing builders keep the first value)."""
        with self._lock:
            if key in self._values:
                return self._values[key]
        value = build()  # outside the lock: decoding takes a while and may itself use the cache
        with self._lock:
            return self._values.setdefault(key, value)

    def clear(self) -> None:
        with self._lock:
            self._values.clear()


# The default cache of every Pipeline in this process.
PROCESS_CACHE = Cache()
