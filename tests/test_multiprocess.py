"""Real multi-process training on CPU: two `nin_jax.main` processes joined by `jax.distributed` (gloo).

2 processes x 2 host devices and 1 process x 4 host devices (both through the launcher, so both use gloo
collectives) train the same config on the same global batches and must agree: to 1e-5 asserted, bit for
bit measured. (A process *without* `jax.distributed` all-reduces with XLA's in-process CPU collectives,
which sum in device order, not gloo's: measured with 8 devices, such a run differs from a gloo run by 1 ulp
of the loss from step 2 on, at most 5e-7 over 24 steps.) Checkpoints move between topologies both ways
(1 device <-> 4 devices on 2 processes, and onto this test process's 8 devices), and SIGTERM sent to one
process stops both at the same step. The launcher's own behaviour (environment, failure, signal
forwarding) is tested with a tiny stand-in module, which costs no jax start-up.
"""

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import pytest

from nin_jax import checkpointing
from nin_jax.runtime import preemption
import helpers_reliability as h

pytestmark = [pytest.mark.cpu, pytest.mark.slow]  # processes of CPU host devices: ~1 min of setup

LAUNCHER = h.REPO / "launch" / "local_multiprocess.py"
NUM_PROCESSES, DEVICES_PER_PROCESS = 2, 2
NUM_DEVICES = NUM_PROCESSES * DEVICES_PER_PROCESS
# The multi-process run resumed from a 1-device checkpoint of RESUME_STEP. SIGTERM goes to it once step
# RESUME_STEP + 3 is logged; the steps after that must outlast the signal's way through the preemption sync
# service even when an idle machine runs ~10 steps/s.
NUM_STEPS, RESUME_STEP = 40, 8
CHANGES = {"num_train_steps": NUM_STEPS, "run.eval_every_steps": 8}


def _launch(workdir, log, env, data_cache, *, module_args=None, num_processes=NUM_PROCESSES,
            devices_per_process=DEVICES_PER_PROCESS, launcher_args=None) -> subprocess.Popen:
    args = module_args if module_args is not None else [f"--workdir={workdir}", *h.config_flags(data_cache, **CHANGES)]
    with open(log, "w") as out:
        return subprocess.Popen(
            [sys.executable, str(LAUNCHER), f"--num_processes={num_processes}",
             f"--devices_per_process={devices_per_process}", *(launcher_args or []), "--", *args],
            cwd=h.REPO, env=env, stdout=out, stderr=subprocess.STDOUT)


def _child_pids(log) -> list[int]:
    found = re.search(r"\[launcher\] .* pids \[([\d, ]+)\]", log.read_text())
    return [int(p) for p in found.group(1).split(",")] if found else []


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    yield from h.module_env(tmp_path_factory, "multiprocess")


def _prepare_resume_from_one_device(source, workdir, config) -> None:
    """`workdir` holding checkpoint RESUME_STEP of `source`, restored on one device and saved from there."""
    (workdir / "checkpoints").mkdir(parents=True)
    shutil.copy(source / "config.json", workdir / "config.json")
    lines = (source / "metrics.jsonl").read_text().splitlines(keepends=True)
    (workdir / "metrics.jsonl").write_text("".join(l for l in lines if json.loads(l)["step"] <= RESUME_STEP))
    state, meta = h.Restorer(config, jax.devices()[:1]).restore(source, RESUME_STEP)
    mngr = checkpointing.create_manager(workdir / "checkpoints", keep=100)
    checkpointing.save(mngr, RESUME_STEP, state, meta)
    mngr.wait_until_finished()
    mngr.close()


@pytest.fixture(scope="module")
def runs(env):
    """Three launched runs of the same config, overlapping in time:

    multi: 2 processes x 2 devices; single: 1 process x 4 devices; resumed: 2 x 2 again, resuming from
    multi's checkpoint RESUME_STEP restored and re-saved on one device, stopped by SIGTERM to process 1 only.
    """
    out = {"config": h.make_config(env["data_cache"], **CHANGES)}
    for name in ("multi", "single", "resumed"):
        out[name], out[f"{name}_log"] = env["root"] / name, env["root"] / f"{name}.log"
    procs = {name: _launch(out[name], out[f"{name}_log"], env["subprocess"], env["data_cache"], num_processes=n,
                           devices_per_process=k)
             for name, n, k in (("multi", NUM_PROCESSES, DEVICES_PER_PROCESS),
                                ("single", 1, NUM_DEVICES))}
    deadline, signalled = time.monotonic() + 500, False
    try:
        while True:
            if "resumed" not in procs and RESUME_STEP in h.committed_steps(out["multi"]):
                _prepare_resume_from_one_device(out["multi"], out["resumed"], out["config"])
                procs["resumed"] = _launch(out["resumed"], out["resumed_log"], env["subprocess"], env["data_cache"])
            if ("resumed" in procs and not signalled and h.last_logged_step(out["resumed"]) >= RESUME_STEP + 3
                    and len(_child_pids(out["resumed_log"])) == NUM_PROCESSES):
                os.kill(_child_pids(out["resumed_log"])[1], signal.SIGTERM)
                signalled = True
            codes = {name: p.poll() for name, p in procs.items()}
            for name, code in codes.items():
                if code not in (None, 0) and not (name == "resumed" and signalled):
                    pytest.fail(f"{name} exited with {code}:\n{h.log_tail(out[f'{name}_log'], 60)}")
            if len(codes) == 3 and None not in codes.values():
                break
            if time.monotonic() > deadline:
                pytest.fail("timed out: " + ", ".join(f"{n} exit code {c}" for n, c in codes.items()))
            time.sleep(0.05)
    finally:
        for p in procs.values():
            p.kill()
    out["resumed_code"] = codes["resumed"]
    return out


def test_two_processes_train_exactly_like_one(runs):
    text = runs["multi_log"].read_text()
    for i in range(NUM_PROCESSES):
        assert f"[p{i}] nin_digits: 29,412 params, {NUM_DEVICES} devices on 2 process(es)" in text
    multi, single = h.trajectory(runs["multi"]), h.trajectory(runs["single"])
    assert sorted(multi) == sorted(single) == list(range(1, NUM_STEPS + 1))
    loss_diff = max(abs(multi[s]["train/loss"] - single[s]["train/loss"]) for s in multi)
    restorer = h.Restorer(runs["config"])
    state_diff = h.max_abs_diff(restorer.restore(runs["multi"])[0], restorer.restore(runs["single"])[0])
    print(f"{NUM_PROCESSES} processes x {DEVICES_PER_PROCESS} devices vs 1 x {NUM_DEVICES}: max |train/loss diff| "
          f"{loss_diff}, max |state diff| {state_diff}")
    assert f"[p0] nin_digits: 29,412 params, {NUM_DEVICES} devices on 1 process(es)" in runs["single_log"].read_text()
    assert loss_diff <= 1e-5
    evals = [{k: v for k, v in h.deterministic_results(w).items() if k.startswith("eval/")}
             for w in (runs["multi"], runs["single"])]
    assert evals[0] == evals[1]
    assert evals[0]["eval/num_examples"] == 297


def test_checkpoint_of_two_processes_restores_on_one_device(runs):
    one = h.Restorer(runs["config"], jax.devices()[:1])
    state, meta = one.restore(runs["multi"])
    assert meta["step"] == NUM_STEPS
    assert {s.device for leaf in jax.tree.leaves(state.params) for s in leaf.addressable_shards} == {jax.devices()[0]}
    ev = one.evaluate(state)
    saved = json.loads((runs["multi"] / "results.json").read_text())
    print("eval on 1 device:", ev, "| the 2-process run's:", {k: saved[k] for k in ev})
    _assert_same_eval(ev, saved)


def _assert_same_eval(a: dict, b: dict) -> None:
    """Counts are exact; the mean loss is a float32 sum whose order depends on the device count (1 ulp)."""
    for k in ("eval/top1", "eval/top5", "eval/num_examples"):
        assert a[k] == b[k], k
    assert abs(a["eval/loss"] - b["eval/loss"]) <= 1e-6 * abs(b["eval/loss"])


def test_resume_one_device_checkpoint_on_two_processes_and_preempt_one(runs):
    """A 1-device checkpoint resumes on 2 processes; SIGTERM to process 1 alone stops both at one step."""
    workdir, log = runs["resumed"], runs["resumed_log"]
    text = log.read_text()
    assert runs["resumed_code"] == preemption.PREEMPTED_EXIT_CODE, h.log_tail(log, 60)
    assert f"[p0] Resuming from checkpoint step {RESUME_STEP}" in text
    assert len(re.findall(r"\[p\d\] Preempted \(SIGTERM\)", text)) == NUM_PROCESSES, h.log_tail(log, 60)
    steps = {int(m.group(1)) for m in re.finditer(r"\[p\d\] Preempted \(SIGTERM\) at step (\d+)", text)}
    assert len(steps) == 1, steps  # both processes stopped at the same step
    step = steps.pop()
    assert RESUME_STEP + 3 <= step < NUM_STEPS and h.committed_steps(workdir)[-1] == step
    assert "[launcher] exit codes [143, 143]" in text

    # The resumed steps follow the uninterrupted run; the checkpoint saved on 2 processes restores on 1 device.
    resumed, reference = h.trajectory(workdir), h.trajectory(runs["multi"])
    loss_diff = max(abs(resumed[s]["train/loss"] - reference[s]["train/loss"]) for s in range(1, step + 1))
    one, eight = h.Restorer(runs["config"], jax.devices()[:1]), h.Restorer(runs["config"])
    on_one, on_eight = one.restore(workdir, step)[0], eight.restore(workdir, step)[0]
    same_step = step in h.committed_steps(runs["multi"])  # compare states too when the uninterrupted run has it
    state_diff = h.max_abs_diff(on_eight, eight.restore(runs["multi"], step)[0]) if same_step else 0.0
    print(f"resumed at {RESUME_STEP}, preempted at {step}: max |train/loss diff| vs uninterrupted {loss_diff}"
          + (f", max |state diff| {state_diff}" if same_step else ""))
    assert state_diff <= 1e-5
    assert loss_diff <= 1e-5
    h.assert_states_identical(on_one, on_eight)
    _assert_same_eval(one.evaluate(on_one), eight.evaluate(on_eight))


def _launcher_module():
    spec = importlib.util.spec_from_file_location("local_multiprocess", LAUNCHER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_STAND_IN = """
import os, signal, sys, time
e = os.environ
print("env", e["JAX_PROCESS_ID"], e["JAX_NUM_PROCESSES"], e["JAX_COORDINATOR_ADDRESS"], e.get("XLA_FLAGS", ""),
      flush=True)
if sys.argv[1] == "fail" and e["JAX_PROCESS_ID"] == "1":
    sys.exit(3)
if sys.argv[1] == "preempt":
    signal.signal(signal.SIGTERM, lambda *_: (print("got SIGTERM", flush=True), sys.exit(143)))
    print("ready", flush=True)
time.sleep(60)
"""


@pytest.fixture
def stand_in(tmp_path):
    (tmp_path / "mp_stand_in.py").write_text(_STAND_IN)
    env = dict(h.subprocess_env(tmp_path / "unused"), PYTHONPATH=str(tmp_path))
    return env


def test_launcher_gives_the_others_a_grace_period_then_kills_them_when_one_process_fails(tmp_path, stand_in):
    log = tmp_path / "fail.log"
    start = time.monotonic()
    proc = _launch(None, log, stand_in, None, module_args=["fail"], devices_per_process=3,
                   launcher_args=["--module=mp_stand_in", "--grace_seconds=5"])
    code = proc.wait(timeout=60)
    text = log.read_text()
    assert code == 3, text
    assert time.monotonic() - start < 30  # process 0 (sleeping 60 s) was killed after the grace period
    assert re.search(r"\[p0\] env 0 2 127\.0\.0\.1:\d+ (\S+ )*--xla_force_host_platform_device_count=3\n", text), text
    assert re.search(r"\[p1\] env 1 2 127\.0\.0\.1:\d+ (\S+ )*--xla_force_host_platform_device_count=3\n", text), text
    assert "[launcher] process 1 failed with exit code 3; the others have 5s to stop" in text
    assert "[launcher] a process exited 5s ago; killing the processes still running" in text
    assert "[launcher] exit codes [137, 3]" in text


def test_launcher_forwards_sigterm(tmp_path, stand_in):
    log = tmp_path / "preempt.log"
    proc = _launch(None, log, stand_in, None, module_args=["preempt"], launcher_args=["--module=mp_stand_in"])
    h.wait_until(lambda: log.read_text().count("ready") == 2, proc, log, timeout=60)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == preemption.PREEMPTED_EXIT_CODE
    text = log.read_text()
    assert "[p0] got SIGTERM" in text and "[p1] got SIGTERM" in text
    assert "[launcher] exit codes [143, 143]" in text


def test_launcher_environment_for_gpus_and_cpus():
    launcher = _launcher_module()
    base = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_cpu_use_thunk_runtime=false"}
    gpu = launcher.process_env(base, process_id=1, num_processes=2, port=1234, devices_per_process=1,
                               gpus_per_process=2)
    assert gpu["CUDA_VISIBLE_DEVICES"] == "2,3"
    assert gpu["XLA_FLAGS"] == "--xla_cpu_use_thunk_runtime=false"
    assert (gpu["JAX_COORDINATOR_ADDRESS"], gpu["JAX_NUM_PROCESSES"], gpu["JAX_PROCESS_ID"]) == ("127.0.0.1:1234", "2", "1")
    cpu = launcher.process_env(base, process_id=0, num_processes=2, port=1234, devices_per_process=2,
                               gpus_per_process=0)
    assert "CUDA_VISIBLE_DEVICES" not in cpu
    assert cpu["XLA_FLAGS"] == "--xla_cpu_use_thunk_runtime=false --xla_force_host_platform_device_count=2"
    with pytest.raises(ValueError, match="--num_processes=0"):
        launcher.launch(["true"], num_processes=0)
    assert launcher.free_port() > 0
