"""Every shipped config loads, names a known dataset and model, and splits evenly over 8 devices; the range
checks of `config.validate` and of the block list."""

import importlib

import pytest

from config_helpers import with_overrides
from nin_jax import architectures, config as config_lib, data, hardware, mesh as mesh_lib, models, optim, train
from nin_jax.config import ConfigError

CONFIGS = [("digits", None), ("default", None), ("cifar10", None), ("cifar10", "modern"), ("cifar100", None),
           ("svhn", None), ("mnist", None), ("imagenet", None)]


def _load(name, arg):
    module = importlib.import_module(f"configs.{name}")
    return module.get_config(arg) if arg else module.get_config()


@pytest.mark.parametrize("name, arg", CONFIGS)
def test_config_is_consistent(name, arg):
    config = _load(name, arg)
    assert config.dataset in data.DATASETS
    assert config.model.arch in architectures.PRESETS
    assert config.recipe in optim.RECIPES
    assert config.batch_size % 8 == 0 and config.run.eval_batch_size % 8 == 0
    num_classes = architectures.PRESETS[config.model.arch]["num_classes"]
    architectures.resolve_blocks(config.model, num_classes)  # raises on an inconsistent model section


def test_caffe_cifar10_recipe_is_the_model_zoo_solver():
    config = _load("cifar10", None)
    o = config.optim
    assert (config.recipe, o.learning_rate, o.momentum, o.weight_decay) == ("caffe", 0.1, 0.9, 1e-4)
    assert (o.bias_lr_mult, o.output_lr_mult, o.lr_decay) == (2.0, 0.1, 0.1)
    assert config.num_train_steps == 120_000 and o.lr_boundaries_epochs == (256.0,)  # 100k its of 128 / 50k


@pytest.mark.parametrize("name, train_images, num_classes", [("cifar10", 50_000, 10), ("cifar100", 50_000, 100),
                                                             ("svhn", 604_388, 10)])
def test_tpu_runtime_estimate_in_the_docstring_follows_from_the_analytic_flops(name, train_images, num_classes):
    module = importlib.import_module(f"configs.{name}")
    config = module.get_config()
    rows = architectures.layer_table(architectures.resolve_blocks(config.model, num_classes), (32, 32, 3),
                                     num_classes=num_classes)
    steps = config.num_train_steps if config.num_train_steps > 0 else config.num_epochs * train_images / config.batch_size
    total = steps * config.batch_size * architectures.train_flops_per_image(rows)
    peak = hardware.peak_flops("TPU v4", half_precision=True)
    minutes = total / (peak * 0.15) / 60  # at 15% MFU, as the docstrings assume
    doc = " ".join(module.__doc__.split())
    assert f"{total / 1e15:.0f} PFLOP" in doc
    assert f"about {minutes:.0f} minutes on one TPU v4 chip ({peak / 1e12:.0f} TFLOP/s)" in doc and "15% MFU" in doc


def test_unknown_config_argument_is_rejected():
    with pytest.raises(ValueError, match="cifar10.py:fast"):
        _load("cifar10", "fast")


@pytest.mark.parametrize("name, arg", CONFIGS)
def test_shipped_configs_pass_the_range_checks(name, arg):
    config_lib.validate(_load(name, arg))


@pytest.mark.parametrize("field, value", [
    ("model.dropout_rate", 1.0), ("model.dropout_rate", -0.1), ("model.fc_dropout", 1.5),
    ("run.log_every_steps", 0), ("run.eval_every_steps", 0), ("run.checkpoint_every_steps", -5), ("run.keep_checkpoints", 0),
    ("run.input_workers", -1), ("batch_size", 0), ("run.eval_batch_size", -8), ("optim.learning_rate", 0.0),
    ("optim.learning_rate", float("nan")),
    ("optim.momentum", 1.0), ("optim.label_smoothing", 1.0), ("optim.weight_decay", -1e-4),
    ("optim.warmup_epochs", -1.0), ("optim.lr_decay", 0.0), ("optim.grad_clip_norm", -1.0),
    ("zca_filter_bias", 0.0), ("gcn_scale", -55.0), ("augment.translate", -1), ("image_size", 0),
    ("model.width", 0.0), ("model.mlp_layers", -2), ("num_epochs", -1.0), ("optim.lr_boundaries_epochs", (5.0, 2.0)),
    ("seed", -1), ("augment.eval_resize", 0),
])
def test_out_of_range_field_is_one_line_naming_the_field_and_a_fix(field, value):
    config = with_overrides(_load("digits", None), **{field.replace(".", "__"): value})
    with pytest.raises(ConfigError) as error:
        config_lib.validate(config)
    message = str(error.value)
    assert f"config.{field}=" in message and "\n" not in message
    assert "set e.g. --config." in message


@pytest.mark.parametrize("field", [
    "dataset", "preprocess", "augment.pad_mode", "augment.eval_resize_mode", "model.arch", "model.head",
    "model.fc_input", "model.pool2", "model.init", "recipe", "run.parallelism",
])
def test_an_unknown_choice_is_one_line_naming_the_field_its_choices_and_a_fix(field):
    config = with_overrides(_load("digits", None), **{field.replace(".", "__"): "bogus"})
    with pytest.raises(ConfigError) as error:
        config_lib.validate(config)
    message = str(error.value)
    assert message.startswith(f"config.{field}='bogus' must be one of ") and "\n" not in message
    assert "set e.g. --config." in message


def test_the_data_and_the_model_check_their_fields_as_the_command_line_does(tmp_path):
    config = with_overrides(_load("digits", None), augment__pad_mode="mirror")
    with pytest.raises(ConfigError, match="config.augment.pad_mode='mirror' must be one of"):
        data.Pipeline(config, mesh_lib.data_sharding(mesh_lib.create_mesh()))
    config = with_overrides(_load("digits", None), model__pool2="median")
    with pytest.raises(ConfigError, match="config.model.pool2='median' must be one of preset, max, avg"):
        models.create_model(config.model, 10)


@pytest.mark.parametrize("blocks, what", [
    ("3:32-0-C", "width 0"), ("0:32-C", "kernel 0"), ("3s0:32-C", "stride 0"),
])
def test_block_list_with_a_zero_width_kernel_or_stride_is_rejected(blocks, what):
    config = with_overrides(_load("digits", None), model__blocks=blocks)
    with pytest.raises(ConfigError, match=f"config.model.blocks: block 1 .* has {what}"):
        config_lib.validate(config)


def test_blocks_that_pool_the_image_to_nothing_name_the_block():
    blocks = architectures.parse_blocks("3:16:max, 3:16:max, 3:16:max, 3:16:max, 3:C", num_classes=10)
    architectures.layer_table(blocks[:3] + blocks[4:], (8, 8, 1), num_classes=10)  # 8 -> 4 -> 2 -> 1: fits
    with pytest.raises(ConfigError, match=r"block 4 '3:16:max' leaves nothing of the 8x8 images after its max "
                       r"pooling \(0x0\)"):
        architectures.layer_table(blocks, (8, 8, 1), num_classes=10)


def test_train_rejects_a_bad_value_before_writing_anything(tmp_path):
    workdir = tmp_path / "never_created"
    with pytest.raises(ConfigError, match="config.model.dropout_rate=1.0"):
        train.train_and_evaluate(with_overrides(_load("digits", None), model__dropout_rate=1.0), str(workdir))
    assert not workdir.exists()


def test_train_rejects_blocks_too_deep_for_the_images_before_writing_the_record(tmp_path):
    config = with_overrides(_load("digits", None), model__blocks="3:16:max, 3:16:max, 3:16:max, 3:16:max, 3:16-C",
                            run__cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ConfigError, match="block 4 '3:16:max' leaves nothing of the 8x8 images"):
        train.train_and_evaluate(config, str(tmp_path / "w"))
    assert not (tmp_path / "w" / "config.json").exists() and not (tmp_path / "w" / "lock").exists()


@pytest.mark.parametrize("arch", sorted(architectures.PRESETS))
def test_presets_emit_one_class_map_per_class_of_the_dataset(arch):
    for num_classes in (3, 10, 37):
        model_cfg = config_lib.get_config().model
        model_cfg.arch = arch
        blocks = architectures.resolve_blocks(model_cfg, num_classes)
        assert blocks[-1].widths[-1] == num_classes
        assert blocks[:-1] == architectures.PRESETS[arch]["blocks"][:-1]  # everything else is the preset's


def test_a_config_json_from_before_the_run_section_loads_with_its_execution_fields_in_run():
    """config.json files written when the execution fields were top-level fields still describe the same
    experiment: a workdir of that time resumes."""
    import json

    current = _load("digits", None)
    old = json.loads(current.to_json_best_effort())
    for name, value in old.pop("run").items():
        old[name] = value
    old["log_every_steps"], old["data_dir"] = 7, "/data/moved"
    loaded = config_lib.from_json(json.dumps(old))
    assert (loaded.run.log_every_steps, loaded.run.data_dir) == (7, "/data/moved")
    assert config_lib.identity_diff(loaded, current) == []
    assert "log_every_steps" not in loaded


def test_identity_is_every_field_outside_the_run_section():
    a, b = _load("digits", None), _load("digits", None)
    b.run.parallelism, b.run.eval_batch_size, b.run.data_dir = "shard_map", 64, "/elsewhere"
    assert config_lib.identity_diff(a, b) == []
    b.model.width = 0.5
    assert config_lib.identity_diff(a, b) == ["model.width"]
