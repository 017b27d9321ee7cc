"""Training and evaluation: state, sharded steps (jit or shard_map), and the `train_and_evaluate` loop.

The step is data parallel over a 1-D mesh (`data` axis over every device of every process). With
`config.parallelism='jit'` the step is written for the global batch and `jax.jit` partitions it from the
shardings (batch split, state replicated and donated); with `'shard_map'` the same step runs per device under
`jax.shard_map` with explicit `pmean` of gradients, metrics and BatchNorm statistics.

A workdir holds one experiment (`nin_jax.workdir`: its record, extension and lock). Every checkpoint is
committed before the evaluation that follows it; SIGTERM and Ctrl-C save at the next step boundary; a full
disk stops the run with one message naming what is intact.
"""


import functools
import json
import logging
import os
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
from nin_jax import workdir as workdir_lib
from nin_jax.config import ConfigError
from nin_jax.data import run_record

PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM: "terminated", and resumable by rerunning the command
INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT (Ctrl-C): also resumable by rerunning the command


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
    """SIGTERM (or Ctrl-C) arrived; a checkpoint of `step` was committed and the run can be resumed.

    `step` is None when a second Ctrl-C stopped the run at once (resumable from its last checkpoint).
    """

    def __init__(self, step: int | None, message: str, code: int = PREEMPTED_EXIT_CODE):
        super().__init__(code)
        self.step, self.message = step, message


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


def _unchanged(images: jax.Array) -> jax.Array:
    return images


def make_train_step(config: ml_collections.ConfigDict, model: models.NIN, num_classes: int, mesh: jax.sharding.Mesh,
                    prepare: Callable[[jax.Array], jax.Array] = _unchanged,
                    ) -> Callable[[TrainState, dict], tuple[TrainState, TrainMetrics]]:
    """The compiled step for `config.parallelism`: state replicated and donated, batch split over `data`.

    ``prepare`` maps the batch's images to the model's input inside the step (`data.Pipeline.device_normalize`
    for batches taken with ``normalize=False``).
    """
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
        new_state, m = step(state, {**batch, "image": prepare(batch["image"])})
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


def make_eval_step(model: models.NIN, num_classes: int, mesh: jax.sharding.Mesh,
                   prepare: Callable[[jax.Array], jax.Array] = _unchanged) -> Callable[[TrainState, dict], EvalMetrics]:
    """The compiled `eval_step`; ``prepare`` as in `make_train_step`."""
    repl, data = mesh_lib.replicated(mesh), mesh_lib.data_sharding(mesh)

    def step(state, batch):
        return eval_step(state, {**batch, "image": prepare(batch["image"])}, model=model, num_classes=num_classes)

    return jax.jit(step, in_shardings=(repl, data), out_shardings=repl)


def evaluate(p_eval_step: Callable, state: TrainState, batches: Iterable[dict]) -> dict[str, float]:
    """One pass over `batches`: eval/loss, eval/top1, eval/top5 and eval/num_examples."""
    total, run_ahead = None, mesh_lib.RunAheadBound()  # on CPU host devices, unbounded dispatch can deadlock
    for batch in batches:
        m = p_eval_step(state, batch)
        run_ahead.add(m)
        total = m if total is None else total.merge(m)
    if total is None:
        raise ConfigError("the evaluation split is empty; check config.eval_split.")
    out = {f"eval/{k}": float(v) for k, v in total.compute().items()}
    out["eval/num_examples"] = int(total.loss.count)
    return out


class PreemptionWatcher:
    """Notices SIGTERM (the TPU preemption notice) and Ctrl-C (SIGINT), and says at a step boundary whether to stop.

    Both stop the run at the next step boundary after committing a checkpoint; a second Ctrl-C stops at once
    (KeyboardInterrupt). On several processes Jax's preemption sync manager makes every process agree on the
    same step: it watches SIGTERM, so a Ctrl-C is passed on to it as a SIGTERM to this process (and the run
    exits as preempted, 143). A single process installs its own handlers.
    """

    def __init__(self):
        self.signal_name: str | None = None
        self._multi = jax.process_count() > 1
        signals = (signal.SIGINT,) if self._multi else (signal.SIGTERM, signal.SIGINT)
        self._previous = {s: signal.signal(s, self._handle) for s in signals}

    def _handle(self, signum, frame):
        del frame
        if signum == signal.SIGINT and self.signal_name is not None:
            raise KeyboardInterrupt  # a second Ctrl-C: stop at once
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name
        if signum == signal.SIGINT:
            # os.write, not print: a handler may run while the main thread is inside a print.
            os.write(2, b"\nCtrl-C: saving a checkpoint at the end of this step, then stopping "
                        b"(Ctrl-C again stops at once, losing the steps since the last checkpoint).\n")
            if self._multi:
                os.kill(os.getpid(), signal.SIGTERM)

    @property
    def exit_code(self) -> int:
        return INTERRUPTED_EXIT_CODE if self.signal_name == "SIGINT" and not self._multi else PREEMPTED_EXIT_CODE

    def reached(self, step: int) -> bool:
        if self._multi:
            return multihost_utils.reached_preemption_sync_point(step)
        return self.signal_name is not None

    def close(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


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
        self.rows: dict[int, dict[str, float]] = {}  # the kept lines, by step (train and eval lines merged)
        if self._path is not None and path.exists():
            kept = []
            for line in path.read_text().splitlines():
                try:
                    row = json.loads(line)
                    if row["step"] <= start_step:
                        kept.append(line + "\n")
                        self.rows.setdefault(row.pop("step"), {}).update(row)
                except (ValueError, KeyError, AttributeError, TypeError):  # a line cut short by a crash
                    pass
            path.write_text("".join(kept))

    def last_train_row(self) -> dict[str, float]:
        """The train/* scalars of the last logged step (for results of a run resumed at its end)."""
        for step in sorted(self.rows, reverse=True):
            row = {k: v for k, v in self.rows[step].items() if not k.startswith("eval/")}
            if "train/loss" in row:
                return row
        return {}

    def write(self, step: int, scalars: dict[str, float]) -> None:
        if self._path is not None:
            with self._path.open("a") as f:
                f.write(json.dumps({"step": step, **scalars}) + "\n")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains `config` in `workdir`, resuming from its latest checkpoint; returns (and writes) results.json.

    Before anything is written: the config's ranges (`config_lib.validate`) and the workdir's experiment
    (`workdir.check_identity`) are checked, and a finished run's results are returned as they are (a read-only
    workdir is fine). Then the workdir is locked for this run (`workdir.WorkdirLock`).
    """
    wall_start = time.time()
    config_lib.validate(config)
    workdir_lib.check_identity(config, epath.Path(workdir))
    finished = workdir_lib.finished_results(config, epath.Path(workdir))
    if finished is not None:
        scores = ", ".join(f"{k} {finished[k]:.4f}" for k in ("eval/top1", "eval/top5", "eval/loss") if k in finished)
        print(f"{workdir} already finished {finished.get('step')} steps ({scores}); results: "
              f"{epath.Path(workdir) / 'results.json'}", flush=True)
        return finished
    workdir_path, lock = workdir_lib.prepare_workdir(workdir)
    ckpt_dir = workdir_path / "checkpoints"
    try:
        return _train_locked(config, workdir, workdir_path, lock, wall_start)
    except Exception as e:
        if checkpointing.is_disk_full(e):
            raise workdir_lib.StorageFullError(workdir_lib.disk_full_message(e, workdir_path, ckpt_dir)) from e
        raise
    finally:
        if lock is not None:
            lock.release()


def _train_locked(config: ml_collections.ConfigDict, workdir: str, workdir_path: epath.Path,
                  lock: workdir_lib.WorkdirLock | None, wall_start: float) -> dict[str, Any]:
    mesh = mesh_lib.create_mesh()
    is_chief = jax.process_index() == 0

    # A run normalises with the statistics it saved at its first start (the cache or the data may be gone).
    recorded = run_record.load(workdir_path)
    pipeline = data.Pipeline(config, mesh_lib.data_sharding(mesh),
                             normalizer=None if recorded is None else recorded.normalizer)
    info = pipeline.info
    model = models.create_model(config.model, info.num_classes, dtype=compute_dtype(config),
                                cpu_kernels=config.cpu_kernels)
    rows = models.model_layer_table(model, info.image_shape)  # raises if the blocks shrink the images to nothing
    steps_per_epoch = pipeline.steps_per_epoch
    num_steps = config_lib.total_train_steps(config, steps_per_epoch)
    lr_fn = optim.create_learning_rate_fn(config, steps_per_epoch, num_steps)
    saved_config = workdir_lib.check_identity(config, workdir_path)
    extended_from = workdir_lib.save_config(config, workdir_path, steps_per_epoch)
    if recorded is None and is_chief:
        run_record.save(workdir_path, pipeline, config)

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
    if extended_from is not None and start_step > 0:
        old_lr = optim.create_learning_rate_fn(saved_config, steps_per_epoch, extended_from)(start_step)
        message = (f"Learning-rate schedule: over {num_steps} steps instead of {extended_from}; at step {start_step} "
                   f"the LR is {float(lr_fn(start_step)):.4g} (the {extended_from}-step schedule had "
                   f"{float(old_lr):.4g}), so this run is not the same as a {num_steps}-step run from scratch.")
        logging.info(message)
        print(message, flush=True)

    flops_per_image = architectures.train_flops_per_image(rows)
    num_params = models.count_params(state.params)
    writer = metric_writers.create_default_writer(str(workdir_path), just_logging=not is_chief, asynchronous=True)
    metrics_log = MetricsLog(workdir_path / "metrics.jsonl", start_step, is_chief)
    if start_step == 0:
        writer.write_hparams({k: v for k, v in config_lib.flatten(config).items()
                              if isinstance(v, (int, float, str, bool))})
    print(f"{config.model.arch}: {num_params:,} params, {jax.device_count()} devices on {jax.process_count()} "
          f"process(es), {num_steps} steps ({steps_per_epoch}/epoch) of batch {config.batch_size}", flush=True)

    # Large images travel as uint8 and are normalised inside the compiled steps, on the accelerator.
    p_train_step = make_train_step(config, model, info.num_classes, mesh, pipeline.device_normalize)
    p_eval_step = make_eval_step(model, info.num_classes, mesh, pipeline.device_normalize)
    hooks = [periodic_actions.ReportProgress(num_train_steps=num_steps, writer=writer,
                                             every_steps=config.log_every_steps)]
    if config.profile and is_chief:
        hooks.append(periodic_actions.Profile(num_profile_steps=5, logdir=str(workdir_path)))

    results: dict[str, Any] = {}
    pending_losses = []
    train_seconds, train_images, t_mark = 0.0, 0, None
    results_path = workdir_path / "results.json"

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

    def save(step: int):
        check_finite()
        # A step's loss is computed before its update, so an update can still overflow: never save such state.
        if not bool(_all_finite(state.params)):
            stop_nonfinite(f"the parameters became non-finite at step {step} (its loss was finite)")
        window = {} if train_metrics is None else {
            k: [float(getattr(train_metrics, k).total), int(getattr(train_metrics, k).count)]
            for k in ("loss", "top1")}
        meta = {"step": step, "train_metrics_window": window, **pipeline.data_position(step)}
        checkpointing.save(mngr, step, state, meta)

    def run_eval(step: int, checkpointed: bool) -> None:
        """Evaluates after every checkpoint is committed (a failing evaluation never costs training), logs, and
        attaches the best-checkpoint metric to the checkpoint of `step` if one was saved."""
        mngr.wait_until_finished()
        ev = evaluate(p_eval_step, state, pipeline.eval_batches(normalize=False))
        eval_scalars = {k: v for k, v in ev.items() if k != "eval/num_examples"}
        writer.write_scalars(step, eval_scalars)
        metrics_log.write(step, eval_scalars)
        results.update(ev)
        if checkpointed:
            checkpointing.attach_metrics(mngr, step, {checkpointing.BEST_METRIC: ev["eval/top1"]})

    def eval_due(step: int) -> bool:
        return step % config.eval_every_steps == 0 or step == num_steps

    # A run that stopped between a checkpoint and the evaluation that follows it evaluates that step first.
    if start_step > 0 and eval_due(start_step) and not (mngr.metrics(start_step) or {}).get(checkpointing.BEST_METRIC):
        run_eval(start_step, checkpointed=True)

    preemption = PreemptionWatcher()
    done = start_step
    run_ahead = mesh_lib.RunAheadBound()  # on CPU host devices, unbounded dispatch can deadlock
    try:
        train_iter = pipeline.train_batches(start_step, normalize=False)
        for step in range(start_step, num_steps):
            with jax.profiler.StepTraceAnnotation("train", step_num=step):
                batch = next(train_iter)
                state, m = p_train_step(state, batch)
            run_ahead.add(m)
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
            preempted = preemption.reached(done)
            checkpointed = done % config.checkpoint_every_steps == 0 or is_last or preempted
            if checkpointed:  # first: the evaluation below waits for its commit
                t0 = time.time()
                save(done)
                t_mark += time.time() - t0
            if eval_due(done):
                t0 = time.time()
                run_eval(done, checkpointed)
                t_mark += time.time() - t0  # evaluation time is not training time
            if lock is not None and lock.lost:
                mngr.wait_until_finished()
                raise workdir_lib.WorkdirLocked(f"stopped at step {done}: {lock.lost}; another run may be writing to "
                                    f"--workdir={workdir}. The checkpoint of step {done} is committed.")
            if preempted:
                mngr.wait_until_finished()
                cause = ("Interrupted (SIGINT)" if preemption.signal_name == "SIGINT" else
                         f"Preempted ({preemption.signal_name or 'SIGTERM'})")
                msg = (f"{cause} at step {done}: checkpoint committed in {mngr.directory}. "
                       f"Rerun the same command to resume from step {done}.")
                print(msg, flush=True)
                raise Preempted(done, msg, preemption.exit_code)
    except KeyboardInterrupt:
        mngr.wait_until_finished()
        steps = workdir_lib.committed_steps(epath.Path(mngr.directory))
        resume = f"resume from step {steps[-1]}" if steps else "start again (no checkpoint was saved)"
        msg = (f"Stopped at once by a second Ctrl-C after step {done}; the steps since the last checkpoint are lost. "
               f"Rerun the same command to {resume}.")
        print(msg, flush=True)
        raise Preempted(None, msg, INTERRUPTED_EXIT_CODE) from None
    finally:
        preemption.close()
        mngr.wait_until_finished()
        writer.flush()

    if "eval/top1" not in results:  # resumed from the final checkpoint of a run that died before its results
        run_eval(num_steps, checkpointed=not (mngr.metrics(num_steps) or {}).get(checkpointing.BEST_METRIC)
                 and num_steps in mngr.all_steps())
    if "train/loss" not in results:  # idem: its last logged training metrics
        results.update(metrics_log.last_train_row())
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
    if extended_from is not None:
        results["extended_from_steps"] = extended_from
    if is_chief:
        workdir_lib.write_atomic(results_path, json.dumps(results, indent=2, sort_keys=True))
    mngr.close()
    writer.close()
    return results
