"""Trains a NIN: `python -m nin_jax.main --config=configs/digits.py --workdir=/tmp/nin_digits`.

Fields of the config can be overridden on the command line, e.g. `--config.model.head=fc`. Rerunning the
same command with the same workdir resumes from the latest checkpoint. The work is done by
`nin_jax.train.train_and_evaluate`; this module parses flags and sets up the process.
"""

from absl import flags, logging
from ml_collections import config_flags

from nin_jax.runtime import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory (or gs:// path) for checkpoints, summaries and results.json.")
config_flags.DEFINE_config_file("config", None, "Training configuration file.", lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    del argv
    cli.prepare_process(FLAGS.config, FLAGS.workdir)  # host devices and joining a multi-process job precede any use of jax
    import jax  # pylint: disable=g-import-not-at-top

    from nin_jax import train  # pylint: disable=g-import-not-at-top

    logging.info("JAX process %d/%d, local devices %s", jax.process_index(), jax.process_count(), jax.local_devices())
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)


def run() -> None:
    cli.run(main)


if __name__ == "__main__":
    run()
