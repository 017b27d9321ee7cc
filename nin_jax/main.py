"""Trains a NIN: `python -m nin_jax.main --config=configs/digits.py --workdir=/tmp/nin_digits`.

Fields of the config can be overridden on the command line, e.g. `--config.model.head=fc`. Rerunning the
same command with the same workdir resumes from the latest checkpoint. The work is done by
`nin_jax.train.train_and_evaluate`; this module only parses flags and sets up the process.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from nin_jax.config import ConfigError

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory (or gs:// path) for checkpoints, summaries and results.json.")
config_flags.DEFINE_config_file("config", None, "Training configuration file.", lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries(logging.logging.Filter):
    """Keeps INFO chatter of Orbax and friends out of the training log (their warnings still show)."""

    _NOISY = ("/orbax/", "/jax/_src/", "/tensorflow_datasets/")

    def filter(self, record):
        return record.levelno >= logging.logging.WARNING or not any(p in record.pathname for p in self._NOISY)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    config = FLAGS.config
    logging.get_absl_handler().python_handler.addFilter(_QuietLibraries())
    # Host setup and joining a multi-process job must precede any other use of jax (hence the late imports).
    from nin_jax import mesh  # pylint: disable=g-import-not-at-top
    from nin_jax.cpu import hostenv  # pylint: disable=g-import-not-at-top

    try:
        hostenv.prepare(config)
        mesh.maybe_initialize_distributed()
    except ConfigError as e:
        _fail(e)
    import jax  # pylint: disable=g-import-not-at-top

    from nin_jax import train  # pylint: disable=g-import-not-at-top

    logging.info("JAX process %d/%d, local devices %s", jax.process_index(), jax.process_count(), jax.local_devices())
    try:
        train.train_and_evaluate(config, FLAGS.workdir)
    except (ConfigError, train.NonFiniteLossError) as e:
        _fail(e)
    except train.Preempted as e:
        sys.exit(e.code)


def _fail(error: Exception) -> None:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
    app.run(main)
