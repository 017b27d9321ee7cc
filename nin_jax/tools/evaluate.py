"""Evaluates a trained workdir: `python -m nin_jax.evaluate --workdir=W [--split=test] [--checkpoint=latest|best|STEP]`.

Rebuilds the model and data from the config saved in W (config.json), restores the checkpoint onto the
devices of this machine, checked against its digest (a run trained on a TPU pod or 8 host devices evaluates
on 1 CPU: the variables are replicated, so only the device layout changes), evaluates one pass over the
split and prints one JSON line:
`eval/top1`, `eval/top5`, `eval/loss`, `num_examples`, `step`, `checkpoint`.

An unreadable newest checkpoint is skipped with a one-line warning naming it and the step used instead;
an unreadable `--checkpoint=best` or step number is a one-line error naming the `--checkpoint=` that reads.
A checkpoint of non-finite parameters, or metrics that are not finite, are a one-line error, never numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any, Sequence

import jax
import ml_collections

from nin_jax import data, mesh as mesh_lib, train
from nin_jax.config import ConfigError
from nin_jax.data import run_record
from nin_jax.cpu import hostenv
from nin_jax.runtime import remote
from nin_jax.tools import restore

CHECKPOINT_CHOICES = restore.CHECKPOINT_CHOICES
load_saved_config = restore.load_saved_config  # kept here for callers of the previous API


def _round_up(n: int, multiple: int) -> int:
    return int(math.ceil(n / multiple) * multiple)


def restore_for_evaluation(workdir: str, *, checkpoint: str = "latest", arch: str | None = None,
                           data_dir: str | None = None) -> tuple[restore.TrainedRun, Any]:
    """(the restored run on a mesh over every device, the data pipeline of its saved config)."""
    config = restore.load_saved_config(workdir, arch=arch)
    if data_dir is not None:
        config.run.data_dir = data_dir
    mesh = mesh_lib.create_mesh()
    # The batch sizes must divide over this machine's devices; evaluation pads (mask 0) the last batch anyway,
    # and the train batch size only sets steps per epoch, so rounding them up changes no result.
    n = math.lcm(jax.device_count(), jax.process_count())
    config = ml_collections.ConfigDict(config.to_dict())
    config.run.eval_batch_size = _round_up(config.run.eval_batch_size, n)
    config.batch_size = _round_up(config.batch_size, n)
    remote.check_access(config.run.data_dir, "--data_dir" if data_dir is not None else "config.run.data_dir")
    # The run's saved normaliser: the training split need not exist (runs older than the record refit it).
    record = run_record.load(workdir)
    if record is None:
        pipeline = data.Pipeline(config, mesh_lib.data_sharding(mesh))
    else:
        pipeline = data.Pipeline(config, mesh_lib.data_sharding(mesh), normalizer=record.normalizer, train=False)
    prep = restore.Preprocessing.from_pipeline(pipeline, config)
    run = restore.load_run(workdir, checkpoint, config=config, mesh=mesh, preprocessing=prep)
    return run, pipeline


def eval_batches(pipeline: Any, split: str | None, *, with_raw: bool = False) -> Any:
    """`pipeline.eval_batches(split)`, with an unusable `split` reported as the --split flag's fault."""
    try:
        return pipeline.eval_batches(split, with_raw=with_raw)
    except (ValueError, KeyError, FileNotFoundError) as e:
        if split is None:
            raise
        reason = str(e).replace("config.eval_split=", "--split=").strip().splitlines()[0] if str(e) else ""
        raise ConfigError(f"--split={split!r} cannot be read ({type(e).__name__}: {reason}); pass a split of "
                          "the run's dataset (TFDS split syntax, e.g. 'test' or 'train[:1000]').") from e


def evaluate_checkpoint(workdir: str, split: str | None = None, checkpoint: str = "latest", *,
                        arch: str | None = None, data_dir: str | None = None) -> dict[str, Any]:
    """Restores `checkpoint` of `workdir` and evaluates one pass over `split` (default: the run's eval split)."""
    run, pipeline = restore_for_evaluation(workdir, checkpoint=checkpoint, arch=arch, data_dir=data_dir)
    batches = eval_batches(pipeline, split)
    p_eval_step = train.make_eval_step(run.model, run.num_classes, run.mesh)
    ev = train.evaluate(p_eval_step, run.state, batches)
    nonfinite = [k for k in ("eval/loss", "eval/top1", "eval/top5") if not math.isfinite(ev[k])]
    if nonfinite:  # the variables are finite (checked at restore): the inputs or their normalisation overflow
        raise ConfigError(f"evaluating {run.checkpoint} gave {', '.join(f'{k}={ev[k]}' for k in nonfinite)}: its "
                          "variables are finite, so the split's images or the run's normalisation "
                          f"({run_record.PREPROCESSING_FILE}) give non-finite logits; check them.")
    return {
        "eval/top1": ev["eval/top1"], "eval/top5": ev["eval/top5"], "eval/loss": ev["eval/loss"],
        "num_examples": ev["eval/num_examples"], "step": run.step, "checkpoint": run.checkpoint,
        "split": split or run.config.eval_split, "arch": run.config.model.arch, "num_devices": jax.device_count(),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="a training workdir (local or gs://)")
    parser.add_argument("--split", default=None, help="split to evaluate (default: the run's config.eval_split)")
    parser.add_argument("--checkpoint", default="latest", help=CHECKPOINT_CHOICES)
    parser.add_argument("--arch", default=None, help="expected model.arch; refuses a checkpoint of another arch")
    parser.add_argument("--data_dir", default=None, help="replaces the saved config.run.data_dir (data moved)")
    args = parser.parse_args(argv)
    try:
        saved = restore.load_saved_config(args.workdir, arch=args.arch)
        hostenv.prepare(saved)  # before any computation initialises jax's backends, as in training
        result = evaluate_checkpoint(args.workdir, args.split, args.checkpoint, arch=args.arch, data_dir=args.data_dir)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(result, sort_keys=True), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
