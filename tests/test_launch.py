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
    repo = launch_helpers.launcher_repo(tmp_path / "repo")
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


@pytest.mark.parametrize("accel", ["v2-64", "v3-16", "v4-9", "v4-12", "v4-96", "v4-16384", "v5p-96", "v5p-12416",
                                   "v5litepod-2", "v5litepod-12", "v6e-2", "v6e-512"])
def test_a_size_the_generation_does_not_come_in_is_refused(accel, capsys):
    lines = []
    assert tpu_vm.main(["create", *VM_ARGS, f"--accelerator_type={accel}"], out=lines.append) == 2
    family = accel.rpartition("-")[0]
    assert f"error: --accelerator_type={accel}: {family} slices come as {family}-" in capsys.readouterr().err
    assert lines == []  # no VM created


@pytest.mark.parametrize("accel,workers", [("v2-512", 64), ("v3-2048", 256), ("v4-384", 48), ("v4-4096", 512),
                                           ("v5p-32", 4), ("v5p-12288", 1536), ("v5litepod-1", 1),
                                           ("v5litepod-256", 64), ("v6e-4", 1), ("v6e-256", 64)])
def test_the_sizes_of_each_generation(accel, workers):
    assert tpu_vm.num_workers(accel) == workers


def test_num_workers_must_agree_with_a_known_type(capsys):
    assert tpu_vm.main(["create", *VM_ARGS, "--num_workers=1"], out=[].append) == 2
    assert "--num_workers=1 contradicts --accelerator_type=v4-16, a slice of 2 worker(s)" in capsys.readouterr().err
    # A type this launcher does not know is taken as given, with its workers and runtime.
    (create,) = dry_run("create", *VM_ARGS, "--accelerator_type=v7x-16", "--num_workers=2", "--version=v2-alpha-x")
    assert "--accelerator-type=v7x-16" in create and "--version=v2-alpha-x" in create


@pytest.mark.parametrize("argv,message", [
    (["train", "--workdir=runs/x"], "--workdir=runs/x is not absolute: on the workers it would resolve inside the "
                                    "code checkout ~/nin_jax, which setup replaces"),
    (["train", "--workdir=~/runs/x"], "--workdir=~/runs/x is not absolute"),
    (["sweep", "--sweep=gap_vs_fc", "--root=sweeps"], "--root=sweeps is not absolute"),
    (["all", "--workdir=/data/run"], "--workdir=/data/run is on the VM's disk, which `all` deletes with the VM"),
    (["all", "--sweep=gap_vs_fc", "--root=/data/sweeps"], "--root=/data/sweeps is on the VM's disk"),
])
def test_a_workdir_that_would_not_outlive_the_code_or_the_vm_is_refused(argv, message, capsys):
    lines = []
    argv = [argv[0], *VM_ARGS, "--accelerator_type=v4-8", "--config=configs/digits.py", *argv[1:]]
    assert tpu_vm.main(argv, out=lines.append) == 2
    assert message in capsys.readouterr().err and lines == []  # nothing created or started


def test_an_absolute_workdir_on_a_one_worker_vm_that_stays():
    dry_run("train", *VM_ARGS, "--accelerator_type=v4-8", "--config=configs/digits.py", "--workdir=/data/run")
    cmds = dry_run("all", *VM_ARGS, "--accelerator_type=v4-8", "--config=configs/digits.py", "--workdir=/data/run",
                   "--keep_vm")
    assert "delete" not in cmds[-1]


@pytest.mark.parametrize("argv,message", [
    (["--config=configs/nope.py"], "--config=configs/nope.py: configs/nope.py does not exist in"),
    (["--config=../configs/digits.py"], "pass a config file of this repository, relative to its root"),
    (["--config=configs/imagenet.py:fast"], "configs/imagenet.py:fast is unknown"),
    (["--config=configs/digits.py", "--config.model.hed=fc"],
     "--config.model.hed=fc: config.model has no field 'hed'; did you mean config.model.head?"),
    (["--config=configs/digits.py", "--config.log_every_steps=5"],
     "--config.log_every_steps=5: config.log_every_steps is now config.run.log_every_steps"),
    (["--config=configs/digits.py", "--config.num_train_steps=abc"], "flag --config.num_train_steps=abc: invalid"),
    (["--config=configs/digits.py", "--config.optim.learning_rate=-1"],
     "config.optim.learning_rate=-1.0 must be > 0"),
    (["--sweep=gap_vs_fc", "--root=gs://b/s", "--config=configs/digits.py", "--config.model.widht=0.5"],
     "--config.model.widht=0.5: config.model has no field 'widht'; did you mean config.model.width?"),
    (["--sweep=gap_vs_fc", "--root=gs://b/s", "--config=configs/digits.py", "--points=fc,nope"],
     "sweep 'gap_vs_fc' has no point 'nope'"),
])
def test_the_config_and_its_overrides_are_checked_before_a_vm_is_created(argv, message, capsys):
    lines = []
    assert tpu_vm.main(["all", *VM_ARGS, "--workdir=gs://b/r", *argv], out=lines.append) == 2
    assert message in capsys.readouterr().err and lines == []  # no VM created


def test_a_config_file_is_named_by_its_path_in_the_checkout(committed_repo, capsys):
    absolute = f"{committed_repo}/configs/digits.py"  # exists here, but not on the workers
    assert tpu_vm.main(["train", *VM_ARGS, f"--config={absolute}", "--workdir=gs://b/r"], out=[].append) == 2
    assert (f"--config={absolute}: the workers run in the shipped checkout, so pass a config file of this "
            "repository, relative to its root, e.g. --config=configs/cifar10.py.") in capsys.readouterr().err
