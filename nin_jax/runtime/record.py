"""The experiment a workdir holds: config.json (its identity and length), results.json, committed steps.

config.json records the experiment at its first start. A rerun must match it outside `config.run`, or only
lengthen the run (an extension, which keeps the shorter run's record as config.<steps>.json and
results.<steps>.json).
"""

from __future__ import annotations

import errno
import json
import logging
import re
from typing import Iterator

import jax
import ml_collections
from etils import epath

from nin_jax import config as config_lib
from nin_jax.config import ConfigError
from nin_jax.runtime import metrics_log

_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# TensorStore reports a full disk as a ValueError with the OS's text (no errno); pinned by
# tests/test_runtime.py for the library versions in requirements.txt.
_DISK_FULL_TEXT = ("No space left on device", "Disk quota exceeded")


class StorageFullError(OSError):
    """The workdir's storage is full (or over quota); what was committed is intact and the run can resume."""


class MissingCheckpointsError(ConfigError):
    """Checkpoints that the workdir's run had committed are gone (removed by something else than training)."""


def exception_chain(error: BaseException, *, implicit: bool = True) -> Iterator[BaseException]:
    """`error`, then the exceptions it was raised from (and, if ``implicit``, while handling), innermost last."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or (error.__context__ if implicit else None)


def is_disk_full(error: BaseException) -> bool:
    """Whether `error` (or an exception it was raised from) is a full disk or an exhausted quota."""
    return any((isinstance(e, OSError) and e.errno in _DISK_FULL_ERRNOS) or any(t in str(e) for t in _DISK_FULL_TEXT)
               for e in exception_chain(error))


def read_config(workdir: epath.Path) -> ml_collections.ConfigDict | None:
    """The experiment saved in `workdir`'s config.json (None for a new workdir)."""
    path = workdir / "config.json"
    if not path.exists():
        return None
    try:
        return config_lib.from_json(path.read_text())
    except (ValueError, TypeError, AttributeError) as e:  # not JSON, or not a config's JSON
        raise ConfigError(
            f"{path} cannot be read ({type(e).__name__}: {' '.join(str(e).split())[:200]}); it records the experiment "
            "this workdir holds: restore it from a copy (results.json holds one under \"config\"), or use a new "
            "--workdir.") from e


def _describe(saved: ml_collections.ConfigDict, config: ml_collections.ConfigDict, fields: list[str]) -> str:
    a, b = config_lib.flatten(saved), config_lib.flatten(config)
    return ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in fields)


def check_identity(saved: ml_collections.ConfigDict | None, config: ml_collections.ConfigDict,
                   workdir: epath.Path) -> list[str]:
    """The identity fields in which `config` differs from the saved experiment: only its length may differ
    (`config_lib.DURATION_FIELDS`); anything else is refused before anything is written."""
    if saved is None:
        return []
    changed = config_lib.identity_diff(saved, config)
    other = [k for k in changed if k not in config_lib.DURATION_FIELDS]
    if other:
        raise ConfigError(f"--workdir={workdir} holds a different experiment ({_describe(saved, config, other)}); "
                          "rerun with its config (config.json) or use a new --workdir.")
    return changed


def finished_results(workdir: epath.Path, changed: list[str]) -> dict | None:
    """results.json of a finished run of this very experiment (same length); reads only."""
    path = workdir / "results.json"
    if changed or not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_atomic(path: epath.Path, text: str) -> None:
    tmp = path.parent / f"{path.name}.tmp"
    tmp.write_text(text)
    tmp.replace(path)


def record_config(config: ml_collections.ConfigDict, saved: ml_collections.ConfigDict | None, changed: list[str],
                  workdir: epath.Path, steps_per_epoch: int) -> int | None:
    """Writes config.json at a run's first start, or records an extension; returns the old length if extended.

    The file keeps the first start's `config.run` values. A longer run keeps its shorter record as
    config.<steps>.json (and results.<steps>.json if it had finished); a shorter one is refused.
    """
    path = workdir / "config.json"
    if saved is None:
        if jax.process_index() == 0:
            write_atomic(path, config.to_json_best_effort(indent=2))
        return None
    if not changed:
        return None
    old, new = config_lib.total_train_steps(saved, steps_per_epoch), config_lib.total_train_steps(config, steps_per_epoch)
    changes = _describe(saved, config, changed)
    if new < old:
        raise ConfigError(
            f"--workdir={workdir} holds a run of {old} steps; {changes} would shorten it to {new}, and a run can only "
            "be extended. Rerun with its config (config.json), evaluate an earlier checkpoint "
            "(python -m nin_jax.evaluate --checkpoint=STEP), or use a new --workdir."
        )
    if new == old:
        raise ConfigError(f"--workdir={workdir} holds a different experiment ({changes}, the same {old} steps); "
                          "rerun with its config (config.json) or use a new --workdir.")
    if jax.process_index() == 0:
        kept = [f"config.{old}.json"]
        if not (workdir / f"config.{old}.json").exists():
            (workdir / f"config.{old}.json").write_text(path.read_text())
        if (workdir / "results.json").exists():
            (workdir / "results.json").rename(workdir / f"results.{old}.json")
        if (workdir / f"results.{old}.json").exists():
            kept.append(f"results.{old}.json")
        write_atomic(path, config.to_json_best_effort(indent=2))
        message = (f"Extending the run in {workdir} from {old} to {new} steps ({changes}); the {old}-step record is "
                   f"kept as {' and '.join(kept)}.")
        logging.info(message)
        print(message, flush=True)
    return old


def committed_steps(directory: epath.Path) -> list[int]:
    """Checkpoint steps on storage (Orbax's in-progress saves have a temporary name, or no commit marker)."""
    try:
        local = "://" not in str(directory)
        return sorted(int(p.name) for p in directory.iterdir()
                      if p.name.isdigit() and (local or (p / "commit_success.txt").exists()))
    except OSError:
        return []


def recorded_progress(workdir: epath.Path, checkpoint_every_steps: int) -> tuple[str, list[str]] | None:
    """(what the record says, its files) if the workdir's record proves that a checkpoint had been committed.

    A finished run (results*.json) ended with one. An evaluation logged at or after step
    `checkpoint_every_steps`, or any step logged after two checkpoint intervals, followed a committed one: an
    evaluation, like each save, first waits for the save before it to commit.
    """
    results = sorted(p.name for p in workdir.glob("results*.json"))
    if results:
        return f"{' and '.join(results)} record{'s' if len(results) == 1 else ''} a finished run", results
    rows = metrics_log.read_rows(workdir / "metrics.jsonl")
    last = max((row["step"] for row in rows), default=0)
    evaluated = any(row["step"] >= checkpoint_every_steps and any(k.startswith("eval/") for k in row) for row in rows)
    if evaluated or last > 2 * checkpoint_every_steps:
        return f"metrics.jsonl logs training up to step {last}", ["metrics.jsonl"]
    return None


def disk_full_message(error: BaseException, workdir: epath.Path, ckpt_dir: epath.Path) -> str:
    path = None
    for e in exception_chain(error):
        found = re.search(r'(?:Failed writing|local file): "([^"]+)"', str(e))
        path = (e.filename if isinstance(e, OSError) and e.filename else None) or (found and found.group(1))
        if path:
            break
    steps = committed_steps(ckpt_dir)
    safe = (f"checkpoints {', '.join(map(str, steps[-3:]))} in {ckpt_dir} are intact (an unfinished save leaves only "
            "a temporary directory, removed at the next start)" if steps else "no checkpoint had been committed yet")
    resume = f"resume from step {steps[-1]}" if steps else "start again"
    return (f"no space left on the storage of --workdir={workdir} (writing {path or workdir}); the run stopped and "
            f"{safe}. Free space there (or raise the quota) and rerun the same command to {resume}.")
