"""Every shipped config loads, names a known dataset and model, and splits evenly over 8 devices."""

import importlib

import pytest

from nin_jax import architectures, data, optim

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
    assert config.batch_size % 8 == 0 and config.eval_batch_size % 8 == 0
    num_classes = architectures.PRESETS[config.model.arch]["num_classes"]
    architectures.resolve_blocks(config.model, num_classes)  # raises on an inconsistent model section


def test_caffe_cifar10_recipe_is_the_model_zoo_solver():
    config = _load("cifar10", None)
    o = config.optim
    assert (config.recipe, o.learning_rate, o.momentum, o.weight_decay) == ("caffe", 0.1, 0.9, 1e-4)
    assert (o.bias_lr_mult, o.output_lr_mult, o.lr_decay) == (2.0, 0.1, 0.1)
    assert config.num_train_steps == 120_000 and o.lr_boundaries_epochs == (256.0,)  # 100k its of 128 / 50k


def test_unknown_config_argument_is_rejected():
    with pytest.raises(ValueError, match="cifar10.py:fast"):
        _load("cifar10", "fast")
