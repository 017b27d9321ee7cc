"""SIGTERM (a TPU preemption notice, a scheduler's stop) and Ctrl-C: stop at a step boundary, resumably."""

from __future__ import annotations

import os
import signal

import jax
from jax.experimental import multihost_utils

PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM: "terminated", and resumable by rerunning the command
INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT (Ctrl-C): also resumable by rerunning the command


class Preempted(SystemExit):
    """SIGTERM (or Ctrl-C) arrived; a checkpoint of `step` was committed and the run can be resumed.

    `step` is None when a second Ctrl-C stopped the run at once (resumable from its last checkpoint).
    """

    def __init__(self, step: int | None, message: str, code: int = PREEMPTED_EXIT_CODE):
        super().__init__(code)
        self.step, self.message = step, message


class PreemptionWatcher:
    """Notices SIGTERM (the TPU preemption notice) and Ctrl-C (SIGINT), and says at a step boundary whether to stop.

    Both stop the run at the next step boundary after committing a checkpoint; a second Ctrl-C stops at once
    (KeyboardInterrupt). On several processes Jax's preemption sync manager makes every process agree on the
    same step: it watches SIGTERM, so a Ctrl-C is passed on to it as a SIGTERM to this process (and the run
    exits as preempted, 143). A single process installs its own handlers.
    """

    def __init__(self):
        self.signal_name: str | None = None
        self._multi = jax.process_count() > 1
        signals = (signal.SIGINT,) if self._multi else (signal.SIGTERM, signal.SIGINT)
        self._previous = {s: signal.signal(s, self._handle) for s in signals}

    def _handle(self, signum, frame):
        del frame
        if signum == signal.SIGINT and self.signal_name is not None:
            raise KeyboardInterrupt  # a second Ctrl-C: stop at once
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name
        if signum == signal.SIGINT:
            # os.write, not print: a handler may run while the main thread is inside a print.
            os.write(2, b"\nCtrl-C: saving a checkpoint at the end of this step, then stopping "
                        b"(Ctrl-C again stops at once, losing the steps since the last checkpoint).\n")
            if self._multi:
                os.kill(os.getpid(), signal.SIGTERM)

    @property
    def exit_code(self) -> int:
        return INTERRUPTED_EXIT_CODE if self.signal_name == "SIGINT" and not self._multi else PREEMPTED_EXIT_CODE

    def reached(self, step: int) -> bool:
        if self._multi:
            return multihost_utils.reached_preemption_sync_point(step)
        return self.signal_name is not None

    def close(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
