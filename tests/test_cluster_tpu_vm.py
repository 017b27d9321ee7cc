"""launch/tpu_vm.py run for real against a fake `gcloud` (launch_helpers.install_fake_tpu): the workers are
directories on this machine and ssh commands run there with bash, so setup, detached jobs, stop and the log
copies are exercised end to end, without a network or a VM."""

import os
import pathlib
import signal
import tarfile
import time

import pytest

from launch import tpu_vm
import launch_helpers

CONFIG = ["--config=configs/digits.py", "--workdir=gs://bkt/run1", "--config.num_train_steps=5"]


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """(fake TPU root, a function running `tpu_vm.main` on a VM of the given accelerator type)."""
    root = tmp_path / "tpu"
    repo = launch_helpers.launcher_repo(tmp_path / "repo", {"nin_jax/__init__.py": ""})
    monkeypatch.setattr(tpu_vm, "REPO_ROOT", repo)
    for key, value in launch_helpers.install_fake_tpu(root, workers=1).items():
        monkeypatch.setenv(key, value)

    def launch(verb: str, accel: str, *args: str) -> int:
        monkeypatch.setenv("FAKE_TPU_WORKERS", str(tpu_vm.num_workers(accel)))
        return tpu_vm.main([verb, f"--name=nin-{accel}", "--zone=us-central2-b", f"--accelerator_type={accel}",
                            *args], out=lambda line: None)

    yield root, launch
    for pid_file in root.glob("workers/*/nin_logs/*.pid"):  # a failed test leaves no job behind
        try:
            os.killpg(int(pid_file.read_text()), signal.SIGKILL)
        except (ValueError, ProcessLookupError):
            pass


def _verbs(root: pathlib.Path) -> list[str]:
    """The recorded calls from this machine as `<verb>` or `ssh:<what the command does>` (the workers' own
    `gcloud storage cp` calls left out)."""
    out = []
    for argv in launch_helpers.fake_gcloud_calls(root):
        if argv[0] == "storage":
            continue
        verb = argv[3] if argv[0] == "compute" else " ".join(argv[:2])
        if verb == "ssh":
            command = next(a for a in argv if a.startswith("--command="))
            verb = ("ssh:setup" if "uv pip install" in command else "ssh:train" if "setsid nohup" in command
                    else "ssh:stop" if command.startswith("--command=groups=") else "ssh:logs")
        out.append(verb)
    return out


def _wait_for(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.parametrize("accel", ["v4-16", "v6e-8"])
def test_create_setup_setup_train_logs_stop_delete(fake, accel, capfd):
    root, launch = fake
    workers = tpu_vm.num_workers(accel)
    (root / "train_seconds").write_text("120")
    assert launch("create", accel) == 0
    assert launch("setup", accel) == 0
    assert launch("setup", accel) == 0  # a second setup only syncs: uv does not recreate the environment
    uv_calls = (root / "uv.log").read_text().splitlines()
    assert sum(c.startswith("uv venv") for c in uv_calls) == workers
    assert sum(c.startswith("uv pip install") for c in uv_calls) == 2 * workers

    assert launch("train", accel, "--background", *CONFIG) == 0
    homes = [root / "workers" / f"w{i}" for i in range(workers)]
    logs = [h / "nin_logs" / "train.log" for h in homes]
    _wait_for(lambda: all("fake python -m nin_jax.main" in log.read_text() for log in logs))
    pgids = [int((h / "nin_logs" / "train.pid").read_text()) for h in homes]
    for i, (log, pgid) in enumerate(zip(logs, pgids)):
        os.killpg(pgid, 0)  # the detached job runs after its ssh returned
        assert (f"fake python -m nin_jax.main --config=configs/digits.py --workdir=gs://bkt/run1 "
                f"--config.num_train_steps=5 (worker {i} of {','.join(f'w{j}' for j in range(workers))}, "
                "in nin_jax)") in log.read_text()
    capfd.readouterr()
    assert launch("logs", accel) == 0
    assert capfd.readouterr().out.count("fake python -m nin_jax.main") == workers

    assert launch("stop", accel, "--grace_seconds=20") == 0
    for log, pgid in zip(logs, pgids):
        with pytest.raises(ProcessLookupError):
            os.killpg(pgid, 0)
        text = log.read_text()
        assert "got SIGTERM" in text and "== train exited with code 143" in text
    for i in range(workers):  # the log reached the workdir (as a gs:// object)
        assert "exited with code 143" in (root / "gcs" / "bkt" / "run1" / "logs" / f"train.worker{i}.log").read_text()
    assert "rm -f /tmp/libtpu_lockfile" in (root / "sudo.log").read_text()

    assert launch("delete", accel) == 0
    assert not (root / "workers").exists()
    assert _verbs(root) == ["create", "scp", "ssh:setup", "scp", "ssh:setup", "ssh:train", "ssh:logs", "ssh:stop",
                            "delete"]


@pytest.mark.parametrize("accel,version", [("v4-8", "tpu-ubuntu2204-base"), ("v5litepod-16", "v2-alpha-tpuv5-lite"),
                                           ("v5p-32", "v2-alpha-tpuv5"), ("v6e-8", "v2-alpha-tpuv6e")])
def test_create_uses_the_runtime_of_the_generation(fake, accel, version):
    root, launch = fake
    assert launch("create", accel) == 0
    (create,) = launch_helpers.fake_gcloud_calls(root)
    assert create == ["compute", "tpus", "tpu-vm", "create", f"nin-{accel}", f"--accelerator-type={accel}",
                      f"--version={version}", "--zone=us-central2-b"]


def test_all_follows_the_job_and_returns_its_exit_code(fake, tmp_path):
    root, launch = fake
    (root / "train_exit").write_text("3")
    assert launch("all", "v4-16", *CONFIG, f"--collect={tmp_path / 'logs'}") == 3
    for i in range(2):
        text = (tmp_path / "logs" / f"worker{i}" / "train.log").read_text()
        assert "fake training done" in text and "== train exited with code 3" in text
    assert _verbs(root) == ["create", "scp", "ssh:setup", "ssh:train", "scp", "scp", "delete"]


def test_a_run_that_lost_a_process_starts_again_on_every_worker_up_to_restarts(fake, monkeypatch):
    root, launch = fake
    monkeypatch.setattr(tpu_vm, "RESTART_DELAY_SECONDS", 0)
    logs = [root / "workers" / f"w{i}" / "nin_logs" / "train.log" for i in range(2)]
    assert launch("create", "v4-16") == 0 and launch("setup", "v4-16") == 0
    (root / "train_exit").write_text("75\n137\n0\n")  # a peer lost, then this process killed, then done
    assert launch("train", "v4-16", *CONFIG) == 0
    for log in logs:
        text = log.read_text()
        assert text.count("fake python -m nin_jax.main") == 3
        assert "== train lost a process (exit code 75): restart 1 of 3" in text
        assert "== train lost a process (exit code 137): restart 2 of 3" in text
        assert "== train exited with code 0" in text
    (root / "train_exit").write_text("75\n")  # every start loses a process: the job gives up
    assert launch("train", "v4-16", "--restarts=1", *CONFIG) == 75
    for log in logs:
        text = log.read_text().split("== train exited with code 0")[1]
        assert text.count("fake python -m nin_jax.main") == 2
        assert "after 1 restart(s) (--restarts=1): giving up" in text and "== train exited with code 75" in text
    (root / "train_exit").write_text("3\n")  # any other failure is not restarted
    assert launch("train", "v4-16", *CONFIG) == 3
    assert logs[0].read_text().split("giving up")[1].count("fake python -m nin_jax.main") == 1
    assert launch("train", "v4-16", "--restarts=-1", *CONFIG) == 2


def test_stop_ends_a_job_without_a_restart(fake, monkeypatch):
    root, launch = fake
    (root / "train_seconds").write_text("120")
    (root / "term_exit").write_text("137")  # as if the run were lost: still no restart after a stop
    assert launch("create", "v4-8") == 0 and launch("setup", "v4-8") == 0
    assert launch("train", "v4-8", "--background", *CONFIG) == 0
    log = root / "workers" / "w0" / "nin_logs" / "train.log"
    _wait_for(lambda: "fake python -m nin_jax.main" in log.read_text())
    assert launch("stop", "v4-8", "--grace_seconds=20") == 0
    text = log.read_text()
    assert "== train exited with code 137" in text and "restart" not in text


def test_all_keeps_the_vm_when_the_connection_drops(fake, capsys):
    root, launch = fake
    (root / "drop_connection").touch()
    assert launch("all", "v4-8", *CONFIG) == 255
    assert "the connection to nin-v4-8 dropped; the job runs on" in capsys.readouterr().err
    assert _verbs(root)[-3:] == ["scp", "ssh:setup", "ssh:train"]  # no delete


def test_setup_ships_only_committed_code_unless_allowed(fake, capsys):
    root, launch = fake
    repo = pathlib.Path(tpu_vm.REPO_ROOT)
    (repo / "requirements.txt").write_text("jax==0.10.2\nnumpy\n")
    (repo / "new_config.py").write_text("x = 1\n")
    assert launch("create", "v4-8") == 0
    assert launch("setup", "v4-8") == 2
    err = capsys.readouterr().err
    assert "the working tree has uncommitted changes (M requirements.txt, ?? new_config.py)" in err
    assert "pass --allow_dirty" in err
    assert launch("setup", "v4-8", "--allow_dirty") == 0
    with tarfile.open(root / "workers" / "w0" / "nin_jax.tar.gz") as tar:
        assert tar.extractfile("requirements.txt").read() == b"jax==0.10.2\nnumpy\n"
        assert tar.extractfile("new_config.py").read() == b"x = 1\n"
    assert (root / "workers" / "w0" / "nin_jax" / "new_config.py").exists()


def test_setup_refuses_while_a_job_runs(fake, capfd):
    root, launch = fake
    (root / "train_seconds").write_text("120")
    assert launch("create", "v4-8") == 0 and launch("setup", "v4-8") == 0
    assert launch("train", "v4-8", "--background", *CONFIG) == 0
    assert launch("setup", "v4-8") == 1
    assert "error: job train still runs on" in capfd.readouterr().err
    assert launch("stop", "v4-8") == 0 and launch("setup", "v4-8") == 0


def test_setup_replaces_the_code_but_keeps_what_it_did_not_ship(fake, capfd):
    root, launch = fake
    assert launch("create", "v4-8") == 0 and launch("setup", "v4-8") == 0
    code = root / "workers" / "w0" / "nin_jax"
    (code / "nin_jax" / "__pycache__").mkdir()
    (code / "nin_jax" / "__pycache__" / "train.cpython-311.pyc").write_bytes(b"")  # Python's own: replaced
    checkpoint = code / "runs" / "x" / "checkpoints" / "6" / "state"  # e.g. a run with --workdir=runs/x
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_text("weights")
    capfd.readouterr()
    assert launch("setup", "v4-8") == 1
    err = capfd.readouterr().err
    assert ("holds 1 file(s) setup did not ship, which replacing the code would delete (first: "
            "./runs/x/checkpoints/6/state); move them out of ~/nin_jax (a workdir belongs on gs://), then rerun "
            "setup") in err, err
    assert checkpoint.read_text() == "weights"
    checkpoint.unlink()
    assert launch("setup", "v4-8") == 0


def test_setup_does_not_replace_a_code_directory_it_did_not_make(fake, capfd):
    root, launch = fake
    assert launch("create", "v4-8") == 0
    notes = root / "workers" / "w0" / "nin_jax" / "notes.txt"
    notes.parent.mkdir()
    notes.write_text("results")
    assert launch("setup", "v4-8") == 1
    assert ("was not made by this setup, which would replace it; check that it holds nothing you need, remove it "
            "(rm -rf ~/nin_jax on every worker), then rerun setup") in capfd.readouterr().err
    assert notes.read_text() == "results"
