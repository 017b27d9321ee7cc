"""Joining multi-process jobs: which environments `cluster.maybe_initialize_distributed` recognises, and a real
`srun --ntasks=2` (emulated on this machine) forming one 2-process job that trains exactly like one process
with 2 devices."""

import os
import socket
import subprocess
import sys
import time

import jax
import pytest

from nin_jax.runtime import cluster
from nin_jax.config import ConfigError
import helpers_reliability as h

pytestmark = [pytest.mark.cpu, pytest.mark.slow]  # processes of CPU host devices: ~1 min of setup

LAUNCHER = h.REPO / "launch" / "local_multiprocess.py"
NUM_STEPS = 8
CHANGES = {"num_train_steps": NUM_STEPS, "run.eval_every_steps": NUM_STEPS}
SLURM_PORT_BASE = 61440  # jax's SLURM coordinator port: SLURM_JOB_ID % 4096 + 61440


def _jax_cluster_types() -> dict:
    """jax's cluster detectors by name. Private API, used only to check `cluster.CLUSTER_ENV_VARS` against the
    installed jax (jax has no public list of them)."""
    from jax._src import clusters

    return {c.name: c for c in clusters.ClusterEnv._cluster_types}


@pytest.mark.parametrize("name", sorted(cluster.CLUSTER_ENV_VARS))
def test_cluster_variables_are_what_the_installed_jax_detects(name, monkeypatch):
    detector = _jax_cluster_types()[name]
    names = cluster.CLUSTER_ENV_VARS[name]
    for var in list(os.environ):
        if var.startswith(("SLURM_", "OMPI_")):
            monkeypatch.delenv(var)
    for var in names:
        monkeypatch.setenv(var, "1")
    assert detector.is_env_present() and cluster.detected_cluster() == name
    for var in names:  # each one is needed
        monkeypatch.delenv(var)
        assert not detector.is_env_present() and cluster.detected_cluster() is None
        monkeypatch.setenv(var, "1")
    order = list(_jax_cluster_types())
    assert sorted(cluster.CLUSTER_ENV_VARS, key=order.index) == list(cluster.CLUSTER_ENV_VARS)  # jax's preference


SRUN_2 = {"SLURM_JOB_ID": "77", "SLURM_STEP_NODELIST": "node[001-002]", "SLURM_NTASKS": "2", "SLURM_PROCID": "1",
          "SLURM_LOCALID": "0"}


@pytest.mark.parametrize("nodelist", ["node001", "node001,host2", "node[001-015],host2", "node[001,007-015],host2"])
@pytest.mark.parametrize("port", [None, "1234"])
def test_a_join_timeout_names_the_coordinator_that_jax_connects_to(nodelist, port, monkeypatch):
    env = {**SRUN_2, "SLURM_STEP_NODELIST": nodelist, **({"JAX_COORDINATOR_PORT": port} if port else {})}
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    expected = _jax_cluster_types()["slurm"].get_coordinator_address(None, port)
    assert cluster._job("slurm", env) == ("process 1 of 2", expected)


@pytest.mark.parametrize("env,found,call", [
    ({}, None, None),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1", **SRUN_2},
     "explicit", (("10.0.0.1:1234", 2, 1), {"cluster_detection_method": "deactivate"})),
    (SRUN_2, "slurm", ((), {"cluster_detection_method": "slurm"})),
    ({**SRUN_2, "SLURM_NTASKS": "1", "SLURM_PROCID": "0"}, None, None),  # one task keeps all its GPUs
    ({"OMPI_MCA_orte_hnp_uri": "1531576320.0;tcp://10.96.0.1:34911", "OMPI_COMM_WORLD_SIZE": "4"}, "ompi",
     ((), {"cluster_detection_method": "ompi"})),
])
def test_maybe_initialize_distributed(env, found, call, monkeypatch):
    calls = []

    def initialize(*args, initialization_timeout, heartbeat_timeout_seconds, **kwargs):  # limits: test_cluster_env
        del initialization_timeout, heartbeat_timeout_seconds
        calls.append((args, kwargs))

    monkeypatch.setattr(jax.distributed, "initialize", initialize)
    assert cluster.maybe_initialize_distributed(env) == found
    assert calls == ([call] if call else [])


@pytest.mark.parametrize("env,message", [
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_PROCESS_ID": "0"}, "but JAX_NUM_PROCESSES is not; set all of"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"}, "must be integers"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"}, "JAX_PROCESS_ID=2 must be"),
])
def test_bad_explicit_variables(env, message):
    with pytest.raises(ConfigError, match=message):
        cluster.maybe_initialize_distributed(env)


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:  # jax's coordinator binds [::]:port
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        try:
            s.bind(("::", port))
        except OSError:
            return False
    return True


def slurm_job_id_with_free_port() -> int:
    """A SLURM job id whose coordinator port (SLURM_JOB_ID % 4096 + 61440) is free now."""
    for offset in range(os.getpid() % 4096, os.getpid() % 4096 + 4096):
        if _port_is_free(SLURM_PORT_BASE + offset % 4096):
            return 4096 * 1000 + offset % 4096
    raise RuntimeError("no free port in 61440-65535")


def srun_env(base: dict[str, str], job_id: int, task: int, ntasks: int) -> dict[str, str]:
    """What `srun --ntasks=<ntasks>` gives task `task` on one node, with one CPU device per task."""
    env = {k: v for k, v in base.items() if not k.startswith(("SLURM_", "JAX_COORDINATOR", "JAX_NUM_PROCESSES",
                                                               "JAX_PROCESS_ID"))}
    env.update(SLURM_JOB_ID=str(job_id), SLURM_STEP_NODELIST="localhost", SLURM_STEP_NUM_NODES="1",
               SLURM_NTASKS=str(ntasks), SLURM_PROCID=str(task), SLURM_LOCALID=str(task), SLURM_NODEID="0",
               XLA_FLAGS="--xla_force_host_platform_device_count=1")
    return env


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two srun tasks of the unchanged training command, and one process with 2 devices (through the local
    launcher, so both use gloo collectives), running at the same time."""
    root, cache = tmp_path_factory.mktemp("srun"), h.compile_cache_dir(tmp_path_factory)
    undo = h.enable_compile_cache(cache)
    base, data_cache = h.subprocess_env(cache), root / "data_cache"
    flags = h.config_flags(data_cache, **CHANGES)
    job_id = slurm_job_id_with_free_port()
    out = {"srun": root / "srun", "single": root / "single"}
    procs = [h.start_main(out["srun"], flags, srun_env(base, job_id, task, 2), root / f"task{task}.log")
             for task in range(2)]
    with open(root / "single.log", "w") as log:
        procs.append(subprocess.Popen(
            [sys.executable, str(LAUNCHER), "--num_processes=1", "--devices_per_process=2", "--",
             f"--workdir={out['single']}", *flags], cwd=h.REPO, env=base, stdout=log, stderr=subprocess.STDOUT))
    logs = [root / "task0.log", root / "task1.log", root / "single.log"]
    deadline = time.monotonic() + 500
    try:
        while any(p.poll() is None for p in procs):
            assert time.monotonic() < deadline, "timed out:\n" + "\n".join(h.log_tail(l) for l in logs)
            time.sleep(0.1)
    finally:
        for p in procs:
            p.kill()
        undo()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, f"{log.name} exited with {p.returncode}:\n{h.log_tail(log, 60)}"
    out["logs"] = [l.read_text() for l in logs]
    out["job_id"] = job_id
    return out


@pytest.mark.slow
def test_srun_tasks_form_one_job_that_trains_like_one_process(runs):
    task0, task1, single = runs["logs"]
    for text in (task0, task1):
        assert "nin_digits: 29,412 params, 2 devices on 2 process(es)" in text
    assert "JAX process 1/2" in task1
    assert "nin_digits: 29,412 params, 2 devices on 1 process(es)" in single
    multi, one = h.trajectory(runs["srun"]), h.trajectory(runs["single"])
    assert sorted(multi) == sorted(one) == list(range(1, NUM_STEPS + 1))
    loss_diff = max(abs(multi[s]["train/loss"] - one[s]["train/loss"]) for s in multi)
    print(f"srun job {runs['job_id']} (2 tasks x 1 device) vs 1 process x 2 devices: max |train/loss diff| "
          f"{loss_diff}")
    assert loss_diff <= 1e-5
    results = [h.deterministic_results(runs[name]) for name in ("srun", "single")]
    assert results[0].keys() == results[1].keys()
    for key in results[0]:
        if key.startswith("eval/"):
            assert results[0][key] == results[1][key], key
        else:
            assert results[0][key] == pytest.approx(results[1][key], abs=1e-5), key
    assert results[0]["eval/num_examples"] == 297
