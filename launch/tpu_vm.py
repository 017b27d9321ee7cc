"""Trains on a Cloud TPU VM (one host or a multi-host pod slice) with gcloud.

    python launch/tpu_vm.py create --name=nin --zone=us-central2-b --accelerator_type=v4-16 [--queued --spot]
    python launch/tpu_vm.py setup  --name=nin --zone=us-central2-b --accelerator_type=v4-16
    python launch/tpu_vm.py train  --name=nin --zone=us-central2-b --accelerator_type=v4-16 --background \\
        --config=configs/cifar10.py --workdir=gs://BUCKET/nin/cifar10 [--config.model.head=fc ...]
    python launch/tpu_vm.py sweep  ... --sweep=gap_vs_fc --root=gs://BUCKET/sweeps --config=configs/cifar10.py
    python launch/tpu_vm.py logs   ... [--job=train] [--follow] [--collect=DIR]
    python launch/tpu_vm.py stop   ...   (ends the job on every worker and frees the TPU)
    python launch/tpu_vm.py delete ...
    python launch/tpu_vm.py all    ... --config=... --workdir=gs://... (create, setup, train, collect logs, delete)

`--dry_run` prints every command (gcloud and local) instead of running it. Every subcommand takes the ssh
options `--internal_ip`, `--tunnel_through_iap` and `--ssh_flag=...` (repeatable; passed to ssh only).

* Every subcommand refuses an accelerator type of a size its generation does not come in (e.g. v4-9); a type
  of another generation needs `--num_workers` and `--version`.
* `create` picks the runtime image of the TPU generation (`runtime_version`; `--version` overrides it).
  `--queued` asks for the slice through a queued resource and waits until it is ACTIVE (`delete --queued`
  deletes both); `--spot` makes it a Spot slice.
* `setup` ships the committed tree (`git archive HEAD`) to every worker with `gcloud ... scp` (no repository
  access or credentials needed on the VM) and refuses a working tree with uncommitted changes, which would
  not be shipped; `--allow_dirty` ships the working tree as it is instead (untracked files included,
  ignored ones not). It installs uv and a Python 3.11 virtual environment once, then syncs
  requirements.txt plus `jax[tpu]` at the pinned jax version; rerunning it only updates the code and
  packages. It refuses while a job runs (the TPU would be busy): `stop` first, and it replaces the code
  directory only while that holds nothing but what setup shipped there (a workdir written inside it stops it).
* `train`, `sweep` and `all` first check, on this machine, the config file (relative to the repository root),
  its `--config.` overrides and the workdir (gs://, or an absolute path on a one-worker VM that is kept).
* `train` and `sweep` first stop whatever job still runs, then start the command on every worker, detached
  from ssh (`setsid nohup`, its own process group): a dropped connection does not end it. Each worker logs
  to ~/nin_logs/<job>.log and copies that log to <workdir>/logs/<job>.worker<i>.log every 5 minutes and
  at the end (`gcloud storage cp` for gs://). Without `--background` the command then follows the logs and
  returns the job's exit code; if the connection drops, the job goes on (`logs --follow` picks it up).
* A run that lost a process (a worker's training exits with 75 when another process of the job stops
  answering, 137 when it was killed, e.g. by the OOM killer) starts again on every worker, at most `--restarts`
  times (default 3), and resumes from the last committed checkpoint; `stop` ends it without a restart. A
  preempted or deleted VM ends the wrappers too: rerun `train` (or `all`) on the new VM to resume.
* `stop` sends SIGTERM to each job's process group (training saves a checkpoint and exits; a rerun of the
  same command resumes), SIGKILL after `--grace_seconds`, then kills any process still holding the TPU
  devices and removes the libtpu lockfile.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from typing import Callable, Sequence

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from absl import flags
from ml_collections import config_flags

from nin_jax import config as config_lib
from nin_jax.config import ConfigError
from nin_jax.runtime import cli
from nin_jax.tools import sweeps

# Remote paths are relative to the home directory, where ssh commands start and scp paths are resolved.
REMOTE_DIR = "nin_jax"
REMOTE_VENV = "nin_venv"
REMOTE_LOGS = "nin_logs"
REMOTE_TARBALL = "nin_jax.tar.gz"
SHIPPED_LIST = ".shipped_by_setup"  # in REMOTE_DIR: the files setup put there, one a line
# Hosts of a slice per accelerator family: TensorCores per host for v2/v3/v4/v5p (the name counts cores),
# chips per host for v5e/v6e (the name counts chips; up to 8 chips are one host).
_CORES_PER_HOST = {"v2": 8, "v3": 8, "v4": 8, "v5p": 8}
_CHIPS_PER_HOST = {"v5litepod": 4, "v6e": 4}
# TPU software (runtime) versions per family, from the Cloud TPU docs.
RUNTIME_VERSIONS = {
    "v2": "tpu-ubuntu2204-base",
    "v3": "tpu-ubuntu2204-base",
    "v4": "tpu-ubuntu2204-base",
    "v5litepod": "v2-alpha-tpuv5-lite",  # v5e
    "v5p": "v2-alpha-tpuv5",
    "v6e": "v2-alpha-tpuv6e",
}
# Worker index and host names from the VM metadata: the index names each worker's log copy; the host names
# let jax find the slice without querying the metadata server itself.
_METADATA = "http://metadata.google.internal/computeMetadata/v1/instance/attributes"
_WORKER_ENV = (
    f"export TPU_WORKER_ID=$(curl -sf -H Metadata-Flavor:Google {_METADATA}/agent-worker-number); "
    f"export TPU_WORKER_HOSTNAMES=$(curl -sf -H Metadata-Flavor:Google {_METADATA}/worker-network-endpoints"
    " | tr , '\\n' | awk -F: '{print $NF}' | paste -sd, -)"
)
# The devices a TPU VM's runtime opens: /dev/accel* up to v4 and v5p, VFIO groups on v5e and v6e.
_TPU_DEVICES = "/dev/accel* /dev/vfio/[0-9]*"
_LOG_COPY_SECONDS = 300
# A training process that lost another process of the job exits with 75 (nin_jax.runtime.peers); one killed
# outright (kill -9, the kernel's OOM killer) reads 137. Either way the others end too, and the job resumes from
# its last committed checkpoint when every worker starts it again. The pause lets the ended process's TPU runtime
# release the chips and the coordinator's port before the next start claims them.
RESTART_EXIT_CODES = (75, 137)
RESTART_DELAY_SECONDS = 10
_QUEUED_FAILED = ("FAILED", "SUSPENDED", "SUSPENDING")


# The sizes each generation comes in; the number in the type counts TensorCores on v2, v3, v4 and v5p (2 per
# chip) and chips on v5e and v6e. From the Cloud TPU docs (cloud.google.com/tpu/docs/):
# * v2 (docs/v2): v2-8, v2-32, v2-128, v2-256, v2-512 (a pod: 256 chips, 512 TensorCores).
# * v3 (docs/v3): v3-8, v3-32, v3-64 ... v3-2048 (a pod: 1024 chips).
# * v4 and v5p (docs/types-topologies, docs/v4, docs/v5p): a 3D topology AxBxC whose sides are all <= 4 or all
#   multiples of 4, in whole hosts of 4 chips: 4, 8, 16 or 32 chips (2x2x1 to 2x4x4) or whole 4x4x4 cubes
#   (a multiple of 64 chips), up to the largest slice: a v4 pod of 4096 chips, v5p's 16x16x24 (6144 chips).
# * v5e (v5litepod, docs/v5e) and v6e (docs/v6e): the 2D topologies 1x1, 2x2, 2x4, 4x4, 4x8, 8x8, 8x16, 16x16.
_LISTED_SIZES = {"v2": (8, 32, 128, 256, 512), "v3": (8, 32, 64, 128, 256, 512, 1024, 2048),
                 "v5litepod": (1, 4, 8, 16, 32, 64, 128, 256), "v6e": (1, 4, 8, 16, 32, 64, 128, 256)}
_CUBE_CHIPS = 64
_LARGEST_CHIPS = {"v4": 4096, "v5p": 6144}


def _size_ok(family: str, n: int) -> bool:
    if family in _LISTED_SIZES:
        return n in _LISTED_SIZES[family]
    chips, odd = divmod(n, 2)
    return not odd and (chips in (4, 8, 16, 32) or (chips % _CUBE_CHIPS == 0 and chips <= _LARGEST_CHIPS[family]))


def _sizes(family: str) -> str:
    """The valid sizes of `family` in words, for error messages."""
    if family in _LISTED_SIZES:
        unit = "chips" if family in _CHIPS_PER_HOST else "TensorCores"
        return f"{', '.join(f'{family}-{n}' for n in _LISTED_SIZES[family])} ({unit})"
    return (f"{family}-8, {family}-16, {family}-32, {family}-64, or a multiple of {2 * _CUBE_CHIPS} up to "
            f"{family}-{2 * _LARGEST_CHIPS[family]} (TensorCores, 2 per chip)")


def _known_family(accelerator_type: str) -> re.Match | None:
    """The match (family, size) of a type of a generation this launcher knows, else None."""
    m = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", accelerator_type)
    return m if m and m[1] in RUNTIME_VERSIONS else None


def _family(accelerator_type: str) -> tuple[str, int]:
    m = _known_family(accelerator_type)
    if m is None:
        raise ConfigError(
            f"--accelerator_type={accelerator_type!r} is not a known TPU type (e.g. v4-16, v5p-32, v5litepod-16, "
            "v6e-8); pass --num_workers and --version for other types."
        )
    family, n = m[1], int(m[2])
    if not _size_ok(family, n):
        raise ConfigError(f"--accelerator_type={accelerator_type}: {family} slices come as {_sizes(family)}; pick "
                          "one of those (see `gcloud compute tpus accelerator-types list --zone=ZONE`).")
    return family, n


def num_workers(accelerator_type: str) -> int:
    """Hosts (workers) of a TPU slice, e.g. v4-8 -> 1, v4-16 -> 2, v5litepod-16 -> 4."""
    family, n = _family(accelerator_type)
    if family in _CORES_PER_HOST:
        return max(1, n // _CORES_PER_HOST[family])
    return 1 if n <= 8 else n // _CHIPS_PER_HOST[family]


def slice_workers(accelerator_type: str, requested: int | None, version: str | None) -> int:
    """The workers of the slice: from a known type (`requested` must agree), or `requested` for another type,
    which also needs its runtime `version`."""
    if requested is not None and requested < 1:
        raise ConfigError(f"--num_workers={requested} must be >= 1 (the hosts of the slice).")
    if _known_family(accelerator_type) is None and requested is not None and version is not None:
        return requested
    workers = num_workers(accelerator_type)
    if requested is not None and requested != workers:
        raise ConfigError(f"--num_workers={requested} contradicts --accelerator_type={accelerator_type}, a slice of "
                          f"{workers} worker(s); leave --num_workers out.")
    return workers


def runtime_version(accelerator_type: str) -> str:
    """The TPU runtime image for `accelerator_type`, e.g. v6e-8 -> v2-alpha-tpuv6e."""
    return RUNTIME_VERSIONS[_family(accelerator_type)[0]]


@dataclasses.dataclass(frozen=True)
class VM:
    name: str
    zone: str
    accelerator_type: str
    version: str
    project: str | None = None
    spot: bool = False
    workers: int = 1
    queued: bool = False
    ssh_options: tuple[str, ...] = ()  # gcloud flags for ssh and scp: --internal-ip, --tunnel-through-iap
    ssh_flags: tuple[str, ...] = ()  # flags for the ssh client itself (gcloud's --ssh-flag)

    def gcloud(self, verb: str, *args: str, group: str = "tpu-vm") -> list[str]:
        project = [f"--project={self.project}"] if self.project else []
        return ["gcloud", "compute", "tpus", group, verb, *args, f"--zone={self.zone}", *project]


def create_command(vm: VM) -> list[str]:
    spot = ["--spot"] if vm.spot else []
    if vm.queued:
        return vm.gcloud("create", vm.name, f"--node-id={vm.name}", f"--accelerator-type={vm.accelerator_type}",
                         f"--runtime-version={vm.version}", *spot, group="queued-resources")
    return vm.gcloud("create", vm.name, f"--accelerator-type={vm.accelerator_type}", f"--version={vm.version}",
                     *spot)


def queued_state_command(vm: VM) -> list[str]:
    return vm.gcloud("describe", vm.name, "--format=value(state.state)", group="queued-resources")


def delete_command(vm: VM) -> list[str]:
    if vm.queued:  # --force deletes the TPU VM with its queued resource
        return vm.gcloud("delete", vm.name, "--force", "--quiet", group="queued-resources")
    return vm.gcloud("delete", vm.name, "--quiet")


def ssh_command(vm: VM, remote: str, worker: str = "all") -> list[str]:
    """Runs the shell command `remote` on `worker` (all: every worker at once)."""
    return vm.gcloud("ssh", vm.name, f"--worker={worker}", *vm.ssh_options,
                     *(f"--ssh-flag={f}" for f in vm.ssh_flags), f"--command={remote}")


def scp_command(vm: VM, src: str, dst: str, worker: str = "all") -> list[str]:
    return vm.gcloud("scp", src, dst, f"--worker={worker}", *vm.ssh_options)


def _pinned_jax_version() -> str:
    with open(os.path.join(REPO_ROOT, "requirements.txt")) as f:
        for line in f:
            m = re.match(r"jax==(\S+)", line.strip())
            if m:
                return m[1]
    raise ConfigError("requirements.txt pins no jax version (a line jax==X); the TPU install needs it.")


def _git(*args: str, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(["git", "-C", REPO_ROOT, *args], capture_output=True, text=True, env=env)
    if proc.returncode:
        raise ConfigError(f"git {' '.join(args)} failed in {REPO_ROOT} ({proc.stderr.strip()}); setup ships a git "
                          "checkout of nin_jax.")
    return proc.stdout


def source_tree(allow_dirty: bool) -> str:
    """What `setup` ships: HEAD, or with `allow_dirty` a tree of the working tree as it is.

    The tree is written through a temporary index, so the repository's own index and stash stay untouched.
    """
    changes = _git("status", "--porcelain").splitlines()
    if not changes:
        return "HEAD"
    if not allow_dirty:
        shown = ", ".join(c.strip() for c in changes[:5]) + (", ..." if len(changes) > 5 else "")
        raise ConfigError(f"the working tree has uncommitted changes ({shown}) that setup would not ship; "
                          "commit them, or pass --allow_dirty to ship the working tree as it is.")
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, GIT_INDEX_FILE=os.path.join(tmp, "index"))
        _git("read-tree", "HEAD", env=env)
        _git("add", "--all", env=env)
        return _git("write-tree", env=env).strip()


def _refuse_if_running() -> str:
    return (f"{{ for f in {REMOTE_LOGS}/*.pid; do [ -f \"$f\" ] && kill -0 -- -$(cat \"$f\") 2>/dev/null && "
            "{ echo \"error: job $(basename \"$f\" .pid) still runs on $(hostname); run the stop subcommand "
            "first\" >&2; exit 1; }; done; true; }")


def _refuse_unshipped_files() -> str:
    """Shell: fail if the code directory holds anything setup did not ship there (a workdir, data, outputs),
    which replacing the code would delete. Setup lists what it ships in the directory's `SHIPPED_LIST`."""
    unshipped = (f"cd {REMOTE_DIR} && find . -name __pycache__ -prune -o ! -type d ! -path ./{SHIPPED_LIST} -print "
                 f"| LC_ALL=C sort | LC_ALL=C comm -23 - {SHIPPED_LIST}")
    return "\n".join([
        "{",
        f"if [ -e {REMOTE_DIR} ] && [ ! -f {REMOTE_DIR}/{SHIPPED_LIST} ]; then",
        f"  echo \"error: ~/{REMOTE_DIR} on $(hostname) was not made by this setup, which would replace it; check "
        f"that it holds nothing you need, remove it (rm -rf ~/{REMOTE_DIR} on every worker), then rerun setup\" >&2; "
        "exit 1",
        "fi",
        f"extra=$([ ! -e {REMOTE_DIR} ] || ({unshipped}))",
        "if [ -n \"$extra\" ]; then",
        f"  echo \"error: ~/{REMOTE_DIR} on $(hostname) holds $(echo \"$extra\" | wc -l) file(s) setup did not ship, "
        f"which replacing the code would delete (first: $(echo \"$extra\" | head -n 3 | paste -sd ' ' -)); move them "
        f"out of ~/{REMOTE_DIR} (a workdir belongs on gs://), then rerun setup\" >&2; exit 1",
        "fi",
        "}",
    ])


def setup_commands(vm: VM, tarball: str, tree: str, python: str = "3.11") -> list[list[str]]:
    """Pack `tree`, copy it to every worker, unpack it and sync the pinned environment (idempotent). The code
    directory is replaced only while it holds nothing but what an earlier setup shipped."""
    jax_tpu = f"jax[tpu]=={_pinned_jax_version()}"
    uv = "$HOME/.local/bin/uv"
    staged = f"{REMOTE_DIR}.new"
    remote = " && ".join([
        "set -e",
        f"mkdir -p {REMOTE_LOGS}",
        _refuse_if_running(),
        _refuse_unshipped_files(),
        f"rm -rf {staged} && mkdir {staged} && tar -xzf {REMOTE_TARBALL} -C {staged}",
        f"(cd {staged} && find . ! -type d | LC_ALL=C sort > ../{REMOTE_DIR}.shipped) && "
        f"mv {REMOTE_DIR}.shipped {staged}/{SHIPPED_LIST}",
        f"rm -rf {REMOTE_DIR} && mv {staged} {REMOTE_DIR}",
        f"(test -x {uv} || curl -LsSf https://astral.sh/uv/install.sh | sh)",
        f"(test -x {REMOTE_VENV}/bin/python || {uv} venv --python {shlex.quote(python)} {REMOTE_VENV})",
        f"{uv} pip install --python {REMOTE_VENV}/bin/python -r {REMOTE_DIR}/requirements.txt {shlex.quote(jax_tpu)}",
        f"{REMOTE_VENV}/bin/python -c 'import jax; print(jax.process_index(), jax.local_device_count(), "
        "jax.device_count(), jax.devices()[0].device_kind)'",
    ])
    return [
        ["git", "-C", REPO_ROOT, "archive", "--format=tar.gz", f"--output={tarball}", tree],
        scp_command(vm, tarball, f"{vm.name}:{REMOTE_TARBALL}"),
        ssh_command(vm, remote),
    ]


def stop_script(grace_seconds: int) -> str:
    """Ends every job on this worker (SIGTERM to its process group, SIGKILL after `grace_seconds`), then
    whatever else holds the TPU, and removes the libtpu lockfile."""
    return "\n".join([
        f"groups=$(cat {REMOTE_LOGS}/*.pid 2>/dev/null)",
        "for g in $groups; do kill -TERM -- -$g 2>/dev/null && echo \"stopping process group $g on $(hostname)\"; "
        "done",
        f"for i in $(seq {2 * grace_seconds}); do alive=; "
        "for g in $groups; do kill -0 -- -$g 2>/dev/null && alive=1; done; [ -z \"$alive\" ] && break; sleep 0.5; "
        "done",
        "for g in $groups; do kill -KILL -- -$g 2>/dev/null && echo \"killed process group $g on $(hostname)\"; "
        "done",
        f"rm -f {REMOTE_LOGS}/*.pid",
        f"holders=$(sudo lsof -t {_TPU_DEVICES} 2>/dev/null)",
        "if [ -n \"$holders\" ]; then echo \"killing TPU holders $holders on $(hostname)\"; "
        "sudo kill -KILL $holders; fi",
        "sudo rm -f /tmp/libtpu_lockfile",
        "true",
    ])


def _copy_command(log: str, dest_dir: str, job: str) -> str:
    """Shell command copying `log` to `dest_dir` (gs:// or a path) as <job>.worker<i>.log."""
    dest = f"{dest_dir.rstrip('/')}/logs"
    name = f"{job}.worker${{TPU_WORKER_ID:-0}}.log"
    if dest.startswith("gs://"):
        return f"gcloud storage cp {log} {shlex.quote(dest)}/{name} >/dev/null 2>&1"
    return f"mkdir -p {shlex.quote(dest)} && cp {log} {shlex.quote(dest)}/{name}"


def job_wrapper(job: str, argv: Sequence[str], log_dir: str, restarts: int = 0) -> str:
    """The detached script a worker runs: `argv` in the code directory, logged to ~/nin_logs/<job>.log
    and copied to `log_dir`/logs; it records its process group (for `stop`) and the exit code. A run that
    lost a process of the job (exit code in `RESTART_EXIT_CODES`) starts again, at most `restarts` times."""
    log, pid, code = (f"$HOME/{REMOTE_LOGS}/{job}.{ext}" for ext in ("log", "pid", "exit"))
    copy = _copy_command(log, log_dir, job)
    lost = " || ".join(f"[ $status -eq {c} ]" for c in RESTART_EXIT_CODES)
    return "\n".join([
        f"echo $$ > {pid}",
        f"cd $HOME/{REMOTE_DIR} && source $HOME/{REMOTE_VENV}/bin/activate || {{ echo \"== {job}: no code or "
        f"environment on $(hostname); run the setup subcommand\" >> {log}; echo 1 > {code}; exit 1; }}",
        _WORKER_ENV,
        f"(while sleep {_LOG_COPY_SECONDS}; do {copy}; done) &",
        "copier=$!",
        "stopping=; start=0",
        "trap 'stopping=1; kill -TERM $child 2>/dev/null' TERM INT",  # stop signals the group; wait for the code
        "while true; do",
        f"echo \"== {job} started $(date -u +%FT%TZ) on $(hostname): \"{shlex.quote(shlex.join(argv))} >> {log}",
        f"{shlex.join(argv)} >> {log} 2>&1 &",
        "child=$!",
        "wait $child; status=$?",
        "while kill -0 $child 2>/dev/null; do wait $child; status=$?; done",
        f"if [ -n \"$stopping\" ] || ! {{ {lost}; }}; then break; fi",
        f"if [ $start -ge {restarts} ]; then echo \"== {job} lost a process (exit code $status) after $start "
        f"restart(s) (--restarts={restarts}): giving up\" >> {log}; break; fi",
        "start=$((start + 1))",
        f"echo \"== {job} lost a process (exit code $status): restart $start of {restarts} in "
        f"{RESTART_DELAY_SECONDS} s, from the last committed checkpoint\" >> {log}",
        f"sleep {RESTART_DELAY_SECONDS} & wait $!",  # waits in the background so that stop's SIGTERM ends it
        "[ -n \"$stopping\" ] && break",
        "done",
        "pkill -P $copier 2>/dev/null; kill $copier 2>/dev/null",  # its sleep first, which ends its loop
        f"echo \"== {job} exited with code $status $(date -u +%FT%TZ)\" >> {log}",
        f"echo $status > {code}",
        f"{copy}",
        "exit $status",
    ])


def remote_job(job: str, argv: Sequence[str], log_dir: str, *, background: bool, grace_seconds: int = 60,
               restarts: int = 0) -> str:
    """The shell command every worker runs: stop what runs, start `job` detached (`job_wrapper`), and unless
    `background` follow its log until it ends and exit with its code."""
    log, pid, code = (f"{REMOTE_LOGS}/{job}.{ext}" for ext in ("log", "pid", "exit"))
    start = "\n".join([
        stop_script(grace_seconds),
        f"mkdir -p {REMOTE_LOGS} && rm -f {code} && touch {log}",
        f"offset=$(stat -c %s {log})",
        f"setsid nohup bash -c {shlex.quote(job_wrapper(job, argv, log_dir, restarts))} > /dev/null 2>&1 "
        "< /dev/null &",
        f"for i in $(seq 100); do [ -s {pid} ] && break; sleep 0.1; done",
        f"echo \"{job} runs on $(hostname) as process group $(cat {pid}); log: ~/{log}\"",
    ])
    if background:
        return start
    return "\n".join([
        start,
        f"tail -c +$((offset + 1)) -F --pid=$(cat {pid}) {log} 2>/dev/null",
        f"exit $(cat {code} 2>/dev/null || echo 1)",
    ])


def check_job_path(vm: VM, flag: str, path: str, *, vm_deleted: bool = False) -> None:
    """The workdir (or sweep root) must outlive what happens to the VM's disk: gs:// always works; an absolute
    path on the VM only for one worker, and only when the VM is not deleted after the job."""
    if path.startswith("gs://"):
        return
    if not path.startswith("/"):
        raise ConfigError(
            f"{flag}={path} is not absolute: on the workers it would resolve inside the code checkout ~/{REMOTE_DIR}, "
            f"which setup replaces; use a gs:// path (e.g. {flag}=gs://BUCKET/nin/run1) or an absolute one.")
    if vm.workers > 1:
        raise ConfigError(
            f"{flag}={path}: the {vm.workers} workers of {vm.accelerator_type} must share the checkpoint "
            f"directory; use a gs:// path (e.g. {flag}=gs://BUCKET/nin/run1).")
    if vm_deleted:
        raise ConfigError(
            f"{flag}={path} is on the VM's disk, which `all` deletes with the VM after the job (checkpoints and "
            f"results with it); use a gs:// path (e.g. {flag}=gs://BUCKET/nin/run1), or pass --keep_vm.")


def _flag_error(e: flags.Error, local: str, given: str) -> str:
    """absl's message for a bad `--config` flag as one line, as nin_jax/runtime/cli.py reports it; a config file
    that raised has its traceback appended, whose last line is the error."""
    lines = [line.strip() for line in str(e).replace(local, given).splitlines() if line.strip()]
    return lines[0] if len(lines) == 1 else f"{lines[0].rstrip(':')}: {lines[-1]}"


def check_config(config: str, overrides: Sequence[str]) -> None:
    """Loads `config` (`path[:arg]`, relative to the repository root) from this checkout, applies `overrides`
    and validates the result, as `nin_jax.main` will on the workers; `ConfigError` with its one-line message."""
    path, sep, arg = config.partition(":")
    local = os.path.normpath(os.path.join(REPO_ROOT, path))
    if os.path.isabs(path) or path.startswith("~") or not local.startswith(REPO_ROOT + os.sep):
        raise ConfigError(f"--config={config}: the workers run in the shipped checkout, so pass a config file of "
                          "this repository, relative to its root, e.g. --config=configs/cifar10.py.")
    if not os.path.isfile(local):
        raise ConfigError(f"--config={config}: {path} does not exist in {REPO_ROOT} (the checkout setup ships); pass "
                          "a config file such as configs/cifar10.py.")
    argv = ["nin_jax.main", f"--config={local}{sep}{arg}", *overrides]
    values = flags.FlagValues()
    # sys_argv: config_flags defines a flag for each `--config.` override it finds there.
    config_flags.DEFINE_config_file("config", None, "the training config", flag_values=values, lock_config=True,
                                    sys_argv=argv)
    try:
        values(argv)
        loaded = values.config
    except flags.Error as e:
        raise ConfigError(_flag_error(e, local, path)) from None
    except (KeyError, AttributeError, TypeError, ValueError) as e:  # config_flags' errors for a wrong field
        hint = cli.unknown_override(argv)  # the training command's hint
        raise ConfigError(hint or f"the --config flags could not be applied ({type(e).__name__}: {e}).") from None
    config_lib.validate(loaded)


def train_argv(config: str, workdir: str, overrides: Sequence[str]) -> list[str]:
    return ["python", "-m", "nin_jax.main", f"--config={config}", f"--workdir={workdir}", *overrides]


def sweep_argv(sweep: str, root: str, config: str, overrides: Sequence[str], points: str = "") -> list[str]:
    # The sweep, its points and the override keys are checked here, before any VM time is spent.
    sweeps.plan(sweep, root, os.path.join(REPO_ROOT, config), sweeps.parse_overrides(
        [a.removeprefix("--") for a in overrides]), [p.strip() for p in points.split(",") if p.strip()])
    return ["python", "launch/sweep.py", f"--sweep={sweep}", f"--root={root}",
            f"--config={config}", *overrides, *([f"--points={points}"] if points else [])]


def logs_commands(vm: VM, job: str, *, lines: int, follow: bool, collect: str | None,
                  worker: str = "all") -> list[list[str]]:
    """Tail each worker's log (following it while the job runs), or copy each to <collect>/worker<i>/."""
    log = f"{REMOTE_LOGS}/{job}.log"
    if collect:
        cmds = []
        for i in range(vm.workers):
            local = os.path.join(collect, f"worker{i}")
            cmds += [["mkdir", "-p", local], scp_command(vm, f"{vm.name}:{log}", local + "/", worker=str(i))]
        return cmds
    if follow:
        tail = (f"pid=$(cat {REMOTE_LOGS}/{job}.pid 2>/dev/null); "
                f"tail -n {lines} ${{pid:+-F --pid=$pid}} {log}")
    else:
        tail = f"tail -n {lines} {log}"
    return [ssh_command(vm, tail, worker=worker)]


def _overrides(rest: Sequence[str]) -> list[str]:
    """Only `--config.<field>=<value>` may pass through to nin_jax.main."""
    bad = [a for a in rest if not a.startswith("--config.")]
    if bad:
        raise ConfigError(f"unrecognized arguments {bad}; config overrides look like --config.model.head=fc.")
    return list(rest)


class Runner:
    """Prints each command (shell-quoted); runs it unless dry-run."""

    def __init__(self, dry_run: bool, out: Callable[[str], None] = print):
        self.dry_run, self.out = dry_run, out

    def __call__(self, cmd: list[str]) -> None:
        self.out(shlex.join(cmd))
        if not self.dry_run:
            subprocess.run(cmd, check=True)

    def output(self, cmd: list[str]) -> str | None:
        """The command's stdout (None in a dry run)."""
        self.out(shlex.join(cmd))
        if self.dry_run:
            return None
        return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip()


def create(vm: VM, run: Runner, poll_seconds: float = 30.0) -> None:
    """Creates the VM; a queued resource is polled until ACTIVE (the slice exists) or it fails."""
    run(create_command(vm))
    if not vm.queued:
        return
    start = time.monotonic()
    while (state := run.output(queued_state_command(vm))) not in (None, "ACTIVE"):
        if state in _QUEUED_FAILED:
            raise ConfigError(f"queued resource {vm.name} is {state}; see `gcloud compute tpus queued-resources "
                              f"describe {vm.name} --zone={vm.zone}`, then delete it with `delete --queued`.")
        run.out(f"# queued resource {vm.name}: {state or '?'} after {(time.monotonic() - start) / 60:.0f} min")
        time.sleep(poll_seconds)


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--name", required=True, help="TPU VM name (and queued-resource id with --queued)")
    common.add_argument("--zone", required=True, help="e.g. us-central2-b")
    common.add_argument("--project", default=None, help="default: gcloud's configured project")
    common.add_argument("--accelerator_type", default="v4-8", help="e.g. v4-8, v4-16, v5p-8, v5litepod-16, v6e-8")
    common.add_argument("--version", default=None,
                        help="TPU runtime image (default per generation: " +
                        ", ".join(f"{k}: {v}" for k, v in RUNTIME_VERSIONS.items()) + ")")
    common.add_argument("--num_workers", type=int, default=None, help="hosts of the slice (default: from the type)")
    common.add_argument("--queued", action="store_true", help="the VM belongs to a queued resource of its name")
    common.add_argument("--internal_ip", action="store_true", help="ssh/scp to the workers' internal IPs")
    common.add_argument("--tunnel_through_iap", action="store_true", help="ssh/scp through Identity-Aware Proxy")
    common.add_argument("--ssh_flag", action="append", default=[], help="a flag for ssh itself (repeatable)")
    common.add_argument("--dry_run", action="store_true", help="print the commands instead of running them")

    def job_args(p: argparse.ArgumentParser, *, sweep: bool) -> None:
        p.add_argument("--config", required=sweep, help="config file, relative to the repository root")
        if sweep:
            p.add_argument("--sweep", required=True, help=f"one of {sorted(sweeps.SWEEPS)}")
            p.add_argument("--root", required=True, help="gs:// sweep root")
            p.add_argument("--points", default="", help="comma-separated subset of the sweep's points")
        else:
            p.add_argument("--workdir", help="gs:// workdir")
        p.add_argument("--background", action="store_true", help="return at once; follow with `logs --follow`")
        p.add_argument("--grace_seconds", type=int, default=60, help="how long a previous job may take to stop")
        p.add_argument("--restarts", type=int, default=3,
                       help="start a run that lost a process (exit 75 or 137) again on every worker, at most this "
                       "often; it resumes from the last committed checkpoint (0: never)")

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("create", parents=[common], help="create the TPU VM (or queue it with --queued)")
    c.add_argument("--spot", action="store_true", help="a Spot VM (cheaper, preemptible)")
    s = sub.add_parser("setup", parents=[common], help="copy the code to every worker and sync the environment")
    s.add_argument("--allow_dirty", action="store_true", help="ship uncommitted changes as they are")
    job_args(sub.add_parser("train", parents=[common], help="python -m nin_jax.main on every worker"), sweep=False)
    job_args(sub.add_parser("sweep", parents=[common], help="launch/sweep.py on every worker"), sweep=True)
    lg = sub.add_parser("logs", parents=[common], help="tail or collect the workers' logs")
    lg.add_argument("--job", default="train", help="train, or sweep-<name> for a sweep")
    lg.add_argument("--lines", type=int, default=50)
    lg.add_argument("--follow", action="store_true", help="keep printing while the job runs")
    lg.add_argument("--worker", default="all", help="all, or one worker index")
    lg.add_argument("--collect", default=None, metavar="DIR", help="copy each worker's log to DIR/worker<i>/")
    st = sub.add_parser("stop", parents=[common], help="end the jobs on every worker and free the TPU")
    st.add_argument("--grace_seconds", type=int, default=60, help="SIGTERM, then SIGKILL after this long")
    sub.add_parser("delete", parents=[common], help="delete the TPU VM (and its queued resource)")
    a = sub.add_parser("all", parents=[common], help="create, setup, train or sweep, collect logs, delete")
    a.add_argument("--spot", action="store_true")
    a.add_argument("--allow_dirty", action="store_true")
    a.add_argument("--config", required=True)
    a.add_argument("--workdir", help="gs:// workdir (train)")
    a.add_argument("--sweep", help="run this sweep instead of one training run")
    a.add_argument("--root", help="gs:// sweep root (with --sweep)")
    a.add_argument("--points", default="")
    a.add_argument("--collect", default="tpu_logs", metavar="DIR", help="where the workers' logs are copied")
    a.add_argument("--keep_vm", action="store_true", help="do not delete the VM at the end")
    a.add_argument("--restarts", type=int, default=3, help="as for train")
    return parser


def main(argv: Sequence[str] | None = None, out: Callable[[str], None] = print) -> int:
    args, rest = _parser().parse_known_args(argv)
    try:
        overrides = _overrides(rest)
        workers = slice_workers(args.accelerator_type, args.num_workers, args.version)
        ssh_options = tuple(f for f, on in (("--internal-ip", args.internal_ip),
                                             ("--tunnel-through-iap", args.tunnel_through_iap)) if on)
        vm = VM(args.name, args.zone, args.accelerator_type, args.version or runtime_version(args.accelerator_type),
                args.project, getattr(args, "spot", False), workers, args.queued, ssh_options, tuple(args.ssh_flag))
        run = Runner(args.dry_run, out)
        tarball = os.path.join(tempfile.gettempdir(), f"nin_jax-{vm.name}.tar.gz")

        def job(background: bool) -> tuple[str, str]:
            """(job name, remote command) of a train or sweep subcommand, validated before anything runs."""
            grace = getattr(args, "grace_seconds", 60)
            if args.restarts < 0:
                raise ConfigError(f"--restarts={args.restarts} must be >= 0 (how often a run that lost a process "
                                  "starts again; 0: never).")
            again = {"grace_seconds": grace, "restarts": args.restarts}
            vm_deleted = args.command == "all" and not args.keep_vm
            if args.command == "sweep" or getattr(args, "sweep", None):
                if not args.root:
                    raise ConfigError("--root is required with --sweep (a gs:// sweep root).")
                check_job_path(vm, "--root", args.root, vm_deleted=vm_deleted)
                check_config(args.config, overrides)
                name = f"sweep-{args.sweep}"
                argv_ = sweep_argv(args.sweep, args.root, args.config, overrides, args.points)
                return name, remote_job(name, argv_, args.root, background=background, **again)
            if not args.config or not args.workdir:
                raise ConfigError("--config and --workdir are required to train.")
            check_job_path(vm, "--workdir", args.workdir, vm_deleted=vm_deleted)
            check_config(args.config, overrides)
            argv_ = train_argv(args.config, args.workdir, overrides)
            return "train", remote_job("train", argv_, args.workdir, background=background, **again)

        if args.command == "create":
            create(vm, run)
        elif args.command == "setup":
            for cmd in setup_commands(vm, tarball, source_tree(args.allow_dirty)):
                run(cmd)
        elif args.command in ("train", "sweep"):
            run(ssh_command(vm, job(args.background)[1]))
        elif args.command == "logs":
            for cmd in logs_commands(vm, args.job, lines=args.lines, follow=args.follow, collect=args.collect,
                                     worker=args.worker):
                run(cmd)
        elif args.command == "stop":
            run(ssh_command(vm, stop_script(args.grace_seconds)))
        elif args.command == "delete":
            run(delete_command(vm))
        else:
            return _all(vm, run, tarball, source_tree(args.allow_dirty), *job(background=False), args)
    except (ValueError, FileNotFoundError) as e:  # ConfigError, and a sweep's unknown name
        print(f"error: {e}", file=sys.stderr)
        return 2
    except subprocess.CalledProcessError as e:
        print(f"error: command failed with exit code {e.returncode}: {shlex.join(e.cmd)}", file=sys.stderr)
        return e.returncode or 1
    return 0


def _all(vm: VM, run: Runner, tarball: str, tree: str, name: str, remote: str, args: argparse.Namespace) -> int:
    """create, setup, the job (followed), collect the logs, delete. The VM is deleted even if a step fails,
    so nothing is left billing, unless the connection dropped while the job runs on (ssh exit code 255)."""
    create(vm, run)
    keep = args.keep_vm
    try:
        for cmd in setup_commands(vm, tarball, tree):
            run(cmd)
        try:
            run(ssh_command(vm, remote))
        except subprocess.CalledProcessError as e:
            if e.returncode == 255:
                keep = True
                print(f"error: the connection to {vm.name} dropped; the job runs on. Follow it with `logs --follow "
                      f"--job={name}`, then `delete` the VM.", file=sys.stderr)
            else:
                _collect(vm, run, name, args.collect)
            raise
        _collect(vm, run, name, args.collect)
    finally:
        if not keep:
            run(delete_command(vm))
    return 0


def _collect(vm: VM, run: Runner, job: str, collect: str) -> None:
    """Copies each worker's log to `collect`; a failed copy is reported, not raised (the logs are in gs:// too)."""
    for cmd in logs_commands(vm, job, lines=0, follow=False, collect=collect):
        try:
            run(cmd)
        except subprocess.CalledProcessError as e:
            print(f"warning: copying a log failed (exit code {e.returncode}): {shlex.join(cmd)}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
