"""Checkpoint restore: a config mismatch is reported and moves nothing; a damaged newest step is skipped."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

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
