"""Which checkpoint is restored: a config mismatch is reported and moves nothing; a damaged newest step is
passed over (training moves it aside, the tools warn); a transient read error is retried and never passes a
step over; read errors are classified by type, and by TensorStore's status codes as these library versions
raise them."""

import errno
import re
import shutil
import socket

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorstore as ts

from nin_jax import checkpointing
from nin_jax.runtime import record, recovery


_ONE_DEVICE = jax.sharding.SingleDeviceSharding(jax.devices()[0])
_ABSTRACT = {"w": jax.ShapeDtypeStruct((4,), jnp.float32, sharding=_ONE_DEVICE)}


def _save(mngr, step, value):
    checkpointing.save(mngr, step, {"w": jnp.full((4,), value)}, {"step": step})
    mngr.wait_until_finished()


def test_restore_with_a_different_structure_fails_clearly_and_moves_nothing(tmp_path):
    mngr = checkpointing.create_manager(tmp_path, keep=3)
    _save(mngr, 1, 1.0)
    _save(mngr, 2, 2.0)
    wrong = {**_ABSTRACT, "extra": jax.ShapeDtypeStruct((2,), jnp.float32, sharding=_ONE_DEVICE)}
    with pytest.raises(recovery.CheckpointError, match="If the config changed"):
        recovery.restore(mngr, wrong, move_aside=True)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name[0].isdigit()) == ["1", "2"]


def test_damaged_newest_step_is_moved_aside_and_the_previous_one_restored(tmp_path):
    mngr = checkpointing.create_manager(tmp_path, keep=3)
    _save(mngr, 1, 1.0)
    _save(mngr, 2, 2.0)
    for f in (tmp_path / "2" / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and "metadata" not in f.name:
            f.write_bytes(b"\0" * 8)
    state, meta, _ = recovery.restore(mngr, _ABSTRACT, move_aside=True)
    assert meta["step"] == 1
    np.testing.assert_array_equal(state["w"], np.ones(4))
    assert (tmp_path / "2.unreadable").is_dir() and not (tmp_path / "2").exists()




def _flaky_restore(monkeypatch, failures: dict[int, list[BaseException]]):
    """checkpointing.restore raising, for each step, the queued errors first (one per call), then reading."""
    real, calls = checkpointing.restore, []

    def restore(mngr, step, abstract_state):
        calls.append(step)
        if failures.get(step):
            raise failures[step].pop(0)
        return real(mngr, step, abstract_state)

    monkeypatch.setattr(checkpointing, "restore", restore)
    monkeypatch.setattr(recovery, "RESTORE_BACKOFF_S", 0.01)
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
    state, meta, _ = recovery.restore(mngr, _ABSTRACT, move_aside=True)
    assert calls == [2, 2, 2] and meta["step"] == 2
    np.testing.assert_array_equal(state["w"], np.full(4, 2.0))
    assert sorted(p.name for p in tmp_path.iterdir() if p.name[0].isdigit()) == ["1", "2"]


def test_persistent_transient_error_is_raised_and_moves_nothing(tmp_path, monkeypatch):
    mngr = checkpointing.create_manager(tmp_path, keep=3)
    _save(mngr, 1, 1.0)
    _save(mngr, 2, 2.0)
    error = ValueError("UNAVAILABLE: connection reset")
    calls = _flaky_restore(monkeypatch, {2: [error] * 10})
    with pytest.raises(recovery.CheckpointUnavailableError, match=r"step 2 .* could not be read in 4 attempts "
                       r"\(ValueError: UNAVAILABLE: connection reset\); it was kept"):
        recovery.restore(mngr, _ABSTRACT, move_aside=True)
    assert calls == [2] * recovery.RESTORE_ATTEMPTS  # never fell back to step 1
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
    state, meta, _ = recovery.restore(mngr, _ABSTRACT, move_aside=True)
    assert meta["step"] == 1
    assert (tmp_path / "2.unreadable").is_dir()


def test_read_errors_are_classified_by_type_and_by_tensorstore_status_code():
    classify = recovery.classify
    assert classify(checkpointing.StructureMismatchError("params/w is (3,) in the checkpoint")) == "mismatch"
    assert classify(checkpointing.CorruptCheckpointError("digest")) == "damaged"
    assert classify(FileNotFoundError("x")) == "damaged"
    for transient in (ConnectionResetError(), TimeoutError(), OSError(5, "Input/output error"),
                      ValueError("UNAVAILABLE: try again"), ValueError("DEADLINE_EXCEEDED: GCS request timed out")):
        assert classify(transient) == "transient", transient
    # Orbax re-raises a failed TensorStore read from it: the cause decides.
    for cause, kind in ((ValueError("UNAVAILABLE: try again"), "transient"),
                        (checkpointing.StructureMismatchError("x"), "mismatch"),
                        (ValueError("OUT_OF_RANGE: Requested byte range [0, 209) is not valid"), "damaged")):
        try:
            raise Exception("Encountered error while reading array index: (slice(0, 24, 1),).") from cause
        except Exception as wrapped:  # noqa: BLE001
            assert classify(wrapped) == kind
    try:  # an unrelated error being handled when the read failed is not its cause
        try:
            raise TimeoutError("optional metadata")
        except TimeoutError:
            raise checkpointing.StructureMismatchError("params/x is missing")  # noqa: B904
    except ValueError as e:
        assert classify(e) == "mismatch"


def _real_read_error(tmp_path, damage) -> BaseException:
    """The error Orbax and TensorStore (the versions in requirements.txt) raise for a step damaged so."""
    mngr = checkpointing.create_manager(tmp_path, keep=3)
    _save(mngr, 1, 1.0)
    files = [f for f in (tmp_path / "1" / "state").rglob("*") if f.is_file() and "/d/" in str(f)]
    for f in files:
        if damage is None:
            f.unlink()
        else:
            f.write_bytes(damage(f.read_bytes()))
    with pytest.raises(Exception) as error:
        checkpointing.restore(checkpointing.create_manager(tmp_path, keep=3), 1, _ABSTRACT)
    return error.value


@pytest.mark.parametrize("damage", ["truncated", "flipped", "deleted"])
def test_real_damage_reads_as_damage(tmp_path, damage):
    """Pinned for these library versions: each kind of damage to the array files fails with an error that is
    classified as damage (TensorStore raises plain ValueErrors, some with a status code, some without)."""
    how = {"truncated": lambda raw: raw[:3], "flipped": lambda raw: raw[:20] + b"\xff" * 16 + raw[36:],
           "deleted": None}[damage]
    error = _real_read_error(tmp_path, how)
    assert recovery.classify(error) == "damaged", recovery.short_error(error)


def test_real_unreachable_storage_reads_as_transient():
    """Pinned for these library versions: TensorStore's error for storage that does not answer (an HTTP
    store on a closed loopback port) is classified as transient, so it is retried and never passes a step over."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again when the block ends: nothing listens there
    spec = {"driver": "zarr", "kvstore": f"http://127.0.0.1:{port}/ckpt/",
            "context": {"http_request_retries": {"max_retries": 1}}}
    with pytest.raises(ValueError) as error:
        ts.open(spec, open=True).result(timeout=60)
    assert recovery.classify(error.value) == "transient", recovery.short_error(error.value)


def test_full_disk_is_recognised_by_errno_and_by_tensorstore_text():
    assert record.is_disk_full(OSError(errno.ENOSPC, "No space"))
    assert record.is_disk_full(ValueError('RESOURCE_EXHAUSTED: Failed to write 264327 bytes to file 15: No '
                                          "space left on device [os_error_code='28']"))
    assert not record.is_disk_full(OSError(errno.EIO, "Input/output error"))


def _damage_step(path):
    for f in (path / "state").rglob("*"):
        if f.is_file() and "/d/" in str(f):
            f.write_bytes(f.read_bytes()[:3])


def test_the_tools_pass_over_a_damaged_latest_step_with_a_warning_and_move_nothing(tmp_path):
    mngr = checkpointing.create_manager(tmp_path, keep=3)
    for step in (1, 2, 3):
        _save(mngr, step, float(step))
    _damage_step(tmp_path / "3")
    reader = checkpointing.create_manager(tmp_path, keep=3, read_only=True)
    warnings = []
    state, meta, step = recovery.restore(reader, _ABSTRACT, "latest", warn=warnings.append)
    assert step == 2 and meta["step"] == 2
    np.testing.assert_array_equal(state["w"], np.full(4, 2.0))
    assert len(warnings) == 1 and warnings[0].startswith(f"warning: checkpoint {tmp_path / '3'} is unreadable (")
    assert warnings[0].endswith("using step 2, the newest readable one.")
    with pytest.raises(recovery.CheckpointError, match=r"\(--checkpoint=3\) is unreadable .* the newest readable "
                                                       r"step is 2: pass --checkpoint=2\.$"):
        recovery.restore(reader, _ABSTRACT, "3")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name[0].isdigit()) == ["1", "2", "3"]


def test_a_step_of_nonfinite_values_is_refused_by_training_and_the_tools_and_moves_nothing(tmp_path):
    """It reads intact, and training never saves such a step: it is not damage to pass over, so training and
    the tools both refuse it, naming it and what to use instead."""
    mngr = checkpointing.create_manager(tmp_path, keep=3)
    _save(mngr, 1, 1.0)
    _save(mngr, 2, float("nan"))
    bad = re.escape(f"checkpoint {tmp_path / '2'} holds NaN or infinite model variables (w: 4 of 4 values); ")
    with pytest.raises(recovery.CheckpointError, match=f"^{bad}.*: move {re.escape(str(tmp_path / '2'))} out of "
                                                       f"{re.escape(str(tmp_path))} to resume from the step before it"):
        recovery.restore(mngr, _ABSTRACT, move_aside=True)
    reader = checkpointing.create_manager(tmp_path, keep=3, read_only=True)
    with pytest.raises(recovery.CheckpointError, match=rf"^{bad}.*pass another saved step, e.g. --checkpoint=1 "
                                                       r"\(saved: \[1\]\)\.$"):
        recovery.restore(reader, _ABSTRACT, "latest")
    assert recovery.restore(reader, _ABSTRACT, "1")[2] == 1
    assert sorted(p.name for p in tmp_path.iterdir() if p.name[0].isdigit()) == ["1", "2"]


def test_no_readable_step_moves_nothing(tmp_path):
    mngr = checkpointing.create_manager(tmp_path, keep=3)
    for step in (1, 2):
        _save(mngr, step, float(step))
        _damage_step(tmp_path / str(step))
    with pytest.raises(recovery.CheckpointError, match=r"no checkpoint in .* can be read \(step 2: .*; step 1: "):
        recovery.restore(mngr, _ABSTRACT, move_aside=True)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name[0].isdigit()) == ["1", "2"]


def test_orbax_read_errors_are_shortened_to_their_cause():
    """Orbax wraps a failed TensorStore read in an exception carrying the whole spec (kilobytes)."""
    spec = "{" + ", ".join(f"'key{i}': {{'driver': 'zarr'}}" for i in range(200)) + "}"
    cause = ValueError('OUT_OF_RANGE: Error reading "params.block1.conv.kernel/0.0" in OCDBT database at local '
                       'file "/w/checkpoints/12/state/": Requested byte range [0, 9) is not valid for value of size 4 '
                       f"[tensorstore_spec='{spec}'] [source locations='tensorstore/kvstore/x.cc:1']")
    try:
        try:
            raise cause
        except ValueError as e:
            raise Exception("Encountered error while reading array index: (slice(0, 3, 1),). See full TensorStore "
                            f"details: <bound method spec of TensorStore({spec})>.") from e
    except Exception as e:  # noqa: BLE001
        short = recovery.short_error(e)
    assert short == ('ValueError: OUT_OF_RANGE: Error reading "params.block1.conv.kernel/0.0" in OCDBT database at '
                     'local file "/w/checkpoints/12/state/": Requested byte range [0, 9) is not valid for value of '
                     "size 4")
    assert recovery.short_error(RuntimeError("x" * 1000)) == "RuntimeError: " + "x" * 297 + "..."
