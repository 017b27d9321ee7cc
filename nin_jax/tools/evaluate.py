"""Evaluates a trained workdir: `python -m nin_jax.evaluate --workdir=W [--split=test] [--checkpoint=latest|best|STEP]
[--crops=1|10] [--resize=short_side|square]`.

Rebuilds the model and data from the config saved in W (config.json), restores the checkpoint onto the
devices of this machine, checked against its digest (a run trained on a TPU pod or 8 host devices evaluates
on 1 CPU: the variables are replicated, so only the device layout changes), evaluates one pass over the
split and prints one JSON line:
`eval/top1`, `eval/top5`, `eval/loss`, `num_examples`, `step`, `checkpoint`, `crops`, `resize`.

Large images (imagenet2012, image folders decoded per example) are evaluated by a stated protocol
(docs/evaluation.md): `--resize=short_side` (the short side to config.augment.eval_resize, aspect kept) or
`square` (warped to eval_resize x eval_resize, Caffe's), overriding the run's config.augment.eval_resize_mode;
then `--crops=1`, the center image_size crop, or `--crops=10`, the 4 corner crops and the center crop, each also
flipped horizontally: an example's logits are the mean of its 10 crops' logits, and loss, top-1 and top-5 are
computed from those mean logits. Small-image datasets (digits, mnist, cifar10, ...) are evaluated whole at the
model's size: `--crops=10` or `--resize=square` there is a one-line error (JSON `resize` is null for them).

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
import jax.numpy as jnp
import ml_collections

from nin_jax import data, mesh as mesh_lib, train
from nin_jax.config import EVAL_RESIZE_MODES, ConfigError
from nin_jax.data import decode, run_record
from nin_jax.cpu import hostenv
from nin_jax.runtime import remote
from nin_jax.tools import restore

CHECKPOINT_CHOICES = restore.CHECKPOINT_CHOICES
load_saved_config = restore.load_saved_config  # kept here for callers of the previous API


def _round_up(n: int, multiple: int) -> int:
    return int(math.ceil(n / multiple) * multiple)


CROPS_CHOICES = decode.EVAL_CROPS  # 1: the center crop; 10: 4 corners + center, each also flipped


def check_protocol(config: ml_collections.ConfigDict, crops: Any = 1,
                   resize: str | None = None) -> tuple[int, str | None]:
    """(crops, resize mode) that evaluating a run of `config` with `--crops` / `--resize` uses; the resize mode
    is None for small-image datasets (evaluated whole). A one-line ConfigError naming the flag otherwise."""
    text = str(crops).strip()
    if not (text.isdigit() and int(text) in CROPS_CHOICES):
        raise ConfigError(f"--crops={crops} is not an evaluation protocol: pass --crops=1 (the center crop) or "
                          "--crops=10 (the 4 corner crops and the center crop, each also flipped; logits averaged).")
    crops = int(text)
    if resize is not None and resize not in EVAL_RESIZE_MODES:
        raise ConfigError(f"--resize={resize} is not a resize protocol: pass --resize=short_side (the short side to "
                          "config.augment.eval_resize, aspect kept) or --resize=square (warped to eval_resize x "
                          "eval_resize, Caffe's protocol).")
    if data.uses_per_example(config):
        return crops, resize or config.augment.eval_resize_mode
    small = (f"config.dataset={config.dataset!r} holds small images, decoded whole at the model's input size (only "
             "imagenet2012 and image_folder with augment.random_resized_crop are decoded per example)")
    if crops != 1:
        raise ConfigError(f"--crops={crops} needs large images to crop: {small}; drop --crops.")
    if resize not in (None, "short_side"):
        raise ConfigError(f"--resize={resize} needs large images to resize: {small}; drop --resize.")
    return crops, None


class _MeanOverCrops:
    """The model on [B, k, H, W, C] crops: its float32 logits [B, classes] are the mean of each example's k crops'
    logits (what `train.eval_step` scores)."""

    def __init__(self, model: Any):
        self.model = model

    def apply(self, variables: Any, images: jax.Array, train: bool = False, **kwargs: Any) -> jax.Array:
        b, k = images.shape[:2]
        logits = self.model.apply(variables, images.reshape(b * k, *images.shape[2:]), train=train, **kwargs)
        return logits.astype(jnp.float32).reshape(b, k, -1).mean(axis=1)


def restore_for_evaluation(workdir: str, *, checkpoint: str = "latest", arch: str | None = None,
                           data_dir: str | None = None, crops: int = 1,
                           resize: str | None = None) -> tuple[restore.TrainedRun, Any]:
    """(the restored run on a mesh over every device, the data pipeline of its saved config).

    `resize` (short_side | square) replaces the saved config.augment.eval_resize_mode; with `crops` > 1 an eval
    batch holds config.run.eval_batch_size // crops examples (rounded up to the devices), so that the forward
    pass keeps about eval_batch_size images; the padded, masked last batch makes results independent of it.
    """
    config = restore.load_saved_config(workdir, arch=arch)
    crops, resize = check_protocol(config, crops, resize)
    if data_dir is not None:
        config.run.data_dir = data_dir
    mesh = mesh_lib.create_mesh()
    # The batch sizes must divide over this machine's devices; evaluation pads (mask 0) the last batch anyway,
    # and the train batch size only sets steps per epoch, so rounding them up changes no result.
    n = math.lcm(jax.device_count(), jax.process_count())
    config = ml_collections.ConfigDict(config.to_dict())
    if resize is not None:
        config.augment.eval_resize_mode = resize
    config.run.eval_batch_size = _round_up(max(1, config.run.eval_batch_size // crops), n)
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


def eval_batches(pipeline: Any, split: str | None, *, with_raw: bool = False, crops: int = 1) -> Any:
    """`pipeline.eval_batches(split)`, with an unusable `split` reported as the --split flag's fault."""
    try:
        return pipeline.eval_batches(split, with_raw=with_raw, crops=crops)
    except (ValueError, KeyError, FileNotFoundError) as e:
        if split is None:
            raise
        reason = str(e).replace("config.eval_split=", "--split=").strip().splitlines()[0] if str(e) else ""
        raise ConfigError(f"--split={split!r} cannot be read ({type(e).__name__}: {reason}); pass a split of "
                          "the run's dataset (TFDS split syntax, e.g. 'test' or 'train[:1000]').") from e


def evaluate_checkpoint(workdir: str, split: str | None = None, checkpoint: str = "latest", *,
                        arch: str | None = None, data_dir: str | None = None, crops: int = 1,
                        resize: str | None = None) -> dict[str, Any]:
    """Restores `checkpoint` of `workdir` and evaluates one pass over `split` (default: the run's eval split).

    Large images only: `crops` 1 (the center crop) or 10 (4 corners + center, each also flipped; the example's
    logits are the mean of the 10 crops' logits); `resize` short_side | square (default: the run's
    config.augment.eval_resize_mode). See the module docstring and docs/evaluation.md.
    """
    run, pipeline = restore_for_evaluation(workdir, checkpoint=checkpoint, arch=arch, data_dir=data_dir,
                                           crops=crops, resize=resize)
    crops, resize = check_protocol(run.config, crops, resize)  # as restore_for_evaluation resolved them
    batches = eval_batches(pipeline, split, crops=crops)
    model = run.model if crops == 1 else _MeanOverCrops(run.model)
    p_eval_step = train.make_eval_step(model, run.num_classes, run.mesh)
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
        "crops": crops, "resize": resize,
        "eval_resize": int(run.config.augment.eval_resize) if resize is not None else None,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="a training workdir (local or gs://)")
    parser.add_argument("--split", default=None, help="split to evaluate (default: the run's config.eval_split)")
    parser.add_argument("--checkpoint", default="latest", help=CHECKPOINT_CHOICES)
    parser.add_argument("--arch", default=None, help="expected model.arch; refuses a checkpoint of another arch")
    parser.add_argument("--data_dir", default=None, help="replaces the saved config.run.data_dir (data moved)")
    parser.add_argument("--crops", default="1",
                        help="large images: 1 (the center crop) or 10 (the 4 corner crops + the center crop, each "
                             "also flipped; an example's logits are the mean of its 10 crops' logits)")
    parser.add_argument("--resize", default=None,
                        help="large images: short_side (the short side to config.augment.eval_resize, aspect kept) "
                             "or square (warped to eval_resize x eval_resize, Caffe's); default: the run's "
                             "config.augment.eval_resize_mode")
    args = parser.parse_args(argv)
    try:
        saved = restore.load_saved_config(args.workdir, arch=args.arch)
        check_protocol(saved, args.crops, args.resize)  # a bad flag fails before jax starts
        hostenv.prepare(saved)  # before any computation initialises jax's backends, as in training
        result = evaluate_checkpoint(args.workdir, args.split, args.checkpoint, arch=args.arch, data_dir=args.data_dir,
                                     crops=args.crops, resize=args.resize)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(result, sort_keys=True), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
