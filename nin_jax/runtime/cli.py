"""The training command line's side of the run: flags, process set-up, and errors as one line.

A bad flag, config field, file or dataset (`ConfigError`), a locked workdir, a full disk and a diverged run
end with one line `error: ...` and exit status 1; SIGTERM and Ctrl-C with 143 / 130 (resumable); the loss of
another process of the job with 75 (resumable, `peers`). Every other exception, storage failures included,
keeps its traceback.
"""

from __future__ import annotations

import difflib
import sys
from typing import Callable

from absl import app, flags
import ml_collections

from nin_jax import config as config_lib
from nin_jax.config import ConfigError

FLAGS = flags.FLAGS


def unknown_override(argv: list[str]) -> str | None:
    """'--config.X.Y=v: ...' for the first override naming a field the config file does not have."""
    path, overrides = None, []
    for arg in argv[1:]:
        name = arg.lstrip("-").partition("=")[0]
        if name == "config":
            path = arg.partition("=")[2]
        elif name.startswith("config."):
            overrides.append((arg, name[len("config."):]))
    if path is None:
        return None
    file, _, file_arg = path.partition(":")
    try:
        root = config_lib.load_config_file(file, file_arg or None)
    except Exception:  # noqa: BLE001 — the flag's own error is reported instead
        return None
    for arg, dotted in overrides:
        moved = config_lib.moved_field_hint(dotted)
        if moved is not None:
            return f"{arg}: config.{dotted} is now config.{moved}; pass --config.{moved}={arg.partition('=')[2]}."
        node, prefix = root, "config"
        for part in dotted.split("."):
            fields = list(node.keys()) if hasattr(node, "keys") else []
            if part not in fields:
                close = difflib.get_close_matches(part, fields, n=1)
                if close:
                    return f"{arg}: {prefix} has no field {part!r}; did you mean {prefix}.{close[0]}?"
                known = f"its fields: {', '.join(sorted(fields))}" if fields else f"{prefix} is not a section"
                return f"{arg}: {prefix} has no field {part!r} ({known})."
            node, prefix = node[part], f"{prefix}.{part}"
    return None


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with every error in the flags (a misspelled or ill-typed `--config.` field, a
    missing config file or flag) as one line."""
    try:
        rest = FLAGS(argv)
        FLAGS.config.keys()  # config_flags defers a config file's errors to the first use
        return rest
    except flags.Error as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        # A config file that raised: absl appends the traceback; its last line is the error.
        fail(lines[0] if len(lines) == 1 else f"{lines[0].rstrip(':')}: {lines[-1]}")
    except OSError as e:  # the config file is missing or failed to load
        path = next((a.partition("=")[2] for a in argv if a.lstrip("-").startswith("config=")), "")
        why = "no such file" if "No such file" in str(e) else " ".join(str(e).split())
        fail(f"--config={path} could not be loaded ({why}); pass a config file such as configs/digits.py.")
    except (KeyError, AttributeError, TypeError, ValueError) as e:  # raised by config_flags for a wrong field
        text = str(e.args[0] if isinstance(e, KeyError) and e.args else e).replace("\n", " ")
        fail(unknown_override(argv) or f"the --config flags could not be applied ({type(e).__name__}: {text}).")
    return []  # not reached


def prepare_process(config: ml_collections.ConfigDict, workdir: str) -> None:
    """What must precede any other use of jax: the CPU's host devices and huge pages (`nin_jax.cpu.hostenv`),
    then joining a multi-process job (`cluster.maybe_initialize_distributed`) and watching its other
    processes (`peers.start`)."""
    from nin_jax.cpu import hostenv  # pylint: disable=g-import-not-at-top
    from nin_jax.runtime import cluster, peers  # pylint: disable=g-import-not-at-top  (imports jax)

    config_lib.validate(config)
    hostenv.prepare(config, reexec=True)
    cluster.maybe_initialize_distributed()
    peers.start(workdir)


def fail(error: Exception | str) -> None:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(1)


def _is_one_line(error: Exception) -> bool:
    # Imported here: these modules import jax, which must not start before `prepare_process`.
    from nin_jax.runtime.lock import WorkdirLocked  # pylint: disable=g-import-not-at-top
    from nin_jax.runtime.record import StorageFullError  # pylint: disable=g-import-not-at-top
    from nin_jax.train import NonFiniteLossError  # pylint: disable=g-import-not-at-top

    return isinstance(error, (ConfigError, WorkdirLocked, StorageFullError, NonFiniteLossError))


def run(main: Callable[[list[str]], None]) -> None:
    """`app.run(main)` with the errors above as one line, and Ctrl-C outside the training steps (start-up,
    compilation, the final evaluation) as one line and exit status 130."""

    def guarded(argv: list[str]) -> None:
        if len(argv) > 1:
            fail(f"unexpected arguments {argv[1:]}; pass config fields as --config.FIELD=VALUE.")
        try:
            main(argv)
        except Exception as e:  # noqa: BLE001 — only the kinds above become one line
            if not _is_one_line(e):
                from nin_jax.runtime import peers  # pylint: disable=g-import-not-at-top

                peers.explain(e)  # a collective that failed because a process was lost: one line, status 75
                raise
            fail(e)

    try:
        app.run(guarded, flags_parser=_parse_flags)
    except KeyboardInterrupt:
        print("\nerror: interrupted (Ctrl-C) outside the training steps; committed checkpoints are kept. Rerun the "
              "same command to resume.", file=sys.stderr)
        sys.exit(130)
