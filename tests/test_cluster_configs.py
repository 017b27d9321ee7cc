"""configs/imagenet.py: the :pod variant keeps the model zoo's duration in epochs with a linearly scaled LR
and a warmup, and the runtime estimates of the docstring follow from the analytic FLOPs."""

import pytest

from configs import imagenet
from nin_jax import architectures, config as config_lib, hardware, optim
from nin_jax.config import ConfigError

MODEL_ZOO_IMAGES = 450_000 * 64


def _steps(config) -> tuple[int, int]:
    """(steps per epoch, total steps) of a config on ImageNet's training set."""
    per_epoch = imagenet.TRAIN_IMAGES // config.batch_size
    return per_epoch, config_lib.total_train_steps(config, per_epoch)


def test_pod_scales_batch_and_lr_and_keeps_the_epochs():
    zoo, pod = imagenet.get_config(), imagenet.get_config("pod")
    assert (zoo.batch_size, zoo.optim.learning_rate, zoo.num_train_steps) == (64, 0.01, 450_000)
    assert pod.batch_size == 1024 and pod.batch_size % 256 == 0 and pod.run.eval_batch_size % 256 == 0
    assert pod.optim.learning_rate == pytest.approx(zoo.optim.learning_rate * pod.batch_size / zoo.batch_size)
    per_epoch, steps = _steps(pod)
    assert (per_epoch, steps) == (1251, 28_147)
    epochs = steps * pod.batch_size / imagenet.TRAIN_IMAGES
    assert epochs == pytest.approx(MODEL_ZOO_IMAGES / imagenet.TRAIN_IMAGES, abs=0.05)  # 22.5 and 22.48
    lr = optim.create_learning_rate_fn(pod, per_epoch, steps)
    warmup = round(pod.optim.warmup_epochs * per_epoch)
    assert 0 < pod.optim.warmup_epochs <= 0.1 * pod.num_epochs
    assert float(lr(0)) == 0.0 and float(lr(warmup)) == pytest.approx(0.16)
    assert float(lr(steps)) == pytest.approx(0.0, abs=1e-9)
    # Everything but batch, LR schedule and cadence is the model zoo's.
    same = ("dataset", "image_size", "preprocess", "augment", "model", "half_precision")
    assert all(pod[k] == zoo[k] for k in same)
    for k in ("momentum", "weight_decay", "bias_lr_mult", "output_lr_mult"):
        assert pod.optim[k] == zoo.optim[k], k


def test_unknown_variant():
    with pytest.raises(ConfigError, match="configs/imagenet.py:fast is unknown"):
        imagenet.get_config("fast")


def test_runtime_estimates_in_the_docstring():
    rows = architectures.layer_table(architectures.PRESETS["nin_imagenet"]["blocks"], (224, 224, 3),
                                     num_classes=1000)
    flops = architectures.train_flops_per_image(rows)
    total = MODEL_ZOO_IMAGES * flops
    doc = " ".join(imagenet.__doc__.split())
    assert f"{flops / 1e9:.2f} GFLOP" in doc and f"{total / 1e15:.0f} PFLOP" in doc
    assert f"{architectures.forward_flops_per_image(rows) / 1e9:.2f} GFLOP forward" in doc
    chip = hardware.peak_flops("TPU v4", True)
    assert "4 chips x 275 TFLOP/s bf16" in doc and "Assuming 15% MFU" in doc
    minutes = {chips: total / (chips * chip * 0.15) / 60 for chips in (4, 16)}  # v4-8, v4-32
    assert f"~{minutes[4]:.0f} minutes on a v4-8" in doc and f"~{minutes[16]:.0f} minutes on a v4-32" in doc
    rates = [MODEL_ZOO_IMAGES / (m * 60) / 1e3 for m in minutes.values()]
    assert f"{rates[0]:.0f}k and {rates[1]:.0f}k decoded images/s" in doc
    _, pod_steps = _steps(imagenet.get_config("pod"))
    assert pod_steps * 1024 * flops == pytest.approx(total, rel=0.002)  # the pod runs the same 184 PFLOP
