"""A training run's hold on its workdir: `with session(config, workdir) as s:` around setup and loop.

The session refuses a workdir holding another experiment before anything is written, holds the workdir's
lock, records the experiment or its extension, restores the newest readable checkpoint, writes the metrics
(TensorBoard and metrics.jsonl), watches for SIGTERM and Ctrl-C, keeps the libraries' noise out of the
output, and turns a full disk into one message naming what is intact. A gs:// location that cannot be
reached is one line before anything else; checkpoints removed under the run stop it with one line, and a
rerun refuses to start again from step 0 when the record shows that the run had committed checkpoints.
"""


from __future__ import annotations

import contextlib
import json
from typing import Any, Callable, Iterator

import jax
import ml_collections
import orbax.checkpoint as ocp
from clu import metric_writers
from etils import epath

from nin_jax import checkpointing, config as config_lib
from nin_jax.config import ConfigError
from nin_jax.runtime import lock as lock_lib, quiet, record, recovery, remote
from nin_jax.runtime.metrics_log import JsonlWriter
from nin_jax.runtime.preemption import INTERRUPTED_EXIT_CODE, Preempted, PreemptionWatcher


class Session:
    """A training run's hold on its workdir. Made by `session`; see the module docstring."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str):
        self.config, self.workdir, self.path = config, workdir, epath.Path(workdir)
        self.is_chief = jax.process_index() == 0
        self.saved = record.read_config(self.path)  # the experiment as first recorded (None: a new workdir)
        self._changed = record.check_identity(self.saved, config, self.path)
        self.finished = record.finished_results(self.path, self._changed)  # results of this very run, if done
        self.extended_from: int | None = None
        self.manager: ocp.CheckpointManager | None = None
        self.jsonl: JsonlWriter | None = None
        self._writer: metric_writers.MetricWriter | None = None
        self._lock: lock_lib.WorkdirLock | None = None
        self._preemption: PreemptionWatcher | None = None  # the latest `signals`' watcher

    def open(self) -> None:
        """Creates and locks the workdir and checks that it is writable (before any compute)."""
        if self.path.exists() and not self.path.is_dir():
            raise ConfigError(f"--workdir={self.workdir} is a file, not a directory; pass a directory path.")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"--workdir={self.workdir} is not writable ({e}); pass a directory you can write to.") from e
        self._lock = lock_lib.lock_workdir(self.path)
        try:
            probe = self.path / f".write_test.{jax.process_index()}"
            probe.write_text("ok")
            probe.unlink()
        except OSError as e:
            raise ConfigError(f"--workdir={self.workdir} is not writable ({e}); pass a directory you can write to.") from e
        self._check_checkpoints_kept()

    def _check_checkpoints_kept(self) -> None:
        """Refuses to start again from step 0 when the record shows that the run had committed checkpoints
        that are no longer there (restarting would silently replace its progress and its metrics.jsonl)."""
        ckpt_dir = self.path / "checkpoints"
        if record.committed_steps(ckpt_dir):
            return
        progress = record.recorded_progress(self.path, self.config.run.checkpoint_every_steps)
        if progress is None:
            return
        said, files = progress
        where = "does not exist" if not ckpt_dir.exists() else "holds no checkpoint"
        raise record.MissingCheckpointsError(
            f"{ckpt_dir} {where}, but {said}: the checkpoints of this run were removed, and rerunning would silently "
            f"start it again from step 0. Restore them into {ckpt_dir} and rerun to resume, or use a new --workdir "
            f"(or, to train it again from step 0 in this workdir, delete {' and '.join(files)}).")

    def lost_checkpoints(self, error: BaseException) -> str | None:
        """The one-line account of `error` if it came from checkpoints removed under the running training: the
        checkpoint directory is gone, steps this run knew committed (all but the newest, which may be the save
        in flight) are, or a file of the save in flight vanished."""
        if self.manager is None or isinstance(error, ConfigError):
            return None
        ckpt_dir = self.path / "checkpoints"
        known = sorted(self.manager.all_steps())  # Orbax's own list: it does not re-read the storage
        gone = [s for s in known[:-1] if s not in record.committed_steps(ckpt_dir)]
        vanished = next((e.filename for e in record.exception_chain(error) if isinstance(e, FileNotFoundError)
                         and str(e.filename or "").startswith(f"{ckpt_dir}/")), None)
        if ckpt_dir.exists() and not gone and vanished is None:
            return None
        what = ("it was removed" if not ckpt_dir.exists() else
                f"steps {gone} that this run had committed are gone" if gone else f"{vanished} vanished during a save")
        return (f"{ckpt_dir} changed under the running training ({what}), and the run stopped "
                f"({recovery.short_error(error)}). Restore any removed checkpoints into {ckpt_dir} and rerun the same "
                "command to resume from the newest one, or use a new --workdir.")

    def record(self, steps_per_epoch: int) -> None:
        """Writes config.json at the first start, or records an extension (`extended_from`: the old length)."""
        self.extended_from = record.record_config(self.config, self.saved, self._changed, self.path, steps_per_epoch)

    def restore(self, target: Any) -> tuple[Any, dict, int] | None:
        """The checkpoint manager (latest `config.run.keep_checkpoints` plus the best by `config.run.best_metric`)
        and the newest readable checkpoint restored onto `target`, damaged newer ones moved aside; None for a
        fresh run."""
        self.manager = checkpointing.create_manager(self.path / "checkpoints", keep=self.config.run.keep_checkpoints,
                                                    best_metric=self.config.run.best_metric)
        return recovery.restore(self.manager, target, move_aside=True)

    def writer(self, start_step: int) -> metric_writers.MetricWriter:
        """TensorBoard events and metrics.jsonl (process 0; the others log only)."""
        default = metric_writers.create_default_writer(str(self.path), just_logging=not self.is_chief,
                                                       asynchronous=True)
        writers = [default]
        if self.is_chief:
            self.jsonl = JsonlWriter(self.path / "metrics.jsonl", start_step)
            writers.append(self.jsonl)
        self._writer = metric_writers.MultiWriter(writers)
        return self._writer

    @contextlib.contextmanager
    def signals(self, current_step: Callable[[], int]) -> Iterator[PreemptionWatcher]:
        """SIGTERM and Ctrl-C watched around the training loop; a second Ctrl-C there stops the run at once."""
        watcher = PreemptionWatcher()
        self._preemption = watcher
        try:
            yield watcher
        except KeyboardInterrupt:
            self.manager.wait_until_finished()
            steps = record.committed_steps(self.path / "checkpoints")
            resume = f"resume from step {steps[-1]}" if steps else "start again (no checkpoint was saved)"
            message = (f"Stopped at once by a second Ctrl-C after step {current_step()}; the steps since the last "
                       f"checkpoint are lost. Rerun the same command to {resume}.")
            print(message, flush=True)
            raise Preempted(None, message, INTERRUPTED_EXIT_CODE) from None
        finally:
            watcher.close()

    def check_lock(self, step: int) -> None:
        if self._lock is not None and self._lock.lost:
            self.manager.wait_until_finished()
            raise lock_lib.WorkdirLocked(f"stopped at step {step}: {self._lock.lost}; another run may be writing to "
                                         f"--workdir={self.workdir}. The checkpoint of step {step} is committed.")

    def stop(self, step: int) -> Preempted:
        """The exception that ends the run after the checkpoint of `step` (SIGTERM or Ctrl-C), with its message."""
        self.manager.wait_until_finished()
        name = self._preemption.signal_name
        cause = "Interrupted (SIGINT)" if name == "SIGINT" else f"Preempted ({name or 'SIGTERM'})"
        message = (f"{cause} at step {step}: checkpoint committed in {self.manager.directory}. Rerun the same "
                   f"command to resume from step {step}.")
        print(message, flush=True)
        return Preempted(step, message, self._preemption.exit_code)

    def write_results(self, results: dict) -> None:
        if self.is_chief:
            record.write_atomic(self.path / "results.json", json.dumps(results, indent=2, sort_keys=True))

    def finish_writes(self) -> None:
        """Waits for the checkpoint in flight and closes the writers (either may raise, e.g. on a full disk)."""
        if self.manager is not None:
            self.manager.wait_until_finished()
            self.manager.close()
        if self._writer is not None:
            self._writer.close()

    def release(self) -> None:
        if self._lock is not None:
            self._lock.release()


@contextlib.contextmanager
def session(config: ml_collections.ConfigDict, workdir: str) -> Iterator[Session]:
    """The boundary around a training run in `workdir` (see the module docstring). A finished run of the same
    experiment yields a session with `finished` set, without locking or writing anything."""
    config_lib.validate(config)
    quiet.install()
    remote.check_access(workdir, "--workdir")
    for field in ("data_dir", "cache_dir"):
        remote.check_access(config.run.get(field), f"--config.run.{field}")
    run = Session(config, workdir)
    if run.finished is not None:
        yield run
        return
    try:
        run.open()
        try:
            yield run
        finally:
            run.finish_writes()
    except Exception as e:
        if record.is_disk_full(e):
            raise record.StorageFullError(record.disk_full_message(e, run.path, run.path / "checkpoints")) from e
        lost = run.lost_checkpoints(e)
        if lost is not None:
            raise record.MissingCheckpointsError(lost) from e
        raise
    finally:
        run.release()
