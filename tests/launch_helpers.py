"""A tiny 2-point digits sweep shared by the sweep, evaluate and analysis tests (run once per test process).

Points `fc` and `gap` of `gap_vs_fc`, each trained by a real `python -m nin_jax.main` subprocess on the 8 host
devices the test environment sets (XLA_FLAGS is inherited): 12 steps, evaluated and checkpointed at 6 and 12.
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = os.path.join(REPO, "configs", "digits.py")


def sweep_cli():
    """launch/sweep.py as a module."""
    from launch import sweep  # pylint: disable=g-import-not-at-top

    return sweep


@functools.cache
def tiny_sweep() -> tuple[str, list[str]]:
    """(sweep root, the launch/sweep.py arguments that made it)."""
    root = tempfile.mkdtemp(prefix="nin_launch_tests_")
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    argv = [f"--sweep=gap_vs_fc", f"--root={root}", f"--config={DIGITS}", "--points=fc,gap",
            f"--set=cache_dir={root}/cache", "--set=model.width=0.25", "--set=num_train_steps=12",
            "--set=optim.warmup_epochs=0.1", "--set=eval_every_steps=6", "--config.checkpoint_every_steps=6",
            "--config.log_every_steps=6"]
    previous = os.environ.get("JAX_DISABLE_MOST_OPTIMIZATIONS")
    os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"  # as conftest does in-process: compile time dominates
    try:
        code = sweep_cli().main(argv)
    finally:
        if previous is None:
            del os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"]
        else:
            os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = previous
    assert code == 0, f"the tiny sweep failed with exit code {code}"
    return root, argv


def trained_workdir() -> tuple[str, dict]:
    """(workdir, results.json) of the sweep's `gap` point."""
    import json

    workdir = os.path.join(tiny_sweep()[0], "gap_vs_fc", "gap")
    with open(os.path.join(workdir, "results.json")) as f:
        return workdir, json.load(f)
