"""`python -m nin_jax.input_benchmark`: throughput per host core and the cores one accelerator needs."""

import json
import subprocess
import sys

import pytest
from data_helpers import make_config, write_image_folder

from nin_jax import hardware
from nin_jax.tools import input_benchmark


def test_accelerator_need_uses_the_model_flops_and_peak(tmp_path):
    config = make_config(tmp_path, model__arch="nin_cifar10")
    need = input_benchmark.accelerator_need(config, (32, 32, 3), 10, "TPU v4", 0.5)
    assert need["accelerator/gflops_per_image_train"] == pytest.approx(1.305, abs=0.01)
    peak = hardware.PEAK_FLOPS["TPU v4"][1]  # float32: config.half_precision is False
    assert need["accelerator/img_per_sec_needed"] == pytest.approx(peak * 0.5 / 1.305e9, rel=0.01)
    assert input_benchmark.accelerator_need(config, (32, 32, 3), 10, "Abacus", 0.5)["accelerator/img_per_sec_needed"] is None


@pytest.mark.slow
def test_json_reports_img_per_sec_and_cores_per_accelerator(tmp_path):
    root = write_image_folder(tmp_path / "folder", {"train": 8, "validation": 1}, size=None)
    out = subprocess.run(
        [sys.executable, "-m", "nin_jax.input_benchmark", "--config=configs/imagenet.py",
         "--config.dataset=image_folder", f"--config.run.data_dir={root}", f"--config.run.cache_dir={tmp_path}/cache",
         "--config.image_size=16", "--config.batch_size=8", "--config.run.eval_batch_size=8", "--num_batches=2",
         "--config.run.num_cpu_devices=2", "--workers=0", "--json"],
        capture_output=True, text=True, check=True,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["input/img_per_sec"] > 0
    assert result["input/img_per_sec_per_core"] == pytest.approx(result["input/img_per_sec"] / result["input/host_cores"])
    assert result["accelerator/kind"] == "TPU v4" and result["accelerator/num_classes"] == 1000
    assert result["input/host_cores_per_accelerator"] == pytest.approx(
        result["accelerator/img_per_sec_needed"] / result["input/img_per_sec_per_core"])
