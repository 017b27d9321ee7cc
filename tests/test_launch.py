"""The TPU VM launcher in dry-run mode: the gcloud commands for a 2-worker v4-16 slice, and bad input.

The launcher ships a git checkout, so these tests point it at a small committed repository of their own
(the project's working tree may have uncommitted changes while tests run).
"""

import os
import shlex
import subprocess
import sys
import tempfile

import pytest

from launch import tpu_vm
import launch_helpers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VM_ARGS = ["--name=nin-a", "--zone=us-central2-b", "--accelerator_type=v4-16", "--project=proj", "--dry_run"]
TAIL = ["--zone=us-central2-b", "--project=proj"]
GCLOUD = ["gcloud", "compute", "tpus", "tpu-vm"]
TARBALL = os.path.join(tempfile.gettempdir(), "nin_jax-nin-a.tar.gz")


@pytest.fixture(autouse=True)
def committed_repo(tmp_path, monkeypatch):
    repo = launch_helpers.make_git_repo(tmp_path / "repo", {"requirements.txt": "jax==0.10.2\n"})
    monkeypatch.setattr(tpu_vm, "REPO_ROOT", repo)
    return repo


def dry_run(*argv: str) -> list[list[str]]:
    lines = []
    assert tpu_vm.main(list(argv), out=lines.append) == 0
    return [shlex.split(line) for line in lines]


def remote(cmd: list[str]) -> str:
    """The --command of an ssh, after checking it is valid bash."""
    (command,) = [a.removeprefix("--command=") for a in cmd if a.startswith("--command=")]
    assert subprocess.run(["bash", "-n", "-c", command]).returncode == 0, command
    return command


def detached(command: str) -> str:
    """The script a job command starts detached (`setsid nohup bash -c SCRIPT ...`), checked as valid bash."""
    start = command.index("\nsetsid nohup bash -c ")
    script = shlex.split(command[start:command.index(" > /dev/null 2>&1 < /dev/null &\n", start)])[4]
    assert subprocess.run(["bash", "-n", "-c", script]).returncode == 0, script
    return script


@pytest.mark.parametrize("accel,workers", [("v4-8", 1), ("v4-16", 2), ("v4-32", 4), ("v5p-16", 2), ("v3-8", 1),
                                           ("v5litepod-8", 1), ("v5litepod-16", 4), ("v6e-64", 16)])
def test_num_workers(accel, workers):
    assert tpu_vm.num_workers(accel) == workers


def test_all_on_a_two_worker_v4_16(committed_repo):
    cmds = dry_run("all", *VM_ARGS, "--config=configs/cifar10.py", "--workdir=gs://bkt/nin/run1",
                   "--config.model.head=fc", "--config.train_split=train[:45000]", "--collect=/tmp/logs")
    assert cmds[0] == GCLOUD + ["create", "nin-a", "--accelerator-type=v4-16", "--version=tpu-ubuntu2204-base", *TAIL]
    assert cmds[1] == ["git", "-C", committed_repo, "archive", "--format=tar.gz", f"--output={TARBALL}", "HEAD"]
    assert cmds[2] == GCLOUD + ["scp", TARBALL, "nin-a:nin_jax.tar.gz", "--worker=all", *TAIL]
    assert cmds[3][:7] == GCLOUD + ["ssh", "nin-a", "--worker=all"] and cmds[3][-2:] == TAIL
    setup = remote(cmds[3])
    assert "tar -xzf nin_jax.tar.gz -C nin_jax.new" in setup
    assert "(test -x nin_venv/bin/python || $HOME/.local/bin/uv venv --python 3.11 nin_venv)" in setup
    assert "pip install --python nin_venv/bin/python -r nin_jax/requirements.txt 'jax[tpu]==0.10.2'" in setup
    assert cmds[4][:7] == GCLOUD + ["ssh", "nin-a", "--worker=all"]
    train = remote(cmds[4])
    assert "tail -c +$((offset + 1)) -F --pid=$(cat nin_logs/train.pid)" in train
    job = detached(train)
    assert ("python -m nin_jax.main --config=configs/cifar10.py --workdir=gs://bkt/nin/run1 --config.model.head=fc "
            "'--config.train_split=train[:45000]' >> $HOME/nin_logs/train.log 2>&1 &") in job
    assert ("gcloud storage cp $HOME/nin_logs/train.log "
            "gs://bkt/nin/run1/logs/train.worker${TPU_WORKER_ID:-0}.log") in job
    assert "TPU_WORKER_HOSTNAMES=" in job  # multi-host jax.distributed on every worker
    # Each worker's log is copied back on its own, then the VM is deleted.
    assert cmds[5:9] == [
        ["mkdir", "-p", "/tmp/logs/worker0"],
        GCLOUD + ["scp", "nin-a:nin_logs/train.log", "/tmp/logs/worker0/", "--worker=0", *TAIL],
        ["mkdir", "-p", "/tmp/logs/worker1"],
        GCLOUD + ["scp", "nin-a:nin_logs/train.log", "/tmp/logs/worker1/", "--worker=1", *TAIL],
    ]
    assert cmds[9] == GCLOUD + ["delete", "nin-a", "--quiet", *TAIL] and len(cmds) == 10


def test_single_subcommands():
    assert dry_run("create", *VM_ARGS, "--spot")[0][-3:] == ["--spot", *TAIL]
    assert dry_run("delete", *VM_ARGS) == [GCLOUD + ["delete", "nin-a", "--quiet", *TAIL]]
    (sweep,) = dry_run("sweep", *VM_ARGS, "--sweep=gap_vs_fc", "--root=gs://bkt/sweeps", "--config=configs/digits.py",
                       "--config.model.width=0.5", "--background")
    command = remote(sweep)
    assert "--worker=all" in sweep
    assert ("python launch/sweep.py --sweep=gap_vs_fc --root=gs://bkt/sweeps --config=configs/digits.py "
            "--config.model.width=0.5") in detached(command)
    assert command.startswith("groups=$(cat nin_logs/*.pid 2>/dev/null)")  # the previous job is stopped first
    assert "> /dev/null 2>&1 < /dev/null &\n" in command and "tail -c" not in command
    assert "gs://bkt/sweeps/logs/sweep-gap_vs_fc.worker" in detached(command)
    (logs,) = dry_run("logs", *VM_ARGS, "--job=sweep-gap_vs_fc", "--follow", "--lines=20")
    assert logs == GCLOUD + ["ssh", "nin-a", "--worker=all", "--command=pid=$(cat nin_logs/sweep-gap_vs_fc.pid "
                             "2>/dev/null); tail -n 20 ${pid:+-F --pid=$pid} nin_logs/sweep-gap_vs_fc.log", *TAIL]
    (stop,) = dry_run("stop", *VM_ARGS, "--grace_seconds=5")
    command = remote(stop)
    assert "kill -TERM -- -$g" in command and "seq 10" in command and "sudo rm -f /tmp/libtpu_lockfile" in command
    assert "sudo lsof -t /dev/accel* /dev/vfio/[0-9]*" in command


def test_ssh_options_reach_ssh_and_scp():
    cmds = dry_run("setup", *VM_ARGS, "--internal_ip", "--tunnel_through_iap", "--ssh_flag=-o ServerAliveInterval=30")
    assert cmds[1] == GCLOUD + ["scp", TARBALL, "nin-a:nin_jax.tar.gz", "--worker=all", "--internal-ip",
                                "--tunnel-through-iap", *TAIL]
    assert cmds[2][7:10] == ["--internal-ip", "--tunnel-through-iap", "--ssh-flag=-o ServerAliveInterval=30"]


def test_queued_resources():
    create, describe = dry_run("create", *VM_ARGS, "--queued", "--spot", "--accelerator_type=v6e-8")
    assert create == ["gcloud", "compute", "tpus", "queued-resources", "create", "nin-a", "--node-id=nin-a",
                      "--accelerator-type=v6e-8", "--runtime-version=v2-alpha-tpuv6e", "--spot", *TAIL]
    assert describe == ["gcloud", "compute", "tpus", "queued-resources", "describe", "nin-a",
                        "--format=value(state.state)", *TAIL]
    assert dry_run("delete", *VM_ARGS, "--queued") == [
        ["gcloud", "compute", "tpus", "queued-resources", "delete", "nin-a", "--force", "--quiet", *TAIL]]


def test_script_dry_run_prints_commands():
    proc = subprocess.run([sys.executable, os.path.join(REPO, "launch", "tpu_vm.py"), "delete", *VM_ARGS],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "gcloud compute tpus tpu-vm delete nin-a --quiet --zone=us-central2-b --project=proj\n"


@pytest.mark.parametrize("argv,message", [
    (["train", "--config=configs/digits.py", "--workdir=/tmp/run"],
     "--workdir=/tmp/run: the 2 workers of v4-16 must share the checkpoint directory; use a gs:// path"),
    (["sweep", "--sweep=nope", "--root=gs://b/s", "--config=configs/digits.py"],
     "unknown sweep 'nope'; choose one of ['bn', 'depth', 'gap_vs_fc', 'mlpconv_vs_conv']"),
    (["train", "--config=configs/digits.py", "--workdir=gs://b/r", "--model.head=fc"],
     "config overrides look like --config.model.head=fc"),
    (["train", "--config=configs/digits.py"], "--config and --workdir are required"),
    (["create", "--accelerator_type=tpu-16"], "'tpu-16' is not a known TPU type"),
])
def test_bad_input(argv, message, capsys):
    lines = []
    assert tpu_vm.main(argv[:1] + VM_ARGS + argv[1:], out=lines.append) == 2
    assert message in capsys.readouterr().err and lines == []  # nothing printed or run
    with pytest.raises(ValueError, match="not a known TPU type"):
        tpu_vm.num_workers("tpu-16")
