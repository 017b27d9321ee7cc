"""A workdir changed or unreachable under a training: one line naming what, and never a silent restart.

Checkpoints removed while the run writes them stop it in one line; a rerun of a run whose record
(metrics.jsonl, results) shows committed checkpoints that are gone is refused instead of silently starting
again from step 0, while a run that stopped before its first checkpoint starts again as before. An
unreadable config.json or lock, and an unreachable gs:// workdir or data directory, are one line each.
"""

import shutil
import subprocess
import sys

import pytest

from nin_jax import checkpointing, train
from nin_jax.config import ConfigError
from nin_jax.tools import evaluate
import helpers_reliability as h
from test_tool_faults import UNREACHABLE_GCS, _lines


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    yield from h.module_env(tmp_path_factory, "workdir_faults")


@pytest.fixture(scope="module")
def finished(env):
    """A finished 24-step run: checkpoints every 4 steps, metrics.jsonl, results.json."""
    workdir = env["root"] / "finished"
    train.train_and_evaluate(h.make_config(env["data_cache"]), str(workdir))
    return workdir


def _copy(workdir, tmp_path):
    shutil.copytree(workdir, tmp_path / "run")
    return tmp_path / "run"


def test_checkpoints_removed_under_a_running_training_stop_it_in_one_line_and_the_rerun_refuses(
        env, tmp_path, monkeypatch):
    workdir, config = tmp_path / "run", h.make_config(env["data_cache"])
    ckpt_dir, real_save = workdir / "checkpoints", checkpointing.save

    def save(mngr, step, *args, **kwargs):
        if step == 16:  # `rm -rf <workdir>/checkpoints` while the save of step 16 is in flight
            mngr.wait_until_finished()
            shutil.copytree(ckpt_dir, tmp_path / "backup")
            shutil.rmtree(ckpt_dir)
            # What Orbax's save thread raises when the files it is writing vanish (when exactly they vanish
            # decides between this, a FileNotFoundError and a TensorStore NOT_FOUND).
            raise ValueError("Save failed: 70/70 params are missing .zarray in checkpoint: [...]")
        return real_save(mngr, step, *args, **kwargs)

    monkeypatch.setattr(checkpointing, "save", save)
    with pytest.raises(ConfigError) as stopped:
        train.train_and_evaluate(config, str(workdir))
    assert str(stopped.value) == (
        f"{ckpt_dir} changed under the running training (it was removed), and the run stopped (ValueError: Save "
        f"failed: 70/70 params are missing .zarray in checkpoint: [...]). Restore any removed checkpoints into "
        f"{ckpt_dir} and rerun the same command to resume from the newest one, or use a new --workdir.")
    monkeypatch.setattr(checkpointing, "save", real_save)

    logged = (workdir / "metrics.jsonl").read_text()
    with pytest.raises(ConfigError) as refused:
        train.train_and_evaluate(config, str(workdir))
    assert str(refused.value) == (
        f"{ckpt_dir} does not exist, but metrics.jsonl logs training up to step 16: the checkpoints of this run were "
        "removed, and rerunning would silently start it again from step 0. Restore them into "
        f"{ckpt_dir} and rerun to resume, or use a new --workdir (or, to train it again from step 0 in this "
        "workdir, delete metrics.jsonl).")
    assert (workdir / "metrics.jsonl").read_text() == logged  # the record is kept as it was

    shutil.copytree(tmp_path / "backup", ckpt_dir)  # the fix the message names
    results = train.train_and_evaluate(config, str(workdir))
    assert results["resumed_from_step"] == 12 and results["step"] == h.NUM_STEPS


def test_a_finished_run_without_its_checkpoints_is_not_extended_from_step_0(env, finished, tmp_path):
    copy = _copy(finished, tmp_path)
    shutil.rmtree(copy / "checkpoints")
    config_json = (copy / "config.json").read_text()
    # The same run: its results are final, nothing is trained or lost.
    assert train.train_and_evaluate(h.make_config(env["data_cache"]), str(copy))["step"] == h.NUM_STEPS
    with pytest.raises(ConfigError, match=rf"^{copy}/checkpoints does not exist, but results.json records a finished "
                                          r"run: .* delete results.json\)\.$"):
        train.train_and_evaluate(h.make_config(env["data_cache"], num_train_steps=2 * h.NUM_STEPS), str(copy))
    assert (copy / "config.json").read_text() == config_json and (copy / "results.json").exists()  # nothing written


def test_a_run_that_stopped_before_its_first_checkpoint_starts_again(env, tmp_path, monkeypatch):
    """Its record shows no committed checkpoint (4 logged steps, the first save failed): nothing to refuse."""
    workdir, config = tmp_path / "run", h.make_config(env["data_cache"])

    def save(*args, **kwargs):
        raise RuntimeError("the machine went away")

    monkeypatch.setattr(checkpointing, "save", save)
    with pytest.raises(RuntimeError, match="the machine went away"):
        train.train_and_evaluate(config, str(workdir))
    assert max(h.read_metrics(workdir)) == 4
    monkeypatch.undo()
    results = train.train_and_evaluate(config, str(workdir))
    assert "resumed_from_step" not in results and results["step"] == h.NUM_STEPS


def test_an_unreadable_config_json_is_one_line_naming_it(env, finished, tmp_path):
    copy = _copy(finished, tmp_path)
    (copy / "config.json").write_text((copy / "config.json").read_text()[:100])  # cut short
    expected = rf"^{copy}/config.json cannot be read \(JSONDecodeError: .*\); it records the experiment"
    with pytest.raises(ConfigError, match=expected):
        train.train_and_evaluate(h.make_config(env["data_cache"]), str(copy))
    with pytest.raises(ConfigError, match=expected):
        evaluate.evaluate_checkpoint(str(copy))


def test_a_lock_file_that_is_not_a_lock_record_is_named(env, finished, tmp_path):
    copy = _copy(finished, tmp_path)
    (copy / "results.json").unlink()  # an unfinished run, which takes the lock
    (copy / "lock").write_text("garbage")
    with pytest.raises(Exception, match=rf"^--workdir={copy}: {copy}/lock is not a lock record .*; if no training is "
                                        r"running in this workdir, delete it and rerun\.$"):
        train.train_and_evaluate(h.make_config(env["data_cache"]), str(copy))


@pytest.mark.slow
@pytest.mark.parametrize("where", ["workdir", "data_dir"])
def test_an_unreachable_gs_path_stops_training_in_one_line(env, tmp_path, where):
    path = "gs://nin-jax-tests-unreachable/" + where
    flags = [f"--workdir={path}"] if where == "workdir" else [f"--workdir={tmp_path / 'run'}",
                                                              f"--config.run.data_dir={path}"]
    proc = subprocess.run([sys.executable, "-m", "nin_jax.main", *h.config_flags(env["data_cache"]), *flags],
                          cwd=h.REPO, env={**env["subprocess"], **UNREACHABLE_GCS}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    err = _lines(proc.stderr)
    assert len(err) == 1, proc.stderr[-3000:]
    flag = "--workdir" if where == "workdir" else "--config.run.data_dir"
    assert err[0].startswith(f"error: {flag}={path} cannot be reached (") and "credentials" in err[0], err
    assert not (tmp_path / "run").exists()  # refused before anything was written
