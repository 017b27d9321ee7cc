"""Checkpoint restore for evaluation: same accuracy on another device count, `best`, and clear errors."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from nin_jax.config import ConfigError
from nin_jax import checkpointing
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
