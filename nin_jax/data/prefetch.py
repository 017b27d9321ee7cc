"""Host batches -> global sharded `jax.Array`s, assembled in a background thread ahead of the consumer."""

from __future__ import annotations

import atexit
import queue
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np

_DEPTH = 2  # batches assembled and placed on the devices ahead of the consumer

# Live prefetch threads. They are daemons (an abandoned iterator must not block exit), so they are stopped and
# joined before the interpreter tears down: a thread killed inside XLA during finalisation aborts the process.
_PRODUCERS: set[tuple[threading.Event, threading.Thread]] = set()


@atexit.register
def _stop_producers() -> None:
    producers = list(_PRODUCERS)
    for stop, _ in producers:
        stop.set()
    for _, thread in producers:
        thread.join(timeout=30)


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


_END = object()


def prefetch(
    host_batches: Iterator[dict[str, np.ndarray]],
    sharding: jax.sharding.NamedSharding,
    global_batch: int,
    on_device: Callable[[dict[str, jax.Array]], dict[str, jax.Array]] | None = None,
) -> Iterator[dict[str, jax.Array]]:
    """Runs ``host_batches`` (this process's rows) in a thread that also places each batch on the devices and
    applies ``on_device`` to it there.

    Errors raised while producing are re-raised by the returned iterator; closing or dropping it stops the thread.
    """
    ready: queue.Queue = queue.Queue(maxsize=_DEPTH)
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for batch in host_batches:
                arrays = {
                    k: jax.make_array_from_process_local_data(sharding, v, (global_batch, *v.shape[1:]))
                    for k, v in batch.items()
                }
                if on_device is not None:
                    arrays = on_device(arrays)
                if not put(arrays):
                    return
            put(_END)
        except BaseException as e:  # pylint: disable=broad-except  # re-raised in the consumer
            put(_Failure(e))
        finally:
            if hasattr(host_batches, "close"):
                host_batches.close()  # a generator's cleanup (e.g. cancelling submitted work) runs now
            _PRODUCERS.discard((stop, threading.current_thread()))

    def consume() -> Iterator[dict[str, jax.Array]]:
        try:
            while True:
                item = ready.get()
                if item is _END:
                    return
                if isinstance(item, _Failure):
                    raise item.error
                yield item
        finally:
            stop.set()
            thread.join()  # the producer finishes its current batch, then sees `stop`

    thread = threading.Thread(target=produce, daemon=True, name="nin_jax-input")
    _PRODUCERS.add((stop, thread))
    thread.start()
    batches = consume()
    weakref.finalize(batches, stop.set)  # also stops the thread if the iterator is dropped unused
    return batches
