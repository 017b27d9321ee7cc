"""One training per workdir: `<workdir>/lock`, held by process 0 of a job, on local disks and object stores."""

from __future__ import annotations

import json
import logging
import os
import random
import socket
import sys
import threading
import time
import uuid

import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from nin_jax.config import ConfigError


class WorkdirLocked(Exception):
    """Another run holds the workdir's lock (or this run lost it); the message names the holder."""


LOCK_NAME = "lock"
LOCK_HEARTBEAT_S = 30.0  # the holder rewrites its lock this often
LOCK_STALE_S = 300.0  # a lock not rewritten for this long is stale: its holder is gone (or hung), on any host
_CLAIM_STALE_S = 60.0  # a claim (object-store exclusive create) left by a process killed while creating a lock


def _is_local(path: epath.Path) -> bool:
    return "://" not in str(path)


def _process_start(pid: int) -> str | None:
    """The kernel's start time of `pid` (Linux), which tells a reused pid from the original process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _pid_alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    now = _process_start(pid)
    return start is None or now is None or now == start


def _create_exclusive(path: epath.Path, text: str) -> bool:
    """Creates `path` holding `text` unless it exists, atomically: True if this call created it.

    Local disk: a complete temporary file hard-linked to `path` (fails if `path` exists; O_EXCL where hard
    links are unsupported). Object stores (gs://), which have no exclusive create in `etils.epath`: each
    contender writes a unique claim, then lists the claims; it creates `path` only if its claim is the only
    one and `path` is absent, then deletes its claim. With read-after-write and list consistency (GCS), two
    contenders cannot both win: the later lister sees the earlier claim, or `path` once that claim is gone.
    Both may lose if they claim at once; the caller retries.
    """
    if _is_local(path):
        tmp = f"{path}.{uuid.uuid4().hex}.tmp"
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, str(path))
            return True
        except FileExistsError:
            return False
        except OSError:  # no hard links here (some network/FUSE file systems)
            try:
                fd = os.open(str(path), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w") as f:
                f.write(text)
            return True
        finally:
            os.unlink(tmp)
    claims = path.parent / f"{path.name}.claims"
    claims.mkdir(parents=True, exist_ok=True)
    mine = claims / f"{time.time():.6f}-{uuid.uuid4().hex}"
    mine.write_text(text)
    try:
        others = []
        for claim in claims.iterdir():
            if claim.name == mine.name:
                continue
            try:
                age = time.time() - float(claim.name.split("-")[0])
            except ValueError:
                age = 0.0
            if age > _CLAIM_STALE_S:
                claim.unlink(missing_ok=True)
            else:
                others.append(claim)
        if others or path.exists():
            return False
        path.write_text(text)
        return True
    finally:
        mine.unlink(missing_ok=True)


class WorkdirLock:
    """An exclusive lock on a workdir, held by one training process (process 0 of a job).

    `<workdir>/lock` is a JSON record of its holder (host, pid, process start time, command, token, start and
    heartbeat times), created atomically (`_create_exclusive`) and rewritten by a heartbeat thread every
    `heartbeat_s`. A lock is stale if its holder is provably gone (same host, pid not running, or the pid now
    belongs to a newer process) or its heartbeat is older than `stale_s` (a holder on another host). A stale
    lock is taken over under a short-lived `<lock>.takeover` lock (created the same way), after checking that
    the lock still holds the stale holder's token. The holder releases the lock on exit (`release`); if it
    finds its lock gone or replaced, `lost` names why and the training stops at the next step.
    """

    def __init__(self, workdir: epath.Path, *, heartbeat_s: float | None = None, stale_s: float | None = None):
        self.path = epath.Path(workdir) / LOCK_NAME
        self.heartbeat_s = LOCK_HEARTBEAT_S if heartbeat_s is None else heartbeat_s
        self.stale_s = LOCK_STALE_S if stale_s is None else stale_s
        self.token = uuid.uuid4().hex
        self.lost: str | None = None
        self._started = time.time()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> str:
        now = time.time()
        return json.dumps({
            "host": socket.gethostname(), "pid": os.getpid(), "pid_start": _process_start(os.getpid()),
            "token": self.token, "started": self._started, "heartbeat": now,
            "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self._started)),
            "command": " ".join(sys.argv)[:500],
        }, indent=1)

    @staticmethod
    def read(path: epath.Path) -> dict | None:
        """The lock record at `path`; None if there is none (or it is being replaced)."""
        try:
            record = json.loads(path.read_text())
            return record if isinstance(record, dict) and "token" in record else None
        except (FileNotFoundError, ValueError):
            return None

    def stale_reason(self, record: dict) -> str | None:
        """Why the holder of `record` is gone, or None if it may be running."""
        age = time.time() - float(record.get("heartbeat", 0))
        if record.get("host") == socket.gethostname() and isinstance(record.get("pid"), int):
            if not _pid_alive(record["pid"], record.get("pid_start")):
                return f"process {record['pid']} on this host is no longer running"
            return None
        if age > self.stale_s:
            return f"its heartbeat is {age / 60:.1f} min old (stale after {self.stale_s / 60:.1f} min)"
        return None

    def describe(self, record: dict) -> str:
        age = time.time() - float(record.get("heartbeat", 0))
        return (f"host {record.get('host')} pid {record.get('pid')}, started {record.get('started_utc')}, "
                f"heartbeat {age:.0f} s ago")

    def acquire(self) -> None:
        """Takes the lock or raises `WorkdirLocked` naming the holder."""
        for attempt in range(8):
            if _create_exclusive(self.path, self._record()):
                self._thread = threading.Thread(target=self._beat, daemon=True, name="nin_jax-workdir-lock")
                self._thread.start()
                return
            holder = self.read(self.path)
            if holder is not None:
                why = self.stale_reason(holder)
                if why is None:
                    raise WorkdirLocked(
                        f"--workdir={self.path.parent} is in use by another training ({self.describe(holder)}; "
                        f"{self.path}); wait for it to finish or stop it, or use another --workdir. If that run is "
                        f"gone (e.g. its machine was deleted), delete {self.path} or rerun after "
                        f"{self.stale_s / 60:.0f} min without heartbeat."
                    )
                if self._take_over(holder, why):
                    self._thread = threading.Thread(target=self._beat, daemon=True, name="nin_jax-workdir-lock")
                    self._thread.start()
                    return
            time.sleep(random.uniform(0.05, 0.3) * (attempt + 1))  # lost a race: the holder changed meanwhile
        if self.path.exists() and self.read(self.path) is None:  # not a lock being replaced: it stayed unreadable
            raise WorkdirLocked(f"--workdir={self.path.parent}: {self.path} is not a lock record (not the JSON that "
                                "training writes there); if no training is running in this workdir, delete it and "
                                "rerun.")
        raise WorkdirLocked(f"--workdir={self.path.parent}: could not take {self.path}, other runs are starting in "
                            "it at the same time; start one run per workdir.")

    def _take_over(self, holder: dict, why: str) -> bool:
        mutex = self.path.parent / f"{self.path.name}.takeover"
        if not _create_exclusive(mutex, self._record()):
            other = self.read(mutex)
            if other is None or time.time() - float(other.get("heartbeat", 0)) > _CLAIM_STALE_S:
                mutex.unlink(missing_ok=True)  # left by a process killed while taking over
            return False
        try:
            current = self.read(self.path)
            if current is None or current["token"] != holder["token"] or self.stale_reason(current) is None:
                return False
            self.path.unlink(missing_ok=True)
            if not _create_exclusive(self.path, self._record()):
                return False
            message = (f"WARNING: took over the stale lock {self.path} of {self.describe(holder)}: {why}.")
            logging.warning(message)
            print(message, flush=True)
            return True
        finally:
            mutex.unlink(missing_ok=True)

    def _write(self, text: str) -> None:
        if _is_local(self.path):
            tmp = f"{self.path}.{self.token}.tmp"
            with open(tmp, "w") as f:
                f.write(text)
            os.replace(tmp, self.path)
        else:
            self.path.write_text(text)

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                current = self.read(self.path)
                if current is None or current["token"] != self.token:
                    holder = "nobody" if current is None else self.describe(current)
                    self.lost = f"the lock {self.path} was removed or taken over (now held by {holder})"
                    return
                self._write(self._record())
            except Exception as e:  # noqa: BLE001 — a storage hiccup; the next beat tries again
                logging.warning("Could not refresh %s: %s", self.path, e)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        try:
            current = self.read(self.path)
            if current is not None and current["token"] == self.token:
                self.path.unlink(missing_ok=True)
        except OSError as e:  # e.g. the disk is gone; a later run sees a dead holder
            logging.warning("Could not remove %s: %s", self.path, e)


def lock_workdir(path: epath.Path) -> WorkdirLock | None:
    """Process 0 takes the workdir's lock (`WorkdirLock`); every process learns whether it did."""
    lock, error = None, None
    if jax.process_index() == 0:
        try:
            lock = WorkdirLock(path)
            lock.acquire()
        except WorkdirLocked as e:
            error = e
        except OSError as e:
            error = ConfigError(f"--workdir={path} is not writable ({e}); pass a directory you can write to.")
    if jax.process_count() > 1:
        ok = int(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
        if not ok and error is None:
            error = WorkdirLocked(f"--workdir={path}: process 0 could not lock it (see its message).")
    if error is not None:
        raise error
    return lock
