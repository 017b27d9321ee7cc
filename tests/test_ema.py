"""The moving average of the weights (`config.optim.ema_decay`): how it moves, that evaluation and the tools
read it, that a resumed run keeps it bit-identical, and that runs without it keep their old checkpoints."""

import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers_reliability as h
from config_helpers import with_overrides
from configs import digits
from nin_jax import data, mesh as mesh_lib, models, optim, train
from nin_jax.config import ConfigError, validate
from nin_jax.runtime.preemption import Preempted
from nin_jax.tools import evaluate

DECAY = 0.9


def _config(tmp_path, **overrides):
    fields = dict(model__width=0.25, model__batch_norm=True, num_train_steps=8, batch_size=32,
                  optim__ema_decay=DECAY, optim__warmup_epochs=0.0, run__log_every_steps=2,
                  run__eval_every_steps=8, run__checkpoint_every_steps=2, run__keep_checkpoints=10,
                  run__cache_dir=str(tmp_path / "cache"))
    return with_overrides(digits.get_config(), **{**fields, **overrides})


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """A BN model's state with an average, its compiled steps and one batch (compiled once for the module)."""
    config = _config(tmp_path_factory.mktemp("ema_parts"))
    mesh = mesh_lib.create_mesh()
    pipeline = data.Pipeline(config, mesh_lib.data_sharding(mesh))
    model = models.create_model(config.model, pipeline.info.num_classes)
    lr_fn = optim.create_learning_rate_fn(config, pipeline.steps_per_epoch, 8)
    state = train.create_train_state(config, model, pipeline.info.image_shape, lr_fn, mesh)
    return dict(config=config, mesh=mesh, pipeline=pipeline, model=model, state=state,
                step=train.make_train_step(config, model, 10, mesh),
                eval=train.make_eval_step(model, 10, mesh), batch=next(pipeline.train_batches(0)))


def _host(tree):
    return jax.tree.map(lambda x: np.asarray(x, np.float64), jax.device_get(tree))


def test_a_run_with_a_decay_keeps_an_average_that_starts_at_the_initial_weights(parts):
    state = parts["state"]
    assert isinstance(state, train.EMATrainState)
    np.testing.assert_equal(_host(state.ema), _host({"params": state.params, "batch_stats": state.batch_stats}))
    assert not isinstance(train.create_train_state(
        with_overrides(parts["config"], optim__ema_decay=0.0), parts["model"], (8, 8, 1),
        optim.create_learning_rate_fn(parts["config"], 10, 8), parts["mesh"]), train.EMATrainState)


def test_each_step_moves_the_average_towards_the_new_weights_by_one_minus_the_decay(parts):
    before = _host(parts["state"].ema)
    new, _ = parts["step"](jax.tree.map(jnp.copy, parts["state"]), parts["batch"])
    d = min(DECAY, (1 + 1) / (10 + 1))  # after the first update the decay is capped at 2/11
    assert float(train.ema_decay_at(DECAY, 1)) == pytest.approx(d)
    assert float(train.ema_decay_at(DECAY, 10_000)) == pytest.approx(DECAY)
    current = _host({"params": new.params, "batch_stats": new.batch_stats})
    expected = jax.tree.map(lambda e, x: d * e + (1 - d) * x, before, current)
    for got, want in zip(jax.tree.leaves(_host(new.ema)), jax.tree.leaves(expected)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert any(np.abs(a - b).max() > 0 for a, b in zip(jax.tree.leaves(current), jax.tree.leaves(before)))


def test_evaluation_applies_the_average_not_the_live_weights(parts):
    state, batches = parts["state"], list(parts["pipeline"].eval_batches())
    trained = jax.tree.map(jnp.copy, state)  # the step donates its input
    for _ in range(3):
        trained, _ = parts["step"](trained, parts["batch"])
    # An average that is the initial weights, on a state whose live weights have trained three steps.
    mixed = trained.replace(ema={"params": state.params, "batch_stats": state.batch_stats})
    live = train.TrainState(**{f: getattr(trained, f) for f in ("step", "apply_fn", "params", "tx", "opt_state",
                                                                "batch_stats", "rng")})
    initial = live.replace(params=state.params, batch_stats=state.batch_stats)
    by_average = train.evaluate(parts["eval"], mixed, batches)
    assert by_average == train.evaluate(parts["eval"], initial, batches)
    assert by_average["eval/loss"] != train.evaluate(parts["eval"], live, batches)["eval/loss"]


def test_the_decay_must_be_below_one(tmp_path):
    with pytest.raises(ConfigError, match=r"config.optim.ema_decay=1.0 must be in \[0, 1\)"):
        validate(_config(tmp_path, optim__ema_decay=1.0))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ema_run")
    workdir = tmp / "run"
    results = train.train_and_evaluate(_config(tmp), str(workdir))
    return tmp, workdir, results


def test_the_run_evaluates_checkpoints_and_tools_read_the_average(run):
    tmp, workdir, results = run
    restorer = h.Restorer(_config(tmp))
    state, _ = restorer.restore(workdir)
    assert isinstance(state, train.EMATrainState)
    by_average = restorer.evaluate(state)
    assert results["eval/top1"] == by_average["eval/top1"] and results["eval/loss"] == by_average["eval/loss"]
    # `nin_jax.evaluate` (and predict, export, fine-tuning, which restore the same way) gives the same numbers.
    tool = evaluate.evaluate_checkpoint(str(workdir))
    assert (tool["eval/top1"], tool["eval/loss"]) == (results["eval/top1"], results["eval/loss"])
    live = train.TrainState(**{f: getattr(state, f) for f in ("step", "apply_fn", "params", "tx", "opt_state",
                                                              "batch_stats", "rng")})
    assert restorer.evaluate(live)["eval/loss"] != results["eval/loss"]


def test_a_run_stopped_by_sigterm_resumes_with_the_average_bit_identical(run, monkeypatch):
    tmp, workdir, results = run
    real = train.make_train_step

    def make_train_step(*args, **kwargs):  # SIGTERM while step 3 computes: the run saves step 3 and stops
        step_fn, calls = real(*args, **kwargs), []

        def wrapped(state, batch):
            calls.append(1)
            if len(calls) == 3:
                os.kill(os.getpid(), signal.SIGTERM)
            return step_fn(state, batch)

        return wrapped

    stopped = tmp / "stopped"
    with monkeypatch.context() as m:
        m.setattr(train, "make_train_step", make_train_step)
        with pytest.raises(Preempted):
            train.train_and_evaluate(_config(tmp), str(stopped))
    assert h.committed_steps(stopped)[-1] == 3
    resumed = train.train_and_evaluate(_config(tmp), str(stopped))
    restorer = h.Restorer(_config(tmp))
    h.assert_states_identical(restorer.restore(stopped)[0], restorer.restore(workdir)[0])  # the average too
    assert h.deterministic_results(stopped) == h.deterministic_results(workdir)
    assert resumed["resumed_from_step"] == 3


def test_checkpoints_of_runs_without_an_average_have_the_arrays_they_always_had(tmp_path):
    """A run without `ema_decay` saves a plain TrainState, so checkpoints written before the option existed
    restore and resume as they did."""
    config = _config(tmp_path, optim__ema_decay=0.0, num_train_steps=2)
    train.train_and_evaluate(config, str(tmp_path / "plain"))
    state, _ = h.Restorer(config).restore(tmp_path / "plain")
    assert type(state) is train.TrainState
    assert {k.split("/")[0] for k in _top_level_names(state)} == {
        "step", "params", "opt_state", "batch_stats", "rng"}


def _top_level_names(state):
    return {jax.tree_util.keystr(path[:1]).strip(".[]'") for path, _ in jax.tree_util.tree_leaves_with_path(state)}
