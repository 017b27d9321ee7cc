"""Log hygiene: the leftovers of failed Orbax reads are dropped, as these library versions produce them, and
everything else is passed on."""

import asyncio
import collections
import gc
import logging
import sys

import tensorstore as ts

from nin_jax.runtime import quiet


def test_leftovers_of_a_failed_orbax_read_are_not_printed(monkeypatch):
    """The unraisable hook drops only Orbax's leftovers: TensorStore's reports to a closed event loop and
    Orbax's read coroutines finalised with their error."""
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: seen.append(u.exc_value))
    quiet.install()

    async def orbax_read():  # stands for Orbax's abandoned read coroutines
        pass

    orbax_read.__code__ = orbax_read.__code__.replace(co_filename="/site-packages/orbax/checkpoint/x.py")
    coroutine = orbax_read()
    Unraisable = collections.namedtuple("Unraisable", "exc_type exc_value exc_traceback err_msg object")
    other = KeyError("kept")
    for error, obj in ((RuntimeError("Event loop is closed"), None), (Exception("read failed"), coroutine),
                       (other, None)):
        sys.unraisablehook(Unraisable(type(error), error, None, None, obj))
    coroutine.close()
    assert seen == [other]


def test_unretrieved_errors_of_abandoned_tensorstore_reads_are_not_logged(caplog):
    """A TensorStore read that Orbax gave to asyncio and then abandoned fails later, with no Orbax frame in its
    traceback; asyncio's "never retrieved" report of it is dropped, the same report for other work is kept."""
    quiet.install()

    async def abandon(awaitable):
        task = asyncio.ensure_future(awaitable)
        await asyncio.sleep(0.1)
        assert task.done()
        del task
        gc.collect()  # asyncio logs an unretrieved task exception when the task is collected

    async def other_work():
        raise KeyError("kept")

    read = ts.open({"driver": "zarr", "kvstore": "memory://absent/"}, open=True)
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        asyncio.run(abandon(read))
        asyncio.run(abandon(other_work()))
    reported = [r.exc_info[1] for r in caplog.records if r.getMessage().startswith("Task exception was never")]
    assert len(reported) == 1 and isinstance(reported[0], KeyError)


def test_unretrieved_tensorstore_errors_of_abandoned_futures_are_not_logged(caplog):
    """Orbax can also abandon the asyncio Future that carries a TensorStore read's outcome: asyncio's "Future
    exception was never retrieved" report of the read's error is dropped, the same report of another error kept."""
    quiet.install()
    read_error = ts.open({"driver": "zarr", "kvstore": "memory://absent/"}, open=True).exception()

    async def abandon(error):
        future = asyncio.get_running_loop().create_future()
        future.set_exception(error)
        del future
        gc.collect()  # asyncio logs an unretrieved future exception when the future is collected

    with caplog.at_level(logging.ERROR, logger="asyncio"):
        asyncio.run(abandon(read_error))
        asyncio.run(abandon(KeyError("kept")))
    reported = [r.exc_info[1] for r in caplog.records if "exception was never retrieved" in r.getMessage()]
    assert len(reported) == 1 and isinstance(reported[0], KeyError)


def test_orbax_reports_of_checkpoint_files_that_vanished_during_a_save_are_not_logged(caplog):
    """Checkpoints removed under a running training end the run with one line (`workdir.Session`); Orbax's save
    threads' own reports of the vanished files (a warning and errors with tracebacks) are dropped, and its other
    errors, and other libraries' reports of a missing file, are kept."""
    quiet.install()
    logger, orbax = logging.getLogger("absl"), "/site-packages/orbax/checkpoint/_src/checkpointers/checkpointer.py"
    vanished = FileNotFoundError(2, "No such file or directory", "/w/checkpoints/8.orbax-checkpoint-tmp/x")
    records = [
        (orbax, logging.WARNING, "Metadata file does not exist: /w/checkpoints/8.orbax-checkpoint-tmp/_METADATA", None),
        (orbax, logging.ERROR, "Failed to run 4 Handler Commit operations in background save thread", vanished),
        (orbax, logging.ERROR, "Failed to run 4 Handler Commit operations in background save thread", KeyError("kept")),
        ("/site-packages/other/lib.py", logging.ERROR, "could not open", vanished),
    ]
    with caplog.at_level(logging.WARNING, logger="absl"):
        for path, level, message, error in records:
            exc_info = (type(error), error, None) if error is not None else None
            logger.handle(logger.makeRecord("absl", level, path, 1, message, (), exc_info))
    kept = [(r.pathname, r.exc_info[1] if r.exc_info else None) for r in caplog.records]
    assert [type(e).__name__ for _, e in kept] == ["KeyError", "FileNotFoundError"]
    assert kept[1][0] == "/site-packages/other/lib.py"
