"""hostenv: host devices, the collectives' timeouts, and when the entry points restart themselves with glibc's
huge-page tunable."""

import subprocess
import sys

import ml_collections
import pytest

from nin_jax.cpu import hostenv

pytestmark = pytest.mark.cpu  # host devices or the CPU kernels


def test_thp_mode_is_the_bracketed_word(tmp_path):
    mode_file = tmp_path / "enabled"
    mode_file.write_text("always [madvise] never\n")
    assert hostenv.transparent_hugepage_mode(str(mode_file)) == "madvise"
    assert hostenv.transparent_hugepage_mode(str(tmp_path / "missing")) is None


def test_tunable_is_added_only_where_it_changes_something():
    env = hostenv.hugepage_env({"PATH": "/bin"}, "madvise")
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    # Other tunables are kept.
    env = hostenv.hugepage_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, "madvise")
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    assert hostenv.hugepage_env({}, "always") is None  # the kernel already uses huge pages
    assert hostenv.hugepage_env({}, "never") is None
    assert hostenv.hugepage_env({}, None) is None
    assert hostenv.hugepage_env({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "madvise") is None  # user's choice
    assert hostenv.hugepage_env({"NIN_JAX_NO_REEXEC": "1"}, "madvise") is None


@pytest.mark.skipif(hostenv.transparent_hugepage_mode() != "madvise" or not sys.platform.startswith("linux"),
                    reason="re-execution only happens with THP in madvise mode")
def test_reexec_keeps_the_command_and_sets_the_tunable():
    code = ("import os, sys; from nin_jax.cpu import hostenv; print('start', flush=True); "
            "hostenv.reexec_with_hugepages(); print(os.environ['GLIBC_TUNABLES'], sys.argv[1:])")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": "."}
    out = subprocess.run([sys.executable, "-c", code, "--flag=1"], env=env, capture_output=True, text=True,
                         check=True).stdout.split("\n")
    # The first start printed once, then the same command ran again with the tunable.
    assert out[:3] == ["start", "start", "glibc.malloc.hugetlb=1 ['--flag=1']"]


def test_host_device_count_defaults_to_a_divisor_of_the_batch_per_core(monkeypatch):
    monkeypatch.setattr(hostenv.os, "sched_getaffinity", lambda pid: set(range(6)), raising=False)
    assert hostenv.host_device_count(0, 128) == 4  # 6 cores, but 128 splits evenly over at most 4
    assert hostenv.host_device_count(0, 96) == 6
    assert hostenv.host_device_count(3, 128) == 3  # an explicit count is kept (the mesh checks divisibility)
    with pytest.raises(ValueError, match="run.num_cpu_devices=-1"):
        hostenv.host_device_count(-1, 128)


def test_accelerator_hosts_are_left_alone(monkeypatch):
    assert hostenv.cpu_backend_expected({"JAX_PLATFORMS": "cpu"})
    assert not hostenv.cpu_backend_expected({"JAX_PLATFORMS": "tpu,cpu"})
    monkeypatch.setattr(hostenv.importlib.util, "find_spec", lambda name: object() if name == "libtpu" else None)
    assert not hostenv.cpu_backend_expected({})


def test_collective_timeouts_are_added_unless_already_set():
    flags = hostenv.with_collective_timeouts("--xla_force_host_platform_device_count=8")
    assert flags == ("--xla_force_host_platform_device_count=8"
                     " --xla_cpu_collective_call_warn_stuck_timeout_seconds=120"
                     " --xla_cpu_collective_call_terminate_timeout_seconds=3600")
    assert hostenv.with_collective_timeouts(flags) == flags  # idempotent
    mine = "--xla_cpu_collective_call_terminate_timeout_seconds=5"
    assert hostenv.with_collective_timeouts(mine) == f"{mine} --xla_cpu_collective_call_warn_stuck_timeout_seconds=120"
    assert hostenv.with_collective_timeouts("") == " ".join(
        f"--{name}={seconds}" for name, seconds in hostenv.COLLECTIVE_TIMEOUTS_S.items())


def test_prepare_sets_the_timeouts_and_keeps_the_users_flags(monkeypatch):
    monkeypatch.setattr(hostenv, "cpu_backend_expected", lambda: True)
    config = ml_collections.ConfigDict({"run": {"num_cpu_devices": 2, "cpu_kernels": False}, "batch_size": 8})
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=3 "
                                    "--xla_cpu_collective_call_warn_stuck_timeout_seconds=7")
    hostenv.prepare(config)  # the device count is in XLA_FLAGS: jax's own setting is left alone
    assert hostenv.os.environ["XLA_FLAGS"] == (
        "--xla_force_host_platform_device_count=3 --xla_cpu_collective_call_warn_stuck_timeout_seconds=7"
        " --xla_cpu_collective_call_terminate_timeout_seconds=3600")
    monkeypatch.setattr(hostenv, "cpu_backend_expected", lambda: False)
    monkeypatch.setenv("XLA_FLAGS", "")
    hostenv.prepare(config)  # an accelerator host: nothing changes
    assert hostenv.os.environ["XLA_FLAGS"] == ""
