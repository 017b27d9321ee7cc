"""The NIN modules: exact presets, shapes, GAP semantics, ablation switches and bad-input errors."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from config_helpers import model_config
from nin_jax import architectures, models
from nin_jax.cpu import layers as cpu_layers

PAPER_PARAMS = {
    "nin_cifar10": 966_986,
    "nin_cifar100": 984_356,
    "nin_svhn": 1_986_026,
    "nin_mnist": 349_674,
    "nin_imagenet": 7_595_176,
}


def _init_shapes(cfg, num_classes, input_shape):
    model = models.create_model(cfg, num_classes)
    x = jnp.zeros((1, *input_shape), jnp.float32)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
    return model, variables


@pytest.mark.parametrize("arch", sorted(PAPER_PARAMS))
def test_preset_has_the_papers_parameter_count(arch):
    preset = architectures.PRESETS[arch]
    model, variables = _init_shapes(model_config(arch), preset["num_classes"], preset["input_shape"])
    assert models.count_params(variables["params"]) == PAPER_PARAMS[arch]
    # The analytic table agrees with the built module.
    rows = models.model_layer_table(model, preset["input_shape"])
    assert sum(r.params for r in rows) == PAPER_PARAMS[arch]


def test_imagenet_preset_is_29_mib_and_1_1_gmacs():
    preset = architectures.PRESETS["nin_imagenet"]
    rows = architectures.layer_table(preset["blocks"], preset["input_shape"], num_classes=1000)
    assert sum(r.params for r in rows) * 4 / 2**20 == pytest.approx(28.97, abs=0.01)
    assert architectures.forward_flops_per_image(rows) / 2 == pytest.approx(1.10e9, rel=0.01)


def test_feature_map_sizes_follow_caffe_ceil_pooling():
    cifar = architectures.layer_table(architectures.PRESETS["nin_cifar10"]["blocks"], (32, 32, 3), num_classes=10)
    assert [r.out_shape[0] for r in cifar if r.name.startswith("pool")] == [16, 8]
    imnet = architectures.layer_table(architectures.PRESETS["nin_imagenet"]["blocks"], (224, 224, 3), num_classes=1000)
    assert [r.out_shape[0] for r in imnet if r.name == "conv1" or r.name.startswith("pool")] == [54, 27, 13, 6]


@pytest.fixture(scope="module")
def digits_model():
    model = models.create_model(model_config("nin_digits"), 10)
    x = jax.random.normal(jax.random.key(1), (4, 8, 8, 1))
    variables = model.init(jax.random.key(0), x, train=False)
    return model, variables, x


def test_output_shapes_and_gap_logits_are_class_map_means(digits_model):
    model, variables, x = digits_model
    logits, maps = model.apply(variables, x, train=False, return_class_maps=True)
    assert logits.shape == (4, 10) and logits.dtype == jnp.float32
    assert maps.shape == (4, 2, 2, 10)
    np.testing.assert_allclose(logits, maps.mean(axis=(1, 2)), rtol=1e-6, atol=1e-6)
    assert (maps >= 0).all()  # the class maps keep their ReLU by default


def test_class_map_relu_can_be_switched_off():
    cfg = model_config("nin_digits", class_map_relu=False)
    model = models.create_model(cfg, 10)
    x = jax.random.normal(jax.random.key(1), (8, 8, 8, 1))
    variables = model.init(jax.random.key(0), x, train=False)
    _, maps = model.apply(variables, x, train=False, return_class_maps=True)
    assert (maps < 0).any()


def test_dropout_is_off_in_eval_and_on_in_training(digits_model):
    model, variables, x = digits_model
    a = model.apply(variables, x, train=False)
    b = model.apply(variables, x, train=False)
    np.testing.assert_array_equal(a, b)
    t1 = model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(1)})
    t2 = model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(2)})
    assert not np.allclose(t1, t2)


def test_batch_norm_uses_batch_statistics_in_training_and_running_averages_in_eval():
    model = models.create_model(model_config("nin_digits", batch_norm=True, dropout_rate=0.0), 10)
    x = 3.0 + 2.0 * jax.random.normal(jax.random.key(1), (16, 8, 8, 1))
    variables = model.init(jax.random.key(0), x, train=False)
    assert "batch_stats" in variables
    # Training mode: output depends on the other examples in the batch, and running stats move.
    out_full, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
    out_half, _ = model.apply(variables, x[:8], train=True, mutable=["batch_stats"])
    assert not np.allclose(out_full[:8], out_half, atol=1e-5)
    moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), updates["batch_stats"], variables["batch_stats"])
    assert max(jax.tree.leaves(moved)) > 0
    # Eval mode: each example is processed independently of the batch.
    e_full = model.apply(variables, x, train=False)
    e_half = model.apply(variables, x[:8], train=False)
    np.testing.assert_allclose(e_full[:8], e_half, rtol=1e-5, atol=1e-5)


def test_batch_norm_replaces_conv_bias():
    model, variables = _init_shapes(model_config("nin_cifar10", batch_norm=True), 10, (32, 32, 3))
    block = variables["params"]["block1"]
    assert "bias" not in block["conv"] and set(block["bn0"]) == {"scale", "bias"}


def test_plain_conv_ablation_has_no_1x1_layers():
    cfg = model_config("nin_cifar10", mlp_layers=0)
    model, variables = _init_shapes(cfg, 10, (32, 32, 3))
    names = {k for block in variables["params"].values() for k in block}
    assert names == {"conv"}
    # conv1 3->96 5x5, conv2 96->192 5x5, conv3 192->10 3x3 (each block keeps its output width).
    expected = (5 * 5 * 3 * 96 + 96) + (5 * 5 * 96 * 192 + 192) + (3 * 3 * 192 * 10 + 10)
    assert models.count_params(variables["params"]) == expected


def test_one_1x1_layer_keeps_the_conv_and_output_widths():
    blocks = architectures.resolve_blocks(model_config("nin_cifar10", mlp_layers=1), 10)
    assert [b.widths for b in blocks] == [(192, 96), (192, 192), (192, 10)]
    blocks = architectures.resolve_blocks(model_config("nin_cifar10", mlp_layers=3), 10)
    assert blocks[0].widths == (192, 160, 160, 96)


@pytest.mark.parametrize(
    "fc_input, expected",
    [("class_maps", 966_986 + 10 * 8 * 8 * 10 + 10), ("features", 966_986 - 1_930 + 192 * 8 * 8 * 10 + 10)],
)
def test_fc_head_parameter_counts(fc_input, expected):
    model, variables = _init_shapes(model_config("nin_cifar10", head="fc", fc_input=fc_input), 10, (32, 32, 3))
    assert models.count_params(variables["params"]) == expected
    assert sum(r.params for r in models.model_layer_table(model, (32, 32, 3))) == expected


def test_fc_head_dropout_is_active_only_in_training():
    model = models.create_model(model_config("nin_digits", head="fc", fc_dropout=0.5, dropout_rate=0.0), 10)
    x = jax.random.normal(jax.random.key(1), (4, 8, 8, 1))
    variables = model.init(jax.random.key(0), x, train=False)
    np.testing.assert_array_equal(model.apply(variables, x, train=False), model.apply(variables, x, train=False))
    t1 = model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(1)})
    t2 = model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(2)})
    assert not np.allclose(t1, t2)


def test_width_multiplier_scales_hidden_channels_only():
    blocks = architectures.resolve_blocks(model_config("nin_cifar10", width=0.5), 10)
    assert [b.widths for b in blocks] == [(96, 80, 48), (96, 96, 96), (96, 96, 10)]


def test_custom_block_list_sets_depth():
    cfg = model_config("nin_digits", blocks="3:32-32-32:max, 3:32-C")
    model = models.create_model(cfg, 10)
    assert [b.widths for b in model.block_specs] == [(32, 32, 32), (32, 10)]
    specs = model.block_specs
    assert specs[0].dropout and not specs[1].dropout and specs[1].pool is None
    logits = model.apply(model.init(jax.random.key(0), jnp.zeros((2, 8, 8, 1)), train=False),
                         jnp.zeros((2, 8, 8, 1)), train=False)
    assert logits.shape == (2, 10)


def test_caffe_init_uses_the_original_stds():
    model = models.create_model(model_config("nin_cifar100", init="caffe"), 100)
    params = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)["params"]
    assert float(jnp.std(params["block1"]["conv"]["kernel"])) == pytest.approx(0.001, rel=0.05)
    assert float(jnp.std(params["block2"]["conv"]["kernel"])) == pytest.approx(0.05, rel=0.05)


def test_bfloat16_compute_keeps_float32_params_and_logits():
    model = models.create_model(model_config("nin_digits"), 10, dtype=jnp.bfloat16)
    x = jnp.ones((2, 8, 8, 1))
    variables = model.init(jax.random.key(0), x, train=False)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables))
    assert model.apply(variables, x, train=False).dtype == jnp.float32


@pytest.mark.parametrize("layers", [models.Layers(), cpu_layers.LAYERS], ids=["flax", "cpu"])
def test_caffe_pooling_is_ceil_mode_and_averages_only_in_bounds_pixels(layers):
    pool = layers.pool
    x = jnp.ones((1, 8, 8, 1))
    assert models.caffe_pool(x, "avg", pool).shape == (1, 4, 4, 1)
    # Border windows are not diluted by the overhang.
    np.testing.assert_allclose(models.caffe_pool(x, "avg", pool), 1.0)
    x = -jnp.arange(64.0).reshape(1, 8, 8, 1)  # all negative: an overhang counted as 0 would win the max
    np.testing.assert_allclose(models.caffe_pool(x, "max", pool)[0, -1, -1, 0], -(6 * 8 + 6))


def test_the_default_model_is_built_from_flaxs_own_layers():
    model = models.create_model(model_config("nin_digits", batch_norm=True), 10)
    assert model.layers == models.Layers()
    assert dataclasses.astuple(model.layers) == (nn.Conv, nn.Dense, models.flax_batch_norm_relu, models.flax_pool)
    # Every module the model creates, in evaluation and in training, is flax's own with lax's own products.
    built = []

    def record(module, method_name):
        del method_name
        built.append(module)
        return False

    def init(train):
        key = jax.random.key(0)
        return model.init({"params": key, "dropout": key}, jnp.zeros((2, 8, 8, 1)), train=train,
                          capture_intermediates=record)

    for train in (False, True):
        jax.eval_shape(functools.partial(init, train))
    types = {type(m) for m in built}
    assert types == {models.NIN, models.MLPConv, nn.Conv, nn.Dense, nn.BatchNorm, nn.Dropout}
    assert all(m.conv_general_dilated is None for m in built if isinstance(m, nn.Conv))
    assert all(m.dot_general is None for m in built if isinstance(m, nn.Dense))


def test_a_run_uses_the_cpu_bundle_only_with_cpu_kernels_on_the_cpu_backend():
    assert cpu_layers.model_layers(False) == models.Layers()
    on_cpu = jax.default_backend() == "cpu"
    assert cpu_layers.model_layers(True) == (cpu_layers.LAYERS if on_cpu else models.Layers())


@pytest.mark.slow
def test_cpu_kernels_compute_the_same_model():
    """The CPU bundle: the same variables, values, gradients and updated BatchNorm statistics as flax's layers."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((4, 32, 32, 3)), jnp.float32)
    cfg = model_config("nin_cifar10", batch_norm=True, width=0.5, dropout_rate=0.0)
    plain = models.create_model(cfg, 10)
    fast = models.create_model(cfg, 10, layers=cpu_layers.LAYERS)
    variables = plain.init(jax.random.key(0), x, train=False)
    # The same variables (paths, shapes, dtypes) in either mode, so a checkpoint restores into either model.
    for train in (False, True):
        shapes = [jax.eval_shape(functools.partial(m.init, jax.random.key(0), x, train=train)) for m in (fast, plain)]
        assert jax.tree.structure(shapes[0]) == jax.tree.structure(shapes[1]) == jax.tree.structure(variables)
        assert jax.tree.leaves(shapes[0]) == jax.tree.leaves(shapes[1])

    def loss(model, params):
        return jnp.sum(model.apply({**variables, "params": params}, x, train=False) ** 2)

    np.testing.assert_allclose(fast.apply(variables, x, train=False), plain.apply(variables, x, train=False),
                               rtol=1e-4, atol=1e-4)
    g_fast, g_plain = (jax.grad(loss, argnums=1)(m, variables["params"]) for m in (fast, plain))
    for a, b in zip(jax.tree.leaves(g_fast), jax.tree.leaves(g_plain)):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3 * float(np.max(np.abs(b))))

    # Training mode (batch statistics; BatchNorm + ReLU run as cpu.batchnorm): the same loss, gradients and
    # updated running averages.
    def train_loss(model, params):
        out, updates = model.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
        return jnp.sum(out**2), updates

    (l_fast, s_fast), g_fast = jax.value_and_grad(train_loss, argnums=1, has_aux=True)(fast, variables["params"])
    (l_plain, s_plain), g_plain = jax.value_and_grad(train_loss, argnums=1, has_aux=True)(plain, variables["params"])
    np.testing.assert_allclose(l_fast, l_plain, rtol=1e-4)
    assert jax.tree.structure(s_fast) == jax.tree.structure(s_plain)
    for a, b in zip(jax.tree.leaves(s_fast), jax.tree.leaves(s_plain)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(np.max(np.abs(b))))
    for a, b in zip(jax.tree.leaves(g_fast), jax.tree.leaves(g_plain)):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3 * float(np.max(np.abs(b))))


def test_output_layer_path_names_the_class_map_layer():
    assert models.output_layer_path(models.create_model(model_config("nin_cifar10"), 10)) == ("block3", "mlp2")
    assert models.output_layer_path(
        models.create_model(model_config("nin_cifar10", mlp_layers=0), 10)) == ("block3", "conv")
    assert models.output_layer_path(models.create_model(model_config("nin_cifar10", head="fc"), 10)) == ("fc",)


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(arch="nin_resnet"), "config.model.arch"),
        (dict(mlp_layers=-2), "config.model.mlp_layers"),
        (dict(width=0.0), "config.model.width"),
        (dict(head="max"), "config.model.head"),
        (dict(head="fc", fc_input="features", mlp_layers=0), "config.model.fc_input"),
        (dict(blocks="3:32-32:max, 3:32-64"), "config.model.blocks"),  # GAP needs one map per class
        (dict(blocks="3x32"), "config.model.blocks"),
        (dict(fc_dropout=1.5, head="fc"), "config.model.fc_dropout"),
        (dict(init="xavier"), "config.model.init"),
    ],
)
def test_bad_model_config_names_the_field(overrides, field):
    arch = overrides.pop("arch", "nin_digits")
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        models.create_model(model_config(arch, **overrides), 10)


def test_models_cli_prints_the_layer_table(capsys):
    models.main(["--arch=nin_imagenet"])
    out = capsys.readouterr().out
    assert "cccp8" in out and "7,595,176" in out and "28.97 MiB" in out


@pytest.mark.parametrize("arch, overrides", [
    ("nin_cifar10", {}), ("nin_imagenet", {}), ("nin_svhn", dict(batch_norm=True)),
    ("nin_cifar10", dict(mlp_layers=0, width=0.5)), ("nin_mnist", dict(head="fc", fc_input="features")),
    ("nin_digits", dict(blocks="3:32-32-32:max, 3s2p1:48-C", head="fc")),
])
def test_layer_table_matches_the_built_module_layer_by_layer(arch, overrides):
    preset = architectures.PRESETS[arch]
    shape = preset["input_shape"]
    model = models.create_model(model_config(arch, **overrides), preset["num_classes"])
    x = jnp.zeros((1, *shape), jnp.float32)
    (_, variables) = jax.eval_shape(
        lambda: model.init_with_output(jax.random.key(0), x, train=False, capture_intermediates=True))
    params, inter = variables["params"], variables["intermediates"]
    built = []  # (params, output shape) per conv/1x1/fc layer, in order
    for b in range(1, len(model.block_specs) + 1):
        block = params[f"block{b}"]
        for j, name in enumerate(["conv"] + sorted(k for k in block if k.startswith("mlp"))):
            n = models.count_params(block[name]) + models.count_params(block.get(f"bn{j}", {}))
            built.append((n, inter[f"block{b}"][name]["__call__"][0].shape[1:]))
    if "fc" in params:
        built.append((models.count_params(params["fc"]), (1, 1, preset["num_classes"])))
    rows = [r for r in models.model_layer_table(model, shape) if r.params or r.name == "fc"]
    assert [(r.params, r.out_shape[-3:] if r.name != "fc" else r.out_shape) for r in rows] == [
        (n, s if len(s) == 3 else (1, 1, s[-1])) for n, s in built]


def test_pytorch_init_is_uniform_within_one_over_sqrt_fan_in():
    model = models.create_model(model_config("nin_cifar10", init="pytorch"), 10)
    params = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)["params"]
    kernel = np.asarray(params["block2"]["conv"]["kernel"])  # 5x5x96 fan-in
    bound = 1 / np.sqrt(5 * 5 * 96)
    assert np.abs(kernel).max() <= bound and np.abs(kernel).max() > 0.99 * bound
    assert np.std(kernel) == pytest.approx(bound / np.sqrt(3), rel=0.02)
