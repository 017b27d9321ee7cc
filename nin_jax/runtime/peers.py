"""A multi-process job that loses a process ends in every other one with one line, within a bounded time.

When one process of a job dies (kill -9, OOM, a lost VM) or stops answering (SIGSTOP, a hung host), the others
wait in their next collective or checkpoint barrier. jax's coordination service notices a missing heartbeat
only after `heartbeat_timeout_seconds` and then aborts every process with a C++ stack trace. `PeerWatch`
comes first: each process bumps a counter in the job's key-value store every `_BEAT_SECONDS`, and a process
whose peer's counter has not moved for `NIN_JAX_PEER_TIMEOUT` seconds (default 30) prints

    error: process 1 of 4 lost process 2 (no sign of life for 31 s); ... last committed checkpoint: step 20 ...

and exits with `PEER_LOST_EXIT_CODE`, skipping jax's shutdown barrier (which would wait for the lost process).
A peer that cannot be reached at all means the coordinator, process 0, is gone. jax's own heartbeat timeout
is set `_JAX_MARGIN_SECONDS` later (`jax_heartbeat_timeout`), as its backstop. A checkpoint being written when
the job ends is never committed: Orbax renames a step's directory (or, on gs://, writes its commit marker) only
after every process has finished writing it, so the rerun resumes from the step this line names.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from typing import Mapping

from etils import epath

from nin_jax.config import ConfigError
from nin_jax.runtime import record

PEER_TIMEOUT_VAR = "NIN_JAX_PEER_TIMEOUT"
DEFAULT_PEER_TIMEOUT_SECONDS = 30
PEER_LOST_EXIT_CODE = 75  # EX_TEMPFAIL: the job may be rerun as it is, and resumes
_BEAT_SECONDS = 2.0
_JAX_MARGIN_SECONDS = 30
_KEY = "nin_jax/alive/"
_STOPPING_KEY = "nin_jax/stopping/"


def seconds_from_env(env: Mapping[str, str], name: str, default: int, minimum: int) -> int:
    """The whole number of seconds in the environment variable `name` (`default` when unset or empty)."""
    value = env.get(name, "").strip()
    if not value:
        return default
    if not value.isdigit() or int(value) < minimum:
        raise ConfigError(f"{name}={value!r} must be a whole number of seconds >= {minimum}, e.g. {name}={default}.")
    return int(value)


def peer_timeout_seconds(env: Mapping[str, str] = os.environ) -> int:
    """`NIN_JAX_PEER_TIMEOUT` (seconds), by default `DEFAULT_PEER_TIMEOUT_SECONDS`."""
    return seconds_from_env(env, PEER_TIMEOUT_VAR, DEFAULT_PEER_TIMEOUT_SECONDS, minimum=5)


def jax_heartbeat_timeout(env: Mapping[str, str] = os.environ) -> int:
    """The `heartbeat_timeout_seconds` given to `jax.distributed.initialize`: after the watch's own limit."""
    return peer_timeout_seconds(env) + _JAX_MARGIN_SECONDS


class PeerWatch:
    """The heartbeat and the watch of one process of a `count`-process job (see the module docstring).

    `client` is the job's distributed client (its key-value store); `checkpoint_dir` where the run's
    checkpoints are, for the line's last committed step.
    """

    def __init__(self, client, process_index: int, count: int, checkpoint_dir: str, timeout: int):
        self._client, self._index, self._count = client, process_index, count
        self._checkpoint_dir, self._timeout = checkpoint_dir, timeout
        self._beats = 0
        self._last_round = time.monotonic()  # end of the last round that reached the store
        self.lost = threading.Event()  # set just before the line is printed and the process exits
        self._verdict = threading.Lock()  # one line, from whichever thread gives up first
        self._rounds = threading.Thread(target=self._run, name="peer-watch", daemon=True)
        self._store_watch = threading.Thread(target=self._watch_store, name="peer-watch-store", daemon=True)

    def start(self) -> "PeerWatch":
        self._rounds.start()
        self._store_watch.start()
        return self

    def _run(self) -> None:
        seen: dict[int, tuple[str, float]] = {}  # peer -> (its counter, when it changed, on this clock)
        previous = time.monotonic()
        while True:
            self._beats += 1
            try:
                self._client.key_value_set(f"{_KEY}{self._index}", str(self._beats), allow_overwrite=True)
                values = dict(self._client.key_value_dir_get(_KEY))
            except Exception:  # noqa: BLE001 — the store is process 0's coordinator; `_watch_store` names it
                time.sleep(_BEAT_SECONDS)
                continue
            now = time.monotonic()
            if now - previous > self._timeout / 2:  # this process was stopped or starved: judge no one on old news
                seen.clear()
            previous = self._last_round = now
            for peer in range(self._count):
                if peer == self._index:
                    continue
                value = values.get(f"{_KEY}{peer}", "")
                if seen.get(peer, (None,))[0] != value:
                    seen[peer] = (value, now)
                elif now - seen[peer][1] > self._timeout:
                    self._give_up(peer, now - seen[peer][1])
            time.sleep(_BEAT_SECONDS)

    def _watch_store(self) -> None:
        while True:
            time.sleep(_BEAT_SECONDS)
            silent = time.monotonic() - self._last_round
            if silent > self._timeout and self._index != 0:
                self._give_up(0, silent, "its coordinator could not be reached")

    def _give_up(self, peer: int, seconds: float, why: str = "") -> None:
        if not self._verdict.acquire(blocking=False):
            threading.Event().wait()  # the other thread is ending the process
        self.lost.set()  # `explain` in the main thread now waits for the exit below instead of raising
        steps = record.committed_steps(epath.Path(self._checkpoint_dir))
        last = f"step {steps[-1]}" if steps else "none yet"
        why = why or "no sign of life"
        print(f"error: process {self._index} of {self._count} lost process {peer} ({why} for {seconds:.0f} s, "
              f"{PEER_TIMEOUT_VAR}); the job cannot go on without it. Last committed checkpoint: {last} in "
              f"{self._checkpoint_dir}; rerun the same command (any process count) to resume from it.",
              file=sys.stderr, flush=True)
        logging.shutdown()
        self._leave_together(peer)
        # Not sys.exit: jax's shutdown barrier at exit would wait for the lost process, then abort.
        os._exit(PEER_LOST_EXIT_CODE)

    def _leave_together(self, lost: int) -> None:
        """Process 0 hosts the coordinator, whose end aborts every other process's jax client at once: it
        leaves only when the others have reached their own verdict (or after the timeout)."""
        try:
            self._client.key_value_set(f"{_STOPPING_KEY}{self._index}", "1", allow_overwrite=True)
            deadline = time.monotonic() + self._timeout
            while self._index == 0 and time.monotonic() < deadline:
                stopping = {key for key, _ in self._client.key_value_dir_get(_STOPPING_KEY)}
                if len(stopping | {f"{_STOPPING_KEY}{lost}"}) >= self._count:
                    break
                time.sleep(0.2)
        except Exception:  # noqa: BLE001 — the coordinator is gone: nothing left to wait for
            pass

    def wait_for_verdict(self) -> bool:
        """After a collective failed: whether the watch finds a lost peer (it then ends the process) within
        the time it needs to (the timeout and two rounds); False if every peer is alive."""
        return self.lost.wait(self._timeout + 3 * _BEAT_SECONDS)


_WATCH: PeerWatch | None = None


def start(workdir: str) -> PeerWatch | None:
    """Starts this process's `PeerWatch` when it is one of several; returns it (None: a single process)."""
    global _WATCH
    import jax  # pylint: disable=g-import-not-at-top
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

    if jax.process_count() == 1 or _WATCH is not None:
        return _WATCH
    checkpoint_dir = str(epath.Path(workdir) / "checkpoints")
    _WATCH = PeerWatch(ocp.multihost.get_jax_distributed_client(), jax.process_index(), jax.process_count(),
                       checkpoint_dir, peer_timeout_seconds()).start()
    return _WATCH


def explain(error: BaseException) -> None:
    """For an exception that ends a multi-process run: if it came from a lost peer (a collective that failed
    because a process died), waits for the watch to say which one and end the process; otherwise returns."""
    import jax  # pylint: disable=g-import-not-at-top

    if _WATCH is not None and isinstance(error, jax.errors.JaxRuntimeError):
        logging.info("A collective failed (%s); checking whether a peer process was lost.", str(error)[:200])
        if _WATCH.wait_for_verdict():
            threading.Event().wait()  # the watch is printing its line and ending the process
