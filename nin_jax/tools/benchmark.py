"""Throughput and model FLOPs utilisation (MFU) of the training step, inference and the input pipeline.

    python -m nin_jax.benchmark --config=configs/cifar10.py [--batch_size=128] [--steps=20] [--rounds=2]
        [--loop_steps=20] [--input_batches=50] [--json=FILE or -] [--config.run.num_cpu_devices=0]

Compiles the real training step (`train.make_train_step`, same mesh and shardings as training) once, then
runs `--rounds` rounds of two blocks: `--steps` consecutive train steps on a synthetic batch, each to
`block_until_ready` (`train/img_per_sec`), and `--loop_steps` consecutive steps as the training loop runs
them (`train/loop_img_per_sec`): fed by the real input pipeline, the dataset resident in the process, metrics
merged, steps dispatched ahead. A block's figure is its images over its wall time (slow steps count, as in a
run; `train/img_per_sec_median_step` is the median single step's rate), and each throughput is the median over
rounds. Then `--steps` inference steps. The loop and `--input_batches` need the dataset; `--input_batches=0
--loop_steps=0` benchmarks synthetic batches only.

MFU is achieved model FLOP/s (analytic FLOPs from `architectures`, every kernel tap counted) over the mean
of the matmul peaks measured around the blocks. For the peak every device multiplies square
matrices at once, and on CPU, where host devices share the same cores, a single-device matmul counts too;
the larger rate is the peak.
Peak memory is the process's peak RSS on CPU and the devices' `peak_bytes_in_use` elsewhere.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import time
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import app, flags
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec as P
from ml_collections import config_flags

from nin_jax import architectures, data, mesh as mesh_lib, models, train
from nin_jax.config import ConfigError
from nin_jax.cpu import conv as cpu_conv, hostenv, layers as cpu_layers, winograd
from nin_jax.runtime import cli, remote
from nin_jax.tools import restore

# Model input (H, W, C) and classes of the built-in datasets; synthetic batches need no data on disk.
DATASET_SHAPES: dict[str, tuple[tuple[int, int, int], int]] = {
    "digits": ((8, 8, 1), 10),
    "mnist": ((28, 28, 1), 10),
    "cifar10": ((32, 32, 3), 10),
    "cifar100": ((32, 32, 3), 100),
    "svhn_cropped": ((32, 32, 3), 10),
    "imagenet2012": ((224, 224, 3), 1000),
}

REQUIRED_KEYS = ("train/img_per_sec", "train/loop_img_per_sec", "infer/img_per_sec", "compile_seconds",
                 "gflops_per_image_train", "gflops_per_image_forward", "peak_gflops", "train/mfu", "infer/mfu",
                 "input/img_per_sec", "device_kind", "device_count", "batch_size")

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training configuration file.", lock_config=True)
_BATCH = flags.DEFINE_integer("batch_size", None, "Global batch (default: config.batch_size).")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed consecutive train steps, and as many inference steps.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
_ROUNDS = flags.DEFINE_integer(
    "rounds", 2, "Rounds of a block of --steps train steps alone and then one of --loop_steps loop steps; each "
    "figure is the median over rounds.")
_JSON = flags.DEFINE_string("json", None, "Write the results to this JSON file ('-': one line on stdout).")
_INPUT_BATCHES = flags.DEFINE_integer(
    "input_batches", 50, "Batches timed through the real input pipeline (needs the dataset); 0 skips it and "
    "reports input/img_per_sec as null.")
_LOOP_STEPS = flags.DEFINE_integer(
    "loop_steps", 20, "Consecutive train steps timed on batches of the real input pipeline, the dataset resident "
    "as in training (needs the dataset); 0 skips it and reports train/loop_img_per_sec as null.")
_PEAK_SIZES = flags.DEFINE_list(
    "peak_sizes", ["1024", "2048"], "Square matmul sizes for the peak; the best of them is the peak.")
_TRACE_DIR = flags.DEFINE_string("trace_dir", None, "Write a jax.profiler trace of 3 train steps here.")


def dataset_shape(config: ml_collections.ConfigDict,
                  pipeline: data.Pipeline | None = None) -> tuple[tuple[int, int, int], int]:
    """Model input shape and class count: ``pipeline``'s if given (an image folder needs one), else those of
    the built-in `config.dataset` from `DATASET_SHAPES` (config.image_size overrides H and W)."""
    if pipeline is not None:
        return tuple(pipeline.info.image_shape), pipeline.info.num_classes
    if config.dataset == "image_folder":
        raise ConfigError("config.dataset='image_folder': its input shape is read from the folder (pass its Pipeline).")
    if config.dataset not in DATASET_SHAPES:
        raise ConfigError(f"config.dataset={config.dataset!r} has no known input shape for synthetic batches; "
                         f"use one of {tuple(DATASET_SHAPES)} or 'image_folder'.")
    (h, w, c), num_classes = DATASET_SHAPES[config.dataset]
    if config.get("image_size"):
        h = w = int(config.image_size)
    return (h, w, c), num_classes


def _time_calls(fn: Callable[[], Any], steps: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return times


def measure_matmul_peak(mesh: jax.sharding.Mesh, dtype: Any, sizes: Sequence[int], reps: int = 5) -> dict[str, float]:
    """Matmul FLOP/s, best over `sizes` and `reps`: all devices at once (one n x n product each) and device 0 alone.

    The best repetition, not the median, is the peak: on a shared machine a slow repetition measures the other
    load, and a higher peak only makes the reported MFU more conservative.
    """
    devices = mesh.devices.ravel().tolist()
    sharded = NamedSharding(mesh, P(mesh_lib.DATA_AXIS))
    best_all, best_one = 0.0, 0.0
    matmul = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=dtype))
    for n in sizes:
        stacked = jax.device_put(jnp.ones((len(devices), n, n), dtype), sharded)
        best_all = max(best_all, len(devices) * 2 * n**3 / min(_time_calls(lambda: matmul(stacked, stacked), reps, 1)))
        single = jax.device_put(jnp.ones((n, n), dtype), devices[0])
        best_one = max(best_one, 2 * n**3 / min(_time_calls(lambda: matmul(single, single), reps, 1)))
    # Host CPU devices share the same cores, so one device alone can use the whole machine.
    one_scaled = best_one if devices[0].platform == "cpu" else best_one * len(devices)
    return {"all_devices": best_all, "one_device": best_one, "peak": max(best_all, one_scaled)}


def _peak_memory_bytes() -> tuple[str, float]:
    devices = jax.local_devices()
    if devices[0].platform != "cpu":
        stats = [d.memory_stats() or {} for d in devices]
        if all("peak_bytes_in_use" in s for s in stats):
            return "device_peak_bytes", float(sum(s["peak_bytes_in_use"] for s in stats))
    # ru_maxrss is in KiB on Linux.
    return "host_peak_rss_bytes", float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def _cpu_kernels(model: models.NIN) -> bool:
    """Whether the model is built from nin_jax.cpu's layers."""
    return model.layers == cpu_layers.LAYERS


def _resolved_conv_impls(model: models.NIN, in_channels: int) -> list[str]:
    """The formulation each block's KxK convolution runs: per layer with CPU kernels, else XLA's."""
    impls = []
    for block in model.block_specs:
        kernel_shape = (block.kernel, block.kernel, in_channels, block.widths[0])
        impls.append(cpu_conv.resolve_impl("auto", kernel_shape, block.stride) if _cpu_kernels(model) else "xla")
        in_channels = block.widths[-1]
    return impls


def executed_flops_per_image(model: models.NIN, rows: Sequence[architectures.LayerRow], in_channels: int
                             ) -> tuple[float, float]:
    """FLOPs per image (forward, train step) as executed: like `architectures`' model FLOPs, but each KxK conv
    that resolves to Winograd counted by the multiplies it runs (tile transforms, additions and scalings by
    constants, not counted). Their ratio to the model FLOPs turns MFU into hardware FLOPs utilisation (HFU)."""
    forward, train_step = architectures.forward_flops_per_image(rows), architectures.train_flops_per_image(rows)
    by_name = {r.name: r for r in rows}
    first_conv = next(r for r in rows if r.macs).name
    for i, (block, impl) in enumerate(zip(model.block_specs, _resolved_conv_impls(model, in_channels)), start=1):
        if impl != "winograd":
            continue
        row = by_name[f"conv{i}"]
        out_h, out_w, _ = row.out_shape
        # A stride-s conv runs as a stride-1 conv with ceil(k/s)-tap kernels on s*s times the channels.
        k, s = block.kernel, block.stride
        kb = -(-k // s)
        m = winograd.tile_size(kb)
        th, tw = winograd.tile_grid(out_h, out_w, m)
        taps = th * tw * (kb + m - 1) ** 2 * s * s
        saved = 2.0 * row.macs * (1.0 - taps / (out_h * out_w * k * k))
        forward -= saved
        train_step -= saved * (2 if row.name == first_conv else 3)  # the first layer has no input gradient
    return forward, train_step


def run(config: ml_collections.ConfigDict, *, steps: int = 10, warmup: int = 2, input_batches: int = 0,
        loop_steps: int = 0, rounds: int = 1, peak_sizes: Sequence[int] = (1024, 2048), trace_dir: str | None = None
        ) -> dict[str, Any]:
    """Benchmarks `config` on the devices jax already sees; returns the results as a flat dict."""
    if steps < 1 or rounds < 1 or warmup < 0 or input_batches < 0 or loop_steps < 0:
        raise ConfigError(f"--steps={steps} and --rounds={rounds} must be >= 1, and --warmup={warmup}, "
                          f"--input_batches={input_batches} and --loop_steps={loop_steps} >= 0.")
    mesh = mesh_lib.create_mesh()
    batch_sharding = mesh_lib.data_sharding(mesh)
    data.check_batch_layout(batch_sharding, config.batch_size, "config.batch_size")
    # First, so that a dataset that is not prepared fails before minutes of model benchmarking.
    input_results: dict[str, Any] = {"input/img_per_sec": None}
    pipeline = None
    if input_batches > 0 or loop_steps > 0 or config.dataset == "image_folder":
        remote.check_access(config.run.data_dir, "--config.run.data_dir")
    try:
        if input_batches > 0:
            from nin_jax.tools import input_benchmark  # only needed (and only importing TF/TFDS) when asked for

            input_results = input_benchmark.measure_input_throughput(config, input_batches)
        # The dataset stays open and resident while the steps are timed, as in a training run.
        if loop_steps > 0 or config.dataset == "image_folder":
            pipeline = data.Pipeline(config, batch_sharding)
    except ConfigError as e:
        if config.dataset == "image_folder":
            raise
        raise ConfigError(f"{e} (--input_batches=0 --loop_steps=0 benchmark synthetic batches of "
                          f"{config.dataset}'s shape without the dataset)") from e
    try:
        return _run(config, mesh, pipeline, steps=steps, warmup=warmup, loop_steps=loop_steps, rounds=rounds,
                    peak_sizes=peak_sizes, trace_dir=trace_dir) | input_results
    finally:
        if pipeline is not None:
            pipeline.close()


def time_training_loop(step_fn: Callable, state: train.TrainState, batches: Iterator[dict[str, jax.Array]],
                       batch_size: int, steps: int) -> tuple[float, train.TrainState]:
    """Global img/s of ``steps`` consecutive train steps fed by ``batches``, merging the metrics as the training
    loop does (steps dispatched at most `mesh.RUN_AHEAD_DEPTH` ahead, one wait at the end); returns it with the
    new state."""
    merged, run_ahead = None, mesh_lib.RunAheadBound()
    start = time.perf_counter()
    for _ in range(steps):
        state, m = step_fn(state, next(batches))
        run_ahead.add(m)
        merged = m if merged is None else merged.merge(m)
    jax.block_until_ready((state, merged))
    return steps * batch_size / (time.perf_counter() - start), state


def _run(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, pipeline: data.Pipeline | None, *,
         steps: int, warmup: int, loop_steps: int, rounds: int, peak_sizes: Sequence[int],
         trace_dir: str | None) -> dict[str, Any]:
    batch_sharding = mesh_lib.data_sharding(mesh)
    image_shape, num_classes = dataset_shape(config, pipeline)
    dtype = train.compute_dtype(config)
    model = models.create_model(config.model, num_classes, dtype=dtype,
                                layers=cpu_layers.model_layers(config.run.cpu_kernels))
    # The schedule's shape costs a few scalar ops per step; a constant one needs no dataset size.
    lr_fn = optax.constant_schedule(config.optim.learning_rate)
    rows = models.model_layer_table(model, image_shape)
    fwd_flops = architectures.forward_flops_per_image(rows)
    train_flops = architectures.train_flops_per_image(rows)
    fwd_executed, train_executed = executed_flops_per_image(model, rows, image_shape[-1])

    batch_size = config.batch_size
    rng = np.random.default_rng(config.seed)
    # The batches and steps of the training loop: with a pipeline, large images arrive as uint8 and are
    # normalised inside the step, as in `train.train_and_evaluate`.
    prepare = pipeline.device_normalize if pipeline is not None else (lambda images: images)
    uint8_images = pipeline is not None and pipeline.transfer_dtype == np.uint8
    images = (rng.integers(0, 256, (batch_size, *image_shape), np.uint8) if uint8_images
              else rng.standard_normal((batch_size, *image_shape), np.float32))
    batch = jax.device_put({"image": images, "label": rng.integers(0, num_classes, batch_size).astype(np.int32)},
                           batch_sharding)
    state = train.create_train_state(config, model, image_shape, lr_fn, mesh)

    step_fn = train.make_train_step(config, model, num_classes, mesh, prepare)
    start = time.perf_counter()
    train_step = step_fn.lower(state, batch).compile()
    compile_seconds = time.perf_counter() - start

    def infer_fn(state, images):
        variables = models.variables(state.params, state.batch_stats)
        return model.apply(variables, prepare(images), train=False)

    repl = mesh_lib.replicated(mesh)
    start = time.perf_counter()
    infer = jax.jit(infer_fn, in_shardings=(repl, batch_sharding), out_shardings=batch_sharding).lower(state, batch["image"]).compile()
    infer_compile_seconds = time.perf_counter() - start

    holder = {"state": state}

    def one_train_step():
        holder["state"], m = train_step(holder["state"], batch)
        return holder["state"].step, m

    # Train and inference steps are timed in blocks of consecutive calls, as they run in training (a step
    # timed right after a matmul peak or an inference step ran up to 20% slower), with the matmul peak measured
    # around the blocks: on a shared host the machine's speed drifts by 10-50% within minutes, so MFU divides by
    # the mean of the peaks around the blocks timed. `*/mfu_vs_max_peak` divides by the highest peak of the whole
    # run instead (the most conservative reading).
    peak_dtype = jnp.bfloat16 if config.half_precision else jnp.float32

    def peak() -> float:
        return measure_matmul_peak(mesh, peak_dtype, peak_sizes, reps=2)["peak"]

    for _ in range(warmup):
        jax.block_until_ready(infer(holder["state"], batch["image"]))
    loop_batches = pipeline.train_batches(0, normalize=False) if loop_steps > 0 else None
    try:
        if loop_batches is not None:  # compiles the step for the pipeline's batch layout, untimed
            for _ in range(max(warmup, 1)):
                holder["state"], _ = step_fn(holder["state"], next(loop_batches))
            jax.block_until_ready(holder["state"])
        load_start = os.getloadavg()[0]
        # The step alone and the loop alternate, round after round, so that their ratio is measured in one
        # state of the machine; each figure is the median over rounds of a block's images / wall time.
        peaks = [peak()]
        train_times, train_rates, loop_rates = [], [], []
        for r in range(rounds):
            times = _time_calls(one_train_step, steps, warmup if r == 0 else 0)
            train_times += times
            train_rates.append(steps * batch_size / sum(times))
            peaks.append(peak())
            if loop_batches is not None:
                rate, holder["state"] = time_training_loop(step_fn, holder["state"], loop_batches, batch_size,
                                                           loop_steps)
                loop_rates.append(rate)
    finally:
        if loop_batches is not None:
            loop_batches.close()
    train_peak = statistics.mean(peaks)
    infer_times = _time_calls(lambda: infer(holder["state"], batch["image"]), steps, 0)
    peaks.append(peak())
    infer_peak = (peaks[-2] + peaks[-1]) / 2
    if trace_dir:
        with jax.profiler.trace(trace_dir):
            _time_calls(one_train_step, 3, 0)
    load_end = os.getloadavg()[0]
    memory_key, memory_bytes = _peak_memory_bytes()

    f32 = measure_matmul_peak(mesh, jnp.float32, peak_sizes, reps=3)
    bf16 = measure_matmul_peak(mesh, jnp.bfloat16, peak_sizes, reps=3)
    train_ips = statistics.median(train_rates)
    loop_ips = statistics.median(loop_rates) if loop_rates else None
    infer_ips = batch_size / statistics.median(infer_times)
    train_mfu = train_flops * train_ips / train_peak
    infer_mfu = fwd_flops * infer_ips / infer_peak
    device = jax.devices()[0]
    results: dict[str, Any] = {
        "train/img_per_sec": train_ips,
        "train/loop_img_per_sec": loop_ips,
        "train/loop_vs_step": None if loop_ips is None else loop_ips / train_ips,
        "train/img_per_sec_rounds": train_rates,
        "train/loop_img_per_sec_rounds": loop_rates or None,
        "train/img_per_sec_median_step": batch_size / statistics.median(train_times),
        "infer/img_per_sec": infer_ips,
        "train/step_ms_median": 1e3 * statistics.median(train_times),
        "train/step_ms_min": 1e3 * min(train_times),
        "train/step_ms_max": 1e3 * max(train_times),
        "infer/step_ms_median": 1e3 * statistics.median(infer_times),
        "infer/step_ms_min": 1e3 * min(infer_times),
        "compile_seconds": compile_seconds,
        "infer_compile_seconds": infer_compile_seconds,
        "gflops_per_image_train": train_flops / 1e9,
        "gflops_per_image_forward": fwd_flops / 1e9,
        "train/gflops_per_sec": train_flops * train_ips / 1e9,
        "infer/gflops_per_sec": fwd_flops * infer_ips / 1e9,
        "peak_gflops": statistics.median(peaks) / 1e9,
        "peak_gflops_max": max(peaks) / 1e9,
        "peak_gflops_min": min(peaks) / 1e9,
        "peak_gflops_f32": f32["peak"] / 1e9,
        "peak_gflops_f32_all_devices": f32["all_devices"] / 1e9,
        "peak_gflops_f32_one_device": f32["one_device"] / 1e9,
        "peak_gflops_bf16": bf16["peak"] / 1e9,
        "train/mfu": train_mfu,
        "train/mfu_vs_max_peak": train_flops * train_ips / max(peaks),
        "infer/mfu": infer_mfu,
        "infer/mfu_vs_max_peak": fwd_flops * infer_ips / max(peaks),
        "gflops_per_image_forward_executed": fwd_executed / 1e9,
        "gflops_per_image_train_executed": train_executed / 1e9,
        "train/hfu": train_mfu * train_executed / train_flops,
        "infer/hfu": infer_mfu * fwd_executed / fwd_flops,
        memory_key: memory_bytes,
        "device_kind": device.device_kind,
        "platform": device.platform,
        "device_count": jax.device_count(),
        "batch_size": batch_size,
        "steps": steps,
        "rounds": rounds,
        "dtype": jnp.dtype(dtype).name,
        "arch": config.model.arch,
        "cpu_kernels": _cpu_kernels(model),
        "conv_impls_resolved": _resolved_conv_impls(model, image_shape[-1]),
        "parallelism": config.run.parallelism,
        "load_avg_1min": [load_start, load_end],
        "host_malloc_hugepages": hostenv.HUGEPAGES_TUNABLE in os.environ.get("GLIBC_TUNABLES", ""),
        "transparent_hugepage_mode": hostenv.transparent_hugepage_mode(),
    }
    return results


def _rates(rates: Sequence[float] | None) -> str:
    return "skipped" if rates is None else " / ".join(f"{v:.1f}" for v in rates)


def format_results(r: dict[str, Any]) -> str:
    """A short human-readable table of `run`'s results."""
    def fmt(v, spec):
        return "skipped" if v is None else format(v, spec)
    lines = [
        f"{r['arch']} batch {r['batch_size']} {r['dtype']} on {r['device_count']} x {r['device_kind']} "
        f"({r['platform']}), cpu kernels {r['cpu_kernels']}: convs {r['conv_impls_resolved']}, {r['parallelism']}",
        f"{'':<22}{'img/s':>10}{'ms/step':>10}{'GFLOP/s':>10}{'MFU':>8}{'vs max peak':>13}",
        f"{'train':<22}{r['train/img_per_sec']:>10.1f}{r['train/step_ms_median']:>10.1f}"
        f"{r['train/gflops_per_sec']:>10.1f}{r['train/mfu']:>8.3f}{r['train/mfu_vs_max_peak']:>13.3f}",
        f"{'inference':<22}{r['infer/img_per_sec']:>10.1f}{r['infer/step_ms_median']:>10.1f}"
        f"{r['infer/gflops_per_sec']:>10.1f}{r['infer/mfu']:>8.3f}{r['infer/mfu_vs_max_peak']:>13.3f}",
        f"{'train loop (real data)':<22}{fmt(r['train/loop_img_per_sec'], '>10.1f')}"
        + ("" if r["train/loop_vs_step"] is None else f"  ({r['train/loop_vs_step']:.2f} x the step alone)"),
        f"rounds ({r['rounds']}): step {_rates(r['train/img_per_sec_rounds'])}; loop "
        f"{_rates(r['train/loop_img_per_sec_rounds'])}; median single step {r['train/img_per_sec_median_step']:.1f}",
        f"{'input pipeline':<22}{fmt(r['input/img_per_sec'], '>10.1f')}",
        f"model GFLOP/image: forward {r['gflops_per_image_forward']:.3f}, train {r['gflops_per_image_train']:.3f}; "
        f"as executed (Winograd's multiplies): forward {r['gflops_per_image_forward_executed']:.3f}, train "
        f"{r['gflops_per_image_train_executed']:.3f}, so HFU train {r['train/hfu']:.3f}, inference {r['infer/hfu']:.3f}",
        f"matmul peak GFLOP/s: f32 {r['peak_gflops_f32']:.1f} (all devices {r['peak_gflops_f32_all_devices']:.1f}, "
        f"one device {r['peak_gflops_f32_one_device']:.1f}), bf16 {r['peak_gflops_bf16']:.1f}; around the blocks "
        f"(MFU's denominators) median {r['peak_gflops']:.1f}, min {r['peak_gflops_min']:.1f}, max "
        f"{r['peak_gflops_max']:.1f}",
        f"train step ms: min {r['train/step_ms_min']:.1f} max {r['train/step_ms_max']:.1f}; compile "
        f"{r['compile_seconds']:.1f} s (inference {r['infer_compile_seconds']:.1f} s); load avg "
        f"{r['load_avg_1min'][0]:.1f} -> {r['load_avg_1min'][1]:.1f}; malloc huge pages "
        f"{'on' if r['host_malloc_hugepages'] else 'off'} (THP mode {r['transparent_hugepage_mode']})",
    ]
    for key in ("host_peak_rss_bytes", "device_peak_bytes"):
        if key in r:
            lines.append(f"peak memory ({key}): {r[key] / 2**30:.2f} GiB")
    return "\n".join(lines)


def _peak_sizes(values: Sequence[str]) -> list[int]:
    try:
        sizes = [int(v) for v in values]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise ConfigError(f"--peak_sizes={','.join(values)}: pass matrix sizes >= 1, e.g. 1024,2048.")
    return sizes


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = _CONFIG.value
    if config is None:
        raise app.UsageError("--config=configs/<name>.py is required.")
    config = config.copy_and_resolve_references()
    if _BATCH.value is not None:
        config.batch_size = _BATCH.value
    try:
        # Every output is checked before minutes of benchmarking could end on a path that cannot be written.
        if _JSON.value and _JSON.value != "-":
            restore.check_output_path(_JSON.value, "--json")
        if _TRACE_DIR.value:
            restore.check_output_path(_TRACE_DIR.value, "--trace_dir", directory=True)
        peak_sizes = _peak_sizes(_PEAK_SIZES.value)
        hostenv.prepare(config, reexec=True)  # the step as training runs it
        results = run(config, steps=_STEPS.value, warmup=_WARMUP.value, input_batches=_INPUT_BATCHES.value,
                      loop_steps=_LOOP_STEPS.value, rounds=_ROUNDS.value, peak_sizes=peak_sizes,
                      trace_dir=_TRACE_DIR.value)
    except ConfigError as e:
        cli.fail(e)
    print(format_results(results), flush=True)
    if _JSON.value == "-":  # one line on stdout, for nin_jax.tools.alternate
        print(json.dumps(results, sort_keys=True), flush=True)
    elif _JSON.value:
        epath.Path(_JSON.value).write_text(json.dumps(results, indent=1, sort_keys=True))


if __name__ == "__main__":
    app.run(main)
