"""Trains a NIN: `python -m nin_jax.main --config=configs/digits.py --workdir=/tmp/nin_digits`.

Fields of the config can be overridden on the command line, e.g. `--config.model.head=fc`. Rerunning the
same command with the same workdir resumes from the latest checkpoint. The work is done by
`nin_jax.train.train_and_evaluate`; this module only parses flags and sets up the process.
"""

import difflib
import sys
import threading

from absl import app, flags, logging
from ml_collections import config_flags

from nin_jax import config as config_lib
from nin_jax.config import ConfigError

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory (or gs:// path) for checkpoints, summaries and results.json.")
config_flags.DEFINE_config_file("config", None, "Training configuration file.", lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


_disk_full = threading.Event()  # set once Orbax reports a full disk (the run then ends with one line)


class _QuietLibraries(logging.logging.Filter):
    """Keeps INFO chatter of Orbax and friends out of the training log (their warnings still show), and their
    tracebacks of a full disk: the run then ends with one line naming the path and what is intact."""

    _NOISY = ("/orbax/", "/jax/_src/", "/tensorflow_datasets/")
    _DISK_FULL = ("No space left on device", "Disk quota exceeded")

    def filter(self, record):
        noisy = any(p in record.pathname for p in self._NOISY)
        if record.levelno >= logging.logging.WARNING:
            try:
                text = record.getMessage() + str(record.exc_info[1] if record.exc_info else "")
            except Exception:  # noqa: BLE001 — a record with bad arguments is shown as it is
                return True
            if any(t in text for t in self._DISK_FULL):  # Orbax's threads, asyncio's unretrieved tasks
                _disk_full.set()
                return False
            return True
        return not noisy


def _quiet_closed_loop(previous):
    """sys.unraisablehook without Tensorstore's reports of writes that completed after Orbax closed the event
    loop of a failed save (e.g. on a full disk, dozens of tracebacks): raised in asyncio's call_soon_threadsafe
    called from native code, with no Python caller; nothing is lost by them."""

    def hook(unraisable):
        tb = unraisable.exc_traceback
        if unraisable.exc_type is RuntimeError and str(unraisable.exc_value) == "Event loop is closed" and tb:
            first = tb.tb_frame.f_code
            if first.co_name == "call_soon_threadsafe" and "asyncio" in first.co_filename:
                return
        previous(unraisable)

    return hook


def _unknown_override(argv: list[str]) -> str | None:
    """'--config.X.Y=v: ...' for the first override naming a field the config file does not have."""
    path, overrides = None, []
    for arg in argv[1:]:
        name, _, _ = arg.lstrip("-").partition("=")
        if name == "config":
            path = arg.partition("=")[2]
        elif name.startswith("config."):
            overrides.append((arg, name[len("config."):]))
    if path is None:
        return None
    file, _, file_arg = path.partition(":")
    try:
        node_root = config_lib.load_config_file(file, file_arg or None)
    except Exception:  # noqa: BLE001 — the flag's own error is reported instead
        return None
    for arg, dotted in overrides:
        node, prefix = node_root, "config"
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
    missing config file or flag) as one line on stderr and exit status 1."""
    try:
        rest = FLAGS(argv)
        FLAGS.config.keys()  # config_flags defers a config file's errors to the first use
        return rest
    except flags.Error as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        # A config file that raised: absl appends the traceback; its last line is the error.
        _fail(lines[0] if len(lines) == 1 else f"{lines[0].rstrip(':')}: {lines[-1]}")
    except OSError as e:  # the config file is missing or failed to load
        path = next((a.partition("=")[2] for a in argv if a.lstrip("-").startswith("config=")), "")
        why = "no such file" if "No such file" in str(e) else " ".join(str(e).split())
        _fail(f"--config={path} could not be loaded ({why}); pass a config file such as configs/digits.py.")
    except (KeyError, AttributeError, TypeError, ValueError) as e:  # raised by config_flags for a wrong field
        text = str(e.args[0] if isinstance(e, KeyError) and e.args else e).replace("\n", " ")
        _fail(_unknown_override(argv) or f"the --config flags could not be applied ({type(e).__name__}: {text}).")
    return []  # not reached


def main(argv):
    if len(argv) > 1:
        _fail(f"unexpected arguments {argv[1:]}; pass config fields as --config.FIELD=VALUE.")
    config = FLAGS.config
    logging.get_absl_handler().python_handler.addFilter(_QuietLibraries())
    # Host setup and joining a multi-process job must precede any other use of jax (hence the late imports).
    from nin_jax import mesh  # pylint: disable=g-import-not-at-top
    from nin_jax.cpu import hostenv  # pylint: disable=g-import-not-at-top

    try:
        config_lib.validate(config)  # also done by train_and_evaluate; here before the host set-up uses it
        hostenv.prepare(config)
        mesh.maybe_initialize_distributed()
    except ConfigError as e:
        _fail(e)
    import jax  # pylint: disable=g-import-not-at-top

    from nin_jax import train, workdir  # pylint: disable=g-import-not-at-top

    logging.info("JAX process %d/%d, local devices %s", jax.process_index(), jax.process_count(), jax.local_devices())
    try:
        train.train_and_evaluate(config, FLAGS.workdir)
    except workdir.StorageFullError as e:
        _disk_full.set()
        _fail(e)
    except (ConfigError, train.NonFiniteLossError) as e:
        _fail(e)
    except train.Preempted as e:
        sys.exit(e.code)


def _fail(error: Exception | str) -> None:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(1)


def run() -> None:
    """`app.run(main)` with one-line flag errors, and Ctrl-C outside the training steps (start-up, compilation,
    the final evaluation) as one line and exit status 130 (the training loop handles its own, see
    `train.PreemptionWatcher`)."""
    sys.unraisablehook = _quiet_closed_loop(sys.unraisablehook)
    try:
        app.run(main, flags_parser=_parse_flags)
    except KeyboardInterrupt:
        print("\nerror: interrupted (Ctrl-C) outside the training steps; committed checkpoints are kept. Rerun the "
              "same command to resume.", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    run()
