"""Collectives on CPU host devices: unbounded run-ahead deadlocks them, `mesh.RunAheadBound` prevents it.

XLA's CPU client lets a device have 32 executions in flight; dispatching a 33rd blocks a thread of the pool
that also runs the participants of collectives, and with as many pool threads as devices a collective then
never gathers all its participants (docs/cpu_collectives.md). The runs below happen in subprocesses, since the
deadlock ends in XLA aborting the process, with the collective timeouts lowered to a few seconds so that the
abort comes quickly. They use two host devices (the default on a 2-core host: one per core) and PJRT_NPROC=1,
so that the pool has one thread per device on any machine; an unbounded loop then deadlocks within its first
hundred steps.
"""

import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nin_jax import mesh as mesh_lib

pytestmark = pytest.mark.cpu  # host devices

REPO = pathlib.Path(__file__).resolve().parent.parent
ABORT = "Termination timeout"  # XLA's message when a collective's participants never all arrive

# A data-parallel step (XLA all-reduces its gradient over the batch), slow enough next to its dispatch that the
# host runs ahead.
_PRELUDE = """
import sys
import jax, jax.numpy as jnp, numpy as np
from nin_jax import mesh as mesh_lib
mesh = mesh_lib.create_mesh()
repl, data = mesh_lib.replicated(mesh), mesh_lib.data_sharding(mesh)
x = jax.device_put(np.ones((2 * 64, 256), np.float32), data)
w = jax.device_put(np.eye(256, dtype=np.float32), repl)

def grad_step(w, x):
    loss, g = jax.value_and_grad(lambda w: jnp.mean(jnp.tanh(x @ w) ** 2))(w)
    return w - 0.01 * g, loss
"""

SCRIPTS = {
    # The step in a plain loop, nothing waiting for it: the old behaviour of the loops.
    "unbounded": """
step = jax.jit(grad_step, in_shardings=(repl, data), out_shardings=(repl, repl), donate_argnums=0)
for _ in range(600):
    w, loss = step(w, x)
""",
    "bounded": """
step = jax.jit(grad_step, in_shardings=(repl, data), out_shardings=(repl, repl), donate_argnums=0)
run_ahead = mesh_lib.RunAheadBound()
for _ in range(600):
    w, loss = step(w, x)
    run_ahead.add(loss)
""",
    # train.evaluate over 150 batches of a step whose metrics sum over the sharded batch (an all-reduce), then
    # the benchmark's training loop (steps and metric merges, as in training) over 300 steps.
    "evaluate_and_benchmark_loop": """
from nin_jax import train
from nin_jax.tools import benchmark
def eval_step(state, batch):
    logits = jax.lax.fori_loop(0, 10, lambda _, h: jnp.tanh(h @ state), batch["image"])
    return train.EvalMetrics.single_from_model_output(loss=jnp.mean(logits ** 2, -1), top1=logits[:, 0],
                                                      top5=logits[:, 1], mask=batch["mask"])
p_eval_step = jax.jit(eval_step, in_shardings=(repl, data), out_shardings=repl)
mask = jax.device_put(np.ones(2 * 64, np.float32), data)
train.evaluate(p_eval_step, w, [{"image": x, "mask": mask}] * 150)
print("evaluated", flush=True)

def train_step(w, batch):
    w, loss = grad_step(w, batch["image"])
    return w, train.TrainMetrics.single_from_model_output(loss=loss, top1=loss)
step = jax.jit(train_step, in_shardings=(repl, data), out_shardings=(repl, repl), donate_argnums=0)
benchmark.time_training_loop(step, w, iter([{"image": x}] * 300), 2 * 64, 300)
""",
}


def run_on_host_devices(name: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "PJRT_NPROC": "1",  # the client's pool then has one thread per device, as on a host of at most 2 cores
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2"
                     " --xla_cpu_collective_call_warn_stuck_timeout_seconds=1"
                     " --xla_cpu_collective_call_terminate_timeout_seconds=2",
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p),
        "TF_CPP_MIN_LOG_LEVEL": "0",  # XLA's abort message is logged at level ERROR/FATAL
    }
    code = _PRELUDE + SCRIPTS[name] + "\nprint('finished', flush=True)\n"
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=180)


def _summary(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in proc.stderr.splitlines() if ABORT in line or "Error" in line]
    return f"exit {proc.returncode}; " + ("\n".join(lines[:3]) or proc.stderr[-2000:])


def test_unbounded_run_ahead_deadlocks_a_collective():
    """The reproduction itself: if this stops failing on a new jaxlib, the bound may no longer be needed."""
    proc = run_on_host_devices("unbounded")
    assert proc.returncode != 0 and ABORT in proc.stderr, _summary(proc)
    assert "finished" not in proc.stdout


@pytest.mark.parametrize("name", ["bounded", "evaluate_and_benchmark_loop"])
def test_bounded_loops_finish(name):
    proc = run_on_host_devices(name)
    assert proc.returncode == 0 and "finished" in proc.stdout, _summary(proc)
    assert ABORT not in proc.stderr


# One participant of an all-reduce arrives 3 s after the other (a host callback sleeps on device 0).
_LATE_PARTICIPANT = """
import os, sys, time
from nin_jax import config as config_lib
from nin_jax.cpu import hostenv
config = config_lib.load_config_file("configs/digits.py")
config.run.num_cpu_devices = 2
hostenv.prepare(config)  # as the entry points do; it keeps the timeouts XLA_FLAGS already sets
import jax, numpy as np
mesh = jax.make_mesh((2,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))

def late(i, x):
    if int(i) == 0:
        time.sleep(3)
    return x

def step(x):
    x = jax.pure_callback(late, jax.ShapeDtypeStruct(x.shape, x.dtype), jax.lax.axis_index("d"), x)
    return jax.lax.psum(x, "d")

f = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=jax.P("d"), out_specs=jax.P("d")))
print(np.asarray(f(jax.device_put(np.ones(2, np.float32), jax.NamedSharding(mesh, jax.P("d"))))).tolist())
"""


# 3 s late: past both timeouts of 1 s; not past the terminate timeout of 2 s counted after a warning at 3 s.
@pytest.mark.parametrize("warn_s,terminate_s,survives", [(1, 1, False), (3, 2, True)])
def test_a_late_participant_aborts_only_after_both_timeouts(warn_s, terminate_s, survives):
    """XLA aborts a collective after the warning timeout and then the terminate timeout (their sum), which
    `hostenv.prepare` raises far above a step (`hostenv.COLLECTIVE_TIMEOUTS_S`) unless XLA_FLAGS sets them."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "NIN_JAX_NO_REEXEC": "1", "TF_CPP_MIN_LOG_LEVEL": "0",
           "XLA_FLAGS": f"--xla_cpu_collective_call_warn_stuck_timeout_seconds={warn_s}"
                        f" --xla_cpu_collective_call_terminate_timeout_seconds={terminate_s}",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
    proc = subprocess.run([sys.executable, "-c", _LATE_PARTICIPANT], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    if survives:
        assert proc.returncode == 0 and proc.stdout.strip() == "[2.0, 2.0]", _summary(proc)
        assert ABORT not in proc.stderr
    else:
        assert proc.returncode != 0 and ABORT in proc.stderr, _summary(proc)


class _Recorded:
    """A pytree leaf that `jax.block_until_ready` waits for by calling its method; records the calls."""

    def __init__(self, name: str, waited: list[str]):
        self.name, self._waited = name, waited

    def block_until_ready(self):
        self._waited.append(self.name)
        return self


def test_add_waits_for_the_outputs_added_depth_calls_earlier():
    waited: list[str] = []
    bound = mesh_lib.RunAheadBound(depth=2)
    for i in range(5):
        bound.add({"metrics": _Recorded(f"step{i}", waited)})
        assert waited == [f"step{j}" for j in range(i - 1)]  # step i-2 and all before it, each once
    sync = mesh_lib.RunAheadBound(depth=0)
    sync.add(_Recorded("now", waited))
    assert waited[-1] == "now"
    with pytest.raises(ValueError, match="depth=-1"):
        mesh_lib.RunAheadBound(depth=-1)


def test_add_returns_once_the_earlier_outputs_are_computed():
    slow = jax.jit(lambda a: jax.lax.fori_loop(0, 600, lambda _, v: jnp.tanh(v @ v), a))
    a = jnp.full((256, 256), 0.01, jnp.float32)
    jax.block_until_ready(slow(a))  # compiled
    bound = mesh_lib.RunAheadBound(depth=1)
    first = slow(a)
    bound.add(first)
    assert not first.is_ready()  # dispatched, still computing: the first add does not wait
    bound.add(jnp.zeros(()))
    assert first.is_ready()
    np.testing.assert_allclose(np.asarray(first), np.asarray(slow(a)))
