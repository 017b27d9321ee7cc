"""A job of 4 processes x 2 host devices that loses one process: the others stop on their own, each with one
line naming the lost process and the last committed checkpoint, exit status 75, within the peer timeout
plus a few heartbeats; the rerun of the same command, or of the same job on 2 processes x 4 devices,
resumes to results bit-identical to a run never interrupted.

Five runs of the same config overlap in time: `reference` (not interrupted) and the faults of `CASES` to
process 2: kill -9 between two checkpoints, during a checkpoint's save and during an evaluation, and
SIGSTOP for longer than the timeout, then SIGCONT. The launcher gives the survivors its grace period, so
they end by themselves, not by its kill.
"""

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from nin_jax.runtime import peers
import helpers_reliability as h

pytestmark = [pytest.mark.cpu, pytest.mark.slow]  # 4-process jobs of CPU host devices: minutes of setup

LAUNCHER = h.REPO / "launch" / "local_multiprocess.py"
NUM_PROCESSES, DEVICES_PER_PROCESS, VICTIM = 4, 2, 2
PEER_TIMEOUT = 20  # seconds; tolerant of 12 processes sharing 2 cores
STOP_SECONDS = PEER_TIMEOUT + 25  # the straggler's pause: past the timeout and the survivors' exit
FAULT_STEP = 10  # between the checkpoints of steps 8 and 12
EVAL_STEP = 12  # a checkpoint and an evaluation
RERUN_PROCESSES = {"killed": NUM_PROCESSES, "mid_save": NUM_PROCESSES // 2}
# Every survivor's exit, counted from the fault: the timeout, two heartbeats to notice, and the leaving.
EXIT_BOUND = PEER_TIMEOUT + 15


def _launch(name, env, log_name=None, changes=None, processes=NUM_PROCESSES):
    log = env["root"] / f"{log_name or name}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, str(LAUNCHER), f"--num_processes={processes}",
             f"--devices_per_process={NUM_PROCESSES * DEVICES_PER_PROCESS // processes}", "--grace_seconds=300", "--",
             f"--workdir={env['root'] / name}", *h.config_flags(env["data_cache"], **(changes or {}))],
            cwd=h.REPO, env={**env["subprocess"], peers.PEER_TIMEOUT_VAR: str(PEER_TIMEOUT)}, stdout=out,
            stderr=subprocess.STDOUT)
    return proc, log


def _child_pids(log) -> list[int]:
    found = re.search(r"\[launcher\] .* pids \[([\d, ]+)\]", log.read_text())
    return [int(p) for p in found.group(1).split(",")] if found else []


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # the launcher reaps its children within 0.1 s of their exit
        return True
    except ProcessLookupError:
        return False


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    yield from h.module_env(tmp_path_factory, "peer_loss")


def _in_eval(workdir) -> bool:
    return EVAL_STEP in h.committed_steps(workdir) and "eval/top1" not in h.read_metrics(workdir).get(EVAL_STEP, {})


# name: (signal to process VICTIM, when, the last committed step the survivors name, config changes)
CASES = {
    "killed": (signal.SIGKILL, lambda wd: h.last_logged_step(wd) >= FAULT_STEP, 8, {}),
    "stopped": (signal.SIGSTOP, lambda wd: h.last_logged_step(wd) >= FAULT_STEP, 8, {}),
    # Step 12's checkpoint started (its train line logged) but not committed: the others wait in its barriers.
    "mid_save": (signal.SIGKILL, lambda wd: h.last_logged_step(wd) >= EVAL_STEP
                 and EVAL_STEP not in h.committed_steps(wd), 8, {}),
    # Step 12 committed, its evaluation (38 batches of 8) running.
    "mid_eval": (signal.SIGKILL, _in_eval, EVAL_STEP, {"run.eval_batch_size": 8}),
}


@pytest.fixture(scope="module")
def runs(env):
    procs, logs = {}, {}
    for name in ("reference", *CASES):
        procs[name], logs[name] = _launch(name, env, changes=CASES.get(name, (0, 0, 0, {}))[3])
    faults, exits, deadline = {}, {}, time.monotonic() + 600
    try:
        while any(p.poll() is None for p in procs.values()):
            for name, (sig, due, _, _) in CASES.items():
                pids = _child_pids(logs[name])
                if name not in faults and pids and procs[name].poll() is None and due(env["root"] / name):
                    os.kill(pids[VICTIM], sig)
                    faults[name] = time.monotonic()
                if name in faults:
                    for i, pid in enumerate(pids):
                        if (name, i) not in exits and not _alive(pid):
                            exits[name, i] = time.monotonic() - faults[name]
            stopped_for = time.monotonic() - faults.get("stopped", time.monotonic())
            if "stopped" in faults and "continued" not in faults and stopped_for > STOP_SECONDS:
                os.kill(_child_pids(logs["stopped"])[VICTIM], signal.SIGCONT)
                faults["continued"] = time.monotonic()
            if time.monotonic() > deadline:
                pytest.fail("timed out:\n" + "\n".join(h.log_tail(log, 20) for log in logs.values()))
            time.sleep(0.01)
    finally:
        for p in procs.values():
            p.kill()
    assert procs["reference"].returncode == 0, h.log_tail(logs["reference"], 60)
    assert set(faults) == {*CASES, "continued"}, {n: h.log_tail(l) for n, l in logs.items() if n not in faults}
    # The reruns of the commands whose checkpoint was being written, with the fault gone: the same command, and
    # the same job on half as many processes (of twice the devices each).
    reruns = {name: _launch(name, env, f"{name}_rerun", processes=RERUN_PROCESSES[name]) for name in RERUN_PROCESSES}
    for name, (proc, log) in reruns.items():
        assert proc.wait(timeout=600) == 0, h.log_tail(log, 60)
        logs[f"{name}_rerun"] = log
    return {"root": env["root"], "logs": logs, "exits": exits, "config": h.make_config(env["data_cache"])}


@pytest.mark.parametrize("name", list(CASES))
def test_every_survivor_stops_with_one_line_naming_the_lost_process(runs, name):
    committed = CASES[name][2]
    text = runs["logs"][name].read_text()
    survivors = [i for i in range(NUM_PROCESSES) if i != VICTIM]
    times = {i: runs["exits"].get((name, i)) for i in survivors}
    print(f"{name}: survivors' exit after the fault (s): {times}")
    assert all(t is not None and t <= EXIT_BOUND for t in times.values()), (times, h.log_tail(runs["logs"][name], 60))
    for i in survivors:
        lines = [l for l in text.splitlines() if l.startswith(f"[p{i}] error:")]
        assert len(lines) == 1, lines
        line = lines[0]
        assert re.fullmatch(
            rf"\[p{i}\] error: process {i} of {NUM_PROCESSES} lost process {VICTIM} \(no sign of life for \d+ s, "
            rf"NIN_JAX_PEER_TIMEOUT\); the job cannot go on without it\. Last committed checkpoint: "
            rf"step {committed} in \S+/checkpoints; rerun the same command \(any process count\) to resume from it\.",
            line), line
        assert f"[p{i}] Traceback" not in text
    codes = [int(c) for c in re.search(r"\[launcher\] exit codes \[([\d, ]+)\]", text).group(1).split(",")]
    assert [c for i, c in enumerate(codes) if i != VICTIM] == [peers.PEER_LOST_EXIT_CODE] * 3
    assert codes[VICTIM] != 0  # killed: 137; stopped: aborted by jax once its coordinator is gone
    assert "killing the processes still running" not in text  # they stopped by themselves


@pytest.mark.parametrize("name", list(RERUN_PROCESSES))
def test_the_rerun_resumes_from_the_last_committed_step_to_the_uninterrupted_results(runs, name):
    rerun, reference = runs["root"] / name, runs["root"] / "reference"
    assert sorted(h.trajectory(rerun)) == list(range(1, h.NUM_STEPS + 1))
    assert h.trajectory(rerun) == h.trajectory(reference)
    assert h.deterministic_results(rerun) == h.deterministic_results(reference)
    restorer = h.Restorer(runs["config"])
    h.assert_states_identical(restorer.restore(rerun)[0], restorer.restore(reference)[0])
    text = runs["logs"][f"{name}_rerun"].read_text()
    for i in range(RERUN_PROCESSES[name]):
        assert f"[p{i}] Resuming from checkpoint step 8 in " in text  # step 12's partial save was not taken
