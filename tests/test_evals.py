"""Several named evaluations in one run (`config.run.evals`): each logged as eval/<name>/..., at its own cadence,
attached to the checkpoints, kept through a resume; the best checkpoint by a named metric
(`config.run.best_metric`, `--checkpoint=best:<metric>`); malformed entries refused in one line."""

import json

import pytest

from config_helpers import with_overrides
from configs import digits
from nin_jax import checkpointing, config as config_lib, train
from nin_jax.config import ConfigError
from nin_jax.runtime import metrics_log, recovery
from nin_jax.tools import evaluate


def _config(**overrides):
    fields = dict(model__width=0.25, num_train_steps=4, optim__warmup_epochs=0.0, run__log_every_steps=2,
                  run__eval_every_steps=4, run__checkpoint_every_steps=2, run__keep_checkpoints=1,
                  run__evals="again=test, part=train[:64]@2", run__best_metric="eval/part/loss")
    return with_overrides(digits.get_config(), **{**fields, **overrides})


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("evals")
    first = train.train_and_evaluate(_config(), str(workdir))
    return workdir, first


def _eval_rows(workdir):
    rows = metrics_log.read_rows(workdir / "metrics.jsonl")
    return {(r["step"], k): r[k] for r in rows for k in r if k.startswith("eval/")}


def test_each_evaluation_is_logged_under_its_name_at_its_cadence(run):
    workdir, results = run
    assert results["eval/again/top1"] == results["eval/top1"]  # the same split, evaluated twice
    assert results["eval/again/num_examples"] == results["eval/num_examples"] == 297
    assert results["eval/part/num_examples"] == 64
    logged = _eval_rows(workdir)
    assert {s for s, k in logged if k == "eval/part/top1"} == {2, 4}  # every 2 steps
    assert {s for s, k in logged if k == "eval/top1"} == {4} == {s for s, k in logged if k == "eval/again/top5"}


def test_the_metrics_ride_on_the_checkpoints_and_pick_the_best(run):
    workdir, _ = run
    mngr = checkpointing.create_manager(workdir / "checkpoints", keep=1, read_only=True,
                                        best_metric="eval/part/loss")
    logged = _eval_rows(workdir)
    attached = {s: mngr.metrics(s) for s in mngr.all_steps()}
    for step, metrics in attached.items():
        assert metrics["eval/part/loss"] == logged[step, "eval/part/loss"]
    assert set(attached[4]) == {f"{p}{m}" for p in ("eval/", "eval/again/", "eval/part/") for m in
                                config_lib.EVAL_METRICS}
    losses = {s: logged[s, "eval/part/loss"] for s in (2, 4)}
    best = min(losses, key=losses.get)
    assert {4, best} <= set(mngr.all_steps())  # the latest, and the lowest eval/part/loss
    assert recovery.select_step(mngr, "best", "eval/part/loss") == best
    assert recovery.select_step(mngr, "best:eval/part/loss") == best
    assert recovery.select_step(mngr, "best:eval/top1") == 4  # the only step that carries it
    out = evaluate.restore_for_evaluation(str(workdir), checkpoint="best")[0]  # the run's own best_metric
    assert out.step == best


def test_a_resumed_run_goes_on_evaluating_every_split(run, tmp_path):
    workdir, first = run
    longer = train.train_and_evaluate(_config(num_train_steps=6), str(workdir))
    assert longer["resumed_from_step"] == 4
    logged = _eval_rows(workdir)
    assert {s for s, k in logged if k == "eval/part/top1"} == {2, 4, 6}
    assert {s for s, k in logged if k == "eval/again/top1"} == {4, 6}
    assert json.loads((workdir / "results.json").read_text())["eval/part/num_examples"] == 64


@pytest.mark.parametrize("evals,best,message", [
    ("test", "eval/top1", r"config.run.evals: 'test' is not name=split\[@every_steps\]"),
    ("Test=test", "eval/top1", r"config.run.evals: 'Test=test' is not name=split"),
    ("a=test@0", "eval/top1", r"config.run.evals: 'a=test@0' is not name=split"),
    ("a=test,a=train", "eval/top1", "config.run.evals names 'a' twice"),
    ("a=test", "eval/b/top1", r"config.run.best_metric='eval/b/top1' is not a metric of this run's evaluations; "
     "choose one of eval/loss, eval/top1, eval/top5, eval/a/loss"),
])
def test_malformed_evaluations_are_refused_in_one_line(evals, best, message):
    with pytest.raises(ConfigError, match=message):
        config_lib.validate(_config(run__evals=evals, run__best_metric=best))


def test_an_unknown_split_is_refused_before_training(tmp_path):
    with pytest.raises(ConfigError, match=r"config.run.evals='nope' is invalid"):
        train.train_and_evaluate(_config(run__evals="x=nope", run__best_metric="eval/top1"), str(tmp_path / "w"))
    assert not (tmp_path / "w" / "checkpoints").exists()
