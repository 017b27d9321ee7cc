"""Faults during training: SIGTERM (preemption), Ctrl-C, kill -9, broken or briefly unreadable checkpoints, a
crash in evaluation, a full disk, and a diverging loss.

Every interrupted run is resumed and compared with one uninterrupted reference run of the same config: the
final state (parameters, BatchNorm statistics, momentum, step, RNG key), results.json's train/eval values
and the whole per-step metrics.jsonl must be bit-identical. Fault steps are drawn from a seeded generator
(RELIABILITY_SEED, default 0) and printed. Training subprocesses share compiled programs with this process
through a persistent compilation cache, so a subprocess costs mostly its imports.
"""

import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from nin_jax import train
from nin_jax.runtime import preemption, record
from nin_jax.runtime.metrics_log import JsonlWriter

import helpers_reliability as h

# Real trainings with kills and restarts (a shared reference run costs ~20 s): the full suite runs them.
pytestmark = pytest.mark.slow

SEED = int(os.environ.get("RELIABILITY_SEED", "0"))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    for environment in h.module_env(tmp_path_factory, "reliability"):
        yield {**environment, "rng": random.Random(SEED)}


def _interrupt_runs(runs: dict, reference_dir, env: dict, status: dict, abort: threading.Event) -> None:
    """Starts the runs once the reference has run (so compiled) a step, and signals each at its target step.

    The compiled programs then come from the shared cache, and the subprocesses' start-up overlaps the rest
    of the reference run. Records exit codes etc. in `runs`; a failure goes to status["error"].
    """
    try:
        deadline = time.monotonic() + 400
        while h.last_logged_step(reference_dir) < 1:
            if abort.is_set() or time.monotonic() > deadline:
                return
            time.sleep(0.05)
        for name, run in runs.items():
            run["proc"] = h.start_main(run["workdir"], h.config_flags(env["data_cache"]), env["subprocess"],
                                       run["log"])
        pending = dict(runs)
        while pending:
            for name, run in list(pending.items()):
                wd, proc = run["workdir"], run["proc"]
                if h.last_logged_step(wd) >= run["target"] and (run["signal"] != signal.SIGKILL
                                                                or h.committed_steps(wd)):
                    proc.send_signal(run["signal"])
                    del pending[name]
                elif proc.poll() is not None or abort.is_set() or time.monotonic() > deadline:
                    status["error"] = f"{name}: exit code {proc.poll()} before step {run['target']}"
                    return
            time.sleep(0.02)
        for name, run in runs.items():
            try:
                run["code"] = run["proc"].wait(timeout=120)
            except subprocess.TimeoutExpired:
                status["error"] = f"{name} did not exit after its signal"
                return
            run["reached"], run["saved"] = h.last_logged_step(run["workdir"]), h.committed_steps(run["workdir"])
    except Exception as e:  # noqa: BLE001 — reported by the fixture in the test thread
        status["error"] = repr(e)
    finally:
        for run in runs.values():
            if "proc" in run and run["proc"].poll() is None:
                run["proc"].kill()


@pytest.fixture(scope="module")
def reference(env, request):
    """An uninterrupted run in this process (every 4th step's checkpoint kept), and, started meanwhile, three
    subprocess runs of the same command: one gets SIGTERM, one kill -9 (after a committed checkpoint), one
    Ctrl-C (SIGINT), at seeded steps. Each of those records: target step, exit code, last logged step,
    committed checkpoints.
    """
    workdir = env["root"] / "reference"
    config = h.make_config(env["data_cache"])
    runs = {"sigterm": {"signal": signal.SIGTERM, "target": env["rng"].choice([5, 9, 13])},
            "kill9": {"signal": signal.SIGKILL, "target": env["rng"].randint(5, h.NUM_STEPS - 6)},
            "sigint": {"signal": signal.SIGINT, "target": env["rng"].choice([6, 11, 15])}}
    for name, run in runs.items():
        run["workdir"], run["log"] = env["root"] / name, env["root"] / f"{name}.log"
    abort = threading.Event()
    thread = threading.Thread(target=_interrupt_runs, args=(runs, workdir, env, status := {}, abort), daemon=True)
    status["thread"] = thread
    if any("interrupted" in item.fixturenames for item in request.session.items):
        thread.start()
    try:
        train.train_and_evaluate(config, str(workdir))
    except BaseException:
        abort.set()
        raise
    assert h.committed_steps(workdir) == list(range(4, h.NUM_STEPS + 1, 4))
    restorer = h.Restorer(config)
    yield {"workdir": workdir, "restorer": restorer, "state": restorer.restore(workdir)[0],
           "results": h.deterministic_results(workdir), "trajectory": h.trajectory(workdir),
           "runs": runs, "status": status}
    abort.set()
    if thread.ident is not None:  # started
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def interrupted(reference):
    """The SIGTERM and kill -9 runs, once both have exited."""
    status, runs = reference["status"], reference["runs"]
    status["thread"].join(timeout=400)
    if status["thread"].is_alive() or "error" in status:
        tails = "\n".join(f"--- {n}\n{h.log_tail(r['log'])}" for n, r in runs.items() if r["log"].exists())
        pytest.fail(f"interrupted runs: {status.get('error', 'timed out')}\n{tails}")
    for name, run in runs.items():
        print(f"{name}: signal after logged step {run['target']}; exit code {run['code']}, logged up to step "
              f"{run['reached']}, checkpoints {run['saved']}")
    return runs


def _assert_same_as_reference(workdir, reference) -> float:
    state, meta = reference["restorer"].restore(workdir)
    assert meta["step"] == h.NUM_STEPS
    diff = h.max_abs_diff(state, reference["state"])
    h.assert_states_identical(state, reference["state"])
    assert h.deterministic_results(workdir) == reference["results"]
    assert h.trajectory(workdir) == reference["trajectory"]  # every logged step's loss, accuracy, lr; the evals
    return diff


def _resume_in_process(workdir, env, capsys) -> str:
    """Reruns the training (what `python -m nin_jax.main` calls) in this process; returns what it printed."""
    capsys.readouterr()
    train.train_and_evaluate(h.make_config(env["data_cache"]), str(workdir))
    return capsys.readouterr().out


def test_sigterm_saves_at_the_next_step_and_resume_is_bit_identical(env, reference, interrupted, capsys):
    run = interrupted["sigterm"]
    assert run["code"] == preemption.PREEMPTED_EXIT_CODE, h.log_tail(run["log"])
    found = re.search(r"Preempted \(SIGTERM\) at step (\d+): checkpoint committed", run["log"].read_text())
    assert found, h.log_tail(run["log"])
    step = int(found.group(1))
    assert run["target"] <= step < h.NUM_STEPS
    assert run["saved"][-1] == step  # the preemption checkpoint, whatever the save interval
    assert not (run["workdir"] / "results.json").exists()

    out = _resume_in_process(run["workdir"], env, capsys)
    assert f"Resuming from checkpoint step {step}" in out
    assert _assert_same_as_reference(run["workdir"], reference) == 0.0


def test_ctrl_c_saves_at_the_next_step_exits_130_and_resume_is_bit_identical(env, reference, interrupted, capsys):
    run = interrupted["sigint"]
    text = run["log"].read_text()
    assert run["code"] == preemption.INTERRUPTED_EXIT_CODE, h.log_tail(run["log"])
    found = re.search(r"Interrupted \(SIGINT\) at step (\d+): checkpoint committed in \S+\. Rerun the same command "
                      r"to resume from step (\d+)\.", text)
    assert found and found.group(1) == found.group(2), h.log_tail(run["log"])
    step = int(found.group(1))
    assert run["target"] <= step < h.NUM_STEPS
    assert run["saved"][-1] == step
    assert "Traceback" not in text and "KeyboardInterrupt" not in text
    assert not (run["workdir"] / "results.json").exists() and not (run["workdir"] / "lock").exists()

    out = _resume_in_process(run["workdir"], env, capsys)
    assert f"Resuming from checkpoint step {step}" in out
    assert _assert_same_as_reference(run["workdir"], reference) == 0.0


def _signal_during_step(monkeypatch, at_step: int, count: int):
    """The compiled train step sends this process `count` SIGINTs while it computes step `at_step` (1-based)."""
    real = train.make_train_step

    def make_train_step(*args, **kwargs):
        step_fn, calls = real(*args, **kwargs), []

        def wrapped(state, batch):
            calls.append(1)
            if len(calls) == at_step:
                for _ in range(count):
                    os.kill(os.getpid(), signal.SIGINT)  # the handler runs before the next line
            return step_fn(state, batch)

        return wrapped

    monkeypatch.setattr(train, "make_train_step", make_train_step)


def test_second_ctrl_c_stops_at_once_and_says_where_the_rerun_resumes(env, reference, monkeypatch, capsys):
    workdir = env["root"] / "double_ctrl_c"
    _signal_during_step(monkeypatch, at_step=7, count=2)
    with pytest.raises(preemption.Preempted) as stopped:
        train.train_and_evaluate(h.make_config(env["data_cache"]), str(workdir))
    assert stopped.value.code == preemption.INTERRUPTED_EXIT_CODE and stopped.value.step is None
    assert stopped.value.message == ("Stopped at once by a second Ctrl-C after step 6; the steps since the last "
                                     "checkpoint are lost. Rerun the same command to resume from step 4.")
    assert h.committed_steps(workdir) == [4] and not (workdir / "lock").exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
    monkeypatch.undo()
    out = _resume_in_process(workdir, env, capsys)
    assert "Resuming from checkpoint step 4" in out
    assert _assert_same_as_reference(workdir, reference) == 0.0


def test_transient_read_error_at_restore_keeps_and_uses_the_newest_step(env, reference, monkeypatch, capsys):
    """The newest step fails twice with a storage error (as gs:// can), then reads: nothing is demoted."""
    from nin_jax import checkpointing
    from nin_jax.runtime import recovery

    workdir = env["root"] / "transient"
    _copy_run(reference["workdir"], workdir, [16, 20])
    real, calls = checkpointing.restore, []

    def flaky(mngr, step, abstract_state):
        calls.append(step)
        if len(calls) <= 2:
            raise ValueError(f'UNAVAILABLE: Error reading "state" in OCDBT database at "{mngr.directory}/{step}"')
        return real(mngr, step, abstract_state)

    monkeypatch.setattr(checkpointing, "restore", flaky)
    monkeypatch.setattr(recovery, "RESTORE_BACKOFF_S", 0.01)
    out = _resume_in_process(workdir, env, capsys)
    assert calls == [20, 20, 20]
    assert "Resuming from checkpoint step 20" in out and "unreadable" not in out
    assert not list((workdir / "checkpoints").glob("*.unreadable"))
    assert _assert_same_as_reference(workdir, reference) == 0.0


@pytest.mark.parametrize("failing_eval", [1, 2], ids=["mid_run_eval", "final_eval"])
def test_crash_in_evaluation_keeps_the_checkpoint_before_it_and_the_rerun_completes(
        env, reference, monkeypatch, capsys, failing_eval):
    """The evaluation at step 12 or 24 (the final one) dies, as a hung all-reduce would; its step's checkpoint
    is already committed, and the rerun evaluates that step and finishes bit-identical to the reference."""
    workdir = env["root"] / f"eval_crash_{failing_eval}"
    real, calls = train.evaluate, []

    def evaluate(*args, **kwargs):
        calls.append(1)
        if len(calls) == failing_eval:
            raise RuntimeError("Rendezvous timed out: all-reduce of the eval step (injected)")
        return real(*args, **kwargs)

    monkeypatch.setattr(train, "evaluate", evaluate)
    with pytest.raises(RuntimeError, match="Rendezvous timed out"):
        train.train_and_evaluate(h.make_config(env["data_cache"]), str(workdir))
    crashed_at = 12 * failing_eval
    assert h.committed_steps(workdir)[-1] == crashed_at
    assert not (workdir / "results.json").exists() and not (workdir / "lock").exists()
    monkeypatch.undo()
    out = _resume_in_process(workdir, env, capsys)
    assert f"Resuming from checkpoint step {crashed_at}" in out
    assert _assert_same_as_reference(workdir, reference) == 0.0
    best = checkpointing_best_step(workdir)
    assert best in h.committed_steps(workdir)


def checkpointing_best_step(workdir) -> int:
    """The step `evaluate --checkpoint=best` would pick (every evaluated checkpoint carries eval/top1)."""
    from nin_jax import checkpointing

    mngr = checkpointing.create_manager(workdir / "checkpoints", keep=100, read_only=True)
    scored = {s: (mngr.metrics(s) or {}).get(checkpointing.BEST_METRIC) for s in mngr.all_steps()}
    mngr.close()
    assert scored[12] is not None and scored[24] is not None, scored
    return max((v, s) for s, v in scored.items() if v is not None)[1]


def _inject_enospc(where: str, at: int) -> None:
    """From step `at` on, the checkpoint writer (Orbax's save) or the metrics writer fails with ENOSPC."""
    import errno

    import orbax.checkpoint as ocp

    real_save, real_write = ocp.CheckpointManager.save, JsonlWriter.write_scalars

    def save(self, step, *args, **kwargs):
        if where == "checkpoint" and step >= at:
            raise OSError(errno.ENOSPC, "No space left on device", f"{self.directory}/{step}.orbax-checkpoint-tmp")
        return real_save(self, step, *args, **kwargs)

    def write(self, step, scalars):
        if where == "metrics" and step >= at:
            raise OSError(errno.ENOSPC, "No space left on device", str(self._path))
        return real_write(self, step, scalars)

    ocp.CheckpointManager.save, JsonlWriter.write_scalars = save, write


_ENOSPC_DRIVER = """
import sys
import test_reliability
from nin_jax import main
test_reliability._inject_enospc(sys.argv.pop(1), int(sys.argv.pop(1)))
main.run()
"""


@pytest.mark.parametrize("where, at", [("checkpoint", 12), ("metrics", 10)])
def test_full_disk_stops_with_one_message_keeps_the_checkpoints_and_the_rerun_completes(
        env, reference, monkeypatch, capsys, where, at):
    import orbax.checkpoint as ocp

    workdir = env["root"] / f"enospc_{where}"
    monkeypatch.setattr(ocp.CheckpointManager, "save", ocp.CheckpointManager.save)  # undone after the test
    monkeypatch.setattr(JsonlWriter, "write_scalars", JsonlWriter.write_scalars)
    _inject_enospc(where, at)
    with pytest.raises(record.StorageFullError) as error:
        train.train_and_evaluate(h.make_config(env["data_cache"]), str(workdir))
    message = str(error.value)
    path = workdir / ("checkpoints/12.orbax-checkpoint-tmp" if where == "checkpoint" else "metrics.jsonl")
    assert message == (
        f"no space left on the storage of --workdir={workdir} (writing {path}); the run stopped and checkpoints 4, 8 "
        f"in {workdir / 'checkpoints'} are intact (an unfinished save leaves only a temporary directory, removed at "
        "the next start). Free space there (or raise the quota) and rerun the same command to resume from step 8.")
    assert h.committed_steps(workdir) == [4, 8] and not (workdir / "lock").exists()
    monkeypatch.undo()
    out = _resume_in_process(workdir, env, capsys)
    assert "Resuming from checkpoint step 8" in out
    assert _assert_same_as_reference(workdir, reference) == 0.0


@pytest.mark.slow
def test_full_disk_on_the_command_line_is_one_line(env, reference):
    workdir = env["root"] / "enospc_cli"
    proc = subprocess.run([sys.executable, "-c", _ENOSPC_DRIVER, "checkpoint", "12", f"--workdir={workdir}",
                           *h.config_flags(env["data_cache"])], cwd=h.REPO / "tests", env=env["subprocess"],
                          capture_output=True, text=True, timeout=300)
    print(proc.stderr[-3000:])
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    # absl's ERROR lines start with E and the date; the run's own message with "error:".
    errors = [line for line in proc.stderr.splitlines()
              if line.startswith("error:") or re.match(r"E\d{4} ", line) or "No space left" in line]
    assert len(errors) == 1 and errors[0].startswith(f"error: no space left on the storage of --workdir={workdir}")
    assert h.committed_steps(workdir) == [4, 8]


@pytest.mark.slow
def test_really_full_disk_is_one_line_and_the_rerun_with_space_completes(env, reference, capsys):
    """The same on a real 900 KiB tmpfs (needs mount rights: root): it fills at the checkpoint of step 12."""
    mount = env["root"] / "tmpfs"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=900k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        workdir = mount / "run"
        proc = subprocess.run([sys.executable, "-m", "nin_jax.main", f"--workdir={workdir}",
                               *h.config_flags(env["data_cache"])], cwd=h.REPO, env=env["subprocess"],
                              capture_output=True, text=True, timeout=300)
        print(proc.stderr[-2000:])
        assert proc.returncode == 1 and "Traceback" not in proc.stderr
        errors = [line for line in proc.stderr.splitlines()
                  if line.startswith("error:") or re.match(r"E\d{4} ", line) or "No space left" in line]
        assert len(errors) == 1 and errors[0].startswith("error: no space left on the storage of"), errors
        steps = h.committed_steps(workdir)
        assert steps and f"rerun the same command to resume from step {steps[-1]}." in errors[0]
        subprocess.run(["mount", "-o", "remount,size=64m", str(mount)], check=True)
        out = _resume_in_process(workdir, env, capsys)
        assert f"Resuming from checkpoint step {steps[-1]}" in out
        assert _assert_same_as_reference(workdir, reference) == 0.0
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_kill9_then_rerun_is_bit_identical(env, reference, interrupted, capsys):
    run = interrupted["kill9"]
    assert run["code"] == -signal.SIGKILL
    assert not (run["workdir"] / "results.json").exists()
    assert run["saved"] and run["saved"][-1] <= run["reached"] < h.NUM_STEPS

    assert (run["workdir"] / "lock").exists()  # left by the killed process

    out = _resume_in_process(run["workdir"], env, capsys)
    assert f"took over the stale lock {run['workdir'] / 'lock'} of host " in out
    assert f"process {run['proc'].pid} on this host is no longer running" in out
    assert f"Resuming from checkpoint step {run['saved'][-1]}" in out
    assert _assert_same_as_reference(run["workdir"], reference) == 0.0


def _copy_run(reference_dir, workdir, steps):
    (workdir / "checkpoints").mkdir(parents=True)
    for name in ("config.json", "metrics.jsonl"):
        shutil.copy(reference_dir / name, workdir / name)
    for step in steps:
        shutil.copytree(reference_dir / "checkpoints" / str(step), workdir / "checkpoints" / str(step))


def _truncate_files(directory) -> int:
    files = [p for p in directory.rglob("*") if p.is_file()]
    for p in files:
        with open(p, "r+b") as f:
            f.truncate(p.stat().st_size // 2)
    return len(files)


def _flip_bytes(directory) -> None:
    """Inverts 64 bytes in the middle of the largest file (array data), keeping every size and name."""
    data = max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    raw = bytearray(data.read_bytes())
    middle = len(raw) // 2
    raw[middle:middle + 64] = bytes(b ^ 0xFF for b in raw[middle:middle + 64])
    data.write_bytes(bytes(raw))


def test_damaged_latest_checkpoints_resume_from_the_last_intact_one(env, reference, capsys):
    """Step 20 truncated (fails to read), step 16 with flipped bytes (reads, fails its digest): resume at 12."""
    workdir = env["root"] / "damaged"
    _copy_run(reference["workdir"], workdir, [4, 8, 12, 16, 20])
    assert _truncate_files(workdir / "checkpoints" / "20") > 3
    _flip_bytes(workdir / "checkpoints" / "16" / "state")

    out = _resume_in_process(workdir, env, capsys)
    for step in (20, 16):
        assert re.search(rf"checkpoint \S+/{step} is unreadable", out), out
        assert (workdir / "checkpoints" / f"{step}.unreadable").is_dir()  # kept for inspection, never restored
    assert "Resuming from checkpoint step 12" in out
    assert _assert_same_as_reference(workdir, reference) == 0.0


def test_half_written_checkpoint_is_ignored(env, reference, capsys):
    """A crash during a save leaves Orbax's temporary directory; the previous step is restored."""
    workdir = env["root"] / "half_written"
    _copy_run(reference["workdir"], workdir, [16, 20])
    tmp = workdir / "checkpoints" / "24.orbax-checkpoint-tmp"
    shutil.copytree(reference["workdir"] / "checkpoints" / "24", tmp)
    _truncate_files(tmp / "state")

    out = _resume_in_process(workdir, env, capsys)
    assert "Resuming from checkpoint step 20" in out
    assert "unreadable" not in out
    assert not tmp.exists()
    assert _assert_same_as_reference(workdir, reference) == 0.0


def test_nonfinite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(env):
    workdir = env["root"] / "diverge"
    config = h.make_config(env["data_cache"], optim__learning_rate=1e30, run__checkpoint_every_steps=2,
                           optim__weight_decay=0.0)
    with pytest.raises(train.NonFiniteLossError) as error:
        train.train_and_evaluate(config, str(workdir))
    message = str(error.value)
    print(message)
    found = re.search(r"became (\S+) at step (\d+); stopped, and the last good checkpoint \(step (\d+)\)", message)
    assert found, message
    bad_step, kept = int(found.group(2)), int(found.group(3))
    assert kept < bad_step < h.NUM_STEPS
    losses = {s: row.get("train/loss") for s, row in h.read_metrics(workdir).items()}
    assert all(np.isfinite(losses[s]) for s in range(1, bad_step))  # nothing non-finite before the named step
    assert h.committed_steps(workdir)[-1] == kept
    state, meta = h.Restorer(config).restore(workdir, kept)
    assert meta["step"] == kept
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(state.params)))


def test_nonfinite_parameters_are_never_saved(env, monkeypatch):
    """An update can overflow although its loss was finite: simulated at the second save (step 8)."""
    workdir, real, calls = env["root"] / "overflow", train._all_finite, []

    def all_finite(tree):
        calls.append(1)
        return real(tree) & (len(calls) < 2)

    monkeypatch.setattr(train, "_all_finite", all_finite)
    with pytest.raises(train.NonFiniteLossError, match=r"the parameters became non-finite at step 8 \(its loss was "
                       r"finite\); stopped, and the last good checkpoint \(step 4\)"):
        train.train_and_evaluate(h.make_config(env["data_cache"]), str(workdir))
    assert h.committed_steps(workdir) == [4]
