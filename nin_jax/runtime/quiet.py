"""Log hygiene: the libraries' chatter and the leftovers of failed Orbax reads and saves stay out of the output.

A damaged checkpoint or a full disk is reported by nin_jax in one line; without these filters the same event
also prints dozens of tracebacks from Orbax's threads, TensorStore and asyncio. Each filter drops exactly one
kind of record, recognised as tests/test_runtime.py pins it for the library versions in requirements.txt,
and passes everything else on.
"""

from __future__ import annotations

import logging
import os
import sys

_TENSORSTORE_ERROR_MARK = "[tensorstore_spec="  # TensorStore appends the spec of a failed operation
_UNRETRIEVED = ("Task exception was never retrieved", "Future exception was never retrieved")
_DISK_FULL_TEXT = ("No space left on device", "Disk quota exceeded")
_NOISY_PATHS = ("/orbax/", "/jax/_src/", "/tensorflow_datasets/")
# What Orbax's save threads log when files of the save in flight were removed under it (the run then ends with
# one line naming what changed, `workdir.Session.lost_checkpoints`, or with the traceback of the re-raised error).
_VANISHED_TEXT = ("No such file or directory", "Metadata file does not exist")


def _in_orbax(filename: str) -> bool:
    return "/orbax/" in filename.replace(os.sep, "/")


class _QuietLibraries(logging.Filter):
    """INFO records of Orbax, JAX and TFDS; warnings about a full disk (the run ends with one line about it);
    Orbax's warning for a save without metrics (they are attached after the evaluation); Orbax's reports of
    checkpoint files that vanished during a save."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return not any(p in record.pathname.replace(os.sep, "/") for p in _NOISY_PATHS)
        try:
            text = record.getMessage() + str(record.exc_info[1] if record.exc_info else "")
        except Exception:  # noqa: BLE001 — a record with bad arguments is shown as it is
            return True
        if _in_orbax(record.pathname) and any(t in text for t in _VANISHED_TEXT):
            return False
        return not any(t in text for t in (*_DISK_FULL_TEXT, "did not provide metrics"))


class _DropOrbaxReadLeftovers(logging.Filter):
    """asyncio's "Task/Future exception was never retrieved" for reads Orbax abandoned when another read of the
    same checkpoint failed (logged when garbage-collected, so some runs print it and some do not): an Orbax
    coroutine, a TensorStore future Orbax handed to asyncio, or a Future carrying TensorStore's error."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not (record.exc_info and record.getMessage().startswith(_UNRETRIEVED)):
            return True
        if _TENSORSTORE_ERROR_MARK in str(record.exc_info[1]):
            return False
        tb = record.exc_info[2]
        while tb is not None:
            frame = tb.tb_frame
            if _in_orbax(frame.f_code.co_filename):
                return False
            if type(frame.f_locals.get("awaitable")).__module__.split(".")[0] == "tensorstore":
                return False
            tb = tb.tb_next
        return True


def _unraisable_hook(previous):
    """Drops TensorStore's reports to an event loop Orbax closed after a failed read or save ("Event loop is
    closed", raised from native code with no Python caller) and Orbax's read coroutines finalised with
    their exception; nothing is lost by them."""

    def hook(unraisable):
        error, code = unraisable.exc_value, getattr(unraisable.object, "cr_code", None)
        if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
            return
        if code is not None and _in_orbax(code.co_filename):
            return
        previous(unraisable)

    hook.nin_jax_quiet = True
    return hook


def install() -> None:
    """Installs the filters (idempotent): on absl's and asyncio's loggers and `sys.unraisablehook`."""
    if getattr(sys.unraisablehook, "nin_jax_quiet", False):
        return
    sys.unraisablehook = _unraisable_hook(sys.unraisablehook)
    logging.getLogger("asyncio").addFilter(_DropOrbaxReadLeftovers())
    quiet = _QuietLibraries()
    logging.getLogger("absl").addFilter(quiet)
    try:  # absl's handler formats records of every logger that propagates to the root
        from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top

        absl_logging.get_absl_handler().python_handler.addFilter(quiet)
    except ImportError:
        pass
