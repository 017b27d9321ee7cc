"""Host settings for the CPU backend, applied by the command-line tools before jax starts.

`prepare` splits the CPU into host devices (data parallel over the cores) and, for training with
`config.run.cpu_kernels`, re-executes the process with malloc huge pages. Hosts with an accelerator plugin
are left alone.

Why huge pages: XLA:CPU's large per-step buffers are mapped fresh for every step, and with the kernel's
transparent huge pages in ``madvise`` mode (the common default) they fault in 4 KiB at a time (the measured
gain is in docs/performance.md). glibc advises huge pages for its allocations when started with
``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` and reads that only at startup, hence the re-execution.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import ml_collections

from nin_jax.config import ConfigError

HUGEPAGES_TUNABLE = "glibc.malloc.hugetlb=1"
# Set to 1 to keep the process as started (no re-execution).
OPT_OUT_VAR = "NIN_JAX_NO_REEXEC"
_THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"


def transparent_hugepage_mode(path: str = _THP_MODE_FILE) -> str | None:
    """The kernel's THP mode (the bracketed word: always, madvise or never), or None if unknown."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def hugepage_env(environ: dict[str, str], thp_mode: str | None) -> dict[str, str] | None:
    """The environment to re-execute with, or None when re-executing would change nothing.

    Only ``madvise`` mode needs the tunable (``always`` already backs large allocations with huge pages and
    ``never`` ignores the advice); an existing hugetlb tunable, or ``NIN_JAX_NO_REEXEC=1``, is respected.
    """
    tunables = environ.get("GLIBC_TUNABLES", "")
    if (thp_mode != "madvise" or environ.get(OPT_OUT_VAR) == "1" or "glibc.malloc.hugetlb" in tunables
            or not sys.platform.startswith("linux")):
        return None
    env = dict(environ)
    env["GLIBC_TUNABLES"] = f"{tunables}:{HUGEPAGES_TUNABLE}" if tunables else HUGEPAGES_TUNABLE
    return env


def reexec_with_hugepages() -> None:
    """Replaces this process by the same command with glibc's huge-page tunable set (see the module doc).

    Call it first thing in a command-line entry point: the process keeps its PID, arguments and the rest of
    its environment, so launchers, signals and exit codes behave as before. Returns if nothing would change.
    """
    env = hugepage_env(dict(os.environ), transparent_hugepage_mode())
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)


# XLA:CPU's in-process collectives (host devices) log a warning when a participant has waited the first
# timeout for the others, and abort the whole process when it has waited the second one more (jaxlib 0.10.2
# defaults: 20 s, then 40 s). Host devices share the cores, so on a loaded machine a participant can wait about
# as long as the others take for a step. Set far above any step on CPU, so that only a real deadlock still
# ends the run (docs/cpu_collectives.md); the warning stays early enough to show where a long wait began.
COLLECTIVE_TIMEOUTS_S = {
    "xla_cpu_collective_call_warn_stuck_timeout_seconds": 120,
    "xla_cpu_collective_call_terminate_timeout_seconds": 3600,
}


def with_collective_timeouts(xla_flags: str) -> str:
    """``xla_flags`` (an XLA_FLAGS value) plus each of `COLLECTIVE_TIMEOUTS_S` it does not already set."""
    added = [f"--{name}={seconds}" for name, seconds in COLLECTIVE_TIMEOUTS_S.items() if name not in xla_flags]
    return " ".join([xla_flags.strip(), *added]).strip()


# Packages whose presence means jax will run on an accelerator (TPU, NVIDIA or AMD GPUs).
_ACCELERATOR_PLUGINS = ("libtpu", "jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "jax_rocm7_plugin")


def cpu_backend_expected(environ: dict[str, str] | None = None) -> bool:
    """Whether jax will run on the CPU, known without initialising it (JAX_PLATFORMS or installed plugins)."""
    platforms = (os.environ if environ is None else environ).get("JAX_PLATFORMS", "")
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    return not any(importlib.util.find_spec(name) is not None for name in _ACCELERATOR_PLUGINS)


def host_cores() -> int:
    """Cores this process may run on (its CPU affinity, where the OS reports one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def host_device_count(requested: int, batch_size: int) -> int:
    """``requested`` host devices, or for 0 one per core this process may use, lowered to a divisor of
    ``batch_size`` so that the data-parallel batch splits evenly."""
    if requested < 0:
        raise ConfigError(f"config.run.num_cpu_devices={requested} must be >= 0 (0: one per core).")
    if requested:
        return requested
    return max(d for d in range(1, host_cores() + 1) if batch_size % d == 0)


def prepare(config: ml_collections.ConfigDict, *, reexec: bool = False) -> None:
    """Call before jax initialises its backends. On a CPU-only host: with `reexec` (training, and the benchmark
    that times its step) and `config.run.cpu_kernels`, re-executes with huge pages (returns only if nothing
    changes); raises the collectives' timeouts (`with_collective_timeouts`, unless XLA_FLAGS sets them); then
    sets the number of host devices (`host_device_count`) unless XLA_FLAGS already sets one. Elsewhere does
    nothing."""
    if not cpu_backend_expected():
        return
    count = host_device_count(config.run.num_cpu_devices, config.batch_size)
    if reexec and config.run.cpu_kernels:
        reexec_with_hugepages()
    # XLA reads XLA_FLAGS when the first backend starts, so this holds even after `import jax`.
    os.environ["XLA_FLAGS"] = with_collective_timeouts(os.environ.get("XLA_FLAGS", ""))
    if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        import jax  # pylint: disable=g-import-not-at-top

        jax.config.update("jax_num_cpu_devices", count)
