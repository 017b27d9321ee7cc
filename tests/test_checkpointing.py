"""Checkpoints of the training state: a save restores bit for bit onto another layout, with its digest
checked; a step's files and array shapes are checked before reading; metrics attached after a save rank the
best step, in the file format Orbax reads."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nin_jax import checkpointing


def _save(mngr, step, value):
    checkpointing.save(mngr, step, {"w": jnp.full((4,), value)}, {"step": step})
    mngr.wait_until_finished()


_ONE_DEVICE = jax.sharding.SingleDeviceSharding(jax.devices()[0])
_ABSTRACT = {"w": jax.ShapeDtypeStruct((4,), jnp.float32, sharding=_ONE_DEVICE)}


def test_a_saved_state_restores_onto_another_sharding_with_its_digest_checked(tmp_path):
    mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    state = jax.device_put({"w": jnp.arange(16.0)}, jax.sharding.NamedSharding(mesh, jax.P()))
    mngr = checkpointing.create_manager(tmp_path, keep=2)
    checkpointing.save(mngr, 3, state, {"step": 3})
    mngr.wait_until_finished()
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    restored, meta = checkpointing.restore(mngr, 3, {"w": jax.ShapeDtypeStruct((16,), jnp.float32, sharding=one)})
    np.testing.assert_array_equal(restored["w"], np.arange(16.0))
    assert restored["w"].sharding == one
    assert meta["step"] == 3 and meta[checkpointing.DIGEST_KEY] == checkpointing.state_digest(state)


def test_a_relative_directory_saves_and_restores(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    mngr = checkpointing.create_manager("run/checkpoints", keep=2)
    _save(mngr, 4, 2.5)
    restored, meta = checkpointing.restore(mngr, 4, _ABSTRACT)
    np.testing.assert_array_equal(restored["w"], np.full((4,), 2.5))
    assert meta["step"] == 4 and (tmp_path / "run" / "checkpoints" / "4").is_dir()


def test_arrays_that_read_but_differ_from_their_digest_are_damage(tmp_path):
    mngr = checkpointing.create_manager(tmp_path, keep=2)
    _save(mngr, 1, 1.0)
    meta_file = tmp_path / "1" / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    meta[checkpointing.DIGEST_KEY] = checkpointing.state_digest({"w": jnp.full((4,), 2.0)})
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(checkpointing.CorruptCheckpointError, match="does not match its saved digest"):
        checkpointing.restore(mngr, 1, _ABSTRACT)


def test_missing_files_and_other_arrays_are_found_before_reading(tmp_path):
    mngr = checkpointing.create_manager(tmp_path, keep=2)
    _save(mngr, 1, 1.0)
    other = {"w": jax.ShapeDtypeStruct((5,), jnp.float32), "b": jax.ShapeDtypeStruct((2,), jnp.float32)}
    with pytest.raises(checkpointing.StructureMismatchError, match=r"^b is missing; w is \(4,\) in the "
                                                                   r"checkpoint, \(5,\) in the model$"):
        checkpointing.check_step(mngr, 1, other)
    with pytest.raises(checkpointing.StructureMismatchError, match=r"^w is not in the model$"):
        checkpointing.check_step(mngr, 1, {})
    (tmp_path / "1" / "state" / "manifest.ocdbt").unlink()
    with pytest.raises(checkpointing.CorruptCheckpointError, match="manifest.ocdbt is missing"):
        checkpointing.check_step(mngr, 1, _ABSTRACT)


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
    # The file Orbax reads them from, for the orbax-checkpoint version in requirements.txt:
    assert json.loads((tmp_path / "1" / "metrics" / "metrics").read_text()) == {checkpointing.BEST_METRIC: 0.9}


