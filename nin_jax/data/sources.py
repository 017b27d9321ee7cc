"""Datasets behind one interface: split sizes, class names, and a base split as arrays or as encoded examples.

* ``digits``: scikit-learn's bundled 8x8 digits (offline). Splits come from a fixed seeded permutation of the
  1,797 images: ``train`` is the first 1,500, ``test`` the other 297.
* ``mnist``, ``cifar10``, ``cifar100``, ``svhn_cropped``, ``imagenet2012``: TFDS, read with ``tfds.data_source``
  (ArrayRecord random access) or, for small datasets prepared as TFRecord, read once with ``tfds.load``.
  Nothing is ever downloaded.
* ``image_folder``: ``<config.run.data_dir>/<split>/<class>/<image>`` in the order TFDS's ``ImageFolder`` gives
  (a deterministic shuffle per split, so slices such as ``train[45000:]`` are class-mixed); the rules for classes,
  channels, bit depth and what is not read are in docs/input.md.

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

from nin_jax.config import DATASETS, ConfigError
from nin_jax.data import decode
from nin_jax.data.cache import Cache

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
    channels: int  # of every split: images that differ are converted (image folders) or decoded to it

    def fingerprint(self, split: str) -> str:
        """Identifies the content of a base split (a key of the statistics fitted on it)."""

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
    channels = 1

    def __init__(self, config: ml_collections.ConfigDict, cache: Cache):
        self._image_size = config.image_size
        self._cache = cache

    def split_sizes(self, names: Sequence[str]) -> dict[str, int]:
        return dict(_DIGITS_SPLITS)

    def fingerprint(self, split: str) -> str:
        return f"digits:{split}"  # bundled with scikit-learn; the split is a fixed permutation

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
        info = tfds.builder(self._name, data_dir=self._data_dir).info
        self.class_names = tuple(info.features["label"].names)
        self.channels = int(info.features["image"].shape[-1] or 3)
        # A prepared TFDS dataset changes only with its version.
        self._content = f"tfds:{self._name}:{info.version}:{location(self._data_dir)}"

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

    def fingerprint(self, split: str) -> str:
        return f"{self._content}:{split}"

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


def open_source(config: ml_collections.ConfigDict, cache: Cache, *, encoded: bool) -> Source:
    """The source of ``config.dataset`` (one of `DATASETS`); ``encoded``: serve large images per example rather
    than decoded."""
    if config.dataset == "digits":
        return Digits(config, cache)
    if config.dataset == "image_folder":
        from nin_jax.data import folders  # pylint: disable=g-import-not-at-top  (it builds on this module)

        return folders.ImageFolder(config, cache)
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
