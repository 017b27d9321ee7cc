"""Alternating training and evaluation for hundreds of steps never hangs.

A real run once hung in the all-reduce of an evaluation step. Here a tiny NIN-CIFAR10 (`model.width=0.125`,
the preset's class maps following the folder's 3 classes) trains 300 steps on 2 host devices, evaluating
every step or two while the input pipeline decodes and crops 32x32 PNGs per example in its own thread, and
(one variant) checkpoints asynchronously between the evaluations. Each run is a separate process with a
deadline: a hang fails the test with the log's tail.
"""

import json
import os
import subprocess
import sys
import time

import pytest

from data_helpers import write_image_folder
import helpers_reliability as h

NUM_STEPS = 300
DEADLINE_S = 420  # a run takes well under a minute of compute; the rest is margin for a loaded machine

VARIANTS = {  # name: (parallelism, eval_every_steps, checkpoint_every_steps)
    "jit_eval_every_step": ("jit", 1, 100),
    "shard_map_eval_every_2": ("shard_map", 2, 100),
    "jit_eval_every_2_async_saves_every_3": ("jit", 2, 3),
}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root, cache = tmp_path_factory.mktemp("stress"), h.compile_cache_dir(tmp_path_factory)
    folder = write_image_folder(root / "images", {"train": 32, "test": 8}, size=(32, 32))
    environ = h.subprocess_env(cache)
    environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    return {"root": root, "folder": folder, "env": environ}


@pytest.mark.slow
@pytest.mark.parametrize("repeat", range(int(os.environ.get("STRESS_REPEATS", "1"))))
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_alternating_train_and_eval_never_hangs(env, variant, repeat):
    """STRESS_REPEATS=N runs each variant N times."""
    parallelism, eval_every, checkpoint_every = VARIANTS[variant]
    workdir, log = env["root"] / f"{variant}_{repeat}", env["root"] / f"{variant}_{repeat}.log"
    flags = {
        "dataset": "image_folder", "run.data_dir": env["folder"], "run.cache_dir": env["root"] / "cache",
        "image_size": 32, "augment.random_resized_crop": True, "augment.eval_resize": 36,
        "model.arch": "nin_cifar10", "model.width": 0.125, "batch_size": 16, "run.eval_batch_size": 16,
        "num_train_steps": NUM_STEPS, "optim.warmup_epochs": 0.0, "run.parallelism": parallelism,
        "run.log_every_steps": 50, "run.eval_every_steps": eval_every, "run.checkpoint_every_steps": checkpoint_every,
        "run.keep_checkpoints": 2,
    }
    start = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "nin_jax.main", f"--config={h.REPO / 'configs' / 'default.py'}",
             f"--workdir={workdir}", *[f"--config.{k}={v}" for k, v in flags.items()]],
            cwd=h.REPO, env=env["env"], stdout=out, stderr=subprocess.STDOUT)
    try:
        code = proc.wait(timeout=DEADLINE_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"{variant}: no exit after {DEADLINE_S} s (last logged step {h.last_logged_step(workdir)}):\n"
                    f"{h.log_tail(log)}")
    seconds = time.monotonic() - start
    assert code == 0, h.log_tail(log)
    results = json.loads((workdir / "results.json").read_text())
    evals = [s for s, row in h.read_metrics(workdir).items() if "eval/top1" in row]
    print(f"{variant}: {NUM_STEPS} steps, {len(evals)} evaluations in {seconds:.1f} s (process wall time)")
    assert results["step"] == NUM_STEPS and results["num_devices"] == 2
    assert results["eval/num_examples"] == 24 and results["eval/top5"] == 1.0  # 3 classes
    assert evals == list(range(eval_every, NUM_STEPS + 1, eval_every))
    assert "nin_cifar10:" in log.read_text()
    assert not (workdir / "lock").exists()
