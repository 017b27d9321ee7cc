"""Checkpoint restore for evaluation: same accuracy on another device count, `best`, damaged checkpoints,
clear errors."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from nin_jax.config import ConfigError
from nin_jax import checkpointing
from nin_jax.runtime import recovery
from nin_jax.tools import evaluate
import launch_helpers

pytestmark = pytest.mark.cpu  # host devices or the CPU kernels

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def run():
    return launch_helpers.trained_workdir()


def test_in_process_evaluation_reproduces_the_final_eval(run):
    workdir, results = run
    out = evaluate.evaluate_checkpoint(workdir)
    assert out["step"] == 12 and out["checkpoint"].endswith("/checkpoints/12")
    assert out["num_examples"] == 297 == results["eval/num_examples"]
    assert out["eval/top1"] == results["eval/top1"]
    assert out["eval/top5"] == results["eval/top5"]
    assert out["eval/loss"] == pytest.approx(results["eval/loss"], rel=1e-5)


@pytest.mark.slow
def test_cli_restores_an_8_device_checkpoint_on_1_device(run):
    workdir, results = run
    assert results["num_devices"] == 8
    # Same compile mode as the training run in this process (conftest), and a single CPU device.
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}
    proc = subprocess.run([sys.executable, "-m", "nin_jax.evaluate", f"--workdir={workdir}"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout  # exactly one JSON line on stdout
    out = json.loads(lines[0])
    assert out["num_devices"] == 1
    assert out["eval/top1"] == results["eval/top1"]
    assert out["eval/loss"] == pytest.approx(results["eval/loss"], rel=1e-5)
    assert (out["step"], out["num_examples"], out["split"], out["arch"]) == (12, 297, "test", "nin_digits")


def test_best_checkpoint_is_the_step_with_the_highest_saved_eval_top1(run):
    workdir, _ = run
    mngr = checkpointing.create_manager(os.path.join(workdir, "checkpoints"), keep=2, read_only=True)
    saved = {s: mngr.metrics(s)[checkpointing.BEST_METRIC] for s in mngr.all_steps()}
    mngr.close()
    out = evaluate.evaluate_checkpoint(workdir, checkpoint="best")
    assert out["step"] == max(saved, key=saved.get)
    assert out["eval/top1"] == saved[out["step"]]  # what training measured at that step
    assert evaluate.evaluate_checkpoint(workdir, split="train[:64]", checkpoint="6")["num_examples"] == 64


def test_workdir_without_checkpoint(run, tmp_path):
    workdir, _ = run
    shutil.copy(os.path.join(workdir, "config.json"), tmp_path / "config.json")
    with pytest.raises(ConfigError, match="no checkpoint in .*checkpoints"):
        evaluate.evaluate_checkpoint(str(tmp_path))
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(ConfigError, match="has not saved one yet"):
        evaluate.evaluate_checkpoint(str(tmp_path))
    with pytest.raises(ConfigError, match="config.json does not exist"):
        evaluate.evaluate_checkpoint(str(tmp_path / "nothing"))


def test_arch_mismatch_and_bad_checkpoint_names(run, capsys):
    workdir, _ = run
    with pytest.raises(ValueError, match=r"--arch=nin_cifar10 does not match .*model.arch='nin_digits'"):
        evaluate.evaluate_checkpoint(workdir, arch="nin_cifar10")
    assert evaluate.main([f"--workdir={workdir}", "--arch=nin_cifar10"]) == 1
    assert "--arch=nin_cifar10 does not match" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"--checkpoint=7: no such step .*\[6, 12\]"):
        evaluate.evaluate_checkpoint(workdir, checkpoint="7")
    with pytest.raises(ValueError, match="choose latest | best"):
        evaluate.evaluate_checkpoint(workdir, checkpoint="newest")


def _damaged_copy(workdir, tmp_path):
    """A copy of the run whose newest checkpoint (12) has every data file of its arrays cut in half."""
    copy = tmp_path / "run"
    shutil.copytree(workdir, copy)
    data = [p for p in (copy / "checkpoints" / "12" / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    assert data
    for path in data:
        with open(path, "r+b") as f:
            f.truncate(path.stat().st_size // 2)
    return copy


def _evaluate_cli(*args):
    env = {**os.environ, "JAX_DISABLE_MOST_OPTIMIZATIONS": "1", "NIN_JAX_NO_REEXEC": "1"}
    return subprocess.run([sys.executable, "-m", "nin_jax.evaluate", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)


def _own_lines(stderr):
    """stderr without the C++ libraries' start-up logging (TensorFlow, XLA), which nin_jax does not control."""
    noise = ("I0000", "W0000", "WARNING: All log messages", "WARNING:absl:Type")
    return [line for line in stderr.splitlines() if line.strip() and not line.startswith(noise)]


@pytest.mark.slow
def test_damaged_newest_checkpoint_falls_back_in_one_line(run, tmp_path):
    workdir, results = run
    copy = _damaged_copy(workdir, tmp_path)
    proc = _evaluate_cli(f"--workdir={copy}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = _own_lines(proc.stderr)
    assert len(lines) == 1, proc.stderr  # no tracebacks, no "Event loop is closed", no TensorStore spec
    assert lines[0].startswith(f"warning: checkpoint {copy}/checkpoints/12 is unreadable (")
    assert lines[0].endswith("using step 6, the newest readable one.") and len(lines[0]) < 600
    out = json.loads(proc.stdout)
    assert out["step"] == 6 and out["checkpoint"] == f"{copy}/checkpoints/6"
    assert (copy / "checkpoints" / "12").is_dir()  # evaluation never moves or deletes anything

    proc = _evaluate_cli(f"--workdir={copy}", "--checkpoint=12")
    assert proc.returncode == 1 and proc.stdout == ""
    lines = _own_lines(proc.stderr)
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"error: checkpoint {copy}/checkpoints/12 (--checkpoint=12) is unreadable (")
    assert lines[0].endswith("the newest readable step is 6: pass --checkpoint=6.")


def test_best_and_named_steps_that_cannot_be_read_name_the_checkpoint_to_use(run, tmp_path):
    workdir, _ = run
    copy = _damaged_copy(workdir, tmp_path)
    with pytest.raises(recovery.CheckpointError, match=r"the newest readable step is 6: pass --checkpoint=6\.$"):
        evaluate.evaluate_checkpoint(str(copy), checkpoint="12")
    out = evaluate.evaluate_checkpoint(str(copy), split="train[:16]", checkpoint="latest")
    assert out["step"] == 6 and out["num_examples"] == 16


def test_missing_split_blames_the_split_flag(run, capsys, monkeypatch):
    monkeypatch.setenv("NIN_JAX_NO_REEXEC", "1")  # evaluate.main runs in this process
    workdir, _ = run
    with pytest.raises(ConfigError, match=r"^--split='validation' cannot be read .*Unknown split 'validation'"):
        evaluate.evaluate_checkpoint(workdir, split="validation")
    assert evaluate.main([f"--workdir={workdir}", "--split=validation", "--arch=nin_digits"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --split='validation'") and "config.eval_split" not in err


def test_checkpoint_of_another_model_is_refused(run, tmp_path):
    workdir, _ = run
    copy = tmp_path / "run"
    shutil.copytree(workdir, copy)
    config = json.loads((copy / "config.json").read_text())
    config["model"]["width"] = 0.5  # the run trained width 0.25
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"does not hold the arrays that the config describes "
                                          r"\((batch_stats|params)/block1/"):
        evaluate.evaluate_checkpoint(str(copy))
