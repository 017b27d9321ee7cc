"""benchmark: the CLI measures a tiny model end to end and writes every documented key."""

import math
import os
import statistics
import subprocess
import sys

import jax
import pytest

from configs import digits
from config_helpers import model_config
from nin_jax import architectures, models
from nin_jax.cpu import layers as cpu_layers
from nin_jax.tools import alternate, benchmark

pytestmark = pytest.mark.cpu  # host devices or the CPU kernels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_cli_prints_json_with_all_keys(tmp_path):
    env = dict(os.environ, JAX_DISABLE_MOST_OPTIMIZATIONS="1")  # compile time dominates a tiny model
    proc = subprocess.run(
        [sys.executable, "-m", "nin_jax.benchmark", "--config=configs/digits.py", "--batch_size=64", "--steps=2",
         "--warmup=1", "--input_batches=2", "--loop_steps=3", "--rounds=2", "--peak_sizes=128",
         f"--config.run.cache_dir={tmp_path}", "--json=-"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "train" in proc.stdout and "MFU" in proc.stdout
    r = alternate.last_json_line(proc.stdout)  # '--json=-': one line that nin_jax.tools.alternate reads
    missing = [k for k in benchmark.REQUIRED_KEYS if k not in r]
    assert not missing, missing
    for key in benchmark.REQUIRED_KEYS:
        if key != "device_kind":
            assert isinstance(r[key], (int, float)) and math.isfinite(r[key]) and r[key] > 0, (key, r[key])
    assert r["batch_size"] == 64 and r["device_count"] == jax.device_count()
    assert r["device_kind"] and r["arch"] == "nin_digits"
    # Step and loop blocks alternate; each figure is the median of its rounds.
    assert len(r["train/img_per_sec_rounds"]) == len(r["train/loop_img_per_sec_rounds"]) == r["rounds"] == 2
    assert r["train/img_per_sec"] == pytest.approx(statistics.median(r["train/img_per_sec_rounds"]))
    assert r["train/loop_img_per_sec"] == pytest.approx(statistics.median(r["train/loop_img_per_sec_rounds"]))
    assert r["train/loop_vs_step"] == pytest.approx(r["train/loop_img_per_sec"] / r["train/img_per_sec"])
    assert "train loop (real data)" in proc.stdout
    # MFU is consistent with the reported throughput, FLOPs and peaks: dividing the median throughput by the
    # run's highest peak is the lower bound of the MFU against the peaks around its block.
    for part, gflops in (("train", "gflops_per_image_train"), ("infer", "gflops_per_image_forward")):
        assert r[f"{part}/mfu_vs_max_peak"] <= r[f"{part}/mfu"] * (1 + 1e-9)
        assert r[f"{part}/mfu_vs_max_peak"] == pytest.approx(
            r[f"{part}/img_per_sec"] * r[gflops] / r["peak_gflops_max"])
        assert r[f"{part}/hfu"] == pytest.approx(r[f"{part}/mfu"] * r[f"{gflops}_executed"] / r[gflops])
    assert r["peak_gflops_min"] <= r["peak_gflops"] <= r["peak_gflops_max"]
    assert r["gflops_per_image_train"] > 2.5 * r["gflops_per_image_forward"]
    assert r["host_peak_rss_bytes"] > 0


def test_executed_flops_count_winograd_multiplies():
    cfg = model_config("nin_cifar10")
    model = models.create_model(cfg, 10, layers=cpu_layers.LAYERS)
    rows = models.model_layer_table(model, (32, 32, 3))
    forward, train_step = architectures.forward_flops_per_image(rows), architectures.train_flops_per_image(rows)
    # With the CPU layers, auto runs conv2 (5x5, 96->192, 16x16 output) and conv3 (3x3, 192->192, 8x8) by F(4x4, kxk):
    # per 4x4 output tile (k+3)^2 products per channel pair instead of 16 k^2.
    saved_macs = (16 * 16 * 25 - 4 * 4 * 64) * 96 * 192 + (8 * 8 * 9 - 2 * 2 * 36) * 192 * 192
    executed = benchmark.executed_flops_per_image(model, rows, 3)
    assert executed == pytest.approx((forward - 2 * saved_macs, train_step - 3 * 2 * saved_macs))
    assert executed[0] == pytest.approx(0.2149e9, rel=1e-3)
    plain = models.create_model(cfg, 10)
    assert benchmark.executed_flops_per_image(plain, rows, 3) == (forward, train_step)


def test_dataset_shape_and_bad_input():
    config = digits.get_config()
    assert benchmark.dataset_shape(config) == ((8, 8, 1), 10)
    config.dataset, config.image_size = "imagenet2012", 64
    assert benchmark.dataset_shape(config) == ((64, 64, 3), 1000)
    config.dataset = "image_folder"
    with pytest.raises(ValueError, match="config.dataset"):
        benchmark.dataset_shape(config)
    with pytest.raises(ValueError, match="--steps"):
        benchmark.run(digits.get_config(), steps=0)
    with pytest.raises(ValueError, match="--loop_steps=-1"):
        benchmark.run(digits.get_config(), loop_steps=-1)
    with pytest.raises(ValueError, match="--rounds=0"):
        benchmark.run(digits.get_config(), rounds=0)


def test_a_missing_dataset_says_how_to_benchmark_without_it(tmp_path):
    config = digits.get_config()
    config.dataset, config.run.data_dir = "cifar10", str(tmp_path)  # not prepared there, and never downloaded
    for kwargs in (dict(input_batches=1), dict(loop_steps=1)):
        with pytest.raises(ValueError, match=r"(?s)not prepared.*--input_batches=0 --loop_steps=0"):
            benchmark.run(config, **kwargs)


def test_large_images_are_benchmarked_as_the_training_loop_takes_them(tmp_path):
    """Large images arrive as uint8 and are normalised inside the step: the synthetic step, inference and the
    real-data loop all run that way (the model refuses un-normalised images, so a missed lookup fails here)."""
    from data_helpers import write_image_folder  # pylint: disable=import-outside-toplevel

    config = digits.get_config()
    config.dataset, config.run.data_dir = "image_folder", write_image_folder(tmp_path / "folder", {"train": 8, "test": 2},
                                                                          size=None)
    config.image_size, config.run.cache_dir = 8, str(tmp_path / "cache")
    config.augment.random_resized_crop, config.augment.eval_resize = True, 10
    config.batch_size = config.run.eval_batch_size = 8
    r = benchmark.run(config, steps=1, warmup=1, loop_steps=2, rounds=1, peak_sizes=(64,))
    assert r["train/img_per_sec"] > 0 and r["train/loop_img_per_sec"] > 0 and r["infer/img_per_sec"] > 0
