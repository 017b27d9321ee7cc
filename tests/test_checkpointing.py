"""Checkpoint restore: a config mismatch is reported and moves nothing; a damaged newest step is skipped; a
transient read error is retried and never demotes a step; metrics are attached after a save; the leftovers of a
failed Orbax read are not printed."""

import asyncio
import collections
import errno
import gc
import logging
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorstore as ts

from nin_jax import checkpointing


def _save(mngr, step, value):
    checkpointing.save(mngr, step, {"w": jnp.full((4,), value)}, {"step": step})
    mngr.wait_until_finished()


def test_restore_with_a_different_structure_fails_clearly_and_moves_nothing(tmp_path):
    mngr = checkpointing.create_manager(tmp_path, keep=3)
    _save(mngr, 1, 1.0)
    _save(mngr, 2, 2.0)
    wrong = {"w": jax.ShapeDtypeStruct((4,), jnp.float32), "extra": jax.ShapeDtypeStruct((2,), jnp.float32)}
    with pytest.raises(checkpointing.CheckpointError, match="If the config changed"):
        checkpointing.restore_latest(mngr, wrong)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name[0].isdigit()) == ["1", "2"]


def test_damaged_newest_step_is_moved_aside_and_the_previous_one_restored(tmp_path):
    mngr = checkpointing.create_manager(tmp_path, keep=3)
    _save(mngr, 1, 1.0)
    _save(mngr, 2, 2.0)
    for f in (tmp_path / "2" / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and "metadata" not in f.name:
            f.write_bytes(b"\0" * 8)
    state, meta = checkpointing.restore_latest(mngr, {"w": jax.ShapeDtypeStruct((4,), jnp.float32)})
    assert meta["step"] == 1
    np.testing.assert_array_equal(state["w"], np.ones(4))
    assert (tmp_path / "2.unreadable").is_dir() and not (tmp_path / "2").exists()


_ABSTRACT = {"w": jax.ShapeDtypeStruct((4,), jnp.float32)}


def _flaky_restore(monkeypatch, failures: dict[int, list[BaseException]]):
    """checkpointing.restore raising, for each step, the queued errors first (one per call), then reading."""
    real, calls = checkpointing.restore, []

    def restore(mngr, step, abstract_state):
        calls.append(step)
        if failures.get(step):
            raise failures[step].pop(0)
        return real(mngr, step, abstract_state)

    monkeypatch.setattr(checkpointing, "restore", restore)
    monkeypatch.setattr(checkpointing, "RESTORE_BACKOFF_S", 0.01)
    return calls


@pytest.mark.parametrize("error", [
    ValueError('UNAVAILABLE: Error reading "w/.zarray" in OCDBT database at "gs://bucket/run/checkpoints/2/state/"'),
    ValueError("DEADLINE_EXCEEDED: GCS request timed out"),
    OSError(5, "Input/output error"),
    TimeoutError("read timed out"),
])
def test_transient_read_error_is_retried_and_the_newest_step_kept_and_used(tmp_path, monkeypatch, error):
    mngr = checkpointing.create_manager(tmp_path, keep=3)
    _save(mngr, 1, 1.0)
    _save(mngr, 2, 2.0)
    calls = _flaky_restore(monkeypatch, {2: [error, error]})
    state, meta = checkpointing.restore_latest(mngr, _ABSTRACT)
    assert calls == [2, 2, 2] and meta["step"] == 2
    np.testing.assert_array_equal(state["w"], np.full(4, 2.0))
    assert sorted(p.name for p in tmp_path.iterdir() if p.name[0].isdigit()) == ["1", "2"]


def test_persistent_transient_error_is_raised_and_moves_nothing(tmp_path, monkeypatch):
    mngr = checkpointing.create_manager(tmp_path, keep=3)
    _save(mngr, 1, 1.0)
    _save(mngr, 2, 2.0)
    error = ValueError("UNAVAILABLE: connection reset")
    calls = _flaky_restore(monkeypatch, {2: [error] * 10})
    with pytest.raises(checkpointing.CheckpointUnavailableError, match=r"step 2 .* could not be read in 4 attempts "
                       r"\(ValueError: UNAVAILABLE: connection reset\); it was kept"):
        checkpointing.restore_latest(mngr, _ABSTRACT)
    assert calls == [2] * checkpointing.RESTORE_ATTEMPTS  # never fell back to step 1
    assert sorted(p.name for p in tmp_path.iterdir() if p.name[0].isdigit()) == ["1", "2"]


@pytest.mark.parametrize("damage", ["truncate_arrays", "delete_item", "bad_json", "delete_metadata"])
def test_proven_damage_moves_the_step_aside(tmp_path, damage):
    mngr = checkpointing.create_manager(tmp_path, keep=3)
    _save(mngr, 1, 1.0)
    _save(mngr, 2, 2.0)
    step = tmp_path / "2"
    if damage == "truncate_arrays":
        for f in (step / "state").rglob("*"):
            if f.is_file() and "/d/" in str(f):
                f.write_bytes(f.read_bytes()[:3])
    elif damage == "delete_item":
        shutil.rmtree(step / "meta")
    elif damage == "bad_json":
        (step / "meta" / "metadata").write_text("{not json")
    else:
        (step / "state" / "_METADATA").unlink()
    state, meta = checkpointing.restore_latest(mngr, _ABSTRACT)
    assert meta["step"] == 1
    assert (tmp_path / "2.unreadable").is_dir()


def test_read_errors_are_classified():
    classify = checkpointing.classify_read_error
    assert classify(checkpointing.CorruptCheckpointError("digest")) == "damaged"
    assert classify(FileNotFoundError("x")) == "damaged"
    assert classify(ValueError("NOT_FOUND: Error opening")) == "damaged"
    assert classify(ValueError("OUT_OF_RANGE: Requested byte range [0, 209) is not valid")) == "damaged"
    assert classify(ValueError("DATA_LOSS: checksum")) == "damaged"
    assert classify(ValueError("UNAVAILABLE: try again")) == "transient"
    assert classify(ConnectionResetError()) == "transient"
    assert classify(ValueError("Structure mismatch: Target path ('x',) not found")) == "other"
    # Orbax re-raises a failed TensorStore read from it: the cause decides.
    undecodable = ValueError('FAILED_PRECONDITION: Error reading "params.w/0.0" in OCDBT database at local file '
                             '"/w/checkpoints/16/state/": ZSTD_decompressStream() failed: Unknown frame descriptor')
    for cause, kind in ((undecodable, "damaged"), (ValueError("UNAVAILABLE: try again"), "transient"),
                        (ValueError("FAILED_PRECONDITION: generation mismatch"), "other")):
        try:
            raise Exception("Encountered error while reading array index: (slice(0, 24, 1),).") from cause
        except Exception as wrapped:  # noqa: BLE001
            assert classify(wrapped) == kind
    try:  # an unrelated error being handled when the read failed is not its cause
        try:
            raise FileNotFoundError("optional metadata")
        except FileNotFoundError:
            raise ValueError("Structure mismatch: Target path ('x',) not found")  # noqa: B904
    except ValueError as e:
        assert classify(e) == "other"
    assert checkpointing.is_disk_full(OSError(errno.ENOSPC, "No space"))
    assert checkpointing.is_disk_full(ValueError('RESOURCE_EXHAUSTED: Failed to write 264327 bytes to file 15: No '
                                                 "space left on device [os_error_code='28']"))
    assert not checkpointing.is_disk_full(OSError(errno.EIO, "Input/output error"))


def test_metrics_attached_after_a_save_are_read_back_and_rank_the_best_step(tmp_path):
    """A step saved without metrics, evaluated, then `attach_metrics`: what `--checkpoint=best` and the best-step
    preservation see, in this manager and in a new one."""
    mngr = checkpointing.create_manager(tmp_path, keep=1)
    for step, top1 in ((1, 0.9), (2, 0.5), (3, 0.7)):
        _save(mngr, step, float(step))
        assert mngr.metrics(step) is None
        checkpointing.attach_metrics(mngr, step, {checkpointing.BEST_METRIC: top1})
        assert mngr.metrics(step) == {checkpointing.BEST_METRIC: top1}
    _save(mngr, 4, 4.0)  # keeps the latest (4) and the best (1); 2 and 3 go
    assert sorted(mngr.all_steps()) == [1, 4]
    again = checkpointing.create_manager(tmp_path, keep=1, read_only=True)
    assert again.metrics(1) == {checkpointing.BEST_METRIC: 0.9} and again.metrics(4) is None


@pytest.mark.parametrize("install", ["directly", "by restore_latest"])
def test_leftovers_of_a_failed_orbax_read_are_not_printed(monkeypatch, tmp_path, install):
    """Restoring (for training or for the tools) installs the filter; it drops only Orbax's leftovers."""
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: seen.append(u.exc_value))
    if install == "directly":
        checkpointing.silence_failed_read_leftovers()
    else:
        assert checkpointing.restore_latest(checkpointing.create_manager(tmp_path, keep=1), {}) is None

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
    checkpointing.silence_failed_read_leftovers()

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
    checkpointing.silence_failed_read_leftovers()
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
