"""Runs N JAX processes of `nin_jax.main` on this machine, joined into one multi-process job.

    python launch/local_multiprocess.py --num_processes=2 --devices_per_process=2 -- \
        --config=configs/digits.py --workdir=/tmp/nin_mp

Everything after `--` goes to every process unchanged. Each process gets JAX_COORDINATOR_ADDRESS (a free
localhost port), JAX_NUM_PROCESSES and JAX_PROCESS_ID, which `nin_jax.runtime.cluster.maybe_initialize_distributed`
passes to `jax.distributed.initialize`; process 0 hosts the coordinator. Together they form one mesh over
all their devices, exactly as the hosts of a TPU pod do, and train one model on the same global batches.

* CPU (default): every process gets `--devices_per_process` host devices through
  XLA_FLAGS=--xla_force_host_platform_device_count; collectives run over gloo.
* GPUs: pass `--gpus_per_process=G` instead; process i then sees CUDA_VISIBLE_DEVICES=iG..iG+G-1, e.g. two
  processes with one GPU each on a 2-GPU box: `--num_processes=2 --gpus_per_process=1`.

Each output line is prefixed with `[p<i>]`. SIGTERM and SIGINT are forwarded to every process (a second
SIGINT kills them): SIGTERM is the preemption notice, on which the processes agree on a step, save a
checkpoint and exit with code 143; rerunning the same command resumes. If a process fails, the others are
given `--grace_seconds` to stop on their own (each prints which process it lost and the last committed
checkpoint, and exits with 75, within NIN_JAX_PEER_TIMEOUT seconds) before they are killed, and the launcher
exits with the failed process's code; if the launcher itself dies, the processes get SIGTERM (Linux).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import IO, Sequence

PREEMPTED_EXIT_CODE = 143  # nin_jax.train.PREEMPTED_EXIT_CODE (not imported: the launcher must not import jax)
_DEVICE_COUNT_FLAG = re.compile(r"--xla_force_host_platform_device_count=\S*")


def free_port() -> int:
    """A TCP port on localhost that is free now (the coordinator binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(base: dict[str, str], *, process_id: int, num_processes: int, port: int,
                devices_per_process: int, gpus_per_process: int) -> dict[str, str]:
    """The environment of process `process_id`: coordinator variables and its device selection."""
    env = dict(base)
    env.update(
        JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
        JAX_NUM_PROCESSES=str(num_processes),
        JAX_PROCESS_ID=str(process_id),
        PYTHONUNBUFFERED="1",  # lines reach the launcher as they are printed
    )
    xla_flags = _DEVICE_COUNT_FLAG.sub("", env.get("XLA_FLAGS", "")).strip()
    if gpus_per_process:
        first = process_id * gpus_per_process
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(first + g) for g in range(gpus_per_process))
    else:
        xla_flags = f"{xla_flags} --xla_force_host_platform_device_count={devices_per_process}".strip()
    if xla_flags:
        env["XLA_FLAGS"] = xla_flags
    else:
        env.pop("XLA_FLAGS", None)
    return env


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the launcher dies (Linux), so no orphan keeps training."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _stream(prefix: str, pipe: IO[str], lock: threading.Lock) -> None:
    for line in pipe:
        with lock:
            sys.stdout.write(f"{prefix}{line}")
            sys.stdout.flush()


def _exit_code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode  # killed by signal N -> 128 + N, as a shell says


def launch(command: Sequence[str], *, num_processes: int, devices_per_process: int = 1, gpus_per_process: int = 0,
           port: int = 0, grace_seconds: float = 120.0) -> int:
    """Runs `command` as `num_processes` processes of one JAX job; returns the exit code for the launcher.

    0 if every process succeeded; 143 if they were preempted (all exited 143); otherwise the code of the first
    process that failed (a process killed by signal N counts as 128 + N).
    """
    if num_processes < 1:
        raise ValueError(f"--num_processes={num_processes} must be >= 1.")
    if devices_per_process < 1:
        raise ValueError(f"--devices_per_process={devices_per_process} must be >= 1.")
    if gpus_per_process < 0:
        raise ValueError(f"--gpus_per_process={gpus_per_process} must be >= 0 (0: CPU host devices).")
    port = port or free_port()
    lock = threading.Lock()
    procs: list[subprocess.Popen] = []
    threads = []
    for i in range(num_processes):
        env = process_env(os.environ, process_id=i, num_processes=num_processes, port=port,
                          devices_per_process=devices_per_process, gpus_per_process=gpus_per_process)
        # Own session: a terminal's Ctrl-C reaches the children only once, through the forwarding below.
        p = subprocess.Popen(list(command), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             bufsize=1, start_new_session=True, preexec_fn=_die_with_parent)
        procs.append(p)
        t = threading.Thread(target=_stream, args=(f"[p{i}] ", p.stdout, lock), daemon=True)
        t.start()
        threads.append(t)
    with lock:
        print(f"[launcher] {num_processes} process(es), coordinator 127.0.0.1:{port}, pids "
              f"{[p.pid for p in procs]}", flush=True)

    interrupts = []

    def forward(signum, frame):
        del frame
        interrupts.append(signum)
        sig = signal.SIGKILL if interrupts.count(signal.SIGINT) > 1 else signum
        for p in procs:
            if p.poll() is None:
                p.send_signal(sig)

    def kill_running(reason: str) -> None:
        with lock:
            print(f"[launcher] {reason}; killing the processes still running", flush=True)
        for p in procs:
            if p.poll() is None:
                p.kill()

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        failed, deadline = None, None
        while True:
            codes = [p.poll() for p in procs]
            if all(c is not None for c in codes):
                break
            exits = [(i, _exit_code(c)) for i, c in enumerate(codes) if c not in (None, 0)]
            errors = [(i, c) for i, c in exits if c != PREEMPTED_EXIT_CODE]
            if errors and failed is None:
                # The others notice the lost process themselves (nin_jax.runtime.peers) and stop with one line.
                failed = errors[0]
                deadline = time.monotonic() + grace_seconds
                with lock:
                    print(f"[launcher] process {failed[0]} failed with exit code {failed[1]}; the others have "
                          f"{grace_seconds:.0f}s to stop", flush=True)
            elif exits and deadline is None:  # preempted: the others are saving the same step
                deadline = time.monotonic() + grace_seconds
            elif deadline is not None and time.monotonic() > deadline:
                deadline = float("inf")
                kill_running(f"a process exited {grace_seconds:.0f}s ago")
            time.sleep(0.1)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    for t in threads:
        t.join(timeout=5)
    codes = [_exit_code(p.returncode) for p in procs]
    with lock:
        print(f"[launcher] exit codes {codes}", flush=True)
    if all(c == 0 for c in codes):
        return 0
    if all(c == PREEMPTED_EXIT_CODE for c in codes):
        return PREEMPTED_EXIT_CODE
    if failed is not None:
        return failed[1]
    return next((c for c in codes if c not in (0, PREEMPTED_EXIT_CODE)), PREEMPTED_EXIT_CODE)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" in argv:
        split = argv.index("--")
        own, passthrough = argv[:split], argv[split + 1:]
    else:
        own, passthrough = argv, []
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     epilog="Arguments after `--` are passed to every process.")
    parser.add_argument("--num_processes", type=int, default=2)
    parser.add_argument("--devices_per_process", type=int, default=1,
                        help="host (CPU) devices per process; ignored with --gpus_per_process")
    parser.add_argument("--gpus_per_process", type=int, default=0,
                        help="GPUs per process, selected with CUDA_VISIBLE_DEVICES (0: CPU host devices)")
    parser.add_argument("--port", type=int, default=0, help="coordinator port (0: pick a free one)")
    parser.add_argument("--module", default="nin_jax.main", help="the Python module every process runs")
    parser.add_argument("--grace_seconds", type=float, default=120.0,
                        help="after one process exits (preempted or failed), how long the others may take to stop")
    args = parser.parse_args(own)
    try:
        return launch([sys.executable, "-m", args.module, *passthrough], num_processes=args.num_processes,
                      devices_per_process=args.devices_per_process, gpus_per_process=args.gpus_per_process,
                      port=args.port, grace_seconds=args.grace_seconds)
    except ValueError as e:
        parser.error(str(e))


if __name__ == "__main__":
    sys.exit(main())
