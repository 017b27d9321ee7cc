"""Training and evaluation: the state, the sharded steps, and `train_and_evaluate` (setup, loop, finish).

The step is data parallel over a 1-D mesh (`data` axis over every device of every process). With
`config.run.parallelism='jit'` the step is written for the global batch and `jax.jit` partitions it from the
shardings (batch split, state replicated and donated); with `'shard_map'` the same step runs per device under
`jax.shard_map` with explicit `pmean` of gradients, metrics and BatchNorm statistics.

`train_and_evaluate` runs inside one `nin_jax.runtime.workdir.session`, which holds the workdir (its lock,
record, checkpoints' recovery, signals). Every checkpoint is committed before the evaluation that follows it, so a
failing evaluation never costs training; SIGTERM and Ctrl-C save at the next step boundary.
"""

import contextlib
import dataclasses
import functools
import json
import logging
import time
from typing import Any, Callable, Iterable, Iterator

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from clu import metric_writers, metrics, periodic_actions
from flax.training import train_state
from jax.sharding import PartitionSpec as P

from nin_jax import (architectures, checkpointing, config as config_lib, data, finetune, hardware, mesh as mesh_lib,
                     models, optim)
from nin_jax.runtime import workdir as workdir_lib
from nin_jax.config import ConfigError
from nin_jax.cpu import layers as cpu_layers
from nin_jax.data import run_record

class TrainState(train_state.TrainState):
    """Parameters, optimizer state, BatchNorm statistics and the run's base RNG key (raw key data)."""

    batch_stats: Any
    rng: jax.Array


class EMATrainState(TrainState):
    """A `TrainState` with the moving average of the weights (`{"params", "batch_stats"}`) of a run with
    `config.optim.ema_decay` > 0. A class of its own, so that the checkpoints of runs without one keep exactly
    the arrays (and tree) they always had."""

    ema: Any


def inference_variables(state: TrainState) -> dict[str, Any]:
    """What evaluation applies the model with: the weights' moving average when the run keeps one."""
    if isinstance(state, EMATrainState):
        return models.variables(state.ema["params"], state.ema["batch_stats"])
    return models.variables(state.params, state.batch_stats)


def ema_decay_at(decay: float, step: jax.Array) -> jax.Array:
    """The decay of the average's update at `step` (after that many updates): `decay`, but at most
    (1 + step) / (10 + step), so the first steps' average is not dominated by the initial weights."""
    step = jnp.asarray(step, jnp.float32)
    return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


@flax.struct.dataclass
class TrainMetrics(metrics.Collection):
    loss: metrics.Average.from_output("loss")
    top1: metrics.Average.from_output("top1")


@flax.struct.dataclass
class EvalMetrics(metrics.Collection):
    loss: metrics.Average.from_output("loss")
    top1: metrics.Average.from_output("top1")
    top5: metrics.Average.from_output("top5")


class NonFiniteLossError(FloatingPointError):
    """The training loss (or the parameters) became NaN or infinite."""


def compute_dtype(config: ml_collections.ConfigDict) -> Any:
    return jnp.bfloat16 if config.half_precision else jnp.float32


def _init_fn(config, model: models.NIN, image_shape, learning_rate_fn) -> tuple[Callable, optax.GradientTransformation]:
    def init_variables(rng):
        return model.init({"params": rng}, jnp.zeros((1, *image_shape), jnp.float32), train=False)

    params_shape = jax.eval_shape(init_variables, jax.random.key(0))["params"]
    tx = optim.create_optimizer(config, params_shape, learning_rate_fn, models.output_layer_path(model))

    def init(rng: jax.Array) -> TrainState:
        params_rng, dropout_rng = jax.random.split(rng)
        variables = init_variables(params_rng)
        params, batch_stats = variables["params"], variables.get("batch_stats", {})
        fields = dict(apply_fn=model.apply, params=params, tx=tx, batch_stats=batch_stats,
                      rng=jax.random.key_data(dropout_rng))
        if config.optim.ema_decay > 0:
            return EMATrainState.create(**fields, ema=jax.tree.map(jnp.copy, {"params": params,
                                                                             "batch_stats": batch_stats}))
        return TrainState.create(**fields)

    return init, tx


def create_train_state(config: ml_collections.ConfigDict, model: models.NIN, image_shape: tuple[int, int, int],
                       learning_rate_fn: optax.Schedule, mesh: jax.sharding.Mesh) -> TrainState:
    """A fresh state from `config.seed`, replicated over the mesh."""
    init, _ = _init_fn(config, model, image_shape, learning_rate_fn)
    return jax.jit(init, out_shardings=mesh_lib.replicated(mesh))(jax.random.key(config.seed))


def abstract_train_state(config: ml_collections.ConfigDict, model: models.NIN, image_shape: tuple[int, int, int],
                         learning_rate_fn: optax.Schedule | None, mesh: jax.sharding.Mesh) -> TrainState:
    """Shapes, dtypes and (replicated) shardings of the state: the restore target for Orbax. The state's
    structure does not depend on the schedule's values, so readers of a checkpoint may pass None."""
    init, _ = _init_fn(config, model, image_shape, learning_rate_fn or optax.constant_schedule(0.0))
    shapes = jax.eval_shape(init, jax.random.key(config.seed))
    repl = mesh_lib.replicated(mesh)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=repl), shapes)


def train_step(state: TrainState, batch: dict, *, model: models.NIN, num_classes: int, label_smoothing: float,
               micro_batches: int = 1, ema_decay: float = 0.0,
               axis_name: str | None = None) -> tuple[TrainState, dict]:
    """One SGD step. With `axis_name`, runs per device and averages gradients/metrics over that axis.

    When the state keeps a moving average of the weights, it moves towards the updated weights by
    1 - `ema_decay_at(ema_decay, step)`.

    With `micro_batches` k > 1 the batch's gradient is accumulated over k sequential micro-batches of a k-th of
    its rows (rows j, j+k, j+2k, ... form micro-batch j, so each device keeps its own rows), and the mean of
    their gradients makes one update: without BatchNorm, the update of the whole batch up to float rounding.
    BatchNorm normalises each micro-batch by its own statistics and updates the running ones after each, as
    k forward passes of the smaller batch would; dropout draws a mask per micro-batch.
    """
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    if axis_name is not None:
        rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
    has_bn = bool(state.batch_stats)

    def gradients(batch_stats, part, rng):
        def loss_fn(params):
            out = model.apply(models.variables(params, batch_stats), part["image"], train=True,
                              rngs={"dropout": rng}, mutable=["batch_stats"] if has_bn else False)
            logits, updates = out if has_bn else (out, {})
            loss = optim.cross_entropy_loss(logits, part["label"], num_classes, label_smoothing).mean()
            return loss, (logits, updates)

        (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        top1 = jnp.mean((jnp.argmax(logits, -1) == part["label"]).astype(jnp.float32))
        return grads, loss, top1, updates.get("batch_stats", batch_stats)

    if micro_batches == 1:
        grads, loss, top1, batch_stats = gradients(state.batch_stats, batch, rng)
    else:
        parts = jax.tree.map(lambda x: x.reshape(-1, micro_batches, *x.shape[1:]).swapaxes(0, 1), batch)

        def accumulate(carry, part_and_index):
            total, stats = carry
            part, j = part_and_index
            grads, loss, top1, stats = gradients(stats, part, jax.random.fold_in(rng, j))
            return (jax.tree.map(jnp.add, total, grads), stats), (loss, top1)

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        (total, batch_stats), (losses, top1s) = jax.lax.scan(
            accumulate, (zeros, state.batch_stats), (parts, jnp.arange(micro_batches)))
        grads, loss, top1 = jax.tree.map(lambda g: g / micro_batches, total), losses.mean(), top1s.mean()
    if axis_name is not None:
        grads, loss, top1 = jax.lax.pmean((grads, loss, top1), axis_name)
    new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    if isinstance(state, EMATrainState):
        d = ema_decay_at(ema_decay, new_state.step)
        current = {"params": new_state.params, "batch_stats": new_state.batch_stats}
        new_state = new_state.replace(ema=jax.tree.map(lambda e, x: d * e + (1.0 - d) * x, state.ema, current))
    return new_state, {"loss": loss, "top1": top1}


def _unchanged(images: jax.Array) -> jax.Array:
    return images


def make_train_step(config: ml_collections.ConfigDict, model: models.NIN, num_classes: int, mesh: jax.sharding.Mesh,
                    prepare: Callable[[jax.Array], jax.Array] = _unchanged,
                    ) -> Callable[[TrainState, dict], tuple[TrainState, TrainMetrics]]:
    """The compiled step for `config.run.parallelism`: state replicated and donated, batch split over `data`.

    ``prepare`` maps the batch's images to the model's input inside the step (`data.Pipeline.device_normalize`
    for batches taken with ``normalize=False``).
    """
    repl, data = mesh_lib.replicated(mesh), mesh_lib.data_sharding(mesh)
    if config.run.parallelism == "shard_map" and model.batch_norm:
        model = model.clone(bn_axis_name=mesh_lib.DATA_AXIS)  # per-device BN statistics averaged over the batch
    step = functools.partial(train_step, model=model, num_classes=num_classes,
                             label_smoothing=config.optim.label_smoothing,
                             micro_batches=config.optim.grad_accum_steps, ema_decay=config.optim.ema_decay)
    if config.run.parallelism == "shard_map":
        # check_vma=False gives per-device gradients of the local loss (pmap semantics), averaged explicitly
        # with pmean; with the checker on, JAX would already psum the gradients of the replicated parameters.
        step = jax.shard_map(functools.partial(step, axis_name=mesh_lib.DATA_AXIS), mesh=mesh,
                             in_specs=(P(), P(mesh_lib.DATA_AXIS)), out_specs=(P(), P()), check_vma=False)
    elif config.run.parallelism != "jit":
        raise ConfigError(f"config.run.parallelism={config.run.parallelism!r}; choose 'jit' or 'shard_map'.")

    def step_with_metrics(state, batch):
        new_state, m = step(state, {**batch, "image": prepare(batch["image"])})
        return new_state, TrainMetrics.single_from_model_output(**m)

    return jax.jit(step_with_metrics, in_shardings=(repl, data), out_shardings=(repl, repl), donate_argnums=0)


def eval_step(state: TrainState, batch: dict, *, model: models.NIN, num_classes: int) -> EvalMetrics:
    """Metrics of one (possibly padded) eval batch, by `inference_variables`; padded examples have mask 0 and do
    not count."""
    logits = model.apply(inference_variables(state), batch["image"], train=False)
    loss = optim.cross_entropy_loss(logits, batch["label"], num_classes)
    top5 = jax.lax.top_k(logits, min(5, num_classes))[1]
    label = batch["label"][:, None]
    return EvalMetrics.single_from_model_output(
        loss=loss, top1=(top5[:, :1] == label).any(-1).astype(jnp.float32),
        top5=(top5 == label).any(-1).astype(jnp.float32), mask=batch["mask"],
    )


def make_eval_step(model: models.NIN, num_classes: int, mesh: jax.sharding.Mesh,
                   prepare: Callable[[jax.Array], jax.Array] = _unchanged) -> Callable[[TrainState, dict], EvalMetrics]:
    """The compiled `eval_step`; ``prepare`` as in `make_train_step`."""
    repl, data = mesh_lib.replicated(mesh), mesh_lib.data_sharding(mesh)

    def step(state, batch):
        return eval_step(state, {**batch, "image": prepare(batch["image"])}, model=model, num_classes=num_classes)

    return jax.jit(step, in_shardings=(repl, data), out_shardings=repl)


def evaluate(p_eval_step: Callable, state: TrainState, batches: Iterable[dict],
             prefix: str = "eval/") -> dict[str, float]:
    """One pass over `batches`: eval/loss, eval/top1, eval/top5 and eval/num_examples (names after `prefix`)."""
    total, run_ahead = None, mesh_lib.RunAheadBound()  # on CPU host devices, unbounded dispatch can deadlock
    for batch in batches:
        m = p_eval_step(state, batch)
        run_ahead.add(m)
        total = m if total is None else total.merge(m)
    if total is None:
        raise ConfigError("the evaluation split is empty; check config.eval_split.")
    out = {f"{prefix}{k}": float(v) for k, v in total.compute().items()}
    out[f"{prefix}num_examples"] = int(total.loss.count)
    return out


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


# ------------------------------------------------------------------------------------------- the loop


@dataclasses.dataclass
class Trainer:
    """What the training loop works on; made by `setup`, advanced by `train`."""

    config: ml_collections.ConfigDict
    mesh: jax.sharding.Mesh
    pipeline: data.Pipeline
    model: models.NIN
    state: TrainState
    step: int  # steps done
    num_steps: int
    lr_fn: optax.Schedule
    train_step: Callable[[TrainState, dict], tuple[TrainState, TrainMetrics]]
    eval_step: Callable[[TrainState, dict], EvalMetrics]
    manager: ocp.CheckpointManager
    writer: metric_writers.MetricWriter
    window: TrainMetrics | None  # the training metrics since the last log line
    flops_per_image: float  # analytic model FLOPs of a training step, per image
    evals: tuple[config_lib.Evaluation, ...]  # config.eval_split's, then config.run.evals'
    results: dict[str, Any] = dataclasses.field(default_factory=dict)  # what results.json reports
    losses: list[tuple[int, jax.Array]] = dataclasses.field(default_factory=list)  # (step, loss) not yet checked


def setup(config: ml_collections.ConfigDict, session: workdir_lib.Session) -> Trainer:
    """Data, model, compiled steps and the state to start from (restored, or fresh from `config.seed`)."""
    mesh = mesh_lib.create_mesh()
    if config.optim.grad_accum_steps > 1:  # each micro-batch splits over the devices as a whole batch does
        data.check_batch_layout(mesh_lib.data_sharding(mesh), config.batch_size // config.optim.grad_accum_steps,
                                "config.batch_size / config.optim.grad_accum_steps")
    if config.init_from:
        finetune.check(config)
    recorded = run_record.load(session.path)  # a run normalises with the statistics saved at its first start
    pipeline = data.Pipeline(config, mesh_lib.data_sharding(mesh),
                             normalizer=None if recorded is None else recorded.normalizer)
    info = pipeline.info
    model = models.create_model(config.model, info.num_classes, dtype=compute_dtype(config),
                                layers=cpu_layers.model_layers(config.run.cpu_kernels))
    rows = models.model_layer_table(model, info.image_shape)  # raises if the blocks shrink the images to nothing
    evals = config_lib.evaluations(config)
    for e in evals[1:]:  # a bad split fails now, not at the first evaluation
        print(f"Evaluation {e.name!r}: {pipeline.num_examples(e.split, 'config.run.evals')} examples of {e.split!r} "
              f"every {e.every_steps} steps", flush=True)
    num_steps = config_lib.total_train_steps(config, pipeline.steps_per_epoch)
    lr_fn = optim.create_learning_rate_fn(config, pipeline.steps_per_epoch, num_steps)
    session.record(pipeline.steps_per_epoch)
    if recorded is None and session.is_chief:
        run_record.save(session.path, pipeline.normalizer, info.class_names, info.image_shape, config)

    restored = session.restore(abstract_train_state(config, model, info.image_shape, lr_fn, mesh))
    step, window = 0, None
    results = {}
    if restored is None:
        state = create_train_state(config, model, info.image_shape, lr_fn, mesh)
        if config.init_from:
            state, results["init_from"] = finetune.initialize(config, state, model, mesh)
    else:
        state, meta, step = restored
        window = _window_from_meta(meta)
        if "init_from" in meta:
            results["init_from"] = meta["init_from"]
        print(f"Resuming from checkpoint step {step} in {session.manager.directory}", flush=True)
    if session.extended_from is not None and step > 0:
        old_lr = optim.create_learning_rate_fn(session.saved, pipeline.steps_per_epoch, session.extended_from)
        _say(f"Learning-rate schedule: over {num_steps} steps instead of {session.extended_from}; at step {step} the "
             f"LR is {float(lr_fn(step)):.4g} (the {session.extended_from}-step schedule had {float(old_lr(step)):.4g}),"
             f" so this run is not the same as a {num_steps}-step run from scratch.")
    writer = session.writer(step)
    if step == 0:
        writer.write_hparams({k: v for k, v in config_lib.flatten(config).items()
                              if isinstance(v, (int, float, str, bool))})
    print(f"{config.model.arch}: {models.count_params(state.params):,} params, {jax.device_count()} devices on "
          f"{jax.process_count()} process(es), {num_steps} steps ({pipeline.steps_per_epoch}/epoch) of batch "
          f"{config.batch_size}", flush=True)
    if config.optim.ema_decay > 0:
        print(f"Evaluations use the weights' moving average (decay {config.optim.ema_decay}).", flush=True)
    # Large images travel as uint8 and are normalised inside the compiled steps, on the accelerator.
    return Trainer(
        config, mesh, pipeline, model, state, step, num_steps, lr_fn,
        make_train_step(config, model, info.num_classes, mesh, pipeline.device_normalize),
        make_eval_step(model, info.num_classes, mesh, pipeline.device_normalize),
        session.manager, writer, window, architectures.train_flops_per_image(rows), evals, results)


def train(t: Trainer, session: workdir_lib.Session) -> None:
    """Steps from `t.step` to `t.num_steps`; a log line, a checkpoint and an evaluation at their cadences."""
    run = t.config.run
    if t.step > 0 and t.step in t.manager.all_steps():  # stopped between this checkpoint and its evaluations?
        attached = t.manager.metrics(t.step) or {}
        missing = [e for e in _due_evals(t) if f"{e.prefix}top1" not in attached]
        if missing:
            evaluate_and_log(t, missing)
    hooks = []
    if run.profile and session.is_chief:
        hooks.append(periodic_actions.Profile(num_profile_steps=5, logdir=str(session.path)))
    timer, run_ahead = Stopwatch(), mesh_lib.RunAheadBound()  # on CPU host devices, unbounded dispatch can deadlock
    batches = t.pipeline.train_batches(t.step, normalize=False)
    with session.signals(lambda: t.step) as preemption:
        for step in range(t.step, t.num_steps):
            with jax.profiler.StepTraceAnnotation("train", step_num=step):
                t.state, m = t.train_step(t.state, next(batches))
            run_ahead.add(m)
            t.step = step + 1
            t.window = m if t.window is None else t.window.merge(m)
            t.losses.append((t.step, m.loss.total))
            timer.count(t.config.batch_size, m)
            for hook in hooks:
                hook(t.step)
            last = t.step == t.num_steps
            if t.step % run.log_every_steps == 0 or last:
                log_train_metrics(t, timer)
            stop = preemption.reached(t.step)
            if t.step % run.checkpoint_every_steps == 0 or last or stop:
                with timer.paused():
                    save_checkpoint(t)
            due = _due_evals(t)
            if due:
                with timer.paused():
                    evaluate_and_log(t, due)
            session.check_lock(t.step)
            if stop:
                raise session.stop(t.step)
    t.results["train/img_per_sec"] = timer.images_per_second()


def _due_evals(t: Trainer) -> list[config_lib.Evaluation]:
    return [e for e in t.evals if t.step % e.every_steps == 0 or t.step == t.num_steps]


class Stopwatch:
    """Training throughput: images over the time from the end of the first step (compilation) to the last
    `lap`, with checkpoints and evaluations `paused` out."""

    def __init__(self):
        self.images, self.seconds, self._start = 0, 0.0, None

    def count(self, batch_size: int, outputs: Any) -> None:
        if self._start is None:
            jax.block_until_ready(outputs)
            self._start = time.perf_counter()
        else:
            self.images += batch_size

    def lap(self) -> float:
        """Images per second so far."""
        if self._start is not None:
            self.seconds = time.perf_counter() - self._start
        return self.images_per_second()

    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 and self.images else float("nan")

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        begin = time.perf_counter()
        try:
            yield
        finally:
            if self._start is not None:
                self._start += time.perf_counter() - begin


def check_finite(t: Trainer) -> None:
    """Raises `NonFiniteLossError` naming the first step since the last check whose loss is not finite, after
    the last good checkpoint is committed."""
    pending = list(t.losses)
    t.losses.clear()
    for (step, _), value in zip(pending, jax.device_get([v for _, v in pending])):
        if not np.isfinite(value):
            _stop_nonfinite(t, f"train/loss became {float(value)} at step {step}")


def _stop_nonfinite(t: Trainer, problem: str) -> None:
    t.manager.wait_until_finished()
    last = t.manager.latest_step()
    kept = (f"the last good checkpoint (step {last}) is kept in {t.manager.directory}" if last is not None
            else "no checkpoint had been saved yet")
    raise NonFiniteLossError(f"{problem}; stopped, and {kept}. Lower config.optim.learning_rate, set "
                             "config.optim.grad_clip_norm, or check the input data.")


def log_train_metrics(t: Trainer, timer: Stopwatch) -> None:
    """Writes the window's train/* means, the LR, img/sec/core and (on TPU/GPU) the MFU; starts a new window."""
    check_finite(t)
    summary = {f"train/{k}": float(v) for k, v in t.window.compute().items()}
    summary["train/lr"] = float(t.lr_fn(t.step - 1))
    img_s = timer.lap()
    if np.isfinite(img_s):
        summary["img/sec/core"] = img_s / jax.device_count()
        mfu = hardware.mfu(t.flops_per_image * img_s, t.config.half_precision)
        if mfu is not None:
            summary["train/mfu"] = mfu
    t.writer.write_scalars(t.step, summary)
    t.results.update(summary)
    t.window = None


def save_checkpoint(t: Trainer) -> None:
    """Starts the save of step `t.step` with its data position and logging window; never of non-finite state."""
    check_finite(t)
    # A step's loss is computed before its update, so an update can still overflow.
    if not bool(_all_finite(t.state.params)):
        _stop_nonfinite(t, f"the parameters became non-finite at step {t.step} (its loss was finite)")
    window = {} if t.window is None else {
        k: [float(getattr(t.window, k).total), int(getattr(t.window, k).count)] for k in ("loss", "top1")}
    meta = {"step": t.step, "train_metrics_window": window, **t.pipeline.data_position(t.step),
            **{k: t.results[k] for k in ("init_from",) if k in t.results}}
    checkpointing.save(t.manager, t.step, t.state, meta)


def _window_from_meta(meta: dict) -> TrainMetrics | None:
    """The logging window a checkpoint saved, so that resumed logs equal uninterrupted ones."""
    window = meta.get("train_metrics_window") or {}
    if not window:
        return None
    return TrainMetrics.empty().replace(**{
        k: metrics.Average(total=jnp.float32(total), count=jnp.int32(count)) for k, (total, count) in window.items()})


def evaluate_and_log(t: Trainer, evals: Iterable[config_lib.Evaluation]) -> None:
    """Runs `evals` on `t.state` once its checkpoint is committed, logs their metrics, and attaches them to the
    checkpoint of this step (if one was saved), which `config.run.best_metric` ranks."""
    t.manager.wait_until_finished()
    scores = {}
    for e in evals:
        ev = evaluate(t.eval_step, t.state, t.pipeline.eval_batches(e.split, normalize=False), e.prefix)
        t.results.update(ev)
        scores.update({k: v for k, v in ev.items() if not k.endswith("num_examples")})
    t.writer.write_scalars(t.step, scores)
    if t.step in t.manager.all_steps():
        checkpointing.attach_metrics(t.manager, t.step, {**(t.manager.metrics(t.step) or {}), **scores})


def finish(t: Trainer, session: workdir_lib.Session, wall_start: float, resumed_from: int | None) -> dict[str, Any]:
    """The run's results.json: the last train/* and eval/* metrics, throughput, size and config."""
    missing = [e for e in t.evals if f"{e.prefix}top1" not in t.results]
    if missing:  # resumed from the final checkpoint of a run that died before its results
        evaluate_and_log(t, missing)
    if "train/loss" not in t.results and session.jsonl is not None:  # idem: its last logged training metrics
        t.results.update(session.jsonl.last_train_row())
    t.results.setdefault("train/img_per_sec", float("nan"))
    t.results.update({
        "num_params": models.count_params(t.state.params), "step": t.num_steps,
        "wall_seconds": time.time() - wall_start, "num_devices": jax.device_count(),
        "num_processes": jax.process_count(), "config": json.loads(t.config.to_json_best_effort()),
    })
    if resumed_from is not None:
        t.results["resumed_from_step"] = resumed_from
    if session.extended_from is not None:
        t.results["extended_from_steps"] = session.extended_from
    session.write_results(t.results)
    return t.results


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains `config` in `workdir`, resuming from its latest checkpoint; returns (and writes) results.json.

    A workdir holding another experiment is refused before anything is written, and a finished run's results
    are returned as they are (a read-only workdir is fine).
    """
    wall_start = time.time()
    with workdir_lib.session(config, workdir) as session:
        if session.finished is not None:
            done = session.finished
            scores = ", ".join(f"{k} {done[k]:.4f}" for k in ("eval/top1", "eval/top5", "eval/loss") if k in done)
            print(f"{workdir} already finished {done.get('step')} steps ({scores}); results: "
                  f"{session.path / 'results.json'}", flush=True)
            return done
        t = setup(config, session)
        resumed_from = t.step or None
        train(t, session)
        return finish(t, session, wall_start, resumed_from)


def _say(message: str) -> None:
    logging.info(message)
    print(message, flush=True)
