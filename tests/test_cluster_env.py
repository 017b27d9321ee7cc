"""A process that is one of several but cannot join the others says so in one line: a partial cluster
environment is refused naming what is missing, a busy coordinator port is named, and a process whose peers
do not come gives up after `NIN_JAX_INIT_TIMEOUT` seconds naming the coordinator and the process count."""

import os
import socket
import subprocess
import sys
import time

import jax
import pytest

from nin_jax.runtime import cluster, peers
from nin_jax.config import ConfigError
import helpers_reliability as h

SRUN = {"SLURM_JOB_ID": "77", "SLURM_STEP_NODELIST": "node[001-002]", "SLURM_NTASKS": "2", "SLURM_PROCID": "1",
        "SLURM_LOCALID": "0"}
EXPLICIT = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}


@pytest.fixture
def jax_calls(monkeypatch):
    """The calls `jax.distributed.initialize` gets (none of them joins anything)."""
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append((a, k)))
    return calls


def _without(env: dict, *names: str) -> dict:
    return {k: v for k, v in env.items() if k not in names}


@pytest.mark.parametrize("env,missing", [
    # A SLURM job's own variables, without a task's (python run in the batch script itself, not under srun).
    ({"SLURM_JOB_ID": "77", "SLURM_NTASKS": "2"}, "SLURM_STEP_NODELIST, SLURM_PROCID, SLURM_LOCALID are not set"),
    (_without(SRUN, "SLURM_LOCALID"), "SLURM_LOCALID is not set"),
    (_without(SRUN, "SLURM_JOB_ID"), "SLURM_JOB_ID is not set"),
])
def test_a_slurm_job_of_several_tasks_needs_every_variable_srun_sets(env, missing, jax_calls):
    with pytest.raises(ConfigError, match=f"SLURM_NTASKS=2 says this is one of 2 processes, but {missing}, which jax "
                                          "needs to join them; srun sets them"):
        cluster.maybe_initialize_distributed(env)
    assert jax_calls == []


def test_one_slurm_task_runs_alone_without_the_task_variables(jax_calls):
    assert cluster.maybe_initialize_distributed({"SLURM_JOB_ID": "77", "SLURM_NTASKS": "1"}) is None
    assert jax_calls == []


def test_open_mpi_5_processes_are_refused(jax_calls):
    # Open MPI 5's mpirun sets the world size but not the ORTE variable jax's detector reads.
    env = {"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "1"}
    with pytest.raises(ConfigError, match="OMPI_COMM_WORLD_SIZE=4 says this is one of 4 processes, but "
                                          "OMPI_MCA_orte_hnp_uri is not set.*only the mpirun of Open MPI 4 sets it"):
        cluster.maybe_initialize_distributed(env)
    assert jax_calls == []


@pytest.mark.parametrize("env,message", [
    (_without(EXPLICIT, "JAX_COORDINATOR_ADDRESS"),
     "JAX_NUM_PROCESSES, JAX_PROCESS_ID are set but JAX_COORDINATOR_ADDRESS is not; set all of"),
    ({"JAX_PROCESS_ID": "0"}, "JAX_PROCESS_ID is set but JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES are not"),
    ({**SRUN, "SLURM_NTASKS": "two"}, "SLURM_NTASKS='two' must be an integer"),
    ({**SRUN, "SLURM_PROCID": "first"}, "SLURM_PROCID='first' must be an integer"),
    ({**SRUN, "NIN_JAX_INIT_TIMEOUT": "soon"}, "NIN_JAX_INIT_TIMEOUT='soon' must be a whole number of seconds"),
    ({**SRUN, "NIN_JAX_INIT_TIMEOUT": "0"}, "NIN_JAX_INIT_TIMEOUT='0' must be a whole number of seconds >= 1"),
    ({**EXPLICIT, "JAX_PROCESS_ID": "0", "JAX_COORDINATOR_ADDRESS": "10.0.0.1"}, "the coordinator port '10.0.0.1'"),
    ({**SRUN, "NIN_JAX_PEER_TIMEOUT": "1"}, "NIN_JAX_PEER_TIMEOUT='1' must be a whole number of seconds >= 5"),
])
def test_bad_variables_are_named(env, message, jax_calls):
    with pytest.raises(ConfigError, match=message):
        cluster.maybe_initialize_distributed(env)
    assert jax_calls == []


@pytest.mark.parametrize("env,timeout", [(EXPLICIT, 300), ({**SRUN, "NIN_JAX_INIT_TIMEOUT": "7"}, 7)])
def test_jax_gets_a_limit_later_than_the_one_line_error(env, timeout, jax_calls):
    cluster.maybe_initialize_distributed(env)
    ((_, kwargs),) = jax_calls
    assert cluster.init_timeout_seconds(env) == timeout
    assert kwargs["initialization_timeout"] > timeout  # jax's own abort (a C++ stack trace) never comes first


@pytest.mark.parametrize("env,peer_timeout", [
    (EXPLICIT, 30), ({**EXPLICIT, "NIN_JAX_PEER_TIMEOUT": "12"}, 12)])
def test_jax_notices_a_lost_process_later_than_the_peer_watch(env, peer_timeout, jax_calls):
    cluster.maybe_initialize_distributed(env)
    ((_, kwargs),) = jax_calls
    assert peers.peer_timeout_seconds(env) == peer_timeout
    assert kwargs["heartbeat_timeout_seconds"] > peer_timeout + 10  # the one line comes before jax's abort


@pytest.fixture
def busy_port():
    """A port some other process listens on, on every address (as jax's coordinator would bind it)."""
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        s.bind(("::", 0))
        s.listen()
        yield s.getsockname()[1]


@pytest.mark.parametrize("kind", ["explicit", "slurm"])
def test_process_0_refuses_a_coordinator_port_in_use(kind, busy_port, jax_calls):
    # jax's coordinator fails to bind it with a traceback from its C++ server, or a segmentation fault.
    env = ({**EXPLICIT, "JAX_PROCESS_ID": "0", "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{busy_port}"} if kind == "explicit"
           else {**SRUN, "SLURM_PROCID": "0", "JAX_COORDINATOR_PORT": str(busy_port)})
    with pytest.raises(ConfigError, match=f"hosts the job's coordinator on port {busy_port}, which .* cannot bind "
                                          r"\(Address already in use\)"):
        cluster.maybe_initialize_distributed(env)
    assert jax_calls == []


def _free_port() -> int:
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        s.bind(("::", 0))
        return s.getsockname()[1]


def _train(env: dict[str, str], tmp_path) -> tuple[subprocess.CompletedProcess, float]:
    """`python -m nin_jax.main` on digits with `env` added to a clean environment; (process, seconds)."""
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("SLURM_", "OMPI_", "JAX_COORDINATOR", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"))}
    base.update(XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu", **env)
    argv = [sys.executable, "-m", "nin_jax.main", f"--config={h.REPO / 'configs' / 'digits.py'}",
            f"--workdir={tmp_path / 'run'}", "--config.num_train_steps=2", f"--config.run.cache_dir={tmp_path}"]
    start = time.monotonic()
    # Far below jax's own limit: a process that waits for it (and then aborts) fails the test.
    proc = subprocess.run(argv, cwd=h.REPO, env=base, capture_output=True, text=True, timeout=150)
    return proc, time.monotonic() - start


def _one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Check failure" not in proc.stderr, proc.stderr[-3000:]
    (line,) = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert line == proc.stderr.rstrip().splitlines()[-1]
    return line


def test_python_outside_srun_in_a_two_task_job_is_one_line(tmp_path):
    proc, _ = _train({"SLURM_JOB_ID": "77", "SLURM_NTASKS": "2"}, tmp_path)
    assert _one_line_error(proc).startswith("error: SLURM_NTASKS=2 says this is one of 2 processes, but "
                                            "SLURM_STEP_NODELIST, SLURM_PROCID, SLURM_LOCALID are not set")
    assert not (tmp_path / "run").exists()  # nothing trained or written


@pytest.mark.parametrize("task", [0, 1])  # 0 hosts the coordinator; 1 finds none
def test_one_of_two_srun_tasks_alone_gives_up_after_the_timeout(task, tmp_path):
    port = _free_port()
    env = {"SLURM_JOB_ID": "77", "SLURM_STEP_NODELIST": "localhost", "SLURM_NTASKS": "2", "SLURM_PROCID": str(task),
           "SLURM_LOCALID": str(task), "JAX_COORDINATOR_PORT": str(port), "NIN_JAX_INIT_TIMEOUT": "3"}
    proc, seconds = _train(env, tmp_path)
    assert _one_line_error(proc) == (
        f"error: process {task} of 2 (slurm) waited 3 s for every process of the job to reach the coordinator at "
        f"localhost:{port}, and not all did; start all of them within 3 s of each other, check that "
        f"localhost:{port} is reachable from here, or raise NIN_JAX_INIT_TIMEOUT (seconds).")
    print(f"task {task} alone: exit status 1 after {seconds:.0f} s")
    assert not (tmp_path / "run").exists()
