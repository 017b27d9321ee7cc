"""A workdir is one experiment: a rerun with another config is refused before anything is written, a longer
run is an extension that keeps the shorter run's record, and a finished run prints its results without
writing (a read-only workdir works). Command-line mistakes are one line."""

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest

from nin_jax import train
from nin_jax.config import ConfigError
import helpers_reliability as h


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    yield from h.module_env(tmp_path_factory, "workdir_record")


@pytest.fixture(scope="module")
def finished(env):
    workdir = env["root"] / "finished"
    train.train_and_evaluate(h.make_config(env["data_cache"]), str(workdir))
    return workdir


def _snapshot(workdir) -> dict[str, tuple[int, str]]:
    """Every file and directory under `workdir`: modification time and content digest."""
    out = {}
    for path in sorted(workdir.rglob("*")):
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
        out[str(path.relative_to(workdir))] = (path.stat().st_mtime_ns, digest)
    return out


def _copy(source, workdir):
    shutil.copytree(source, workdir)
    return workdir


@pytest.mark.slow
def test_rerun_of_a_finished_run_with_another_config_is_refused_and_changes_nothing(env, finished, capsys):
    before = _snapshot(finished)
    other = h.make_config(env["data_cache"], preprocess="scale", optim__learning_rate=0.05)
    with pytest.raises(ConfigError, match=r"holds a different experiment \(optim.learning_rate: 0.1 -> 0.05, "
                       r"preprocess: 'standardize' -> 'scale'\)"):
        train.train_and_evaluate(other, str(finished))
    assert _snapshot(finished) == before  # config.json, results.json, metrics, checkpoints; no lock left

    proc = subprocess.run(  # the same through the command line: one line, nothing written
        [sys.executable, "-m", "nin_jax.main", f"--workdir={finished}",
         *h.config_flags(env["data_cache"], preprocess="scale", optim__learning_rate=0.05)],
        cwd=h.REPO, env=env["subprocess"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "holds a different experiment" in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert _snapshot(finished) == before


@contextlib.contextmanager
def _read_only(path):
    """`path` made read-only: a read-only bind mount as root (who ignores file modes), chmod otherwise."""
    if os.geteuid() == 0:
        mounted = subprocess.run(["mount", "--bind", str(path), str(path)], capture_output=True).returncode == 0
        if not mounted or subprocess.run(["mount", "-o", "remount,ro,bind", str(path)],
                                         capture_output=True).returncode:
            if mounted:
                subprocess.run(["umount", str(path)])
            pytest.skip("cannot make a read-only bind mount here")
        try:
            yield
        finally:
            subprocess.run(["umount", str(path)], check=True)
    else:
        modes = {p: p.stat().st_mode for p in [path, *path.rglob("*")]}
        for p in modes:
            p.chmod(modes[p] & ~0o222)
        try:
            yield
        finally:
            for p, mode in modes.items():
                p.chmod(mode)


def test_finished_run_in_a_read_only_workdir_prints_its_results(env, finished, capsys):
    workdir = _copy(finished, env["root"] / "read_only")
    before = _snapshot(workdir)
    saved = json.loads((workdir / "results.json").read_text())
    with _read_only(workdir):
        with pytest.raises(OSError):
            (workdir / "probe").write_text("x")
        capsys.readouterr()
        results = train.train_and_evaluate(h.make_config(env["data_cache"], run__log_every_steps=3), str(workdir))
    out = capsys.readouterr().out
    assert f"{workdir} already finished {h.NUM_STEPS} steps (eval/top1 {saved['eval/top1']:.4f}" in out
    assert results == saved
    assert _snapshot(workdir) == before


def test_a_longer_run_extends_the_workdir_keeping_the_shorter_runs_record(env, finished, capsys):
    workdir = _copy(finished, env["root"] / "extended")
    old_config, old_results = (workdir / "config.json").read_text(), (workdir / "results.json").read_text()
    longer = h.NUM_STEPS + 12
    capsys.readouterr()
    results = train.train_and_evaluate(h.make_config(env["data_cache"], num_train_steps=longer), str(workdir))
    out = capsys.readouterr().out
    print(out)
    assert (f"Extending the run in {workdir} from {h.NUM_STEPS} to {longer} steps (num_train_steps: {h.NUM_STEPS} -> "
            f"{longer}); the {h.NUM_STEPS}-step record is kept as config.{h.NUM_STEPS}.json and "
            f"results.{h.NUM_STEPS}.json.") in out
    assert f"Resuming from checkpoint step {h.NUM_STEPS}" in out
    assert (f"Learning-rate schedule: over {longer} steps instead of {h.NUM_STEPS}; at step {h.NUM_STEPS} the LR "
            "is") in out
    assert (workdir / f"config.{h.NUM_STEPS}.json").read_text() == old_config
    assert (workdir / f"results.{h.NUM_STEPS}.json").read_text() == old_results
    assert json.loads((workdir / "config.json").read_text())["num_train_steps"] == longer
    assert results["step"] == longer and results["extended_from_steps"] == h.NUM_STEPS
    assert h.committed_steps(workdir)[-3:] == [longer - 8, longer - 4, longer]
    assert max(h.read_metrics(workdir)) == longer

    before = _snapshot(workdir)
    with pytest.raises(ConfigError, match=f"holds a run of {longer} steps; num_train_steps: {longer} -> {h.NUM_STEPS} "
                       f"would shorten it to {h.NUM_STEPS}, and a run can only be extended"):
        train.train_and_evaluate(h.make_config(env["data_cache"]), str(workdir))
    assert _snapshot(workdir) == before


@pytest.mark.parametrize("flag, expected", [
    ("--config.modle.head=fc",
     "error: --config.modle.head=fc: config has no field 'modle'; did you mean config.model?"),
    ("--config.model.hed=fc", "error: --config.model.hed=fc: config.model has no field 'hed'; did you mean "
                              "config.model.head?"),
    ("--config.model.width=abc", "error: flag --config.model.width=abc: could not convert string to float: 'abc'"),
    ("--config.log_every_steps=5", "error: --config.log_every_steps=5: config.log_every_steps is now "
                                   "config.run.log_every_steps; pass --config.run.log_every_steps=5."),
])
def test_command_line_mistakes_are_one_line(tmp_path, flag, expected):
    proc = subprocess.run([sys.executable, "-m", "nin_jax.main", "--config=configs/digits.py",
                           f"--workdir={tmp_path / 'w'}", flag], cwd=h.REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip() == expected
    assert not (tmp_path / "w").exists()


def test_missing_config_file_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "nin_jax.main", "--config=configs/nope.py",
                           f"--workdir={tmp_path / 'w'}"], cwd=h.REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip() == ("error: --config=configs/nope.py could not be loaded (no such file); pass a config "
                                   "file such as configs/digits.py.")
