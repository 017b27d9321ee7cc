"""Shared pieces of the reliability and multi-process tests: a tiny run, subprocesses, and exact comparisons."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time
from typing import Any, Callable, Iterator

import jax
import numpy as np
import optax
from jax.experimental.compilation_cache import compilation_cache

from config_helpers import with_overrides
from nin_jax.cpu import hostenv

REPO = pathlib.Path(__file__).resolve().parent.parent
NUM_STEPS = 24

# digits, width 0.5, a checkpoint every 4 steps (all kept, so runs can be compared step by step) and a log
# line every step (the loss trajectory, and how tests see the step of a running process).
OVERRIDES: dict[str, Any] = {
    "num_train_steps": NUM_STEPS,
    "batch_size": 32,
    "run.eval_batch_size": 160,
    "model.width": 0.5,
    "optim.warmup_epochs": 0.1,
    "run.log_every_steps": 1,
    "run.eval_every_steps": 12,
    "run.checkpoint_every_steps": 4,
    "run.keep_checkpoints": 100,
}

# Throughput and wall-clock keys differ between any two runs; everything else in results.json must not.
_TIMING_KEYS = ("img/sec/core", "train/img_per_sec", "train/mfu", "wall_seconds")


def make_config(cache_dir: str | os.PathLike, **changes: Any):
    """configs/digits.py with OVERRIDES, then `changes` (dotted names as keyword keys: model__width=...)."""
    from configs import digits

    config = digits.get_config()
    config.run.cache_dir = str(cache_dir)
    return with_overrides(config, **{**{k.replace(".", "__"): v for k, v in OVERRIDES.items()}, **changes})


def config_flags(cache_dir: str | os.PathLike, **changes: Any) -> list[str]:
    """The same configuration as command-line flags of `nin_jax.main`."""
    items = {**OVERRIDES, "run.cache_dir": str(cache_dir), **{k.replace("__", "."): v for k, v in changes.items()}}
    return [f"--config={REPO / 'configs' / 'digits.py'}"] + [f"--config.{k}={v}" for k, v in items.items()]


def compile_cache_dir(tmp_path_factory) -> pathlib.Path:
    """One persistent compilation cache per test session, shared by the reliability and multi-process tests."""
    return tmp_path_factory.getbasetemp() / "compile_cache_reliability"


def enable_compile_cache(path: str | os.PathLike) -> Callable[[], None]:
    """Shares compiled programs between this process and its subprocesses; returns the undo function."""
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    previous = {n: getattr(jax.config, n) for n in names}
    compilation_cache.reset_cache()
    for name, value in zip(names, (str(path), 0.0, 0)):
        jax.config.update(name, value)

    def undo():
        for name, value in previous.items():
            jax.config.update(name, value)
        compilation_cache.reset_cache()

    return undo


def module_env(tmp_path_factory, name: str) -> Iterator[dict[str, Any]]:
    """Body of a module-scoped `env` fixture: a root directory `name`, the digits cache under it, and the shared
    compilation cache on for this process and its training subprocesses (`subprocess`)."""
    root, cache = tmp_path_factory.mktemp(name), compile_cache_dir(tmp_path_factory)
    undo = enable_compile_cache(cache)
    try:
        yield {"root": root, "data_cache": root / "data_cache", "subprocess": subprocess_env(cache)}
    finally:
        undo()


def subprocess_env(compile_cache: str | os.PathLike) -> dict[str, str]:
    """Environment of a training subprocess that compiles exactly like this test process (and shares its cache)."""
    env = dict(os.environ)
    env.update(
        XLA_FLAGS=hostenv.with_collective_timeouts("--xla_force_host_platform_device_count=8"),  # as conftest
        JAX_DISABLE_MOST_OPTIMIZATIONS="1",
        JAX_COMPILATION_CACHE_DIR=str(compile_cache),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
        PYTHONPATH=os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p),
        PYTHONUNBUFFERED="1",
        TF_CPP_MIN_LOG_LEVEL="2",
    )
    return env


def start_main(workdir: pathlib.Path, flags: list[str], env: dict[str, str], log: pathlib.Path) -> subprocess.Popen:
    """`python -m nin_jax.main` in the background, output to `log`."""
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-m", "nin_jax.main", f"--workdir={workdir}", *flags],
                                cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)


def read_metrics(workdir: pathlib.Path) -> dict[int, dict[str, float]]:
    """metrics.jsonl as {step: scalars} (train and eval lines of a step merged)."""
    out: dict[int, dict[str, float]] = {}
    path = workdir / "metrics.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:  # being written
                continue
            out.setdefault(row.pop("step"), {}).update(row)
    return out


def last_logged_step(workdir: pathlib.Path) -> int:
    return max(read_metrics(workdir), default=0)


def committed_steps(workdir: pathlib.Path) -> list[int]:
    """Checkpoint steps Orbax has finished (its temporary directories end in .orbax-checkpoint-tmp)."""
    ckpt = workdir / "checkpoints"
    return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) if ckpt.exists() else []


def wait_until(predicate: Callable[[], bool], proc: subprocess.Popen, log: pathlib.Path, timeout: float = 240.0):
    """Polls `predicate` while `proc` runs; fails with the log's tail if it exits or time runs out."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"condition not reached (exit code {proc.poll()}); log tail:\n{log_tail(log)}")
        time.sleep(0.02)


def log_tail(log: pathlib.Path, lines: int = 30) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def deterministic_results(workdir: pathlib.Path) -> dict[str, float]:
    """results.json's train/* and eval/* values, without throughput."""
    results = json.loads((workdir / "results.json").read_text())
    return {k: v for k, v in results.items() if k.startswith(("train/", "eval/")) and k not in _TIMING_KEYS}


def trajectory(workdir: pathlib.Path) -> dict[int, dict[str, float]]:
    """metrics.jsonl without throughput values."""
    return {s: {k: v for k, v in row.items() if k not in _TIMING_KEYS} for s, row in read_metrics(workdir).items()}


class Restorer:
    """Restores checkpoints of runs of `config` onto `devices` (default: every device) and evaluates them."""

    def __init__(self, config, devices: list | None = None):
        from nin_jax import data, mesh as mesh_lib, models, train

        self.mesh = mesh_lib.create_mesh(devices)
        self.pipeline = data.Pipeline(config, mesh_lib.data_sharding(self.mesh))
        info = self.pipeline.info
        self.model = models.create_model(config.model, info.num_classes, dtype=train.compute_dtype(config))
        # The optimizer state's structure does not depend on the schedule's values.
        self.abstract = train.abstract_train_state(config, self.model, info.image_shape,
                                                   optax.constant_schedule(0.0), self.mesh)
        self._eval_step = None

    def restore(self, workdir: pathlib.Path, step: int | None = None):
        """(state, meta) of checkpoint `step` (default: the latest) of `workdir`."""
        from nin_jax import checkpointing

        mngr = checkpointing.create_manager(workdir / "checkpoints", keep=100, read_only=True)
        try:
            return checkpointing.restore(mngr, mngr.latest_step() if step is None else step, self.abstract)
        finally:
            mngr.close()

    def evaluate(self, state) -> dict[str, float]:
        from nin_jax import train

        if self._eval_step is None:
            self._eval_step = train.make_eval_step(self.model, self.pipeline.info.num_classes, self.mesh)
        return train.evaluate(self._eval_step, state, self.pipeline.eval_batches())


def _leaves(state) -> list[tuple[str, np.ndarray]]:
    """(path, value) of every array of a TrainState: params, BN statistics, momentum, step and RNG key."""
    flat, _ = jax.tree_util.tree_flatten_with_path(jax.device_get(state))
    return [(jax.tree_util.keystr(path), np.asarray(v)) for path, v in flat]


def max_abs_diff(a, b) -> float:
    """Largest |a - b| over every array of two states."""
    la, lb = _leaves(a), _leaves(b)
    assert [p for p, _ in la] == [p for p, _ in lb]
    return max(float(np.max(np.abs(x.astype(np.float64) - y.astype(np.float64)), initial=0.0))
               for (_, x), (_, y) in zip(la, lb))


def assert_states_identical(a, b) -> None:
    """Bit-identical states: same arrays, dtypes and bytes (NaN-safe, unlike ==)."""
    la, lb = _leaves(a), _leaves(b)
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (path, x), (_, y) in zip(la, lb):
        assert x.dtype == y.dtype and x.shape == y.shape, (path, x.dtype, y.dtype, x.shape, y.shape)
        assert x.tobytes() == y.tobytes(), f"{path} differs: max abs diff {np.max(np.abs(x - y))}"
