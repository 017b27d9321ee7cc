"""Datasets behind one interface: split sizes, class names, and a base split as arrays or as encoded examples.

* ``digits``: scikit-learn's bundled 8x8 digits (offline). Splits come from a fixed seeded permutation of the
  1,797 images: ``train`` is the first 1,500, ``test`` the other 297.
* ``mnist``, ``cifar10``, ``cifar100``, ``svhn_cropped``, ``imagenet2012``: TFDS, read with ``tfds.data_source``
  (ArrayRecord random access) or, for small datasets prepared as TFRecord, read once with ``tfds.load``.
  Nothing is ever downloaded.
* ``image_folder``: ``<config.run.data_dir>/<split>/<class>/<image>`` listed by ``tfds.folder_dataset.ImageFolder``,
  which orders each split by a deterministic shuffle, so slices such as ``train[45000:]`` are class-mixed.

A source serves a base split either decoded (`Arrays`, for datasets that fit in memory) or as per-example
encoded reads (`Examples`, for large images). `select` turns a TFDS split string (``train[:45000]``,
``train[90%:]``, ``train+test``) into base splits and positions with TFDS's own ``ReadInstruction`` arithmetic.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
from collections.abc import Callable, Hashable, Sequence
from typing import Any, Protocol

import ml_collections
import numpy as np
from PIL import Image

from nin_jax.config import ConfigError
from nin_jax.data import decode
from nin_jax.data.cache import Cache

DATASETS = ("digits", "mnist", "cifar10", "cifar100", "svhn_cropped", "imagenet2012", "image_folder")
_DIGITS_SPLITS = {"train": 1500, "test": 297}


@dataclasses.dataclass(frozen=True)
class Arrays:
    """A decoded base split."""

    images: np.ndarray  # uint8 [N, H, W, C]
    labels: np.ndarray  # int32 [N]
    key: Hashable  # identifies the content (the cache key of normalised copies derives from it)


class Examples(Protocol):
    """Random access to a base split's encoded examples; picklable, so worker processes can read it."""

    io_bound: bool  # whether `read` waits on storage (then many reads should be in flight)

    def __len__(self) -> int: ...

    def read(self, i: int) -> tuple[bytes | str, int, str]:
        """(encoded bytes or a file path, label, name for messages) of example ``i``."""


@dataclasses.dataclass(frozen=True)
class FileExamples:
    io_bound = False  # `read` returns the path; the decoder reads the file
    paths: tuple[str, ...]
    labels: np.ndarray  # int32 [N]

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, i: int) -> tuple[str, int, str]:
        return self.paths[i], int(self.labels[i]), self.paths[i]


@dataclasses.dataclass(frozen=True)
class TfdsExamples:
    io_bound = True
    source: Any  # tfds.data_source with the image left encoded
    dataset: str
    split: str

    def __len__(self) -> int:
        return len(self.source)

    def read(self, i: int) -> tuple[bytes, int, str]:
        example = self.source[int(i)]
        name = example.get("file_name", f"{self.dataset}[{self.split}][{i}]")
        return example["image"], int(example["label"]), name.decode() if isinstance(name, bytes) else str(name)


class Source(Protocol):
    class_names: tuple[str, ...]

    def split_sizes(self, names: Sequence[str]) -> dict[str, int]:
        """Sizes of the base splits (at least those in ``names``)."""

    def arrays(self, split: str) -> Arrays:
        """A base split decoded into memory."""

    def examples(self, split: str) -> Examples:
        """A base split as per-example encoded reads."""


def location(data_dir: str | None) -> str | None:
    """``data_dir`` as an absolute local path (URLs such as gs:// unchanged), for cache keys."""
    if not data_dir or "://" in data_dir:
        return data_dir or None
    return os.path.abspath(os.path.expanduser(data_dir))


def map_threads(fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
    """``[fn(x) for x in items]`` on one thread per core (PIL and the ArrayRecord reader release the GIL)."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        return list(pool.map(fn, items))


class Digits:
    class_names = tuple(str(d) for d in range(10))

    def __init__(self, config: ml_collections.ConfigDict, cache: Cache):
        self._image_size = config.image_size
        self._cache = cache

    def split_sizes(self, names: Sequence[str]) -> dict[str, int]:
        return dict(_DIGITS_SPLITS)

    def arrays(self, split: str) -> Arrays:
        key = ("digits", split, self._image_size)
        return self._cache.get(key, lambda: self._load(split, key))

    def examples(self, split: str) -> Examples:
        raise NotImplementedError("digits are only served decoded")

    def _load(self, split: str, key: Hashable) -> Arrays:
        from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top

        digits = load_digits()
        order = np.random.default_rng(0).permutation(len(digits.images))  # fixed: defines the splits
        rows = order[: _DIGITS_SPLITS["train"]] if split == "train" else order[_DIGITS_SPLITS["train"] :]
        images = np.round(digits.images[rows] * (255.0 / 16.0)).astype(np.uint8)[..., None]
        return Arrays(decode.resize_all(images, self._image_size), digits.target[rows].astype(np.int32), key)


def _not_prepared_error(name: str, data_dir: str | None, error: Exception) -> ConfigError:
    where = data_dir or "~/tensorflow_datasets"
    return ConfigError(
        f"TFDS dataset {name!r} is not prepared in {where} (config.run.data_dir) and is never downloaded "
        f"implicitly ({type(error).__name__}: {error}). Prepare it on a machine with network access with "
        f"`tfds build {name} --data_dir={where} --file_format=array_record` (ImageNet also needs "
        f"--manual_dir=<dir with the ILSVRC2012 tars>), or train offline with config.dataset='image_folder' "
        f"(config.run.data_dir=<root>/<split>/<class>/<image>) or config.dataset='digits'."
    )


class Tfds:
    """A prepared TFDS dataset; ``encoded`` leaves images undecoded for per-example reads."""

    def __init__(self, config: ml_collections.ConfigDict, cache: Cache, *, encoded: bool):
        import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

        self._tfds = tfds
        self._name = config.dataset
        self._data_dir = config.run.data_dir
        self._image_size = config.image_size
        self._encoded = encoded
        self._cache = cache
        self._sources: dict[str, Any] = {}
        self.class_names = tuple(tfds.builder(self._name, data_dir=self._data_dir).info.features["label"].names)

    def _data_source(self, split: str) -> Any:
        """``tfds.data_source`` of a base split, or None when the dataset exists only as TFRecord."""
        if split not in self._sources:
            decoders = {"image": self._tfds.decode.SkipDecoding()} if self._encoded else None
            try:
                self._sources[split] = self._tfds.data_source(
                    self._name, split=split, data_dir=self._data_dir, download=False, decoders=decoders
                )
            except Exception as e:  # tfds raises several types here (NotImplementedError, AssertionError, ...)
                builder = self._tfds.builder(self._name, data_dir=self._data_dir)
                if not builder.is_prepared():
                    raise _not_prepared_error(self._name, self._data_dir, e) from e
                if self._encoded:
                    raise ConfigError(
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
            sizes[name] = len(source) if source is not None else len(self.arrays(name).labels)
        return sizes

    def arrays(self, split: str) -> Arrays:
        key = (self._name, location(self._data_dir), split, self._image_size)
        return self._cache.get(key, lambda: self._load(split, key))

    def examples(self, split: str) -> Examples:
        return TfdsExamples(self._data_source(split), self._name, split)

    def _load(self, split: str, key: Hashable) -> Arrays:
        source = self._data_source(split)
        if source is not None:
            examples = map_threads(lambda i: source[i], range(len(source)))
            images = np.stack([e["image"] for e in examples])
            labels = np.array([int(e["label"]) for e in examples], np.int32)
        else:  # prepared as TFRecord: read the whole split once through tf.data
            ds = self._tfds.load(self._name, split=split, data_dir=self._data_dir, download=False)
            chunks = list(self._tfds.as_numpy(ds.batch(4096)))
            images = np.concatenate([c["image"] for c in chunks])
            labels = np.concatenate([c["label"] for c in chunks]).astype(np.int32)
        return Arrays(decode.resize_all(images.astype(np.uint8), self._image_size), labels, key)


class ImageFolder:
    def __init__(self, config: ml_collections.ConfigDict, cache: Cache):
        root = config.run.data_dir
        if not root:
            raise ConfigError(
                "config.run.data_dir must be the image-folder root (<data_dir>/<split>/<class>/<image>) "
                "for config.dataset='image_folder'"
            )
        root = os.path.abspath(os.path.expanduser(root))
        if not os.path.isdir(root):
            raise ConfigError(f"config.run.data_dir={root} (image_folder root) does not exist")
        self._root = root
        self._image_size = config.image_size
        self._cache = cache
        self._examples, self.class_names = cache.get(("image_folder_listing", root), lambda: _list_folder(root))

    def split_sizes(self, names: Sequence[str]) -> dict[str, int]:
        return {name: len(examples) for name, examples in self._examples.items()}

    def arrays(self, split: str) -> Arrays:
        key = ("image_folder", self._root, split, self._image_size)
        return self._cache.get(key, lambda: self._decode_all(split, key))

    def examples(self, split: str) -> Examples:
        return self._examples[split]

    def _decode_all(self, split: str, key: Hashable) -> Arrays:
        examples = self._examples[split]
        paths, size = examples.paths, self._image_size
        try:
            with Image.open(paths[0]) as first:
                channels = 1 if first.mode in decode.GRAY_MODES else 3
                native = first.size
        except (OSError, SyntaxError, ValueError) as e:
            raise decode.decode_error(paths[0], e) from e
        images = map_threads(lambda p: decode.decode_full(p, p, channels, size), paths)
        for path, image in zip(paths, images):
            if image.shape != images[0].shape:
                raise ConfigError(
                    f"image {path} has shape {image.shape} but {paths[0]} has {images[0].shape} (native size "
                    f"{native}); set config.image_size to resize every image of the folder to one size"
                )
        return Arrays(np.stack(images), examples.labels, key)


def _list_folder(root: str) -> tuple[dict[str, FileExamples], tuple[str, ...]]:
    """{split: examples} and class names from TFDS ImageFolder, after checking for empty folders."""
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    builder = tfds.folder_dataset.ImageFolder(root)
    # ImageFolder silently skips split folders without class folders and keeps class folders without images.
    splits = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    if not splits:
        raise ConfigError(f"config.run.data_dir={root} holds no split folders; expected <data_dir>/<split>/<class>/<image>")
    # tfds exposes no public random-access listing; `_split_examples` is ImageFolder's own (shuffled) example list.
    split_examples = builder._split_examples  # pylint: disable=protected-access
    for split in splits:
        split_dir = os.path.join(root, split)
        classes = sorted(d for d in os.listdir(split_dir) if os.path.isdir(os.path.join(split_dir, d)))
        if not classes:
            raise ConfigError(f"split folder {split_dir} holds no class folders; expected {split_dir}/<class>/<image>")
        counts = {c: 0 for c in classes}
        for example in split_examples.get(split, []):
            counts[example.label] += 1
        for c, count in counts.items():
            if count == 0:
                raise ConfigError(
                    f"class folder {os.path.join(split_dir, c)} holds no .jpg/.jpeg/.png images; "
                    "add images or remove the folder"
                )
    label_feature = builder.info.features["label"]
    examples = {
        split: FileExamples(
            tuple(e.image_path for e in split_examples[split]),
            np.array([label_feature.str2int(e.label) for e in split_examples[split]], np.int32),
        )
        for split in splits
    }
    return examples, tuple(label_feature.names)


def open_source(config: ml_collections.ConfigDict, cache: Cache, *, encoded: bool) -> Source:
    """The source of ``config.dataset``; ``encoded``: serve large images per example rather than decoded."""
    if config.dataset not in DATASETS:
        raise ConfigError(f"config.dataset={config.dataset!r} is unknown; choose one of: {', '.join(DATASETS)}")
    if config.dataset == "digits":
        return Digits(config, cache)
    if config.dataset == "image_folder":
        return ImageFolder(config, cache)
    return Tfds(config, cache, encoded=encoded)


@dataclasses.dataclass(frozen=True)
class Selection:
    """A split string resolved against base splits: ``index`` are positions in the bases' concatenation."""

    bases: tuple[str, ...]
    offsets: np.ndarray  # start of each base in the concatenation
    index: np.ndarray  # int [N]


def resolve_split(split: str, sizes: dict[str, int], field: str = "split") -> list[tuple[str, np.ndarray]]:
    """TFDS split string -> [(base split, indices into it)], e.g. 'train[45000:]' -> [('train', 45000..N-1)]."""
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    infos = {name: tfds.core.SplitInfo(name=name, shard_lengths=[n], num_bytes=0) for name, n in sizes.items()}
    try:
        instructions = tfds.core.ReadInstruction.from_spec(split).to_absolute(infos)
    except (ValueError, AssertionError) as e:
        raise ConfigError(f"{field}={split!r} is invalid: {e} (available splits and sizes: {sizes})") from e
    return [(ins.splitname, np.arange(sizes[ins.splitname])[ins.from_ : ins.to]) for ins in instructions]


def select(source: Source, split: str, field: str) -> Selection:
    """Resolves ``split`` (the value of config ``field``) against ``source``'s base splits."""
    names = list(dict.fromkeys(part.split("[")[0].strip() for part in split.split("+")))
    sizes = source.split_sizes(names)
    parts = resolve_split(split, sizes, field)
    bases = tuple(dict.fromkeys(name for name, _ in parts))
    offsets = np.cumsum([0] + [sizes[b] for b in bases])
    index = np.concatenate([idx + offsets[bases.index(name)] for name, idx in parts])
    if len(index) == 0:
        raise ConfigError(f"{field}={split!r} selects no examples (split sizes: {sizes})")
    return Selection(bases, offsets[:-1], index)
