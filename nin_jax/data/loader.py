"""The Pipeline: a config's training and evaluation batches as global `jax.Array`s sharded over the data axis.

Two paths read examples; both take their order from `order` and hand batches to `prefetch`:

* In memory (digits, MNIST, CIFAR, SVHN, image folders of small images): every base split is decoded once,
  normalised once and kept in the process `Cache`; a training batch gathers rows and translates + flips them.
* Per example (ImageNet, image folders with ``augment.random_resized_crop``): each example is read and decoded
  when its batch is built, cropped to ``image_size`` (random-resized crop + flip for training, resize + center
  crop for evaluation) and sent to the devices as uint8, where a pixel table normalises it (in the prefetch
  thread, or inside the consumer's step with ``normalize=False``). Nothing is held in memory.

Evaluation visits every example exactly once: the last batch is padded and its padding carries ``mask == 0``.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import json
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from nin_jax import config as config_lib
from nin_jax.config import ConfigError
from nin_jax.data import decode, order, prefetch, preprocessing, sources, transforms
from nin_jax.data import workers as workers_lib
from nin_jax.data.cache import PROCESS_CACHE, Cache

_DEFAULT_LARGE_IMAGE_SIZE = 224
_STANDARDIZE_FIT_EXAMPLES = 2000  # decoded examples used to fit per-channel stats of a large-image dataset
_NORMALIZE_CHUNK = 2048  # rows normalised per task when a whole split is normalised
_READ_THREADS = 16  # concurrent example reads of the per-example path


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    num_classes: int
    image_shape: tuple[int, int, int]  # model input H, W, C after preprocessing / cropping
    num_train_examples: int | None  # None for a Pipeline built with train=False
    num_eval_examples: int
    class_names: tuple[str, ...]


def uses_per_example(config: ml_collections.ConfigDict) -> bool:
    """Whether ``config`` reads large images per example rather than holding the dataset in memory."""
    return config.dataset == "imagenet2012" or (
        config.dataset == "image_folder" and bool(config.augment.random_resized_crop)
    )


def _data_shards(sharding: jax.sharding.NamedSharding) -> int:
    axes = sharding.spec[0] if len(sharding.spec) else None
    if axes is None:
        return 1
    axes = axes if isinstance(axes, tuple) else (axes,)
    return math.prod(sharding.mesh.shape[a] for a in axes)


def check_batch_layout(sharding: jax.sharding.NamedSharding, batch: int, field: str) -> None:
    """Raises ConfigError unless a global batch of ``batch`` splits over processes and data-axis devices as
    `order.process_rows` assumes: equal rows per process, each process's rows on its own devices."""
    process_index, process_count = jax.process_index(), jax.process_count()
    shards = _data_shards(sharding)
    if batch <= 0 or batch % process_count or batch % shards:
        raise ConfigError(
            f"{field}={batch} must be a positive multiple of the number of processes "
            f"({process_count}) and of the number of devices on the data axis ({shards})"
        )
    local = sharding.addressable_devices_indices_map((batch,))
    start = min(idx[0].start or 0 for idx in local.values())
    stop = max(batch if idx[0].stop is None else idx[0].stop for idx in local.values())
    expected = order.process_rows(batch, process_index, process_count)
    if (start, stop) != (expected.start, expected.stop):
        raise ValueError(
            f"the sharding gives process {process_index} rows [{start}, {stop}) of a batch of {batch}, "
            f"expected [{expected.start}, {expected.stop}); build the mesh with jax.make_mesh so that each "
            "process's devices are contiguous along the data axis"
        )


class _Pending:
    """A host batch being built: ``result()`` waits for it, ``cancel()`` drops it."""

    def __init__(self, result: Callable[[], dict[str, np.ndarray]], cancel: Callable[[], None] = lambda: None):
        self.result, self.cancel = result, cancel


# --------------------------------------------------------------------------------------------------------------
# In-memory path.


@dataclasses.dataclass(frozen=True)
class _ArraySplit:
    content: tuple[str, ...]  # fingerprints of the base splits
    bases: tuple[sources.Arrays, ...]
    raw: np.ndarray  # uint8 [M, H, W, C]: the bases concatenated
    labels: np.ndarray  # int32 [M]
    index: np.ndarray  # [N] rows of the split in the arrays
    normalized: np.ndarray | None = None  # float32 [M, H, W, C] once normalised

    def __len__(self) -> int:
        return len(self.index)


class _InMemory:
    fit_method = "every image of the split"

    def __init__(self, config: ml_collections.ConfigDict, source: sources.Source, cache: Cache):
        self._config, self._source, self._cache = config, source, cache
        self.image_shape: tuple[int, int, int] | None = None  # of the first split opened
        self._first: tuple[str, str] | None = None  # (field, split) that gave `image_shape`

    def open(self, split: str, field: str) -> _ArraySplit:
        selection = sources.select(self._source, split, field)
        bases = tuple(self._source.arrays(b) for b in selection.bases)
        if len({b.images.shape[1:] for b in bases}) > 1:
            raise ConfigError(f"{field}={split!r} combines splits with different image shapes; set config.image_size")
        if len(bases) == 1:
            raw, labels = bases[0].images, bases[0].labels
        else:
            raw, labels = np.concatenate([b.images for b in bases]), np.concatenate([b.labels for b in bases])
        shape = tuple(int(d) for d in raw.shape[1:])
        if self.image_shape is None:
            self.image_shape, self._first = shape, (field, split)
        elif shape != self.image_shape:  # the model is built for the first shape: another one fails inside it
            raise ConfigError(
                f"{field}={split!r} gives images of shape {shape} but {self._first[0]}={self._first[1]!r} gives "
                f"{self.image_shape}; set config.image_size to resize every image to one size"
            )
        content = tuple(self._source.fingerprint(b) for b in selection.bases)
        return _ArraySplit(content, bases, raw, labels, selection.index)

    def fit_images(self, split: _ArraySplit) -> np.ndarray:
        return split.raw[split.index]

    def normalize(self, split: _ArraySplit, normalizer: preprocessing.Normalizer) -> _ArraySplit:
        normalized = [self._normalized(base, normalizer) for base in split.bases]
        return dataclasses.replace(split, normalized=normalized[0] if len(normalized) == 1 else np.concatenate(normalized))

    def _normalized(self, base: sources.Arrays, normalizer: preprocessing.Normalizer) -> np.ndarray:
        """float32 model inputs of a whole base split, computed once per process and normaliser."""

        def build() -> np.ndarray:
            starts = range(0, len(base.images), _NORMALIZE_CHUNK)
            return np.concatenate(sources.map_threads(lambda s: normalizer(base.images[s : s + _NORMALIZE_CHUNK]), starts))

        return self._cache.get(("normalized", base.key, normalizer.fingerprint), build)

    def submit_train(self, split: _ArraySplit, indices: np.ndarray, step: int, rows: slice) -> _Pending:
        return _Pending(lambda: self._train_examples(split, indices, step, rows))

    def submit_eval(self, split: _ArraySplit, indices: np.ndarray, with_raw: bool, crops: int = 1) -> _Pending:
        del crops  # 1: the Pipeline refuses more crops of images that are already model size
        return _Pending(lambda: self._eval_examples(split, indices, with_raw))

    def close(self) -> None:
        pass  # the arrays stay in the cache

    def _train_examples(self, split: _ArraySplit, indices: np.ndarray, step: int, rows: slice) -> dict[str, np.ndarray]:
        config = self._config
        positions = split.index[indices]
        images = split.normalized[positions]
        translate, flip = config.augment.translate, config.augment.flip
        if translate or flip:
            offset_y, offset_x, flips = order.augment_params(config.seed, step, config.batch_size, translate, flip)
            images = transforms.translate_and_flip(images, offset_y[rows], offset_x[rows], flips[rows], translate,
                                                   config.augment.pad_mode)
        return {"image": images, "label": split.labels[positions]}

    def _eval_examples(self, split: _ArraySplit, indices: np.ndarray, with_raw: bool) -> dict[str, np.ndarray]:
        positions = split.index[indices]
        out = {"image": split.normalized[positions], "label": split.labels[positions]}
        if with_raw:
            out["raw"] = split.raw[positions]
        return out


# --------------------------------------------------------------------------------------------------------------
# Per-example path.


@dataclasses.dataclass(frozen=True)
class _ExampleSplit:
    content: tuple[str, ...]  # fingerprints of the base splits
    examples: tuple[sources.Examples, ...]
    offsets: np.ndarray  # start of each base in their concatenation
    index: np.ndarray  # [N] positions of the split in that concatenation
    normalizer: preprocessing.Normalizer | None = None  # applied on the devices by a pixel table lookup

    def __len__(self) -> int:
        return len(self.index)

    def read(self, j: int) -> tuple[bytes | str, int, str]:
        position = int(self.index[j])
        s = int(np.searchsorted(self.offsets, position, side="right")) - 1
        return self.examples[s].read(position - int(self.offsets[s]))


class _PerExample:
    def __init__(self, config: ml_collections.ConfigDict, source: sources.Source, workers: int):
        if config.preprocess not in ("scale", "standardize"):
            raise ConfigError(
                f"config.preprocess={config.preprocess!r} needs the whole dataset in memory; use 'standardize' or "
                f"'scale' for {config.dataset} with per-example decoding"
            )
        self._config, self._source = config, source
        self._workers = workers
        self._pool: workers_lib.DecodePool | None = None
        # Storage reads run in threads: remote storage (ArrayRecord on gs://) needs many requests in flight.
        self._readers = concurrent.futures.ThreadPoolExecutor(_READ_THREADS, thread_name_prefix="nin_jax-read")
        self._size = config.image_size or _DEFAULT_LARGE_IMAGE_SIZE
        self._channels = source.channels
        self.image_shape = (self._size, self._size, self._channels)
        self._eval_resize_mode = config.augment.eval_resize_mode
        self.fit_method = (f"center crops of up to {_STANDARDIZE_FIT_EXAMPLES} evenly spaced examples, short side "
                           f"resized to {config.augment.eval_resize}")
        if self._eval_resize_mode != "short_side":  # (the default's text, and so its cached statistics, unchanged)
            self.fit_method += f", eval_resize_mode {self._eval_resize_mode}"

    def open(self, split: str, field: str) -> _ExampleSplit:
        selection = sources.select(self._source, split, field)
        return _ExampleSplit(tuple(self._source.fingerprint(b) for b in selection.bases),
                             tuple(self._source.examples(b) for b in selection.bases), selection.offsets,
                             selection.index)

    def fit_images(self, split: _ExampleSplit) -> np.ndarray:
        # Statistics of center crops of evenly spaced training examples.
        picks = np.linspace(0, len(split) - 1, min(len(split), _STANDARDIZE_FIT_EXAMPLES)).astype(int)
        return self._submit(split, picks, None).result()["image"]

    def normalize(self, split: _ExampleSplit, normalizer: preprocessing.Normalizer) -> _ExampleSplit:
        return dataclasses.replace(split, normalizer=normalizer)

    def submit_train(self, split: _ExampleSplit, indices: np.ndarray, step: int, rows: slice) -> _Pending:
        return self._submit(split, indices, order.example_seeds(self._config.seed, step, self._config.batch_size)[rows])

    def submit_eval(self, split: _ExampleSplit, indices: np.ndarray, with_raw: bool, crops: int = 1) -> _Pending:
        return self._submit(split, indices, None, crops)  # the raw images are the uint8 batch itself (see Pipeline)

    def _submit(self, split: _ExampleSplit, indices: np.ndarray, seeds: np.ndarray | None,
                crops: int = 1) -> _Pending:
        if self._pool is None:
            self._pool = workers_lib.DecodePool(self._workers)
        if any(examples.io_bound for examples in split.examples):
            reads = list(self._readers.map(split.read, indices))
        else:  # a lookup: handing it to threads would cost more than it does
            reads = [split.read(j) for j in indices]
        seeds = [None] * len(reads) if seeds is None else [int(s) for s in seeds]
        items = [(encoded, name, seed) for (encoded, _, name), seed in zip(reads, seeds)]
        spec = decode.CropSpec(self._size, self._channels, bool(self._config.augment.flip),
                               self._config.augment.eval_resize, self._eval_resize_mode, crops)
        labels = np.array([label for _, label, _ in reads], np.int32)
        pending = self._pool.submit(items, spec)
        return _Pending(lambda: {"image": pending.result(), "label": labels}, pending.cancel)

    def close(self) -> None:
        self._readers.shutdown(wait=False, cancel_futures=True)
        if self._pool is not None:
            self._pool.close()


def pixel_lookup(table: np.ndarray, images: jax.Array) -> jax.Array:
    """uint8 [..., C] -> float32 ``table[x, c]``: a normaliser's exact output (`Normalizer.pixel_table`), computed
    where the images already are, so the host decodes and transfers uint8 only (a quarter of the bytes)."""
    channels = table.shape[1]
    # A 1-D take from the flattened table: one index per element, where a two-index gather needs two.
    flat = images.astype(jnp.int32) * channels + jnp.arange(channels)
    return jnp.take(jnp.asarray(table.reshape(-1)), flat, mode="clip")  # in range by construction


# --------------------------------------------------------------------------------------------------------------


_LOOKAHEAD = 2  # host batches submitted to the decode pool ahead of the one being placed on the devices


def _ahead(pendings: Iterator[_Pending]) -> Iterator[dict[str, np.ndarray]]:
    """Results of ``pendings`` in order, keeping `_LOOKAHEAD` more submitted so that the pool never idles."""
    queued: collections.deque[_Pending] = collections.deque()
    try:
        for pending in pendings:
            queued.append(pending)
            if len(queued) > _LOOKAHEAD:
                yield queued.popleft().result()
        while queued:
            yield queued.popleft().result()
    finally:
        for pending in queued:
            pending.cancel()


class Pipeline:
    """Training and evaluation batches for ``config`` as global arrays with ``sharding`` (P('data')).

    Args:
      config: a training configuration (dataset, splits, preprocess, augment, batch sizes, seed).
      sharding: the batch sharding; its data axis must hold each process's devices contiguously.
      normalizer: use this normaliser (e.g. `load_normalizer` of a run's file) instead of fitting or loading
        one for ``config.train_split``; it must match ``config.preprocess`` and the image shape.
      train: False builds an evaluation-only pipeline that never opens ``config.train_split``: it needs
        ``normalizer`` when ``config.preprocess`` is fitted; ``steps_per_epoch`` and ``num_train_examples`` are
        None and ``train_batches`` is unavailable.
      cache: where decoded and normalised splits are kept (default: shared by every Pipeline of the process).
      workers: large images only: decode in this many worker processes, or with 0 in threads of this process
        (default: ``config.run.input_workers``). Batches do not depend on it.
    """

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        sharding: jax.sharding.NamedSharding,
        *,
        normalizer: preprocessing.Normalizer | None = None,
        train: bool = True,
        cache: Cache | None = None,
        workers: int | None = None,
    ):
        config_lib.validate(config)  # every field's value, before anything is read
        if normalizer is not None and normalizer.method != config.preprocess:
            raise ConfigError(
                f"the given normaliser is {normalizer.method!r} but config.preprocess={config.preprocess!r}; "
                "use the config the normaliser was fitted with"
            )
        if not train and normalizer is None and config.preprocess in preprocessing.FITTED:
            raise ValueError(f"Pipeline(train=False) with config.preprocess={config.preprocess!r} needs `normalizer`")
        self._config = config
        self._sharding = sharding
        self._cache = PROCESS_CACHE if cache is None else cache
        self._process_index, self._process_count = jax.process_index(), jax.process_count()
        if train:
            check_batch_layout(sharding, config.batch_size, "config.batch_size")
        check_batch_layout(sharding, config.run.eval_batch_size, "config.run.eval_batch_size")
        per_example = uses_per_example(config)
        source = sources.open_source(config, self._cache, encoded=per_example)
        if config.augment.random_resized_crop and not per_example:
            raise ConfigError(
                "config.augment.random_resized_crop is for large-image datasets (imagenet2012, image_folder); "
                f"use augment.translate / augment.flip for {config.dataset}"
            )
        if workers is None:
            workers = int(config.run.input_workers)
        self._path = _PerExample(config, source, workers) if per_example else _InMemory(config, source, self._cache)

        # Seconds spent in each setup stage (zero when served from the process cache), for the input benchmark.
        self.setup_seconds: dict[str, float] = {}
        start = time.perf_counter()
        # Without training, the eval split gives the image shape.
        split, field = (config.train_split, "config.train_split") if train else (config.eval_split, "config.eval_split")
        first = self._path.open(split, field)
        image_shape = self._path.image_shape
        self.setup_seconds["load"] = time.perf_counter() - start
        start = time.perf_counter()
        if normalizer is None:
            normalizer = self._fit_normalizer(first) if train else preprocessing.Normalizer(
                config.preprocess, gcn_scale=config.gcn_scale)
        else:
            normalizer.check_input(image_shape, "the given normaliser")
        self.normalizer = normalizer
        # Large images stay uint8 up to the devices, where this table normalises them (`device_normalize`).
        self._table = normalizer.pixel_table(image_shape[-1]) if per_example else None
        # The prefetch thread's normalisation (``normalize=True``) is `device_normalize`, compiled on its own.
        self._lookup = None if self._table is None else jax.jit(self.device_normalize, out_shardings=sharding)
        self.setup_seconds["fit"] = time.perf_counter() - start
        start = time.perf_counter()
        first = self._path.normalize(first, normalizer)
        self.setup_seconds["normalize"] = time.perf_counter() - start
        self._train = first if train else None
        self.steps_per_epoch: int | None = None
        if train:
            self.steps_per_epoch = len(first) // config.batch_size
            if self.steps_per_epoch == 0:
                raise ConfigError(
                    f"config.batch_size={config.batch_size} is larger than config.train_split={config.train_split!r} "
                    f"({len(first)} examples)"
                )
        start = time.perf_counter()
        num_eval = len(self._open_eval(config.eval_split)) if train else len(first)
        self.setup_seconds["eval_split"] = time.perf_counter() - start
        self.info = DatasetInfo(
            num_classes=len(source.class_names),
            image_shape=image_shape,
            num_train_examples=len(first) if train else None,
            num_eval_examples=num_eval,
            class_names=tuple(source.class_names),
        )

    # ---- public API

    def train_batches(self, start_step: int = 0, *, normalize: bool = True) -> Iterator[dict[str, jax.Array]]:
        """Infinite training batches from ``start_step`` on: {'image': f32 [B, H, W, C], 'label': i32 [B]}.

        ``normalize=False`` leaves large images uint8, for the consumer's compiled step to normalise with
        `device_normalize` (on a TPU or GPU the lookup then runs on the accelerator, fused into the step).
        """
        train = self._require_train()
        if start_step < 0:
            raise ValueError(f"start_step={start_step} must be >= 0")
        config = self._config
        rows = order.process_rows(config.batch_size, self._process_index, self._process_count)

        def host_batches() -> Iterator[dict[str, np.ndarray]]:
            step = start_step
            while True:
                indices = order.train_indices(
                    len(train), config.batch_size, step, config.seed,
                    process_index=self._process_index, process_count=self._process_count,
                )
                yield self._path.submit_train(train, indices, step, rows)
                step += 1

        return prefetch.prefetch(_ahead(host_batches()), self._sharding, config.batch_size,
                                 self._on_device(False, normalize))

    def eval_batches(self, split: str | None = None, *, with_raw: bool = False, normalize: bool = True,
                     crops: int = 1) -> Iterator[dict[str, jax.Array]]:
        """One pass over ``split`` (default config.eval_split), every example exactly once.

        Yields {'image', 'label', 'mask'} (+ 'raw' uint8 images if ``with_raw``); the last batch is padded
        with mask 0. ``normalize=False``: as in `train_batches`. ``crops=10`` (large images only): 'image' is
        [B, 10, H, W, C], each example's `decode.decode_eval_crops` (4 corners + center, and their flips).
        """
        if crops not in decode.EVAL_CROPS:
            raise ConfigError(f"crops={crops!r} must be one of {decode.EVAL_CROPS}")
        if crops != 1 and self._table is None:
            raise ConfigError(f"crops={crops} is for large images decoded per example; {self._config.dataset} "
                              "images are already the model's input size")
        opened = self._open_eval(split or self._config.eval_split)
        batch = self._config.run.eval_batch_size

        def host_batches() -> Iterator[dict[str, np.ndarray]]:
            for b in range(order.num_eval_batches(len(opened), batch)):
                indices, mask = order.eval_indices(
                    len(opened), batch, b, process_index=self._process_index, process_count=self._process_count
                )
                pending = self._path.submit_eval(opened, indices, with_raw, crops)
                yield _Pending(lambda pending=pending, mask=mask: {**pending.result(), "mask": mask}, pending.cancel)

        return prefetch.prefetch(_ahead(host_batches()), self._sharding, batch,
                                 self._on_device(with_raw, normalize))

    def num_examples(self, split: str, field: str = "config.eval_split") -> int:
        """The examples of evaluation split ``split`` (the value of config ``field``, named by a bad split's error)."""
        return len(self._open_eval(split, field))

    @property
    def transfer_dtype(self) -> type:
        """dtype of the images of batches taken with ``normalize=False``: uint8 for large images, else float32."""
        return np.float32 if self._table is None else np.uint8

    def device_normalize(self, images: jax.Array) -> jax.Array:
        """What batches taken with ``normalize=False`` still need: uint8 large images -> the normaliser's
        float32 output; images that arrive normalised pass unchanged. Traceable inside jit and shard_map."""
        if self._table is None or images.dtype != jnp.uint8:
            return images
        return pixel_lookup(self._table, images)

    def data_position(self, step: int) -> dict[str, int]:
        """Where training ``step`` reads: {'epoch': e, 'index_in_epoch': first example's position in the epoch}."""
        self._require_train()
        epoch, k = divmod(step, self.steps_per_epoch)
        return {"epoch": epoch, "index_in_epoch": k * self._config.batch_size}

    def close(self) -> None:
        """Stops the decode workers (large images); the Pipeline's batch iterators must be finished or closed."""
        self._path.close()

    # ---- helpers

    def _on_device(self, with_raw: bool,
                   normalize: bool) -> Callable[[dict[str, jax.Array]], dict[str, jax.Array]] | None:
        """Large images arrive as uint8: normalised on the devices if ``normalize``, kept as 'raw' if ``with_raw``."""
        if self._lookup is None or not (normalize or with_raw):
            return None
        lookup = self._lookup

        def finish(batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
            raw = {"raw": batch["image"]} if with_raw else {}
            return {**batch, "image": lookup(batch["image"]) if normalize else batch["image"], **raw}

        return finish

    def _require_train(self) -> Any:
        if self._train is None:
            raise ValueError("this Pipeline was built with train=False and has no training split")
        return self._train

    def _open_eval(self, split: str, field: str = "config.eval_split") -> Any:
        return self._path.normalize(self._path.open(split, field), self.normalizer)

    def _fit_normalizer(self, train: Any) -> preprocessing.Normalizer:
        config = self._config
        fit_key = {
            "dataset": config.dataset,
            "split": config.train_split,
            "num_examples": len(train),
            "image_shape": list(self._path.image_shape),
            "content": list(train.content),  # the files' sizes and times for image folders: edits refit
            "fit": self._path.fit_method,
        }
        memo_key = ("normalizer", config.preprocess, json.dumps(fit_key, sort_keys=True),
                    config.zca_filter_bias, config.gcn_scale)
        return self._cache.get(
            memo_key,
            lambda: preprocessing.fitted_normalizer(
                config.preprocess,
                lambda: self._path.fit_images(train),
                cache_key=fit_key,
                # Never the data folder, unless config.run.cache_dir names it.
                cache_dirs=[config.run.cache_dir or preprocessing.DEFAULT_CACHE_DIR],
                zca_filter_bias=config.zca_filter_bias,
                gcn_scale=config.gcn_scale,
            ),
        )
