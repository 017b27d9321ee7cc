"""The training step and loop: device-count and parallelism invariance, learning, workdir contents, CLI."""

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from config_helpers import with_overrides
from configs import digits
from nin_jax import mesh as mesh_lib, models, optim, train
from nin_jax.data import loader, preprocessing
from nin_jax.config import ConfigError

NUM_CLASSES = 10
IMAGE_SHAPE = (8, 8, 1)


def small_config(**overrides):
    return with_overrides(digits.get_config(), model__width=0.5, **overrides)


def _batch(seed=0, n=16):
    rng = np.random.default_rng(seed)
    return {"image": rng.normal(size=(n, *IMAGE_SHAPE)).astype(np.float32),
            "label": rng.integers(0, NUM_CLASSES, n).astype(np.int32)}


def _run_one_step(config, devices, steps=1, rows=16):
    mesh = mesh_lib.create_mesh(devices)
    model = models.create_model(config.model, NUM_CLASSES)
    lr_fn = optim.create_learning_rate_fn(config, steps_per_epoch=10, total_steps=100)
    state = train.create_train_state(config, model, IMAGE_SHAPE, lr_fn, mesh)
    step = train.make_train_step(config, model, NUM_CLASSES, mesh)
    losses = []
    for i in range(steps):
        batch = jax.device_put(_batch(i, rows), mesh_lib.data_sharding(mesh))
        state, m = step(state, batch)
        losses.append(float(m.loss.compute()))
    return jax.device_get(state.params), jax.device_get(state.batch_stats), losses


def _assert_trees_close(a, b, tol=1e-5):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(x, y, rtol=tol, atol=tol)


def test_one_step_on_one_device_equals_one_step_on_eight():
    config = small_config()  # dropout on, BatchNorm on
    p1, s1, l1 = _run_one_step(config, jax.devices()[:1])
    p8, s8, l8 = _run_one_step(config, jax.devices())
    np.testing.assert_allclose(l1, l8, rtol=1e-5)
    _assert_trees_close(p1, p8)
    _assert_trees_close(s1, s8)


def test_jit_and_shard_map_steps_agree():
    # Dropout masks are drawn per device under shard_map and for the global batch under jit, so they differ by
    # design; with dropout off, gradients and BatchNorm statistics must agree after averaging over devices.
    base = dict(**{"model.dropout_rate": 0.0})
    pj, sj, lj = _run_one_step(small_config(**base, run__parallelism="jit"), jax.devices(), steps=2)
    ps, ss, ls = _run_one_step(small_config(**base, run__parallelism="shard_map"), jax.devices(), steps=2)
    np.testing.assert_allclose(lj, ls, rtol=1e-5)
    _assert_trees_close(pj, ps)
    _assert_trees_close(sj, ss)


@pytest.mark.parametrize("parallelism", ["jit", "shard_map"])
def test_accumulating_four_micro_batches_updates_as_one_large_batch(parallelism):
    # 32 rows on 8 devices: 4 micro-batches of 8, one row per device each. Without BatchNorm and dropout the
    # accumulated step is the large batch's up to float rounding.
    base = dict(**{"model.dropout_rate": 0.0, "model.batch_norm": False}, batch_size=32, run__parallelism=parallelism)
    p1, _, l1 = _run_one_step(small_config(**base), jax.devices(), steps=2, rows=32)
    p4, _, l4 = _run_one_step(small_config(**base, optim__grad_accum_steps=4), jax.devices(), steps=2, rows=32)
    np.testing.assert_allclose(l1, l4, rtol=1e-5)
    _assert_trees_close(p1, p4)


def test_accumulation_with_batchnorm_is_the_same_on_one_device_and_on_eight():
    # Each micro-batch is normalised by its own statistics (over all devices), so the step does not depend on
    # how the rows are spread over devices: dropout off, as its masks are drawn per device layout.
    config = small_config(**{"model.dropout_rate": 0.0}, batch_size=32, optim__grad_accum_steps=2)
    p1, s1, l1 = _run_one_step(config, jax.devices()[:1], steps=2, rows=32)
    p8, s8, l8 = _run_one_step(config, jax.devices(), steps=2, rows=32)
    np.testing.assert_allclose(l1, l8, rtol=1e-5)
    _assert_trees_close(p1, p8)
    _assert_trees_close(s1, s8)
    one = _run_one_step(small_config(**{"model.dropout_rate": 0.0}, batch_size=32), jax.devices(), steps=2, rows=32)
    assert not np.allclose(jax.tree.leaves(one[1])[0], jax.tree.leaves(s8)[0])  # BN saw micro-batches


def test_an_accumulation_that_does_not_divide_the_batch_is_rejected_in_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"^config.optim.grad_accum_steps=3 does not divide config.batch_size=128 "
                       r"into equal micro-batches; set e.g. --config.optim.grad_accum_steps=2.$"):
        train.train_and_evaluate(small_config(batch_size=128, optim__grad_accum_steps=3), str(tmp_path / "a"))
    with pytest.raises(ConfigError, match=r"config.batch_size / config.optim.grad_accum_steps=4 must be a positive "
                       r"multiple of the number of processes \(1\) and of the number of devices on the data axis \(8\)"):
        train.train_and_evaluate(small_config(batch_size=16, optim__grad_accum_steps=4), str(tmp_path / "b"))
    assert not (tmp_path / "b").exists() or not any((tmp_path / "b").iterdir())


@pytest.mark.parametrize("parallelism", ["jit", "shard_map"])
def test_images_normalised_inside_the_step_train_exactly_as_normalised_batches(parallelism):
    """The training loop hands large images over as uint8 and normalises them inside the step (`prepare`)."""
    config = small_config(run__parallelism=parallelism)
    mesh = mesh_lib.create_mesh(jax.devices())
    model = models.create_model(config.model, NUM_CLASSES)
    lr_fn = optim.create_learning_rate_fn(config, steps_per_epoch=10, total_steps=100)
    normalizer = preprocessing.Normalizer("standardize", {"mean": np.float32([100.0]), "std": np.float32([60.0])})
    table = normalizer.pixel_table(1)
    pixels = np.random.default_rng(0).integers(0, 256, (16, *IMAGE_SHAPE), np.uint8)
    labels = np.arange(16, dtype=np.int32) % NUM_CLASSES
    sharding = mesh_lib.data_sharding(mesh)
    on_host = train.make_train_step(config, model, NUM_CLASSES, mesh)
    in_step = train.make_train_step(config, model, NUM_CLASSES, mesh, functools.partial(loader.pixel_lookup, table))
    states = []
    for step, images in ((on_host, normalizer(pixels)), (in_step, pixels)):
        state = train.create_train_state(config, model, IMAGE_SHAPE, lr_fn, mesh)
        state, _ = step(state, jax.device_put({"image": images, "label": labels}, sharding))
        states.append(jax.device_get((state.params, state.batch_stats)))
    for x, y in zip(jax.tree.leaves(states[0]), jax.tree.leaves(states[1]), strict=True):
        np.testing.assert_array_equal(x, y)


def test_the_model_refuses_images_that_were_not_normalised():
    model = models.create_model(small_config().model, NUM_CLASSES)
    with pytest.raises(TypeError, match="device_normalize"):
        jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), jnp.zeros((2, *IMAGE_SHAPE), jnp.uint8))


def test_caffe_sgd_applies_lr_before_momentum_with_per_layer_multipliers():
    config = small_config(recipe="caffe")
    config.optim.update(dict(learning_rate=0.5, momentum=0.9, weight_decay=0.1, bias_lr_mult=2.0,
                             output_lr_mult=0.1, lr_boundaries_epochs=(1.0,), lr_decay=0.1))
    params = {"block1": {"conv": {"kernel": jnp.ones((2,)), "bias": jnp.ones((2,))}, "bn0": {"bias": jnp.ones((2,))}},
              "block2": {"mlp1": {"kernel": jnp.ones((2,)), "bias": jnp.ones((2,))}}}
    lr_fn = optim.create_learning_rate_fn(config, steps_per_epoch=1, total_steps=3)
    tx = optim.create_optimizer(config, params, lr_fn, ("block2", "mlp1"))
    grads = jax.tree.map(jnp.ones_like, params)
    opt_state = tx.init(params)
    u1, opt_state = tx.update(grads, opt_state, params)
    u2, _ = tx.update(grads, opt_state, params)  # LR drops to 0.05 at step 1
    # Step 0: v = -lr * mult * (g + wd * w); weights decay, biases and BN do not; class-map layer at x0.1.
    assert float(u1["block1"]["conv"]["kernel"][0]) == pytest.approx(-0.5 * 1.1)
    assert float(u1["block1"]["conv"]["bias"][0]) == pytest.approx(-0.5 * 2.0)
    assert float(u1["block1"]["bn0"]["bias"][0]) == pytest.approx(-0.5)
    assert float(u1["block2"]["mlp1"]["kernel"][0]) == pytest.approx(-0.5 * 0.1 * 1.1)
    assert float(u1["block2"]["mlp1"]["bias"][0]) == pytest.approx(-0.5 * 0.1)
    # Step 1: the velocity keeps the old LR's contribution (Caffe), the new gradient uses the new LR.
    assert float(u2["block1"]["conv"]["kernel"][0]) == pytest.approx(0.9 * -0.55 - 0.05 * 1.1)


def test_modern_schedule_warms_up_then_decays_to_zero():
    config = small_config()
    lr_fn = optim.create_learning_rate_fn(config, steps_per_epoch=10, total_steps=400)
    warm = int(config.optim.warmup_epochs * 10)
    assert float(lr_fn(0)) == 0.0
    assert float(lr_fn(warm)) == pytest.approx(config.optim.learning_rate)
    assert float(lr_fn(400)) == pytest.approx(0.0, abs=1e-7)


def _learning_config():
    config = small_config(num_train_steps=60, run__log_every_steps=20, run__eval_every_steps=30, run__checkpoint_every_steps=30)
    config.optim.warmup_epochs = 1.0
    config.model.dropout_rate = 0.0  # learns faster in a few dozen steps
    return config


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("digits_run")
    config = _learning_config()
    results = train.train_and_evaluate(config, str(workdir))
    return workdir, results


def test_a_short_digits_run_learns(digits_run):
    _, results = digits_run
    assert results["eval/top1"] > 0.5  # chance is 0.1
    assert results["eval/num_examples"] == 297  # every held-out digit, once


def test_workdir_holds_events_checkpoints_config_and_complete_results(digits_run):
    workdir, results = digits_run
    assert list(workdir.glob("events.out.tfevents.*"))
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [30, 60]
    saved = json.loads((workdir / "results.json").read_text())
    for key in ("num_params", "step", "eval/top1", "eval/top5", "eval/loss", "train/loss", "train/img_per_sec",
                "wall_seconds", "config"):
        assert key in saved, key
    assert saved["step"] == 60 and saved["config"]["model"]["width"] == 0.5
    assert saved["eval/top1"] == pytest.approx(results["eval/top1"])
    assert json.loads((workdir / "config.json").read_text())["dataset"] == "digits"


def test_rerunning_a_finished_workdir_resumes_without_training(digits_run):
    workdir, results = digits_run
    config = _learning_config()
    again = train.train_and_evaluate(config, str(workdir))
    assert again["step"] == 60 and again["eval/top1"] == results["eval/top1"]
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [30, 60]


def test_a_rerun_may_change_execution_settings_but_not_the_experiment(digits_run):
    workdir, results = digits_run
    saved = (workdir / "config.json").read_text()
    other = _learning_config()
    other.model.head = "fc"
    other.optim.learning_rate = 0.05
    with pytest.raises(ConfigError, match=r"model.head: 'gap' -> 'fc', optim.learning_rate: 0.1 -> 0.05"):
        train.train_and_evaluate(other, str(workdir))
    same = _learning_config()
    same.run.parallelism, same.run.log_every_steps, same.run.cpu_kernels = "shard_map", 7, False
    assert train.train_and_evaluate(same, str(workdir))["eval/top1"] == results["eval/top1"]
    assert (workdir / "config.json").read_text() == saved  # the first start's record is kept


def test_batch_not_divisible_by_devices_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="config.batch_size=12 must be a positive multiple"):
        train.train_and_evaluate(small_config(batch_size=12), str(tmp_path))


def test_workdir_that_is_a_file_or_unwritable_is_rejected(tmp_path):
    afile = tmp_path / "file"
    afile.write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        train.train_and_evaluate(small_config(), str(afile))
    with pytest.raises(ValueError, match="not writable"):
        train.train_and_evaluate(small_config(), str(afile / "sub"))


@pytest.mark.slow
def test_command_line_trains_with_overrides_applied(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "nin_jax.main", "--config=configs/digits.py", f"--workdir={tmp_path}",
         "--config.num_train_steps=3", "--config.model.width=0.25", "--config.model.head=fc",
         "--config.optim.learning_rate=0.3", "--config.optim.warmup_epochs=0", "--config.run.num_cpu_devices=2"],
        capture_output=True, text=True, timeout=300,
        env={**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"},  # so that num_cpu_devices decides
             "JAX_DISABLE_MOST_OPTIMIZATIONS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["step"] == 3 and saved["num_devices"] == 2
    assert (saved["config"]["model"]["head"], saved["config"]["optim"]["learning_rate"]) == ("fc", 0.3)


def test_misspelled_config_field_is_rejected_in_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "nin_jax.main", "--config=configs/digits.py", f"--workdir={tmp_path / 'w'}",
         "--config.modle.head=fc"], capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == ["error: --config.modle.head=fc: config has no field 'modle'; did you mean "
                                        "config.model?"]


def test_a_warmup_given_in_epochs_is_capped_to_a_tenth_of_a_short_run():
    assert optim.warmup_steps(5.0, steps_per_epoch=351, total_steps=400) == 40  # 1,755 steps asked for
    assert optim.warmup_steps(5.0, steps_per_epoch=351, total_steps=70_200) == 1_755  # a 200-epoch run: as asked
    lr = optim.create_learning_rate_fn(small_config(optim__warmup_epochs=5.0), steps_per_epoch=351, total_steps=400)
    assert float(lr(40)) == pytest.approx(0.1) and float(lr(20)) == pytest.approx(0.05)
