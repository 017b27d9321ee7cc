"""Input pipeline: every dataset as a random-access source, batched into global sharded `jax.Array`s.

Sources (``config.dataset``):

* ``digits``: scikit-learn's bundled 8x8 digits (offline). Splits come from a fixed seeded permutation of the
  1,797 images: ``train`` is the first 1,500, ``test`` the other 297.
* ``mnist``, ``cifar10``, ``cifar100``, ``svhn_cropped``: TFDS, read with ``tfds.data_source`` (ArrayRecord random
  access) or, for datasets prepared as TFRecord, read once with ``tfds.load``.
* ``imagenet2012``: TFDS ArrayRecord only, decoded per example (never held in memory).
* ``image_folder``: ``<config.data_dir>/<split>/<class>/<image>`` listed by ``tfds.folder_dataset.ImageFolder``,
  which orders each split by a deterministic shuffle, so slices such as ``train[45000:]`` are class-mixed.

Split strings are TFDS split strings for every source (``train[:45000]``, ``train[90%:]``, ``train+test``):
each base split is materialised and sliced here with TFDS's own ``ReadInstruction`` arithmetic.

Small datasets are decoded once into uint8 arrays, normalised once (``nin_jax.preprocessing``) and kept in a
process-level cache, so the eval pass and later `Pipeline` objects reuse them; their augmentation (zero-padded
random translation + horizontal flip, after normalisation, like pylearn2's WindowAndFlip) is vectorised numpy.
Large-image datasets (ImageNet, or an image folder with ``augment.random_resized_crop``) are decoded per example
in a thread pool with an Inception-style random-resized crop + flip for training and resize + center crop for
evaluation.

Order and resumption. The training order is a pure function of ``(config.seed, step)``: epoch ``e`` uses a
permutation of the whole split drawn from ``(seed, e)``; global batch ``k`` of the epoch is rows
``[k*B, (k+1)*B)`` of it (the remainder is dropped, a different one each epoch); process ``p`` of ``P`` reads
only rows ``[p*B/P, (p+1)*B/P)`` of that global batch. Augmentation randomness for a global batch is drawn from
``(seed, step)`` and sliced the same way. Hence resuming from a checkpointed step is
``epoch, k = divmod(step, steps_per_epoch)`` with no replay and no iterator state to save, and the global
batch at a step does not depend on the number of processes or devices. A shuffle buffer or a stateful loader
would need its iterator state checkpointed and would change order with the topology.

Every batch is assembled in a background thread and placed on the devices ahead of use with
``jax.make_array_from_process_local_data`` (sharded over the mesh's data axis). Evaluation visits every
example exactly once: the last batch is padded and its padding carries ``mask == 0``.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import dataclasses
import functools
import io
import json
import math
import os
import queue
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from PIL import Image

from nin_jax import preprocessing

DATASETS = ("digits", "mnist", "cifar10", "cifar100", "svhn_cropped", "imagenet2012", "image_folder")
_TFDS_IN_MEMORY = ("mnist", "cifar10", "cifar100", "svhn_cropped")
_DIGITS_SPLITS = {"train": 1500, "test": 297}
_DEFAULT_CACHE_DIR = "~/.cache/nin_jax"
_DEFAULT_LARGE_IMAGE_SIZE = 224
_STANDARDIZE_FIT_EXAMPLES = 2000  # decoded examples used to fit per-channel stats of a large-image dataset
_GRAY_MODES = ("1", "L", "I", "I;16", "F")  # PIL modes decoded as one channel
_PREFETCH = 2  # batches assembled and placed on the devices ahead of the consumer
# Distinct random streams derived from config.seed.
_PERMUTATION_STREAM, _AUGMENT_STREAM = 0, 1


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    num_classes: int
    image_shape: tuple[int, int, int]  # model input H, W, C after preprocessing / cropping
    num_train_examples: int
    num_eval_examples: int
    class_names: tuple[str, ...]


# --------------------------------------------------------------------------------------------------------------
# Pure index logic (no I/O): which examples each process reads at each step.


def process_rows(global_batch: int, process_index: int, process_count: int) -> slice:
    """Rows of a global batch that process ``process_index`` of ``process_count`` reads."""
    if global_batch % process_count:
        raise ValueError(f"global batch {global_batch} is not divisible by the process count {process_count}")
    per_process = global_batch // process_count
    return slice(process_index * per_process, (process_index + 1) * per_process)


@functools.lru_cache(maxsize=4)
def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    """The (read-only) order of the training split in ``epoch``."""
    perm = np.random.default_rng([seed, _PERMUTATION_STREAM, epoch]).permutation(num_examples)
    perm.flags.writeable = False
    return perm


def train_indices(
    num_examples: int, global_batch: int, step: int, seed: int, *, process_index: int = 0, process_count: int = 1
) -> np.ndarray:
    """Split indices read by one process at training ``step`` (its rows of the global batch)."""
    steps_per_epoch = num_examples // global_batch
    if steps_per_epoch == 0:
        raise ValueError(f"global batch {global_batch} is larger than the split ({num_examples} examples)")
    epoch, k = divmod(step, steps_per_epoch)
    batch = epoch_permutation(num_examples, seed, epoch)[k * global_batch : (k + 1) * global_batch]
    return batch[process_rows(global_batch, process_index, process_count)]


def num_eval_batches(num_examples: int, global_batch: int) -> int:
    return -(-num_examples // global_batch)


def eval_indices(
    num_examples: int, global_batch: int, batch_index: int, *, process_index: int = 0, process_count: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """(indices, mask) read by one process for eval batch ``batch_index``; padding rows have mask 0."""
    positions = batch_index * global_batch + np.arange(global_batch)
    mask = positions < num_examples
    rows = process_rows(global_batch, process_index, process_count)
    # Padding rows point at example 0 so they can be read like any other; the mask removes them.
    return np.where(mask, positions, 0)[rows], mask[rows].astype(np.float32)


def augment_params(
    seed: int, step: int, global_batch: int, translate: int, flip: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Crop offsets (y, x) in [0, 2*translate] and flip flags for every row of a global batch."""
    rng = np.random.default_rng([seed, _AUGMENT_STREAM, step])
    offsets = rng.integers(0, 2 * translate + 1, size=(2, global_batch))
    flips = rng.random(global_batch) < 0.5 if flip else np.zeros(global_batch, bool)
    return offsets[0], offsets[1], flips


def translate_and_flip(
    images: np.ndarray, offset_y: np.ndarray, offset_x: np.ndarray, flip: np.ndarray, pad: int
) -> np.ndarray:
    """Zero-pads [N, H, W, C] by ``pad``, crops an HxW window at the offsets and mirrors flagged rows."""
    n, h, w, c = images.shape
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0))) if pad else images
    s = padded.strides
    # windows[i, y, x] is the HxW crop of image i at offset (y, x): a read-only view, so the gather below copies
    # one block per image (5x faster than indexing every pixel).
    windows = np.lib.stride_tricks.as_strided(
        padded, (n, 2 * pad + 1, 2 * pad + 1, h, w, c), (s[0], s[1], s[2], s[1], s[2], s[3]), writeable=False
    )
    out = windows[np.arange(n), offset_y, offset_x]
    out[flip] = out[flip, :, ::-1]
    return out


def resolve_split(split: str, sizes: dict[str, int], field: str = "split") -> list[tuple[str, np.ndarray]]:
    """TFDS split string -> [(base split, indices into it)], e.g. 'train[45000:]' -> [('train', 45000..N-1)]."""
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    infos = {name: tfds.core.SplitInfo(name=name, shard_lengths=[n], num_bytes=0) for name, n in sizes.items()}
    try:
        instructions = tfds.core.ReadInstruction.from_spec(split).to_absolute(infos)
    except (ValueError, AssertionError) as e:
        raise ValueError(f"{field}={split!r} is invalid: {e} (available splits and sizes: {sizes})") from e
    return [(ins.splitname, np.arange(sizes[ins.splitname])[ins.from_ : ins.to]) for ins in instructions]


def _base_split_names(split: str) -> list[str]:
    return list(dict.fromkeys(part.split("[")[0].strip() for part in split.split("+")))


# --------------------------------------------------------------------------------------------------------------
# Image decoding.


def _decode_error(name: str, error: Exception) -> ValueError:
    return ValueError(f"cannot decode image {name}: {error}. Remove or replace the file.")


def _open_image(encoded: bytes | str) -> Image.Image:
    return Image.open(encoded if isinstance(encoded, str) else io.BytesIO(encoded))


def _to_array(image: Image.Image, channels: int) -> np.ndarray:
    array = np.asarray(image.convert("L" if channels == 1 else "RGB"))
    return array[..., None] if channels == 1 else array


def _decode_full(encoded: bytes | str, name: str, channels: int, size: int | None) -> np.ndarray:
    """Decodes a whole image to uint8 HWC, resized to size x size when ``size`` is given."""
    try:
        with _open_image(encoded) as image:
            if size is not None and image.size != (size, size):
                image = image.convert("RGB" if channels == 3 else "L").resize((size, size), Image.BILINEAR)
            return _to_array(image, channels)
    except (OSError, SyntaxError, ValueError) as e:  # PIL's errors for unreadable / truncated files
        raise _decode_error(name, e) from e


def _random_resized_box(width: int, height: int, rng: np.random.Generator) -> tuple[float, float, float, float]:
    """Inception-style crop: area in [8%, 100%], aspect ratio in [3/4, 4/3] (torchvision's 10-try rule)."""
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(0.08, 1.0)
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        w, h = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            x0, y0 = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
            return x0, y0, x0 + w, y0 + h
    w, h = width, height  # fallback: the largest centred crop with a ratio inside the range
    if width / height < 3 / 4:
        h = round(width * 4 / 3)
    elif width / height > 4 / 3:
        w = round(height * 4 / 3)
    x0, y0 = (width - w) // 2, (height - h) // 2
    return x0, y0, x0 + w, y0 + h


def _center_box(width: int, height: int, size: int, resize: int) -> tuple[float, float, float, float]:
    """Box that 'resize the short side to ``resize``, then center-crop size x size' reads from the original."""
    side = min(width, height) * min(size / resize, 1.0)
    x0, y0 = (width - side) / 2, (height - side) / 2
    return x0, y0, x0 + side, y0 + side


def _decode_crop(
    encoded: bytes | str,
    name: str,
    size: int,
    channels: int,
    *,
    rng: np.random.Generator | None,
    flip: bool,
    eval_resize: int,
) -> np.ndarray:
    """Decodes one large image to uint8 [size, size, C]: random-resized crop (+flip) if ``rng``, else center crop."""
    try:
        with _open_image(encoded) as image:
            width, height = image.size
            if rng is not None:
                box = _random_resized_box(width, height, rng)
            else:
                box = _center_box(width, height, size, eval_resize)
            if image.format == "JPEG":
                # Let libjpeg decode at 1/2, 1/4 or 1/8 scale while the crop keeps at least `size` pixels.
                wanted = (math.ceil(width * size / (box[2] - box[0])), math.ceil(height * size / (box[3] - box[1])))
                image.draft("RGB", wanted)
                sx, sy = image.size[0] / width, image.size[1] / height
                box = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
            image = image.convert("L" if channels == 1 else "RGB").resize((size, size), Image.BILINEAR, box=box)
            array = _to_array(image, channels)
    except (OSError, SyntaxError, ValueError) as e:
        raise _decode_error(name, e) from e
    if rng is not None and flip and rng.random() < 0.5:
        array = array[:, ::-1]
    return array


# --------------------------------------------------------------------------------------------------------------
# Sources: a base split is either decoded in memory or read per example.


@dataclasses.dataclass
class _ArraySource:
    images: np.ndarray  # uint8 [N, H, W, C]
    labels: np.ndarray  # int32 [N]


@dataclasses.dataclass
class _EncodedSource:
    """Random access to encoded examples: ``read(i) -> (bytes or file path, label, name for messages)``."""

    read: Callable[[int], tuple[bytes | str, int, str]]


# Process-level caches, shared by every Pipeline of the process (the eval pass, repeated constructions).
_CACHE: dict[tuple, Any] = {}
_CACHE_LOCK = threading.Lock()


def clear_caches() -> None:
    """Drops decoded datasets, fitted normalizers and normalised arrays cached in this process."""
    with _CACHE_LOCK:
        _CACHE.clear()


def _cached(key: tuple, build: Callable[[], Any]) -> Any:
    with _CACHE_LOCK:
        if key in _CACHE:
            return _CACHE[key]
    value = build()  # outside the lock: decoding can take a while and may itself use the cache
    with _CACHE_LOCK:
        return _CACHE.setdefault(key, value)


def _map_parallel(fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        return list(pool.map(fn, items, chunksize=256))


def _resize_all(images: np.ndarray, size: int | None) -> np.ndarray:
    if size is None or images.shape[1:3] == (size, size):
        return images
    channels = images.shape[-1]
    return np.stack([_resize_array(image, size, channels) for image in images])


def _resize_array(image: np.ndarray, size: int, channels: int) -> np.ndarray:
    pil = Image.fromarray(image[..., 0] if channels == 1 else image).resize((size, size), Image.BILINEAR)
    return _to_array(pil, channels)


class _Digits:
    lazy = False
    class_names = tuple(str(d) for d in range(10))

    def __init__(self, config: ml_collections.ConfigDict):
        self._image_size = config.image_size

    def split_sizes(self, names: Sequence[str]) -> dict[str, int]:
        return dict(_DIGITS_SPLITS)

    def load(self, name: str) -> _ArraySource:
        return _cached(("digits", name, self._image_size), lambda: self._load(name))

    def _load(self, name: str) -> _ArraySource:
        from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top

        digits = load_digits()
        order = np.random.default_rng(0).permutation(len(digits.images))  # fixed: defines the splits
        rows = order[: _DIGITS_SPLITS["train"]] if name == "train" else order[_DIGITS_SPLITS["train"] :]
        images = np.round(digits.images[rows] * (255.0 / 16.0)).astype(np.uint8)[..., None]
        return _ArraySource(_resize_all(images, self._image_size), digits.target[rows].astype(np.int32))


def _not_prepared_error(name: str, data_dir: str | None, error: Exception) -> ValueError:
    where = data_dir or "~/tensorflow_datasets"
    return ValueError(
        f"TFDS dataset {name!r} is not prepared in {where} (config.data_dir) and is never downloaded "
        f"implicitly ({type(error).__name__}: {error}). Prepare it on a machine with network access with "
        f"`tfds build {name} --data_dir={where} --file_format=array_record` (ImageNet also needs "
        f"--manual_dir=<dir with the ILSVRC2012 tars>), or train offline with config.dataset='image_folder' "
        f"(config.data_dir=<root>/<split>/<class>/<image>) or config.dataset='digits'."
    )


class _Tfds:
    def __init__(self, config: ml_collections.ConfigDict):
        import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

        self._tfds = tfds
        self._name = config.dataset
        self._data_dir = config.data_dir
        self._image_size = config.image_size
        self.lazy = self._name == "imagenet2012"
        self._sources: dict[str, Any] = {}
        self.class_names = tuple(tfds.builder(self._name, data_dir=self._data_dir).info.features["label"].names)

    def _data_source(self, split: str) -> Any:
        """``tfds.data_source`` of a base split, or None when the dataset exists only as TFRecord."""
        if split not in self._sources:
            decoders = {"image": self._tfds.decode.SkipDecoding()} if self.lazy else None
            try:
                self._sources[split] = self._tfds.data_source(
                    self._name, split=split, data_dir=self._data_dir, download=False, decoders=decoders
                )
            except Exception as e:  # tfds raises several types here (NotImplementedError, AssertionError, ...)
                builder = self._tfds.builder(self._name, data_dir=self._data_dir)
                if not builder.is_prepared():
                    raise _not_prepared_error(self._name, self._data_dir, e) from e
                if self.lazy:
                    raise ValueError(
                        f"{self._name} in {builder.data_dir} is prepared as {builder.info.file_format}, but this "
                        f"pipeline needs random access: rebuild it with `tfds build {self._name} --manual_dir=<dir "
                        f"with the ILSVRC2012 tars> --data_dir={self._data_dir or '~/tensorflow_datasets'} "
                        "--file_format=array_record`."
                    ) from e
                self._sources[split] = None
        return self._sources[split]

    def split_sizes(self, names: Sequence[str]) -> dict[str, int]:
        sizes = {}
        for name in names:
            source = self._data_source(name)
            sizes[name] = len(source) if source is not None else len(self.load(name).labels)
        return sizes

    def load(self, name: str) -> _ArraySource | _EncodedSource:
        if self.lazy:
            source = self._data_source(name)

            def read(i: int) -> tuple[bytes, int, str]:
                example = source[int(i)]
                file_name = example.get("file_name", f"{self._name}[{name}][{i}]")
                file_name = file_name.decode() if isinstance(file_name, bytes) else str(file_name)
                return example["image"], int(example["label"]), file_name

            return _EncodedSource(read)
        key = (self._name, os.path.abspath(self._data_dir) if self._data_dir else None, name, self._image_size)
        return _cached(key, lambda: self._load_in_memory(name))

    def _load_in_memory(self, name: str) -> _ArraySource:
        source = self._data_source(name)
        if source is not None:
            examples = _map_parallel(lambda i: source[i], range(len(source)))
            images = np.stack([e["image"] for e in examples])
            labels = np.array([int(e["label"]) for e in examples], np.int32)
        else:  # prepared as TFRecord: read the whole split once through tf.data
            ds = self._tfds.load(self._name, split=name, data_dir=self._data_dir, download=False)
            chunks = list(self._tfds.as_numpy(ds.batch(4096)))
            images = np.concatenate([c["image"] for c in chunks])
            labels = np.concatenate([c["label"] for c in chunks]).astype(np.int32)
        return _ArraySource(_resize_all(images.astype(np.uint8), self._image_size), labels)


class _Folder:
    def __init__(self, config: ml_collections.ConfigDict):
        root = config.data_dir
        if not root:
            raise ValueError(
                "config.data_dir must be the image-folder root (<data_dir>/<split>/<class>/<image>) "
                "for config.dataset='image_folder'"
            )
        root = os.path.abspath(os.path.expanduser(root))
        if not os.path.isdir(root):
            raise FileNotFoundError(f"config.data_dir={root} (image_folder root) does not exist")
        self._root = root
        self._image_size = config.image_size
        self.lazy = bool(config.augment.random_resized_crop)
        self._examples, self.class_names = _cached(("image_folder_listing", root), lambda: _list_folder(root))

    def split_sizes(self, names: Sequence[str]) -> dict[str, int]:
        return {name: len(paths) for name, (paths, _) in self._examples.items()}

    def load(self, name: str) -> _ArraySource | _EncodedSource:
        paths, labels = self._examples[name]
        if self.lazy:
            return _EncodedSource(lambda i: (paths[i], int(labels[i]), paths[i]))
        return _cached(("image_folder", self._root, name, self._image_size), lambda: self._decode_all(name))

    def _decode_all(self, name: str) -> _ArraySource:
        paths, labels = self._examples[name]
        size = self._image_size
        try:
            with Image.open(paths[0]) as first:
                channels = 1 if first.mode in _GRAY_MODES else 3
                native = first.size
        except (OSError, SyntaxError, ValueError) as e:
            raise _decode_error(paths[0], e) from e
        images = _map_parallel(lambda p: _decode_full(p, p, channels, size), paths)
        for path, image in zip(paths, images):
            if image.shape != images[0].shape:
                raise ValueError(
                    f"image {path} has shape {image.shape} but {paths[0]} has {images[0].shape} (native size "
                    f"{native}); set config.image_size to resize every image of the folder to one size"
                )
        return _ArraySource(np.stack(images), labels)


def _list_folder(root: str) -> tuple[dict[str, tuple[list[str], np.ndarray]], tuple[str, ...]]:
    """{split: (paths, labels)} and class names from TFDS ImageFolder, after checking for empty folders."""
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    builder = tfds.folder_dataset.ImageFolder(root)
    # ImageFolder silently skips split folders without class folders and keeps class folders without images.
    splits = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    if not splits:
        raise ValueError(f"config.data_dir={root} holds no split folders; expected <data_dir>/<split>/<class>/<image>")
    # tfds exposes no public random-access listing; `_split_examples` is ImageFolder's own (shuffled) example list.
    split_examples = builder._split_examples  # pylint: disable=protected-access
    for split in splits:
        split_dir = os.path.join(root, split)
        classes = sorted(d for d in os.listdir(split_dir) if os.path.isdir(os.path.join(split_dir, d)))
        if not classes:
            raise ValueError(f"split folder {split_dir} holds no class folders; expected {split_dir}/<class>/<image>")
        counts = {c: 0 for c in classes}
        for example in split_examples.get(split, []):
            counts[example.label] += 1
        for c, count in counts.items():
            if count == 0:
                raise ValueError(
                    f"class folder {os.path.join(split_dir, c)} holds no .jpg/.jpeg/.png images; "
                    "add images or remove the folder"
                )
    label_feature = builder.info.features["label"]
    examples = {
        split: (
            [e.image_path for e in split_examples[split]],
            np.array([label_feature.str2int(e.label) for e in split_examples[split]], np.int32),
        )
        for split in splits
    }
    return examples, tuple(label_feature.names)


# --------------------------------------------------------------------------------------------------------------
# Selected splits.


@dataclasses.dataclass
class _InMemorySplit:
    raw: np.ndarray  # uint8 [M, H, W, C] base images (concatenated when the split spans several base splits)
    normalized: np.ndarray  # float32 [M, H, W, C]
    labels: np.ndarray  # int32 [M]
    index: np.ndarray  # [N] rows of the split in the arrays above

    def __len__(self) -> int:
        return len(self.index)


@dataclasses.dataclass
class _LazySplit:
    sources: list[_EncodedSource]
    offsets: np.ndarray  # start of each source in their concatenation
    index: np.ndarray  # [N] positions of the split in that concatenation

    def __len__(self) -> int:
        return len(self.index)

    def read(self, j: int) -> tuple[bytes | str, int, str]:
        position = int(self.index[j])
        s = int(np.searchsorted(self.offsets, position, side="right")) - 1
        return self.sources[s].read(position - int(self.offsets[s]))


def _open_dataset(config: ml_collections.ConfigDict) -> _Digits | _Tfds | _Folder:
    if config.dataset not in DATASETS:
        raise ValueError(f"config.dataset={config.dataset!r} is unknown; choose one of: {', '.join(DATASETS)}")
    if config.dataset == "digits":
        return _Digits(config)
    if config.dataset == "image_folder":
        return _Folder(config)
    return _Tfds(config)


def _num_data_shards(sharding: jax.sharding.NamedSharding) -> int:
    axes = sharding.spec[0] if len(sharding.spec) else None
    if axes is None:
        return 1
    axes = axes if isinstance(axes, tuple) else (axes,)
    return math.prod(sharding.mesh.shape[a] for a in axes)


# Live prefetch threads. They are daemons (an abandoned iterator must not block exit), so they are stopped and
# joined before the interpreter tears down: a thread killed inside XLA during finalisation aborts the process.
_PRODUCERS: set[tuple[threading.Event, threading.Thread]] = set()


@atexit.register
def _stop_producers() -> None:
    producers = list(_PRODUCERS)
    for stop, _ in producers:
        stop.set()
    for _, thread in producers:
        thread.join(timeout=30)


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


_END = object()


class Pipeline:
    """Training and evaluation batches for ``config`` as global arrays with ``sharding`` (P('data'))."""

    def __init__(self, config: ml_collections.ConfigDict, sharding: jax.sharding.NamedSharding):
        if config.preprocess not in preprocessing.PREPROCESS_CHOICES:
            raise ValueError(
                f"config.preprocess={config.preprocess!r} is unknown; choose one of {preprocessing.PREPROCESS_CHOICES}"
            )
        if not isinstance(config.seed, int) or config.seed < 0:
            raise ValueError(f"config.seed={config.seed!r} must be a non-negative integer")
        self._config = config
        self._sharding = sharding
        self._process_index, self._process_count = jax.process_index(), jax.process_count()
        for field in ("batch_size", "eval_batch_size"):
            self._check_batch(field, config[field])
        self._data = _open_dataset(config)
        self._lazy = self._data.lazy
        if config.augment.random_resized_crop and not self._lazy:
            raise ValueError(
                "config.augment.random_resized_crop is for large-image datasets (imagenet2012, image_folder); "
                f"use augment.translate / augment.flip for {config.dataset}"
            )
        if self._lazy and config.preprocess not in ("scale", "standardize"):
            raise ValueError(
                f"config.preprocess={config.preprocess!r} needs the whole dataset in memory; use 'standardize' or "
                f"'scale' for {config.dataset} with per-example decoding"
            )
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        # Seconds spent in each setup stage (zero when served from the process cache), for the input benchmark.
        self.setup_seconds: dict[str, float] = {}
        start = time.perf_counter()
        train_sources, train_offsets, train_index = self._select(config.train_split, "config.train_split")
        self.setup_seconds["load"] = time.perf_counter() - start
        if self._lazy:
            self._train = _LazySplit(train_sources, train_offsets, train_index)
            self._size = config.image_size or _DEFAULT_LARGE_IMAGE_SIZE
            self._channels = 3 if config.dataset == "imagenet2012" else self._first_image_channels()
            image_shape = (self._size, self._size, self._channels)
        else:
            image_shape = tuple(int(d) for d in train_sources[0].images.shape[1:])
        self._fit_key = {
            "dataset": config.dataset,
            "split": config.train_split,
            "num_examples": len(train_index),
            "image_shape": list(image_shape),
            "data_dir": os.path.abspath(os.path.expanduser(config.data_dir)) if config.data_dir else None,
        }
        start = time.perf_counter()
        self._normalizer = self._fit_normalizer(train_sources, train_index)
        self.setup_seconds["fit"] = time.perf_counter() - start
        start = time.perf_counter()
        if not self._lazy:
            self._train = self._in_memory(train_sources, train_index, "config.train_split")
        self.setup_seconds["normalize"] = time.perf_counter() - start
        self.steps_per_epoch = len(self._train) // config.batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"config.batch_size={config.batch_size} is larger than config.train_split={config.train_split!r} "
                f"({len(self._train)} examples)"
            )
        start = time.perf_counter()
        num_eval = len(self._open_eval(config.eval_split))
        self.setup_seconds["eval_split"] = time.perf_counter() - start
        self.info = DatasetInfo(
            num_classes=len(self._data.class_names),
            image_shape=image_shape,
            num_train_examples=len(self._train),
            num_eval_examples=num_eval,
            class_names=tuple(self._data.class_names),
        )

    # ---- public API

    def train_batches(self, start_step: int = 0) -> Iterator[dict[str, jax.Array]]:
        """Infinite training batches from ``start_step`` on: {'image': f32 [B, H, W, C], 'label': i32 [B]}."""
        if start_step < 0:
            raise ValueError(f"start_step={start_step} must be >= 0")

        def host_batches() -> Iterator[dict[str, np.ndarray]]:
            step = start_step
            while True:
                yield self._train_batch(step)
                step += 1

        return self._prefetch(host_batches(), self._config.batch_size)

    def eval_batches(self, split: str | None = None, *, with_raw: bool = False) -> Iterator[dict[str, jax.Array]]:
        """One pass over ``split`` (default config.eval_split), every example exactly once.

        Yields {'image', 'label', 'mask'} (+ 'raw' uint8 images if ``with_raw``); the last batch is padded
        with mask 0.
        """
        opened = self._open_eval(split or self._config.eval_split)
        batch = self._config.eval_batch_size

        def host_batches() -> Iterator[dict[str, np.ndarray]]:
            for b in range(num_eval_batches(len(opened), batch)):
                indices, mask = eval_indices(
                    len(opened), batch, b, process_index=self._process_index, process_count=self._process_count
                )
                yield {**self._eval_examples(opened, indices, with_raw), "mask": mask}

        return self._prefetch(host_batches(), batch)

    def data_position(self, step: int) -> dict[str, int]:
        """Where training ``step`` reads: {'epoch': e, 'index_in_epoch': first example's position in the epoch}."""
        epoch, k = divmod(step, self.steps_per_epoch)
        return {"epoch": epoch, "index_in_epoch": k * self._config.batch_size}

    # ---- batches

    def _train_batch(self, step: int) -> dict[str, np.ndarray]:
        config, split = self._config, self._train
        batch = config.batch_size
        indices = train_indices(
            len(split), batch, step, config.seed, process_index=self._process_index, process_count=self._process_count
        )
        rows = process_rows(batch, self._process_index, self._process_count)
        if self._lazy:
            seeds = np.random.default_rng([config.seed, _AUGMENT_STREAM, step]).integers(0, 2**63, size=batch)[rows]
            decoded = self._map(lambda args: self._decode_train(split, *args), list(zip(indices, seeds)))
            images = self._normalizer(np.stack([image for image, _ in decoded]))
            return {"image": images, "label": np.array([label for _, label in decoded], np.int32)}
        positions = split.index[indices]
        images = split.normalized[positions]
        translate, flip = config.augment.translate, config.augment.flip
        if translate or flip:
            offset_y, offset_x, flips = augment_params(config.seed, step, batch, translate, flip)
            images = translate_and_flip(images, offset_y[rows], offset_x[rows], flips[rows], translate)
        return {"image": images, "label": split.labels[positions]}

    def _eval_examples(
        self, split: _InMemorySplit | _LazySplit, indices: np.ndarray, with_raw: bool
    ) -> dict[str, np.ndarray]:
        if self._lazy:
            decoded = self._map(lambda j: self._decode_eval(split, j), list(indices))
            raw = np.stack([image for image, _ in decoded])
            out = {"image": self._normalizer(raw), "label": np.array([label for _, label in decoded], np.int32)}
        else:
            positions = split.index[indices]
            raw = split.raw[positions]
            out = {"image": split.normalized[positions], "label": split.labels[positions]}
        if with_raw:
            out["raw"] = raw
        return out

    def _decode_train(self, split: _LazySplit, j: int, seed: int) -> tuple[np.ndarray, int]:
        encoded, label, name = split.read(j)
        image = _decode_crop(
            encoded,
            name,
            self._size,
            self._channels,
            rng=np.random.default_rng(seed),
            flip=self._config.augment.flip,
            eval_resize=self._config.augment.eval_resize,
        )
        return image, label

    def _decode_eval(self, split: _LazySplit, j: int) -> tuple[np.ndarray, int]:
        encoded, label, name = split.read(j)
        image = _decode_crop(
            encoded, name, self._size, self._channels, rng=None, flip=False, eval_resize=self._config.augment.eval_resize
        )
        return image, label

    def _prefetch(self, host_batches: Iterator[dict[str, np.ndarray]], global_batch: int) -> Iterator[dict[str, jax.Array]]:
        """Runs ``host_batches`` in a background thread that also places each batch on the devices."""
        ready: queue.Queue = queue.Queue(maxsize=_PREFETCH)
        stop = threading.Event()

        def put(item: Any) -> bool:
            while not stop.is_set():
                try:
                    ready.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def produce() -> None:
            try:
                for batch in host_batches:
                    arrays = {
                        k: jax.make_array_from_process_local_data(self._sharding, v, (global_batch, *v.shape[1:]))
                        for k, v in batch.items()
                    }
                    if not put(arrays):
                        return
                put(_END)
            except BaseException as e:  # pylint: disable=broad-except  # re-raised in the consumer
                put(_Failure(e))
            finally:
                _PRODUCERS.discard((stop, threading.current_thread()))

        def consume() -> Iterator[dict[str, jax.Array]]:
            try:
                while True:
                    item = ready.get()
                    if item is _END:
                        return
                    if isinstance(item, _Failure):
                        raise item.error
                    yield item
            finally:
                stop.set()
                thread.join()  # the producer finishes its current batch, then sees `stop`

        thread = threading.Thread(target=produce, daemon=True, name="nin_jax-input")
        _PRODUCERS.add((stop, thread))
        thread.start()
        batches = consume()
        weakref.finalize(batches, stop.set)  # also stops the thread if the iterator is dropped unused
        return batches

    # ---- setup helpers

    def _check_batch(self, field: str, batch: int) -> None:
        shards = _num_data_shards(self._sharding)
        if batch <= 0 or batch % self._process_count or batch % shards:
            raise ValueError(
                f"config.{field}={batch} must be a positive multiple of the number of processes "
                f"({self._process_count}) and of the number of devices on the data axis ({shards})"
            )
        local = self._sharding.addressable_devices_indices_map((batch,))
        start = min(idx[0].start or 0 for idx in local.values())
        stop = max(batch if idx[0].stop is None else idx[0].stop for idx in local.values())
        expected = process_rows(batch, self._process_index, self._process_count)
        if (start, stop) != (expected.start, expected.stop):
            raise ValueError(
                f"the sharding gives process {self._process_index} rows [{start}, {stop}) of a batch of {batch}, "
                f"expected [{expected.start}, {expected.stop}); build the mesh with jax.make_mesh so that each "
                "process's devices are contiguous along the data axis"
            )

    def _select(self, split: str, field: str) -> tuple[list[Any], np.ndarray, np.ndarray]:
        """(base sources, their offsets in the concatenation, the split's positions in it) for a split string."""
        sizes = self._data.split_sizes(_base_split_names(split))
        parts = resolve_split(split, sizes, field)
        bases = list(dict.fromkeys(name for name, _ in parts))
        offsets = np.cumsum([0] + [sizes[b] for b in bases])
        index = np.concatenate([idx + offsets[bases.index(name)] for name, idx in parts])
        if len(index) == 0:
            raise ValueError(f"{field}={split!r} selects no examples (split sizes: {sizes})")
        return [self._data.load(b) for b in bases], offsets[:-1], index

    def _in_memory(self, sources: list[_ArraySource], index: np.ndarray, field: str) -> _InMemorySplit:
        normalized = [self._normalized(source) for source in sources]
        if len(sources) == 1:
            return _InMemorySplit(sources[0].images, normalized[0], sources[0].labels, index)
        if len({s.images.shape[1:] for s in sources}) > 1:
            raise ValueError(f"{field} combines splits with different image shapes; set config.image_size")
        return _InMemorySplit(
            np.concatenate([s.images for s in sources]),
            np.concatenate(normalized),
            np.concatenate([s.labels for s in sources]),
            index,
        )

    def _normalized(self, source: _ArraySource) -> np.ndarray:
        """float32 model inputs of a whole base split, computed once per process and normaliser."""
        config = self._config
        # Base sources stay in _CACHE until clear_caches(), which also drops this entry, so id() is unique here.
        key = ("normalized", id(source), config.preprocess, json.dumps(self._fit_key, sort_keys=True),
               config.zca_filter_bias, config.gcn_scale)

        def build() -> np.ndarray:
            starts = range(0, len(source.images), 2048)
            return np.concatenate(self._map(lambda s: self._normalizer(source.images[s : s + 2048]), starts))

        return _cached(key, build)

    def _fit_normalizer(self, sources: list[Any], index: np.ndarray) -> preprocessing.Normalizer:
        config = self._config

        def fit_images() -> np.ndarray:
            if not self._lazy:
                return self._in_memory_raw(sources, index)
            # Large images: statistics of center crops of evenly spaced training examples.
            picks = np.linspace(0, len(self._train) - 1, min(len(self._train), _STANDARDIZE_FIT_EXAMPLES)).astype(int)
            return np.stack([image for image, _ in self._map(lambda j: self._decode_eval(self._train, j), list(picks))])

        memo_key = ("normalizer", config.preprocess, json.dumps(self._fit_key, sort_keys=True),
                    config.zca_filter_bias, config.gcn_scale)
        return _cached(
            memo_key,
            lambda: preprocessing.fitted_normalizer(
                config.preprocess,
                fit_images,
                cache_key=self._fit_key,
                cache_dirs=[config.data_dir, config.cache_dir or _DEFAULT_CACHE_DIR],
                zca_filter_bias=config.zca_filter_bias,
                gcn_scale=config.gcn_scale,
            ),
        )

    @staticmethod
    def _in_memory_raw(sources: list[_ArraySource], index: np.ndarray) -> np.ndarray:
        if len(sources) == 1:
            return sources[0].images[index]
        return np.concatenate([s.images for s in sources])[index]

    def _open_eval(self, split: str) -> _InMemorySplit | _LazySplit:
        sources, offsets, index = self._select(split, "config.eval_split")
        if self._lazy:
            return _LazySplit(sources, offsets, index)
        return self._in_memory(sources, index, "config.eval_split")

    def _first_image_channels(self) -> int:
        encoded, _, name = self._train.read(0)
        try:
            with _open_image(encoded) as image:
                return 1 if image.mode in _GRAY_MODES else 3
        except (OSError, SyntaxError, ValueError) as e:
            raise _decode_error(name, e) from e

    def _map(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1)
        return list(self._pool.map(fn, items))
