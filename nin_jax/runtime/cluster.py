"""Joining a multi-process job (`maybe_initialize_distributed`), before any other use of jax.

TPU VMs are found by jax itself; SLURM's `srun` and Open MPI's `mpirun` from their environment; local runs
from JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID (`launch/local_multiprocess.py`). A
partial environment is refused naming what is missing, and a process that cannot reach the others says so
in one line after `NIN_JAX_INIT_TIMEOUT` seconds.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import socket
import sys
import threading
from typing import Mapping

import jax

from nin_jax.config import ConfigError
from nin_jax.runtime import peers

# What each of jax's cluster detectors (jax/_src/clusters/, jax 0.10.2) needs in the environment, by the name
# `jax.distributed.initialize(cluster_detection_method=...)` accepts. Only the yes/no is decided here; jax
# derives the coordinator, process count and id, and each process's local GPU from the same variables.
CLUSTER_ENV_VARS: dict[str, tuple[str, ...]] = {
    "ompi": ("OMPI_MCA_orte_hnp_uri",),  # set by the mpirun of Open MPI 4 (ORTE)
    "slurm": ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID"),  # srun
}
# Set by local launchers (launch/local_multiprocess.py); they win over any cluster environment.
EXPLICIT_ENV_VARS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
# The process count each cluster environment states (jax reads the same variable). A count above 1 means this
# process is one of several, so every variable of `CLUSTER_ENV_VARS` must then be there.
_PROCESS_COUNT_VAR = {"ompi": "OMPI_COMM_WORLD_SIZE", "slurm": "SLURM_NTASKS"}
_INTEGER_VARS = {"ompi": ("OMPI_COMM_WORLD_SIZE",), "slurm": ("SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_PROCID",
                                                             "SLURM_LOCALID")}
# How to start the processes so that each gets the variables, per cluster environment.
_HOW_TO_START = {
    "ompi": "only the mpirun of Open MPI 4 sets it (Open MPI 5's does not): use Open MPI 4, srun, or "
            "launch/local_multiprocess.py, or give every process JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and "
            "JAX_PROCESS_ID",
    "slurm": "srun sets them: start every task with srun (`srun python -m nin_jax.main ...`, as "
             "launch/slurm.sbatch does), or one process with `srun --ntasks=1 ...`",
}
# jax's SLURM coordinator port, unless JAX_COORDINATOR_PORT sets it: SLURM_JOB_ID % 4096 + 61440.
_SLURM_PORT_BASE, _SLURM_PORT_RANGE = 61440, 4096

# How long the processes of a job wait for each other when they join it, in seconds: every process must have
# started within this time of the first. Without a bound, a process whose peers never come waits in silence
# for jax's own limit and then aborts with a C++ stack trace.
INIT_TIMEOUT_VAR = "NIN_JAX_INIT_TIMEOUT"
DEFAULT_INIT_TIMEOUT_SECONDS = 300
# jax's own limit is set this much later, so the one-line error below always comes first.
_JAX_TIMEOUT_MARGIN_SECONDS = 60


def detected_cluster(env: Mapping[str, str] = os.environ) -> str | None:
    """The cluster environment of `CLUSTER_ENV_VARS` that `env` describes, in jax's order of preference."""
    return next((name for name, names in CLUSTER_ENV_VARS.items() if all(n in env for n in names)), None)


def _int_var(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise ConfigError(f"{name}={env[name]!r} must be an integer; unset it or start the job with its "
                          "launcher, which sets it.") from None


def init_timeout_seconds(env: Mapping[str, str] = os.environ) -> int:
    """`NIN_JAX_INIT_TIMEOUT` (seconds), by default `DEFAULT_INIT_TIMEOUT_SECONDS`."""
    return peers.seconds_from_env(env, INIT_TIMEOUT_VAR, DEFAULT_INIT_TIMEOUT_SECONDS, minimum=1)


def _explicit_process(env: Mapping[str, str]) -> tuple[str, int, int]:
    """(coordinator address, process count, process id) from `EXPLICIT_ENV_VARS`."""
    present = [n for n in EXPLICIT_ENV_VARS if n in env]
    missing = [n for n in EXPLICIT_ENV_VARS if n not in env]
    if missing:
        raise ConfigError(f"{', '.join(present)} {'is' if len(present) == 1 else 'are'} set but {', '.join(missing)} "
                          f"{'is' if len(missing) == 1 else 'are'} not; set all of {', '.join(EXPLICIT_ENV_VARS)} "
                          "(or launch with launch/local_multiprocess.py), or none.")
    try:
        count, pid = int(env["JAX_NUM_PROCESSES"]), int(env["JAX_PROCESS_ID"])
    except ValueError:
        raise ConfigError(f"JAX_NUM_PROCESSES={env['JAX_NUM_PROCESSES']!r} and JAX_PROCESS_ID="
                          f"{env['JAX_PROCESS_ID']!r} must be integers, e.g. 2 and 0.") from None
    if not 0 <= pid < count:
        raise ConfigError(f"JAX_PROCESS_ID={pid} must be in [0, JAX_NUM_PROCESSES={count}).")
    return env["JAX_COORDINATOR_ADDRESS"], count, pid


def _multi_process_cluster(env: Mapping[str, str]) -> str | None:
    """The cluster environment that says this is one of several processes, in jax's order of preference.

    A process count above 1 with any variable of jax's detector missing is refused: jax would not detect the
    cluster, and the process would train alone (or, started outside `srun`, wait for peers that never come).
    """
    for name, count_var in _PROCESS_COUNT_VAR.items():
        if count_var not in env or _int_var(env, count_var) <= 1:
            continue
        count = int(env[count_var])
        missing = [v for v in CLUSTER_ENV_VARS[name] if v not in env]
        if missing:
            raise ConfigError(
                f"{count_var}={count} says this is one of {count} processes, but {', '.join(missing)} "
                f"{'is' if len(missing) == 1 else 'are'} not set, which jax needs to join them; {_HOW_TO_START[name]}.")
        for var in _INTEGER_VARS[name]:
            _int_var(env, var)
        return name
    return None


def _slurm_port(env: Mapping[str, str]) -> str:
    """The port of a SLURM job's coordinator, as jax picks it."""
    return env.get("JAX_COORDINATOR_PORT") or str(int(env["SLURM_JOB_ID"]) % _SLURM_PORT_RANGE + _SLURM_PORT_BASE)


def _coordinator_port(cluster: str, env: Mapping[str, str]) -> int | None:
    """The port process 0 will host the coordinator on, where known before jax starts (else None)."""
    if "JAX_COORDINATOR_BIND_ADDRESS" in env:
        return None  # bound elsewhere; jax reports its own failures there
    if cluster == "explicit":
        port = env["JAX_COORDINATOR_ADDRESS"].rpartition(":")[2]
    elif cluster == "slurm":
        port = _slurm_port(env)
    else:
        return None
    if not port.isdigit():
        raise ConfigError(f"the coordinator port {port!r} (from JAX_COORDINATOR_ADDRESS or JAX_COORDINATOR_PORT) must "
                          "be a number, e.g. JAX_COORDINATOR_ADDRESS=10.0.0.1:1234.")
    return int(port)


def _check_port_free(port: int) -> None:
    """Raises `ConfigError` if this host cannot bind `port` (jax's coordinator then crashes the process)."""
    try:
        s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    except OSError:
        return  # no IPv6 here: jax binds [::] and reports the failure itself
    with s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC does: a closed connection does not count
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # jax's coordinator binds [::]:port, both stacks
        try:
            s.bind(("::", port))
        except OSError as e:
            raise ConfigError(
                f"process 0 hosts the job's coordinator on port {port}, which {socket.gethostname()} cannot bind "
                f"({e.strerror}); end what holds it, or pick a free port (JAX_COORDINATOR_PORT under SLURM, "
                "JAX_COORDINATOR_ADDRESS otherwise).") from None


def _first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM host list ('gpu[03-04,07],cpu1' -> 'gpu03'): where jax's SLURM detector puts
    the coordinator."""
    prefix, _, ranges = nodelist.split(",", 1)[0].partition("[")  # 'gpu[03-04' -> 'gpu', '03-04'
    return prefix + ranges.split("-", 1)[0].rstrip("]")


def _job(how: str, env: Mapping[str, str]) -> tuple[str, str]:
    """(this process, the coordinator) as a timeout message names them, from what jax reads to find them."""
    if how == "slurm":
        return (f"process {env['SLURM_PROCID']} of {env['SLURM_NTASKS']}",
                f"{_first_slurm_host(env['SLURM_STEP_NODELIST'])}:{_slurm_port(env)}")
    if how == "ompi":
        return (f"process {env.get('OMPI_COMM_WORLD_RANK', '?')} of {env['OMPI_COMM_WORLD_SIZE']}",
                "the mpirun host (OMPI_MCA_orte_hnp_uri)")
    return "this process", "worker 0 of the TPU slice"


def _join(how: str, timeout: int, heartbeat: int, who: str, address: str, *args: object, **kwargs: object) -> None:
    """`jax.distributed.initialize(*args, **kwargs)`, or, when not every process has joined within `timeout`
    seconds, one line `error: ...` naming `who` (this process), the coordinator `address`, and exit status 1."""
    joined = threading.Event()

    def give_up() -> None:
        if joined.wait(timeout):
            return
        print(f"error: {who} ({how}) waited {timeout} s for every process of the job to reach the coordinator at "
              f"{address}, and not all did; start all of them within {timeout} s of each other, check that "
              f"{address} is reachable from here, or raise {INIT_TIMEOUT_VAR} (seconds).", file=sys.stderr, flush=True)
        # The main thread is blocked inside jax's C++ client, which no Python exception can interrupt.
        os._exit(1)

    threading.Thread(target=give_up, name="distributed-init-timeout", daemon=True).start()
    logging.info("Joining a multi-process job (%s); waiting up to %d s for every process (%s overrides).", how,
                 timeout, INIT_TIMEOUT_VAR)
    try:
        jax.distributed.initialize(*args, initialization_timeout=timeout + _JAX_TIMEOUT_MARGIN_SECONDS,
                                   heartbeat_timeout_seconds=heartbeat, **kwargs)
    finally:
        joined.set()


def maybe_initialize_distributed(env: Mapping[str, str] = os.environ) -> str | None:
    """Joins a multi-process job when one is configured; returns how it was found (None: a single process).

    * "explicit": JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID (local multi-process runs).
      Cluster detection is switched off, so inside a SLURM allocation every process keeps all its devices.
    * "slurm", "ompi": `srun` or Open MPI's `mpirun` started more than one process. jax's own detection
      then finds the coordinator (SLURM: the first node of the step, port SLURM_JOB_ID % 4096 + 61440;
      JAX_COORDINATOR_PORT overrides it) and gives each process one GPU, number SLURM_LOCALID (Open MPI:
      the local rank); JAX_LOCAL_DEVICE_IDS=0,1,... overrides that, e.g. for one process per node. One task
      alone keeps every device it sees and needs no coordinator.
    * "tpu": jax[tpu] is installed; jax finds the slice's workers in the TPU VM metadata (one worker is a
      one-process job). Without slice metadata, training continues as a single process, with a warning.

    A partial environment is refused with `ConfigError` naming what is missing: some but not all of the explicit
    variables, or a cluster's process count above 1 without every variable its detector needs (e.g. SLURM
    variables outside `srun`). Every process must join within `NIN_JAX_INIT_TIMEOUT` seconds (default 300) of the
    first; otherwise each waiting one prints a line naming the coordinator and exits with status 1. jax's
    heartbeat timeout is set behind `NIN_JAX_PEER_TIMEOUT` (`peers`), which ends the job first when a process is lost.
    """
    timeout = init_timeout_seconds(env)
    heartbeat = peers.jax_heartbeat_timeout(env)  # jax's backstop behind `peers.PeerWatch`
    if any(n in env for n in EXPLICIT_ENV_VARS):
        address, count, pid = _explicit_process(env)
        port = _coordinator_port("explicit", env) if pid == 0 else None
        if port is not None:
            _check_port_free(port)
        _join("JAX_COORDINATOR_ADDRESS", timeout, heartbeat, f"process {pid} of {count}", address, address, count, pid,
              cluster_detection_method="deactivate")
        return "explicit"
    cluster = _multi_process_cluster(env)
    if cluster is not None:
        port = _coordinator_port(cluster, env) if cluster == "slurm" and int(env["SLURM_PROCID"]) == 0 else None
        if port is not None:
            _check_port_free(port)
        _join(cluster, timeout, heartbeat, *_job(cluster, env), cluster_detection_method=cluster)
        return cluster
    if importlib.util.find_spec("libtpu") is not None:
        try:
            _join("Cloud TPU", timeout, heartbeat, *_job("tpu", env))
        except (RuntimeError, ValueError) as e:
            logging.warning("jax.distributed.initialize() failed (%s); running as a single process.", e)
            return None
        return "tpu"
    return None
