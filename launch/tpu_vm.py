"""Trains on a Cloud TPU VM (one host or a multi-host pod slice) with gcloud.

    python launch/tpu_vm.py create --name=nin --zone=us-central2-b --accelerator_type=v4-16
    python launch/tpu_vm.py setup  --name=nin --zone=us-central2-b --accelerator_type=v4-16
    python launch/tpu_vm.py train  --name=nin --zone=us-central2-b --accelerator_type=v4-16 \\
        --config=configs/cifar10.py --workdir=gs://BUCKET/nin/cifar10 [--config.model.head=fc ...]
    python launch/tpu_vm.py sweep  ... --sweep=gap_vs_fc --root=gs://BUCKET/sweeps --config=configs/cifar10.py
    python launch/tpu_vm.py logs   ... [--job=train] [--follow] [--collect=DIR]
    python launch/tpu_vm.py delete ...
    python launch/tpu_vm.py all    ... --config=... --workdir=gs://... (create, setup, train, collect logs, delete)

`--dry_run` prints every command (gcloud and local) instead of running it.

Code transfer: `setup` packs the committed tree (`git archive HEAD`, so the VM runs a known commit; commit
first) and copies it to every worker with `gcloud compute tpus tpu-vm scp --worker=all` (no repository access
or credentials needed on the VM). It then makes a Python 3.11 virtual environment with uv (the TPU base images
ship Python 3.10, older than the pinned packages need) and installs requirements.txt plus `jax[tpu]` at the
pinned jax version. `train` and `sweep` run the same command on every worker (`--worker=all`); each worker
writes its output to ~/nin_logs/<job>.log and the command's output streams back (`--background` detaches it
instead: follow it with `logs --follow`). With more than one worker, the workdir must be a gs:// path that all
workers share.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shlex
import subprocess
import sys
from typing import Callable, Sequence

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from nin_jax.tools import sweeps

# Remote paths are relative to the home directory, where ssh commands start and scp paths are resolved.
REMOTE_DIR = "nin_jax"
REMOTE_VENV = "nin_venv"
REMOTE_LOGS = "nin_logs"
REMOTE_TARBALL = "nin_jax.tar.gz"
# Hosts of a slice per accelerator family: TensorCores per host for v2/v3/v4/v5p (the name counts cores),
# chips per host for v5e/v6e (the name counts chips; up to 8 chips are one host).
_CORES_PER_HOST = {"v2": 8, "v3": 8, "v4": 8, "v5p": 8}
_CHIPS_PER_HOST = {"v5litepod": 4, "v6e": 4}
# On a TPU VM the slice's workers are known from the metadata server, not the environment; exporting them
# makes `nin_jax.mesh.maybe_initialize_distributed` call jax.distributed.initialize() on multi-host slices.
_METADATA = "http://metadata.google.internal/computeMetadata/v1/instance/attributes"
_WORKER_ENV = (
    f"export TPU_WORKER_ID=$(curl -sf -H Metadata-Flavor:Google {_METADATA}/agent-worker-number); "
    f"export TPU_WORKER_HOSTNAMES=$(curl -sf -H Metadata-Flavor:Google {_METADATA}/worker-network-endpoints"
    " | tr , '\\n' | awk -F: '{print $NF}' | paste -sd, -)"
)


def num_workers(accelerator_type: str) -> int:
    """Hosts (workers) of a TPU slice, e.g. v4-8 -> 1, v4-16 -> 2, v5litepod-16 -> 4."""
    m = re.fullmatch(r"(v\d+[a-z]*|v5litepod)-(\d+)", accelerator_type)
    if not m or (m[1] not in _CORES_PER_HOST and m[1] not in _CHIPS_PER_HOST):
        raise ValueError(
            f"--accelerator_type={accelerator_type!r} is not a known TPU type (e.g. v4-16, v5p-32, v5litepod-16, "
            "v6e-8); pass --num_workers for other types."
        )
    family, n = m[1], int(m[2])
    if family in _CORES_PER_HOST:
        return max(1, n // _CORES_PER_HOST[family])
    return 1 if n <= 8 else n // _CHIPS_PER_HOST[family]


@dataclasses.dataclass(frozen=True)
class VM:
    name: str
    zone: str
    accelerator_type: str
    version: str
    project: str | None = None
    spot: bool = False
    workers: int = 1

    def gcloud(self, verb: str, *args: str) -> list[str]:
        project = [f"--project={self.project}"] if self.project else []
        return ["gcloud", "compute", "tpus", "tpu-vm", verb, *args, f"--zone={self.zone}", *project]


def create_command(vm: VM) -> list[str]:
    return vm.gcloud("create", vm.name, f"--accelerator-type={vm.accelerator_type}", f"--version={vm.version}",
                     *(["--spot"] if vm.spot else []))


def delete_command(vm: VM) -> list[str]:
    return vm.gcloud("delete", vm.name, "--quiet")


def ssh_command(vm: VM, remote: str, worker: str = "all") -> list[str]:
    """Runs the shell command `remote` on `worker` (all: every worker at once)."""
    return vm.gcloud("ssh", vm.name, f"--worker={worker}", f"--command={remote}")


def scp_command(vm: VM, src: str, dst: str, worker: str = "all") -> list[str]:
    return vm.gcloud("scp", src, dst, f"--worker={worker}")


def _pinned_jax_version() -> str:
    with open(os.path.join(REPO_ROOT, "requirements.txt")) as f:
        for line in f:
            m = re.match(r"jax==(\S+)", line.strip())
            if m:
                return m[1]
    raise ValueError("requirements.txt pins no jax version (a line jax==X); the TPU install needs it.")


def setup_commands(vm: VM, tarball: str, python: str = "3.11") -> list[list[str]]:
    """Pack the committed tree, copy it to every worker, unpack it and install the pinned environment."""
    jax_tpu = f"jax[tpu]=={_pinned_jax_version()}"
    uv = "$HOME/.local/bin/uv"
    remote = " && ".join([
        "set -e",
        f"rm -rf {REMOTE_DIR} && mkdir -p {REMOTE_DIR} {REMOTE_LOGS}",
        f"tar -xzf {REMOTE_TARBALL} -C {REMOTE_DIR}",
        f"(test -x {uv} || curl -LsSf https://astral.sh/uv/install.sh | sh)",
        f"{uv} venv --python {shlex.quote(python)} {REMOTE_VENV}",
        f"{uv} pip install --python {REMOTE_VENV}/bin/python -r {REMOTE_DIR}/requirements.txt {shlex.quote(jax_tpu)}",
        f"{REMOTE_VENV}/bin/python -c 'import jax; print(jax.process_index(), jax.local_device_count(), "
        "jax.device_count(), jax.devices()[0].device_kind)'",
    ])
    return [
        ["git", "-C", REPO_ROOT, "archive", "--format=tar.gz", f"--output={tarball}", "HEAD"],
        scp_command(vm, tarball, f"{vm.name}:{REMOTE_TARBALL}"),
        ssh_command(vm, remote),
    ]


def remote_job(job: str, argv: Sequence[str], *, background: bool) -> str:
    """The shell command every worker runs: `argv` in the code directory, its output in ~/nin_logs/<job>.log."""
    log = f"{REMOTE_LOGS}/{job}.log"
    run = f"source {REMOTE_VENV}/bin/activate && cd {REMOTE_DIR} && {_WORKER_ENV} && {shlex.join(argv)}"
    if background:  # survives the ssh session; all three streams redirected so ssh returns at once
        return f"mkdir -p {REMOTE_LOGS} && setsid nohup bash -c {shlex.quote(run)} > {log} 2>&1 < /dev/null &"
    return f"mkdir -p {REMOTE_LOGS} && set -o pipefail && ({run}) 2>&1 | tee {log}"


def _check_shared_path(vm: VM, flag: str, path: str) -> None:
    if vm.workers > 1 and not path.startswith("gs://"):
        raise ValueError(
            f"{flag}={path}: the {vm.workers} workers of {vm.accelerator_type} must share the checkpoint "
            f"directory; use a gs:// path (e.g. {flag}=gs://BUCKET/nin/run1)."
        )


def train_argv(config: str, workdir: str, overrides: Sequence[str]) -> list[str]:
    return ["python", "-m", "nin_jax.main", f"--config={config}", f"--workdir={workdir}",
            *overrides]


def sweep_argv(sweep: str, root: str, config: str, overrides: Sequence[str], points: str = "") -> list[str]:
    sweeps.get_sweep(sweep)  # an unknown name fails here, before any VM time is spent
    return ["python", "launch/sweep.py", f"--sweep={sweep}", f"--root={root}",
            f"--config={config}", *overrides, *([f"--points={points}"] if points else [])]


def logs_commands(vm: VM, job: str, *, lines: int, follow: bool, collect: str | None,
                  worker: str = "all") -> list[list[str]]:
    """Tail each worker's log, or copy every worker's log to <collect>/worker<i>/."""
    log = f"{REMOTE_LOGS}/{job}.log"
    if collect:
        cmds = []
        for i in range(vm.workers):
            local = os.path.join(collect, f"worker{i}")
            cmds += [["mkdir", "-p", local], scp_command(vm, f"{vm.name}:{log}", local + "/", worker=str(i))]
        return cmds
    return [ssh_command(vm, f"tail -n {lines}{' -F' if follow else ''} {log}", worker=worker)]


def _overrides(rest: Sequence[str]) -> list[str]:
    """Only `--config.<field>=<value>` may pass through to nin_jax.main."""
    bad = [a for a in rest if not a.startswith("--config.")]
    if bad:
        raise ValueError(f"unrecognized arguments {bad}; config overrides look like --config.model.head=fc.")
    return list(rest)


class Runner:
    """Prints each command (shell-quoted); runs it unless dry-run."""

    def __init__(self, dry_run: bool, out: Callable[[str], None] = print):
        self.dry_run, self.out = dry_run, out

    def __call__(self, cmd: list[str]) -> None:
        self.out(shlex.join(cmd))
        if not self.dry_run:
            subprocess.run(cmd, check=True)


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--name", required=True, help="TPU VM name")
    common.add_argument("--zone", required=True, help="e.g. us-central2-b")
    common.add_argument("--project", default=None, help="default: gcloud's configured project")
    common.add_argument("--accelerator_type", default="v4-8", help="e.g. v4-8, v4-16, v5litepod-16, v6e-8")
    common.add_argument("--version", default="tpu-ubuntu2204-base",
                        help="TPU runtime image (v5e: v2-alpha-tpuv5-lite, v6e: v2-alpha-tpuv6e)")
    common.add_argument("--num_workers", type=int, default=None, help="hosts of the slice (default: from the type)")
    common.add_argument("--dry_run", action="store_true", help="print the commands instead of running them")

    def job_args(p: argparse.ArgumentParser, *, sweep: bool) -> None:
        p.add_argument("--config", required=sweep, help="config file, relative to the repository root")
        if sweep:
            p.add_argument("--sweep", required=True, help=f"one of {sorted(sweeps.SWEEPS)}")
            p.add_argument("--root", required=True, help="gs:// sweep root")
            p.add_argument("--points", default="", help="comma-separated subset of the sweep's points")
        else:
            p.add_argument("--workdir", help="gs:// workdir")
        p.add_argument("--background", action="store_true", help="detach; follow with `logs --follow`")

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("create", parents=[common], help="create the TPU VM")
    c.add_argument("--spot", action="store_true", help="a Spot VM (cheaper, preemptible)")
    sub.add_parser("setup", parents=[common], help="copy the code to every worker and install the environment")
    job_args(sub.add_parser("train", parents=[common], help="python -m nin_jax.main on every worker"), sweep=False)
    job_args(sub.add_parser("sweep", parents=[common], help="launch/sweep.py on every worker"), sweep=True)
    lg = sub.add_parser("logs", parents=[common], help="tail or collect the workers' logs")
    lg.add_argument("--job", default="train", help="train, or sweep-<name> for a sweep")
    lg.add_argument("--lines", type=int, default=50)
    lg.add_argument("--follow", action="store_true")
    lg.add_argument("--worker", default="all", help="all, or one worker index")
    lg.add_argument("--collect", default=None, metavar="DIR", help="copy each worker's log to DIR/worker<i>/")
    sub.add_parser("delete", parents=[common], help="delete the TPU VM")
    a = sub.add_parser("all", parents=[common], help="create, setup, train or sweep, collect logs, delete")
    a.add_argument("--spot", action="store_true")
    a.add_argument("--config", required=True)
    a.add_argument("--workdir", help="gs:// workdir (train)")
    a.add_argument("--sweep", help="run this sweep instead of one training run")
    a.add_argument("--root", help="gs:// sweep root (with --sweep)")
    a.add_argument("--points", default="")
    a.add_argument("--collect", default="tpu_logs", metavar="DIR", help="where the workers' logs are copied")
    a.add_argument("--keep_vm", action="store_true", help="do not delete the VM at the end")
    return parser


def main(argv: Sequence[str] | None = None, out: Callable[[str], None] = print) -> int:
    args, rest = _parser().parse_known_args(argv)
    try:
        overrides = _overrides(rest)
        workers = args.num_workers or num_workers(args.accelerator_type)
        vm = VM(args.name, args.zone, args.accelerator_type, args.version, args.project,
                getattr(args, "spot", False), workers)
        run = Runner(args.dry_run, out)
        tarball = os.path.join("/tmp", f"nin_jax-{vm.name}.tar.gz")

        def job(background: bool) -> tuple[str, str]:
            """(job name, remote command) of a train or sweep subcommand, validated before anything runs."""
            if args.command == "sweep" or getattr(args, "sweep", None):
                if not args.root:
                    raise ValueError("--root is required with --sweep (a gs:// sweep root).")
                _check_shared_path(vm, "--root", args.root)
                argv_ = sweep_argv(args.sweep, args.root, args.config, overrides, args.points)
                return f"sweep-{args.sweep}", remote_job(f"sweep-{args.sweep}", argv_, background=background)
            if not args.config or not args.workdir:
                raise ValueError("--config and --workdir are required to train.")
            _check_shared_path(vm, "--workdir", args.workdir)
            return "train", remote_job("train", train_argv(args.config, args.workdir, overrides), background=background)

        if args.command == "create":
            run(create_command(vm))
        elif args.command == "setup":
            for cmd in setup_commands(vm, tarball):
                run(cmd)
        elif args.command in ("train", "sweep"):
            run(ssh_command(vm, job(args.background)[1]))
        elif args.command == "logs":
            for cmd in logs_commands(vm, args.job, lines=args.lines, follow=args.follow, collect=args.collect,
                                     worker=args.worker):
                run(cmd)
        elif args.command == "delete":
            run(delete_command(vm))
        else:  # all: the VM is deleted even if a step fails, so nothing is left running (and billed)
            name, remote = job(background=False)
            run(create_command(vm))
            try:
                for cmd in setup_commands(vm, tarball):
                    run(cmd)
                try:
                    run(ssh_command(vm, remote))
                finally:
                    for cmd in logs_commands(vm, name, lines=0, follow=False, collect=args.collect):
                        run(cmd)
            finally:
                if not args.keep_vm:
                    run(delete_command(vm))
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except subprocess.CalledProcessError as e:
        print(f"error: command failed with exit code {e.returncode}: {shlex.join(e.cmd)}", file=sys.stderr)
        return e.returncode or 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
