"""Process-level settings of the host that must be in place before Python starts.

XLA:CPU allocates its activations and temporaries with malloc. Buffers of tens of MB are mmap-ed fresh for
every step, and with the kernel's transparent huge pages in ``madvise`` mode (the common default) they fault
in 4 KiB at a time: on a 2-core CPU huge pages made the NIN-CIFAR10 step 3-25% faster, run to run. glibc
advises huge pages for its allocations when started with ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``; glibc
reads that only at startup, so the command-line entry points re-execute themselves once with it set.
"""

from __future__ import annotations

import os
import sys

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
