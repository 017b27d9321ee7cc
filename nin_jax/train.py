"""Training and evaluation: state, sharded steps (jit or shard_map), and the `train_and_evaluate` loop.

The step is data parallel over a 1-D mesh (`data` axis over every device of every process). With
`config.parallelism='jit'` the step is written for the global batch and `jax.jit` partitions it from the
shardings (batch split, state replicated and donated); with `'shard_map'` the same step runs per device under
`jax.shard_map` with explicit `pmean` of gradients, metrics and BatchNorm statistics.
"""


import functools
import json
import logging
import signal
import time
from typing import Any, Callable, Iterable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from clu import metric_writers, metrics, periodic_actions
from etils import epath
from flax.training import train_state
from jax.experimental import multihost_utils
from jax.sharding import PartitionSpec as P

from nin_jax import architectures, checkpointing, config as config_lib, data, hardware, mesh as mesh_lib, models, optim
from nin_jax.config import ConfigError

PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM: "terminated", and resumable by rerunning the command


class TrainState(train_state.TrainState):
    """Parameters, optimizer state, BatchNorm statistics and the run's base RNG key (raw key data)."""

    batch_stats: Any
    rng: jax.Array


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
    """The training loss became NaN or infinite."""


class Preempted(SystemExit):
    """SIGTERM arrived; a checkpoint of `step` was committed and the run can be resumed."""

    def __init__(self, step: int, message: str):
        super().__init__(PREEMPTED_EXIT_CODE)
        self.step, self.message = step, message


def compute_dtype(config: ml_collections.ConfigDict) -> Any:
    return jnp.bfloat16 if config.half_precision else jnp.float32


def total_train_steps(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
    if config.num_train_steps > 0:
        return int(config.num_train_steps)
    steps = int(config.num_epochs * steps_per_epoch)
    if steps <= 0:
        raise ConfigError(
            f"config.num_epochs={config.num_epochs} gives no training steps ({steps_per_epoch} steps per epoch); "
            "set config.num_epochs > 0 or config.num_train_steps > 0."
        )
    return steps


def _init_fn(config, model: models.NIN, image_shape, learning_rate_fn) -> tuple[Callable, optax.GradientTransformation]:
    def init_variables(rng):
        return model.init({"params": rng}, jnp.zeros((1, *image_shape), jnp.float32), train=False)

    params_shape = jax.eval_shape(init_variables, jax.random.key(0))["params"]
    tx = optim.create_optimizer(config, params_shape, learning_rate_fn, models.output_layer_path(model))

    def init(rng: jax.Array) -> TrainState:
        params_rng, dropout_rng = jax.random.split(rng)
        variables = init_variables(params_rng)
        return TrainState.create(
            apply_fn=model.apply, params=variables["params"], tx=tx,
            batch_stats=variables.get("batch_stats", {}), rng=jax.random.key_data(dropout_rng),
        )

    return init, tx


def create_train_state(config: ml_collections.ConfigDict, model: models.NIN, image_shape: tuple[int, int, int],
                       learning_rate_fn: optax.Schedule, mesh: jax.sharding.Mesh) -> TrainState:
    """A fresh state from `config.seed`, replicated over the mesh."""
    init, _ = _init_fn(config, model, image_shape, learning_rate_fn)
    return jax.jit(init, out_shardings=mesh_lib.replicated(mesh))(jax.random.key(config.seed))


def abstract_train_state(config: ml_collections.ConfigDict, model: models.NIN, image_shape: tuple[int, int, int],
                         learning_rate_fn: optax.Schedule, mesh: jax.sharding.Mesh) -> TrainState:
    """Shapes, dtypes and (replicated) shardings of the state: the restore target for Orbax."""
    init, _ = _init_fn(config, model, image_shape, learning_rate_fn)
    shapes = jax.eval_shape(init, jax.random.key(config.seed))
    repl = mesh_lib.replicated(mesh)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=repl), shapes)


def train_step(state: TrainState, batch: dict, *, model: models.NIN, num_classes: int, label_smoothing: float,
               axis_name: str | None = None) -> tuple[TrainState, dict]:
    """One SGD step. With `axis_name`, runs per device and averages gradients/metrics over that axis."""
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    if axis_name is not None:
        rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
    has_bn = bool(state.batch_stats)

    def loss_fn(params):
        out = model.apply(models.variables(params, state.batch_stats), batch["image"], train=True, rngs={"dropout": rng},
                          mutable=["batch_stats"] if has_bn else False)
        logits, updates = out if has_bn else (out, {})
        loss = optim.cross_entropy_loss(logits, batch["label"], num_classes, label_smoothing).mean()
        return loss, (logits, updates)

    (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    top1 = jnp.mean((jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32))
    if axis_name is not None:
        grads, loss, top1 = jax.lax.pmean((grads, loss, top1), axis_name)
    new_state = state.apply_gradients(grads=grads, batch_stats=updates.get("batch_stats", state.batch_stats))
    return new_state, {"loss": loss, "top1": top1}


def make_train_step(config: ml_collections.ConfigDict, model: models.NIN, num_classes: int,
                    mesh: jax.sharding.Mesh) -> Callable[[TrainState, dict], tuple[TrainState, TrainMetrics]]:
    """The compiled step for `config.parallelism`: state replicated and donated, batch split over `data`."""
    repl, data = mesh_lib.replicated(mesh), mesh_lib.data_sharding(mesh)
    if config.parallelism == "shard_map" and model.batch_norm:
        model = model.clone(bn_axis_name=mesh_lib.DATA_AXIS)  # per-device BN statistics averaged over the batch
    step = functools.partial(train_step, model=model, num_classes=num_classes,
                             label_smoothing=config.optim.label_smoothing)
    if config.parallelism == "shard_map":
        # check_vma=False gives per-device gradients of the local loss (pmap semantics), averaged explicitly
        # with pmean; with the checker on, JAX would already psum the gradients of the replicated parameters.
        step = jax.shard_map(functools.partial(step, axis_name=mesh_lib.DATA_AXIS), mesh=mesh,
                             in_specs=(P(), P(mesh_lib.DATA_AXIS)), out_specs=(P(), P()), check_vma=False)
    elif config.parallelism != "jit":
        raise ConfigError(f"config.parallelism={config.parallelism!r}; choose 'jit' or 'shard_map'.")

    def step_with_metrics(state, batch):
        new_state, m = step(state, batch)
        return new_state, TrainMetrics.single_from_model_output(**m)

    return jax.jit(step_with_metrics, in_shardings=(repl, data), out_shardings=(repl, repl), donate_argnums=0)


def eval_step(state: TrainState, batch: dict, *, model: models.NIN, num_classes: int) -> EvalMetrics:
    """Metrics of one (possibly padded) eval batch; padded examples have mask 0 and do not count."""
    logits = model.apply(models.variables(state.params, state.batch_stats), batch["image"], train=False)
    loss = optim.cross_entropy_loss(logits, batch["label"], num_classes)
    top5 = jax.lax.top_k(logits, min(5, num_classes))[1]
    label = batch["label"][:, None]
    return EvalMetrics.single_from_model_output(
        loss=loss, top1=(top5[:, :1] == label).any(-1).astype(jnp.float32),
        top5=(top5 == label).any(-1).astype(jnp.float32), mask=batch["mask"],
    )


def make_eval_step(model: models.NIN, num_classes: int, mesh: jax.sharding.Mesh) -> Callable[[TrainState, dict], EvalMetrics]:
    repl, data = mesh_lib.replicated(mesh), mesh_lib.data_sharding(mesh)
    return jax.jit(functools.partial(eval_step, model=model, num_classes=num_classes),
                   in_shardings=(repl, data), out_shardings=repl)


def evaluate(p_eval_step: Callable, state: TrainState, batches: Iterable[dict]) -> dict[str, float]:
    """One pass over `batches`: eval/loss, eval/top1, eval/top5 and eval/num_examples."""
    total = None
    for batch in batches:
        m = p_eval_step(state, batch)
        total = m if total is None else total.merge(m)
    if total is None:
        raise ConfigError("the evaluation split is empty; check config.eval_split.")
    out = {f"eval/{k}": float(v) for k, v in total.compute().items()}
    out["eval/num_examples"] = int(total.loss.count)
    return out


def prepare_workdir(workdir: str) -> epath.Path:
    """Creates `workdir` and checks it is a writable directory (early, before any compute)."""
    path = epath.Path(workdir)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--workdir={workdir} is a file, not a directory; pass a directory path.")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write_test.{jax.process_index()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"--workdir={workdir} is not writable ({e}); pass a directory you can write to.") from e
    return path


def save_config(config: ml_collections.ConfigDict, workdir: epath.Path) -> None:
    """Writes config.json at a run's first start; later starts must match its experiment identity.

    Identity is every field but `config_lib.EXECUTION_FIELDS` (devices, cadences, kernels, data location),
    which a resumed run may change; the file keeps the first start's values.
    """
    path = workdir / "config.json"
    if path.exists():
        saved = config_lib.from_json(path.read_text())
        diff = config_lib.identity_diff(saved, config)
        if diff:
            a, b = config_lib.flatten(saved), config_lib.flatten(config)
            changes = ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in diff)
            raise ConfigError(f"--workdir={workdir} holds a different experiment ({changes}); rerun with its "
                              "config (config.json) or use a new --workdir.")
        return
    if jax.process_index() == 0:
        path.write_text(config.to_json_best_effort(indent=2))


class PreemptionWatcher:
    """Notices SIGTERM (the TPU preemption notice) and says, at a step boundary, whether to stop.

    On several processes Jax's preemption sync manager makes every process agree on the same step; a single
    process installs its own SIGTERM handler.
    """

    def __init__(self):
        self._signalled = False
        self._multi = jax.process_count() > 1
        if not self._multi:
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        del signum, frame
        self._signalled = True

    def reached(self, step: int) -> bool:
        if self._multi:
            return multihost_utils.reached_preemption_sync_point(step)
        return self._signalled

    def close(self) -> None:
        if not self._multi:
            signal.signal(signal.SIGTERM, self._previous)


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def _first_nonfinite(losses: list[tuple[int, jax.Array]]) -> tuple[int, float] | None:
    values = jax.device_get([v for _, v in losses])
    for (step, _), v in zip(losses, values):
        if not np.isfinite(v):
            return step, float(v)
    return None


class MetricsLog:
    """`<workdir>/metrics.jsonl`: one JSON line `{"step": s, <scalar>: value, ...}` per write, by process 0.

    A plain-text copy of the logged scalars for scripts and tests. On resume the lines after the restored
    step (logged before the interruption) are dropped, so the file reads as one uninterrupted run.
    """

    def __init__(self, path: epath.Path, start_step: int, enabled: bool):
        self._path = path if enabled else None
        if self._path is not None and path.exists():
            kept = []
            for line in path.read_text().splitlines():
                try:
                    if json.loads(line)["step"] <= start_step:
                        kept.append(line + "\n")
                except (ValueError, KeyError):  # a line cut short by a crash
                    pass
            path.write_text("".join(kept))

    def write(self, step: int, scalars: dict[str, float]) -> None:
        if self._path is not None:
            with self._path.open("a") as f:
                f.write(json.dumps({"step": step, **scalars}) + "\n")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains `config` in `workdir`, resuming from its latest checkpoint; returns (and writes) results.json."""
    wall_start = time.time()
    workdir_path = prepare_workdir(workdir)
    mesh = mesh_lib.create_mesh()
    is_chief = jax.process_index() == 0

    pipeline = data.Pipeline(config, mesh_lib.data_sharding(mesh))
    info = pipeline.info
    model = models.create_model(config.model, info.num_classes, dtype=compute_dtype(config),
                                cpu_kernels=config.cpu_kernels)
    steps_per_epoch = pipeline.steps_per_epoch
    num_steps = total_train_steps(config, steps_per_epoch)
    lr_fn = optim.create_learning_rate_fn(config, steps_per_epoch, num_steps)
    save_config(config, workdir_path)

    mngr = checkpointing.create_manager(workdir_path / "checkpoints", keep=config.keep_checkpoints)
    abstract = abstract_train_state(config, model, info.image_shape, lr_fn, mesh)
    restored = checkpointing.restore_latest(mngr, abstract)
    train_metrics = None
    if restored is None:
        state, start_step = create_train_state(config, model, info.image_shape, lr_fn, mesh), 0
    else:
        state, meta = restored
        start_step = int(meta["step"])
        window = meta.get("train_metrics_window") or {}
        if window:  # the partially accumulated logging window, so resumed logs equal uninterrupted ones
            train_metrics = TrainMetrics.empty().replace(**{
                k: metrics.Average(total=jnp.float32(t), count=jnp.int32(c)) for k, (t, c) in window.items()})
        logging.info("Resumed from %s at step %d.", mngr.directory, start_step)
        print(f"Resuming from checkpoint step {start_step} in {mngr.directory}", flush=True)

    results_path = workdir_path / "results.json"
    if start_step >= num_steps and results_path.exists():
        print(f"{workdir} already finished {num_steps} steps; results: {results_path}", flush=True)
        mngr.close()
        return json.loads(results_path.read_text())

    rows = models.model_layer_table(model, info.image_shape)
    flops_per_image = architectures.train_flops_per_image(rows)
    num_params = models.count_params(state.params)
    writer = metric_writers.create_default_writer(str(workdir_path), just_logging=not is_chief, asynchronous=True)
    metrics_log = MetricsLog(workdir_path / "metrics.jsonl", start_step, is_chief)
    if start_step == 0:
        writer.write_hparams({k: v for k, v in config_lib.flatten(config).items()
                              if isinstance(v, (int, float, str, bool))})
    print(f"{config.model.arch}: {num_params:,} params, {jax.device_count()} devices on {jax.process_count()} "
          f"process(es), {num_steps} steps ({steps_per_epoch}/epoch) of batch {config.batch_size}", flush=True)

    p_train_step = make_train_step(config, model, info.num_classes, mesh)
    p_eval_step = make_eval_step(model, info.num_classes, mesh)
    hooks = [periodic_actions.ReportProgress(num_train_steps=num_steps, writer=writer,
                                             every_steps=config.log_every_steps)]
    if config.profile and is_chief:
        hooks.append(periodic_actions.Profile(num_profile_steps=5, logdir=str(workdir_path)))

    results: dict[str, Any] = {}
    pending_losses = []
    train_seconds, train_images, t_mark = 0.0, 0, None
    preemption = PreemptionWatcher()

    def stop_nonfinite(problem: str):
        mngr.wait_until_finished()
        kept = (f"the last good checkpoint (step {mngr.latest_step()}) is kept in {mngr.directory}"
                if mngr.latest_step() is not None else "no checkpoint had been saved yet")
        raise NonFiniteLossError(
            f"{problem}; stopped, and {kept}. Lower "
            "config.optim.learning_rate, set config.optim.grad_clip_norm, or check the input data."
        )

    def check_finite():
        bad = _first_nonfinite(pending_losses)
        pending_losses.clear()
        if bad is not None:
            stop_nonfinite(f"train/loss became {bad[1]} at step {bad[0]}")

    def save(step: int, metrics_for_best: dict | None):
        check_finite()
        # A step's loss is computed before its update, so an update can still overflow: never save such state.
        if not bool(_all_finite(state.params)):
            stop_nonfinite(f"the parameters became non-finite at step {step} (its loss was finite)")
        window = {} if train_metrics is None else {
            k: [float(getattr(train_metrics, k).total), int(getattr(train_metrics, k).count)]
            for k in ("loss", "top1")}
        meta = {"step": step, "train_metrics_window": window, **pipeline.data_position(step)}
        checkpointing.save(mngr, step, state, meta, metrics_for_best)

    try:
        train_iter = pipeline.train_batches(start_step)
        for step in range(start_step, num_steps):
            with jax.profiler.StepTraceAnnotation("train", step_num=step):
                batch = next(train_iter)
                state, m = p_train_step(state, batch)
            done = step + 1
            pending_losses.append((done, m.loss.total))
            train_metrics = m if train_metrics is None else train_metrics.merge(m)
            if t_mark is None:  # exclude the first step (compilation) from throughput
                jax.block_until_ready(m)
                t_mark = time.time()
            else:
                train_images += config.batch_size
            for hook in hooks:
                hook(done)
            is_last = done == num_steps
            if done % config.log_every_steps == 0 or is_last:
                check_finite()
                summary = {f"train/{k}": float(v) for k, v in train_metrics.compute().items()}
                now = time.time()
                train_seconds += now - t_mark
                t_mark = now
                summary["train/lr"] = float(lr_fn(done - 1))
                if train_seconds > 0 and train_images:
                    img_s = train_images / train_seconds
                    summary["img/sec/core"] = img_s / jax.device_count()
                    mfu = hardware.mfu(flops_per_image * img_s, config.half_precision)
                    if mfu is not None:
                        summary["train/mfu"] = mfu
                writer.write_scalars(done, summary)
                metrics_log.write(done, summary)
                results.update(summary)
                train_metrics = None
            metrics_for_best = None
            if done % config.eval_every_steps == 0 or is_last:
                t0 = time.time()
                ev = evaluate(p_eval_step, state, pipeline.eval_batches())
                eval_scalars = {k: v for k, v in ev.items() if k != "eval/num_examples"}
                writer.write_scalars(done, eval_scalars)
                metrics_log.write(done, eval_scalars)
                results.update(ev)
                metrics_for_best = {checkpointing.BEST_METRIC: ev["eval/top1"]}
                t_mark += time.time() - t0  # evaluation time is not training time
            preempted = preemption.reached(done)
            if done % config.checkpoint_every_steps == 0 or is_last or preempted:
                t0 = time.time()
                save(done, metrics_for_best)
                t_mark += time.time() - t0
            if preempted:
                mngr.wait_until_finished()
                msg = (f"Preempted (SIGTERM) at step {done}: checkpoint committed in {mngr.directory}. "
                       "Rerun the same command to resume.")
                print(msg, flush=True)
                raise Preempted(done, msg)
    finally:
        preemption.close()
        mngr.wait_until_finished()
        writer.flush()

    if "eval/top1" not in results:  # resumed from the final checkpoint of a run that died before its results
        results.update(evaluate(p_eval_step, state, pipeline.eval_batches()))
    results.update({
        "num_params": num_params,
        "step": num_steps,
        "train/img_per_sec": train_images / train_seconds if train_seconds else float("nan"),
        "wall_seconds": time.time() - wall_start,
        "num_devices": jax.device_count(),
        "num_processes": jax.process_count(),
        "config": json.loads(config.to_json_best_effort()),
    })
    if restored is not None:
        results["resumed_from_step"] = start_step
    if is_chief:
        results_path.write_text(json.dumps(results, indent=2, sort_keys=True))
    mngr.close()
    writer.close()
    return results
