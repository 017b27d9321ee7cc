"""Input-pipeline throughput without a model: decode + normalise + augment + batch + placement on the devices.

    python -m nin_jax.input_benchmark --config=configs/cifar10.py --config.dataset=image_folder \\
        --config.data_dir=/work/shared/data/cifar10-jpeg --config.train_split='train[:45000]' \\
        --config.eval_split='train[45000:]' [--num_batches=200] [--json]

Reports the first pass (listing + decoding into the in-memory cache, fitting or loading the normaliser,
normalising) separately from the steady-state training-batch rate.
"""

from __future__ import annotations

import json
import time

import jax
import ml_collections
from absl import app, flags
from ml_collections import config_flags

from nin_jax import data, mesh as mesh_lib
from nin_jax.cpu import hostenv

def measure_input_throughput(
    config: ml_collections.ConfigDict, num_batches: int = 100, *, cold: bool = True, warmup_batches: int = 5
) -> dict[str, float]:
    """Builds the pipeline for ``config`` and times its training batches.

    Args:
      config: a training configuration.
      num_batches: timed global batches after ``warmup_batches``.
      cold: drop the process-level caches first, so the first pass really decodes (an on-disk fitted
        normaliser is still loaded rather than refitted).
    Returns:
      ``input/img_per_sec`` (steady state, global images per second over all processes), ``input/first_pass_s``
      and its stages ``input/setup_<stage>_s``, plus the batch size and counts used.
    """
    if cold:
        data.clear_caches()
    sharding = mesh_lib.data_sharding(mesh_lib.create_mesh())
    start = time.perf_counter()
    pipeline = data.Pipeline(config, sharding)
    first_pass = time.perf_counter() - start
    batches = pipeline.train_batches()
    for _ in range(warmup_batches):
        jax.block_until_ready(next(batches))
    start = time.perf_counter()
    for _ in range(num_batches):
        jax.block_until_ready(next(batches))
    elapsed = time.perf_counter() - start
    batches.close()
    return {
        "input/img_per_sec": num_batches * config.batch_size / elapsed,
        "input/batch_ms": 1000.0 * elapsed / num_batches,
        "input/first_pass_s": first_pass,
        **{f"input/setup_{stage}_s": seconds for stage, seconds in pipeline.setup_seconds.items()},
        "input/batch_size": config.batch_size,
        "input/num_batches": num_batches,
        "input/num_train_examples": pipeline.info.num_train_examples,
        "input/num_devices": jax.device_count(),
    }


def _report(config: ml_collections.ConfigDict, num_batches: int, as_json: bool) -> None:
    hostenv.prepare(config)  # the host devices training uses
    result = measure_input_throughput(config, num_batches)
    if as_json:
        print(json.dumps(result))
        return
    print(
        f"{config.dataset} {config.train_split} ({result['input/num_train_examples']} examples), batch "
        f"{config.batch_size}, {result['input/num_devices']} devices, preprocess={config.preprocess}"
    )
    stages = ", ".join(f"{k[len('input/setup_'):-2]} {v:.2f}s" for k, v in result.items() if k.startswith("input/setup_"))
    print(f"first pass: {result['input/first_pass_s']:.2f}s ({stages})")
    print(f"steady state: {result['input/img_per_sec']:.0f} img/s ({result['input/batch_ms']:.2f} ms/batch)")


def main() -> None:
    # Flags are defined here, not at import, so that importing measure_input_throughput defines no flags.
    config = config_flags.DEFINE_config_file("config", None, "Training configuration file.", lock_config=True)
    num_batches = flags.DEFINE_integer("num_batches", 200, "Timed training batches (after 5 warm-up batches).")
    as_json = flags.DEFINE_bool("json", False, "Print one JSON object instead of text.")
    flags.mark_flag_as_required("config")
    app.run(lambda argv: _report(config.value, num_batches.value, as_json.value))


if __name__ == "__main__":
    main()
