"""Input throughput without a model (decode + crop + augment + batch + placement on the devices), per host core,
against what one accelerator needs to train the config's model at a stated MFU.

    python -m nin_jax.input_benchmark --config=configs/imagenet.py --config.dataset=image_folder \\
        --config.run.data_dir=DIR [--workers=N] [--accelerator="TPU v4"] [--mfu=0.4] [--num_batches=200] [--json]

The need of one accelerator is ``peak FLOP/s x MFU / training FLOPs per image`` (analytic FLOPs of the model's
layer table, the peak from nin_jax.hardware), so ``input/host_cores_per_accelerator`` is how many host cores a
job needs per accelerator. The first pass (listing, decoding into the in-memory cache, fitting or loading the
normaliser) is reported separately from the steady-state rate. The batches are the training loop's: large
images arrive on the devices as uint8, and their normalisation runs inside the train step (on the accelerator),
so it is not timed here.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from typing import Any

import jax
import ml_collections
from absl import app, flags
from ml_collections import config_flags

from nin_jax import architectures, data, hardware, mesh as mesh_lib, models
from nin_jax.config import ConfigError
from nin_jax.cpu import hostenv
from nin_jax.runtime import cli, remote


def _cpu_seconds() -> float:
    """CPU time of this process and of its live children (decode worker processes; Linux /proc only)."""
    total = time.process_time()
    for child in multiprocessing.active_children():
        try:
            with open(f"/proc/{child.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
    return total


def measure_input_throughput(
    config: ml_collections.ConfigDict,
    num_batches: int = 100,
    *,
    cold: bool = True,
    warmup_batches: int = 5,
    workers: int | None = None,
) -> dict[str, float]:
    """Builds the pipeline for ``config`` and times its training batches.

    Args:
      config: a training configuration.
      num_batches: timed global batches after ``warmup_batches``.
      cold: drop the process-level caches first, so the first pass really decodes (an on-disk fitted
        normaliser is still loaded rather than refitted).
      workers: decode worker processes for large images (None: the Pipeline's default).
    Returns:
      ``input/img_per_sec`` (steady state, global images per second over all processes),
      ``input/img_per_sec_per_core``, ``input/cpu_ms_per_image``, ``input/first_pass_s`` and its stages ``input/setup_<stage>_s``, plus
      the batch size and counts used.
    """
    if num_batches < 1:
        raise ConfigError(f"--num_batches={num_batches} must be >= 1: the rate is images over the time of the "
                          "timed batches.")
    if warmup_batches < 0:
        raise ConfigError(f"warmup_batches={warmup_batches} must be >= 0.")
    if workers is not None and workers < 0:
        raise ConfigError(f"--workers={workers} must be >= 0 (0: decode in threads of this process).")
    if cold:
        data.clear_caches()
    sharding = mesh_lib.data_sharding(mesh_lib.create_mesh())
    start = time.perf_counter()
    pipeline = data.Pipeline(config, sharding, workers=workers)
    first_pass = time.perf_counter() - start
    batches = pipeline.train_batches(normalize=False)  # as `train.train_and_evaluate` takes them
    try:
        for _ in range(warmup_batches):
            jax.block_until_ready(next(batches))
        start, cpu_start = time.perf_counter(), _cpu_seconds()
        for _ in range(num_batches):
            jax.block_until_ready(next(batches))
        elapsed, cpu = time.perf_counter() - start, _cpu_seconds() - cpu_start
    finally:
        batches.close()
        pipeline.close()
    img_per_sec = num_batches * config.batch_size / elapsed
    cores = hostenv.host_cores() * jax.process_count()
    return {
        "input/img_per_sec": img_per_sec,
        "input/img_per_sec_per_core": img_per_sec / cores,
        "input/host_cores": cores,
        # CPU time per image (this process with its device threads, plus decode workers): unlike img/s, it does
        # not depend on how much of a shared machine the run got.
        "input/cpu_ms_per_image": 1000.0 * cpu / (num_batches * config.batch_size / jax.process_count()),
        "input/batch_ms": 1000.0 * elapsed / num_batches,
        "input/first_pass_s": first_pass,
        **{f"input/setup_{stage}_s": seconds for stage, seconds in pipeline.setup_seconds.items()},
        "input/batch_size": config.batch_size,
        "input/num_batches": num_batches,
        "input/num_train_examples": pipeline.info.num_train_examples,
        "input/image_shape": list(pipeline.info.image_shape),
        "input/num_classes": pipeline.info.num_classes,
        "input/num_devices": jax.device_count(),
    }


def accelerator_need(
    config: ml_collections.ConfigDict,
    image_shape: tuple[int, int, int],
    num_classes: int,
    device_kind: str,
    mfu: float,
) -> dict[str, Any]:
    """Images per second that one ``device_kind`` accelerator consumes training ``config.model`` at ``mfu``.

    Images too small for the model (a quick benchmark at a reduced ``config.image_size``) are counted at the
    preset's own input size and class count.
    """
    try:
        rows = models.model_layer_table(models.create_model(config.model, num_classes), tuple(image_shape))
    except ConfigError:
        preset = architectures.PRESETS[config.model.arch]
        image_shape, num_classes = preset["input_shape"], preset["num_classes"]
        rows = models.model_layer_table(models.create_model(config.model, num_classes), tuple(image_shape))
    train_flops = architectures.train_flops_per_image(rows)
    peak = hardware.peak_flops(device_kind, bool(config.half_precision))
    return {
        "accelerator/kind": device_kind,
        "accelerator/mfu": mfu,
        "accelerator/peak_tflops": None if peak is None else peak / 1e12,
        "accelerator/num_classes": num_classes,
        "accelerator/gflops_per_image_train": train_flops / 1e9,
        "accelerator/img_per_sec_needed": None if peak is None else peak * mfu / train_flops,
    }


def run(config: ml_collections.ConfigDict, num_batches: int, *, workers: int | None, device_kind: str,
        mfu: float) -> dict[str, Any]:
    """`measure_input_throughput` and `accelerator_need`, and the host cores one accelerator needs."""
    if not 0 < mfu <= 1:
        raise ConfigError(f"--mfu={mfu} must be in (0, 1]: the fraction of the accelerator's peak FLOP/s that "
                          "training reaches (e.g. 0.4).")
    result: dict[str, Any] = measure_input_throughput(config, num_batches, workers=workers)
    result.update(accelerator_need(config, result["input/image_shape"], result["input/num_classes"], device_kind, mfu))
    needed = result["accelerator/img_per_sec_needed"]
    result["input/host_cores_per_accelerator"] = (
        None if needed is None else needed / result["input/img_per_sec_per_core"]
    )
    return result


def _report(config: ml_collections.ConfigDict, num_batches: int, as_json: bool, workers: int | None,
            device_kind: str, mfu: float) -> None:
    hostenv.prepare(config)  # the host devices training uses
    remote.check_access(config.run.data_dir, "--config.run.data_dir")
    r = run(config, num_batches, workers=workers, device_kind=device_kind, mfu=mfu)
    if as_json:
        print(json.dumps(r))
        return
    print(
        f"{config.dataset} {config.train_split} ({r['input/num_train_examples']} examples), batch "
        f"{config.batch_size}, {r['input/num_devices']} devices, preprocess={config.preprocess}"
    )
    stages = ", ".join(f"{k[len('input/setup_'):-2]} {v:.2f}s" for k, v in r.items() if k.startswith("input/setup_"))
    print(f"first pass: {r['input/first_pass_s']:.2f}s ({stages})")
    print(f"steady state: {r['input/img_per_sec']:.0f} img/s ({r['input/batch_ms']:.2f} ms/batch) on "
          f"{r['input/host_cores']} host cores = {r['input/img_per_sec_per_core']:.0f} img/s per core")
    if r["accelerator/img_per_sec_needed"] is None:
        print(f"no peak FLOP/s known for {device_kind!r}; see nin_jax/hardware.py")
        return
    print(f"{config.model.arch} at {r['accelerator/gflops_per_image_train']:.2f} GFLOP/image (train): one "
          f"{device_kind} at {mfu:.0%} MFU of {r['accelerator/peak_tflops']:.0f} TFLOP/s needs "
          f"{r['accelerator/img_per_sec_needed']:.0f} img/s, i.e. {r['input/host_cores_per_accelerator']:.1f} "
          "host cores of this kind")


def main() -> None:
    # Flags are defined here, not at import, so that importing measure_input_throughput defines no flags.
    config = config_flags.DEFINE_config_file("config", None, "Training configuration file.", lock_config=True)
    num_batches = flags.DEFINE_integer("num_batches", 200, "Timed training batches (after 5 warm-up batches).")
    as_json = flags.DEFINE_bool("json", False, "Print one JSON object instead of text.")
    workers = flags.DEFINE_integer("workers", None, "Decode worker processes for large images (0: threads).")
    accelerator = flags.DEFINE_string("accelerator", "TPU v4", "JAX device_kind of the accelerator to feed.")
    mfu = flags.DEFINE_float("mfu", 0.4, "Model FLOPs utilisation the accelerator is assumed to reach.")
    flags.mark_flag_as_required("config")

    def report(argv: list[str]) -> None:
        if len(argv) > 1:
            cli.fail(f"unexpected arguments {argv[1:]}; pass config fields as --config.FIELD=VALUE.")
        try:
            _report(config.value, num_batches.value, as_json.value, workers.value, accelerator.value, mfu.value)
        except ConfigError as e:
            cli.fail(e)

    app.run(report)


if __name__ == "__main__":
    main()
