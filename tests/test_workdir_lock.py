"""One training per workdir: the lock's record, refusal naming the holder, stale locks, object-store creation,
and two real trainings started in one workdir."""

import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from nin_jax import train
from nin_jax.runtime import lock as lock_lib
import helpers_reliability as h


def _record(path):
    return json.loads(path.read_text())


def test_lock_records_its_holder_refuses_a_second_and_is_released(tmp_path):
    first = lock_lib.WorkdirLock(tmp_path)
    first.acquire()
    record = _record(tmp_path / "lock")
    assert (record["host"], record["pid"], record["token"]) == (socket.gethostname(), os.getpid(), first.token)
    with pytest.raises(lock_lib.WorkdirLocked) as error:
        lock_lib.WorkdirLock(tmp_path).acquire()
    message = str(error.value)
    assert f"is in use by another training (host {socket.gethostname()} pid {os.getpid()}, started " in message
    assert "\n" not in message
    first.release()
    assert not (tmp_path / "lock").exists()
    second = lock_lib.WorkdirLock(tmp_path)
    second.acquire()
    second.release()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _plant(path, **fields):
    record = {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": None, "token": "old",
              "started": time.time(), "heartbeat": time.time(), "started_utc": "then", **fields}
    path.write_text(json.dumps(record))


@pytest.mark.parametrize("holder", ["dead_pid_here", "reused_pid_here", "silent_other_host"])
def test_stale_lock_is_taken_over(tmp_path, capsys, holder):
    lock_path = tmp_path / "lock"
    if holder == "dead_pid_here":  # what kill -9 leaves
        _plant(lock_path, pid=_dead_pid())
    elif holder == "reused_pid_here":  # the pid runs, but it is a newer process than the holder
        _plant(lock_path, pid=os.getpid(), pid_start="1")
    else:
        _plant(lock_path, host="elsewhere", heartbeat=time.time() - lock_lib.LOCK_STALE_S - 1)
    lock = lock_lib.WorkdirLock(tmp_path)
    lock.acquire()
    assert _record(lock_path)["token"] == lock.token
    assert "took over the stale lock" in capsys.readouterr().out
    assert not (tmp_path / "lock.takeover").exists()
    lock.release()


def test_live_lock_on_another_host_is_respected_until_its_heartbeat_stops(tmp_path):
    _plant(tmp_path / "lock", host="elsewhere", pid=1234, heartbeat=time.time() - 60)
    with pytest.raises(lock_lib.WorkdirLocked, match=r"host elsewhere pid 1234, .* heartbeat 60 s ago"):
        lock_lib.WorkdirLock(tmp_path).acquire()
    assert _record(tmp_path / "lock")["token"] == "old"


def test_heartbeat_refreshes_the_lock_and_notices_losing_it(tmp_path):
    lock = lock_lib.WorkdirLock(tmp_path, heartbeat_s=0.05)
    lock.acquire()
    first = _record(tmp_path / "lock")["heartbeat"]
    time.sleep(0.3)
    assert _record(tmp_path / "lock")["heartbeat"] > first and lock.lost is None
    _plant(tmp_path / "lock", token="someone else")
    deadline = time.monotonic() + 5
    while lock.lost is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert "was removed or taken over" in lock.lost
    lock.release()
    assert _record(tmp_path / "lock")["token"] == "someone else"  # not ours to remove


@pytest.mark.parametrize("local", [True, False])
def test_exclusive_create_has_one_winner_among_racing_threads(tmp_path, monkeypatch, local):
    """Local disk (hard link) and the object-store protocol (claims, forced here on a local path)."""
    if not local:
        monkeypatch.setattr(lock_lib, "_is_local", lambda path: False)
    for round_ in range(5):
        path = tmp_path / f"lock{round_}"
        barrier, wins = threading.Barrier(6), []

        def contend(i):
            barrier.wait()
            for _ in range(20):  # the object-store protocol may let every contender lose a round: retry
                if lock_lib._create_exclusive(lock_lib.epath.Path(path), f"writer {i}"):
                    wins.append(i)
                    return
                if path.exists():
                    return
                time.sleep(0.01 * (i + 1))

        threads = [threading.Thread(target=contend, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(wins) == 1 and path.read_text() == f"writer {wins[0]}"
        if not local:
            assert not list((tmp_path / f"lock{round_}.claims").iterdir())  # every claim withdrawn


def test_lock_through_the_object_store_protocol(tmp_path, monkeypatch):
    monkeypatch.setattr(lock_lib, "_is_local", lambda path: False)
    lock = lock_lib.WorkdirLock(tmp_path)
    lock.acquire()
    with pytest.raises(lock_lib.WorkdirLocked, match="in use by another training"):
        lock_lib.WorkdirLock(tmp_path).acquire()
    lock.release()
    assert not (tmp_path / "lock").exists()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    yield from h.module_env(tmp_path_factory, "workdir_lock")


@pytest.mark.slow
def test_second_training_in_a_running_workdir_is_refused_and_the_first_finishes_intact(env, capsys):
    workdir, log = env["root"] / "shared", env["root"] / "first.log"
    proc = h.start_main(workdir, h.config_flags(env["data_cache"]), env["subprocess"], log)
    try:
        h.wait_until(lambda: h.last_logged_step(workdir) >= 2, proc, log)
        before = (workdir / "config.json").read_text()
        with pytest.raises(lock_lib.WorkdirLocked) as error:
            train.train_and_evaluate(h.make_config(env["data_cache"]), str(workdir))
        print(error.value)
        assert f"pid {proc.pid}" in str(error.value)
        assert proc.wait(timeout=300) == 0, h.log_tail(log)
    finally:
        proc.kill()
    assert (workdir / "config.json").read_text() == before
    results = json.loads((workdir / "results.json").read_text())
    assert results["step"] == h.NUM_STEPS and "resumed_from_step" not in results
    assert sorted(h.read_metrics(workdir)) == list(range(1, h.NUM_STEPS + 1))  # one run's lines, each step once
    assert h.committed_steps(workdir) == list(range(4, h.NUM_STEPS + 1, 4))
    assert not (workdir / "lock").exists()
