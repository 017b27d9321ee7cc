"""Evaluates a trained workdir: `python -m nin_jax.evaluate --workdir=W [--split=test] [--checkpoint=latest|best|STEP]`.

Rebuilds the model and data from the config saved in W (config.json), restores the Orbax checkpoint onto
the devices of this machine (a run trained on a TPU pod or 8 host devices evaluates on 1 CPU: the state is
replicated, so only the device layout changes), evaluates one pass over the split and prints one JSON line:
`eval/top1`, `eval/top5`, `eval/loss`, `num_examples`, `step`, `checkpoint`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from typing import Any, Sequence

import jax
import ml_collections
import optax
from etils import epath

from nin_jax import checkpointing, config as config_lib, data, mesh as mesh_lib, models, train
from nin_jax.config import ConfigError
from nin_jax.cpu import hostenv

CHECKPOINT_CHOICES = "latest | best | a step number"


@dataclasses.dataclass
class Restored:
    """A workdir's model and state restored onto this machine's devices, with a pipeline for its data."""

    config: ml_collections.ConfigDict
    model: Any  # models.NIN
    state: Any  # train.TrainState
    pipeline: Any  # data.Pipeline
    mesh: Any  # jax.sharding.Mesh
    step: int
    checkpoint: str  # the step directory restored

    @property
    def variables(self) -> dict:
        """What `model.apply` takes for inference."""
        return models.variables(self.state.params, self.state.batch_stats)


def load_saved_config(workdir: str, *, arch: str | None = None) -> ml_collections.ConfigDict:
    """The config.json a training run wrote in `workdir`; with `arch`, checks that it trained that arch."""
    path = epath.Path(workdir) / "config.json"
    if not path.exists():
        raise ConfigError(
            f"{path} does not exist: --workdir={workdir} holds no training run "
            "(train first with `python -m nin_jax.main --config=... --workdir=...`)."
        )
    config = config_lib.from_json(path.read_text())
    if arch is not None and arch != config.model.arch:
        raise ConfigError(
            f"--arch={arch} does not match the checkpoint in {workdir}, which was trained as "
            f"model.arch={config.model.arch!r} (config.json); drop --arch or pass --arch={config.model.arch}."
        )
    return config


def _round_up(n: int, multiple: int) -> int:
    return int(math.ceil(n / multiple) * multiple)


def _select_step(mngr: Any, checkpoint: str, directory: epath.Path) -> int:
    steps = sorted(mngr.all_steps())
    if not steps:
        raise ConfigError(
            f"no checkpoint in {directory}: the run in this workdir has not saved one yet "
            "(train longer, or lower config.checkpoint_every_steps)."
        )
    if checkpoint == "latest":
        return steps[-1]
    if checkpoint == "best":
        metric = checkpointing.BEST_METRIC
        scored = [(m[metric], s) for s, m in ((s, mngr.metrics(s)) for s in steps) if m and metric in m]
        if not scored:
            raise ConfigError(f"no checkpoint in {directory} carries {metric}; use --checkpoint=latest.")
        return max(scored)[1]
    if checkpoint.isdigit():
        if int(checkpoint) not in steps:
            raise ConfigError(f"--checkpoint={checkpoint}: no such step in {directory}; saved steps are {steps}.")
        return int(checkpoint)
    raise ConfigError(f"--checkpoint={checkpoint!r}; choose {CHECKPOINT_CHOICES}.")


def restore(workdir: str, *, checkpoint: str = "latest", arch: str | None = None,
            config: ml_collections.ConfigDict | None = None) -> Restored:
    """Restores `checkpoint` of `workdir` onto a mesh over every device of this machine.

    `config` defaults to the saved config.json (pass one to change e.g. `data_dir` for another machine).
    """
    config = load_saved_config(workdir, arch=arch) if config is None else config
    ckpt_dir = epath.Path(workdir) / "checkpoints"
    if not ckpt_dir.exists():
        raise ConfigError(
            f"no checkpoint in {ckpt_dir}: the run in --workdir={workdir} has not saved one yet "
            "(train longer, or lower config.checkpoint_every_steps)."
        )
    mesh = mesh_lib.create_mesh()
    # The batch sizes must divide over this machine's devices; evaluation pads (mask 0) the last batch anyway,
    # and the train batch size only sets steps per epoch, so rounding them up changes no result.
    n = math.lcm(jax.device_count(), jax.process_count())
    config = ml_collections.ConfigDict(config.to_dict())
    config.eval_batch_size = _round_up(config.eval_batch_size, n)
    config.batch_size = _round_up(config.batch_size, n)

    mngr = checkpointing.create_manager(ckpt_dir, keep=config.keep_checkpoints, read_only=True)
    try:
        step = _select_step(mngr, str(checkpoint), ckpt_dir)
        pipeline = data.Pipeline(config, mesh_lib.data_sharding(mesh))
        info = pipeline.info
        model = models.create_model(config.model, info.num_classes, dtype=train.compute_dtype(config),
                                    cpu_kernels=config.cpu_kernels)
        # The optimizer state's structure does not depend on the schedule: any schedule gives the restore target.
        abstract = train.abstract_train_state(config, model, info.image_shape, optax.constant_schedule(0.0), mesh)
        try:
            state, _ = checkpointing.restore(mngr, step, abstract)
        except Exception as e:  # noqa: BLE001 — report which checkpoint and why, whatever Orbax raised
            raise checkpointing.CheckpointError(
                f"cannot restore {ckpt_dir / str(step)} for model.arch={config.model.arch!r} "
                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); is config.json from the same run?"
            ) from e
    finally:
        mngr.close()
    return Restored(config, model, state, pipeline, mesh, step, str(ckpt_dir / str(step)))


def evaluate_checkpoint(workdir: str, split: str | None = None, checkpoint: str = "latest", *,
                        arch: str | None = None, data_dir: str | None = None) -> dict[str, Any]:
    """Restores `checkpoint` of `workdir` and evaluates one pass over `split` (default: the run's eval split)."""
    config = load_saved_config(workdir, arch=arch)
    if data_dir is not None:
        config.data_dir = data_dir
    r = restore(workdir, checkpoint=checkpoint, config=config)
    p_eval_step = train.make_eval_step(r.model, r.pipeline.info.num_classes, r.mesh)
    ev = train.evaluate(p_eval_step, r.state, r.pipeline.eval_batches(split))
    return {
        "eval/top1": ev["eval/top1"], "eval/top5": ev["eval/top5"], "eval/loss": ev["eval/loss"],
        "num_examples": ev["eval/num_examples"], "step": r.step, "checkpoint": r.checkpoint,
        "split": split or r.config.eval_split, "arch": r.config.model.arch, "num_devices": jax.device_count(),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="a training workdir (local or gs://)")
    parser.add_argument("--split", default=None, help="split to evaluate (default: the run's config.eval_split)")
    parser.add_argument("--checkpoint", default="latest", help=CHECKPOINT_CHOICES)
    parser.add_argument("--arch", default=None, help="expected model.arch; refuses a checkpoint of another arch")
    parser.add_argument("--data_dir", default=None, help="replaces the saved config.data_dir (data moved)")
    args = parser.parse_args(argv)
    try:
        saved = load_saved_config(args.workdir, arch=args.arch)
        hostenv.prepare(saved)  # before any computation initialises jax's backends, as in training
        result = evaluate_checkpoint(args.workdir, args.split, args.checkpoint, arch=args.arch, data_dir=args.data_dir)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(result, sort_keys=True), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
