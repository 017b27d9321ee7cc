"""Image folders, ``<root>/<split>/<class>/.../<image>``: listing, headers, and what the whole folder is.

The listing gives each split in the order TFDS's ``ImageFolder`` gives it (a deterministic shuffle, so slices
are class-mixed); every split must hold the same class folders. The channel count and bit depth are decided
from every image's header, so that train and eval splits have one shape (the rules: docs/input.md).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import json
import os
import random
import sys
from collections.abc import Hashable, Sequence

import jax
import ml_collections
import numpy as np

from nin_jax.config import ConfigError
from nin_jax.data import decode, preprocessing
from nin_jax.data.cache import Cache
from nin_jax.data.sources import Arrays, Examples, FileExamples, map_threads

class ImageFolder:
    """``<root>/<split>/<class>/.../<image>``: every split folder holds the same class folders; the channel count
    is one for the whole folder (3 if any image of any split is in colour), read from the images' headers."""

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
        self._cache_dirs = [config.run.cache_dir or preprocessing.DEFAULT_CACHE_DIR]
        # Listed on every open (a stat per file): files changed since the last Pipeline get new cache keys.
        self._listing = list_folder(root)
        self.class_names = self._listing.class_names
        headers_key = ("image_folder_headers", root, tuple(sorted(self._listing.fingerprints.items())))
        self._headers = cache.get(headers_key, self._read_headers)
        self.channels = _folder_channels(self._headers)

    def split_sizes(self, names: Sequence[str]) -> dict[str, int]:
        return {name: len(examples) for name, examples in self._listing.examples.items()}

    def fingerprint(self, split: str) -> str:
        return self._listing.fingerprints[split]

    def arrays(self, split: str) -> Arrays:
        key = ("image_folder", self.fingerprint(split), self._image_size, self.channels)
        return self._cache.get(key, lambda: self._decode_all(split, key))

    def examples(self, split: str) -> Examples:
        return self._listing.examples[split]

    def _read_headers(self) -> dict[str, _Headers]:
        """Every image's header, summarised per split; prints what is not read and what is converted (once per
        process and folder content)."""
        headers = {split: self._split_headers(split) for split in self._listing.examples}
        for line in _folder_notes(self._root, self._listing.unread, headers, _folder_channels(headers)):
            _note(line)
        return headers

    def _split_headers(self, split: str) -> _Headers:
        """The split's header summary, from the cache directory when these files were read before."""
        name = f"nin_jax_image_folder_headers_{self.fingerprint(split).split(':')[-1][:32]}.json"
        cached = preprocessing.cache_read(self._cache_dirs, name)
        if cached is not None:
            try:
                return _Headers.from_json(cached, self._root)
            except (ValueError, KeyError, TypeError):  # not a file this code wrote: read the headers again
                pass
        headers = _Headers.scan(self._listing.examples[split].paths)
        preprocessing.cache_write(self._cache_dirs, name, headers.to_json(self._root))
        return headers

    def _decode_all(self, split: str, key: Hashable) -> Arrays:
        examples, sizes = self._listing.examples[split], self._headers[split].sizes
        if self._image_size is None and len(sizes) > 1:
            (size, path), (other, other_path) = list(sizes.items())[:2]
            raise ConfigError(
                f"image {other_path} is {other[0]}x{other[1]} pixels but {path} is {size[0]}x{size[1]}; set "
                "config.image_size to resize every image of the folder to one size"
            )
        images = map_threads(lambda p: decode.decode_full(p, p, self.channels, self._image_size), examples.paths)
        return Arrays(np.stack(images), examples.labels, key)


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")  # what PIL and OpenCV both decode to the same pixels


def _note(line: str) -> None:
    """Prints a one-line note about the data, on the first process only (every process reads the same data)."""
    if jax.process_index() == 0:
        print(f"note: {line}", file=sys.stderr, flush=True)


@dataclasses.dataclass(frozen=True)
class _FolderListing:
    examples: dict[str, FileExamples]  # per split, in ImageFolder's deterministic shuffle
    class_names: tuple[str, ...]
    fingerprints: dict[str, str]  # per split: a digest of every image's path, size and modification time
    unread: tuple[str, ...]  # entries under the split folders that are not read (relative to the root)


def _images_under(directory: str, unread: list[str], seen: set[str]) -> list[tuple[str, os.stat_result]]:
    """(path, stat) of the images in ``directory`` and its subfolders; what is not an image goes to ``unread``."""
    real = os.path.realpath(directory)
    if real in seen:  # a symbolic link back to a folder already read
        unread.append(os.path.join(directory, ""))
        return []
    seen.add(real)
    found = []
    for entry in os.scandir(directory):
        if entry.name.startswith("."):
            unread.append(os.path.join(entry.path, "") if entry.is_dir() else entry.path)
        elif entry.is_dir():
            found += _images_under(entry.path, unread, seen)
        elif entry.is_file() and entry.name.lower().endswith(IMAGE_EXTENSIONS):
            found.append((entry.path, entry.stat()))
        else:
            unread.append(entry.path)
    return found


def _class_mismatch(root: str, classes: dict[str, list[str]]) -> ConfigError:
    every = sorted(set().union(*classes.values()))
    lacks = [f"{split}/ lacks {', '.join(c for c in every if c not in names)}"
             for split, names in classes.items() if len(names) < len(every)]
    lowered = collections.defaultdict(list)
    for name in every:
        lowered[name.lower()].append(name)
    same = [" vs ".join(names) for names in lowered.values() if len(names) > 1]
    case = f" (class names are case-sensitive: {'; '.join(same)})" if same else ""
    return ConfigError(
        f"the split folders of config.run.data_dir={root} hold different class folders: {'; '.join(lacks)}{case}. "
        "Every split must hold the same classes (labels are the sorted class names, so a class missing from "
        "training would be an untrained output); rename, move or remove these folders."
    )


def list_folder(root: str) -> _FolderListing:
    """The examples of every split, in the order TFDS's ``ImageFolder`` gives (classes sorted, each class's paths
    sorted, then ``random.Random(split)`` shuffles each split), with images in subfolders and .bmp/.webp read too."""
    # Files and hidden entries beside the split folders (a README, .git) cannot be examples: they are not listed.
    splits = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not splits:
        raise ConfigError(
            f"config.run.data_dir={root} holds no split folders; expected <data_dir>/<split>/<class>/<image>"
        )
    prefix = os.path.join(root, "")  # paths relative to the root are what follows it
    unread: list[str] = []  # folders end with a separator
    classes = {}
    for split in splits:
        split_dir = os.path.join(root, split)
        names = []
        for entry in sorted(os.scandir(split_dir), key=lambda e: e.name):
            if entry.is_dir() and not entry.name.startswith("."):
                names.append(entry.name)
            else:
                unread.append(os.path.join(entry.path, "") if entry.is_dir() else entry.path)
        if not names:
            raise ConfigError(f"split folder {split_dir} holds no class folders; expected {split_dir}/<class>/<image>")
        classes[split] = names
    if any(names != classes[splits[0]] for names in classes.values()):
        raise _class_mismatch(root, classes)
    class_names = tuple(classes[splits[0]])
    examples, fingerprints = {}, {}
    for split in splits:
        listed: list[tuple[str, int]] = []
        digest = hashlib.sha256()
        for label, name in enumerate(class_names):
            class_dir = os.path.join(root, split, name)
            found = sorted(_images_under(class_dir, unread, set()))
            if not found:
                raise ConfigError(
                    f"class folder {class_dir} holds no {'/'.join(IMAGE_EXTENSIONS)} images; add images or remove "
                    "the folder"
                )
            for path, stat in found:  # (slicing: os.path.relpath would cost more than the stat)
                digest.update(f"{path[len(prefix):]}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
            listed += [(path, label) for path, _ in found]
        random.Random(split).shuffle(listed)  # TFDS ImageFolder's shuffle: slices of a split are class-mixed
        examples[split] = FileExamples(tuple(p for p, _ in listed), np.array([label for _, label in listed], np.int32))
        fingerprints[split] = f"image_folder:{digest.hexdigest()}"
    return _FolderListing(examples, class_names, fingerprints, tuple(p[len(prefix):] for p in unread))


@dataclasses.dataclass(frozen=True)
class _Headers:
    """What the headers of a split's images say: per property (gray, colour, wide, alpha) the number of images
    with it and the first of them; the first two distinct sizes, each with its first image."""

    kinds: dict[str, tuple[int, str]]
    sizes: dict[tuple[int, int], str]

    @classmethod
    def scan(cls, paths: Sequence[str]) -> _Headers:
        """Reads every header (PIL parses it without decoding pixels), in chunks on the pool threads."""
        step = len(paths) // (4 * (os.cpu_count() or 1)) + 1
        parts = map_threads(cls._scan_chunk, [paths[i : i + step] for i in range(0, len(paths), step)])
        return functools.reduce(cls.merge, parts)

    @classmethod
    def _scan_chunk(cls, paths: Sequence[str]) -> _Headers:
        kinds: dict[str, list] = {}
        sizes: dict[tuple[int, int], str] = {}
        for path in paths:
            header = decode.read_header(path, path)
            for kind, present in (("gray", header.gray), ("colour", not header.gray), ("wide", header.wide),
                                  ("alpha", header.alpha)):
                if present:
                    kinds.setdefault(kind, [0, path])[0] += 1
            if len(sizes) < 2:
                sizes.setdefault(header.size, path)
        return cls({k: (n, first) for k, (n, first) in kinds.items()}, sizes)

    def merge(self, later: _Headers) -> _Headers:
        """These headers followed by ``later``'s."""
        kinds = dict(self.kinds)
        for kind, (n, first) in later.kinds.items():
            kinds[kind] = (kinds[kind][0] + n, kinds[kind][1]) if kind in kinds else (n, first)
        sizes = dict(self.sizes)
        for size, path in later.sizes.items():
            if len(sizes) < 2:
                sizes.setdefault(size, path)
        return _Headers(kinds, sizes)

    def count(self, kind: str) -> int:
        return self.kinds.get(kind, (0, ""))[0]

    def to_json(self, root: str) -> bytes:
        """Paths relative to ``root``, so that a moved copy of the folder (same fingerprint) names its own files."""
        return json.dumps({
            "kinds": {k: [n, os.path.relpath(p, root)] for k, (n, p) in self.kinds.items()},
            "sizes": [[w, h, os.path.relpath(p, root)] for (w, h), p in self.sizes.items()],
        }).encode()

    @classmethod
    def from_json(cls, payload: bytes, root: str) -> _Headers:
        blob = json.loads(payload)
        return cls({k: (int(n), os.path.join(root, p)) for k, (n, p) in blob["kinds"].items()},
                   {(int(w), int(h)): os.path.join(root, p) for w, h, p in blob["sizes"]})


def _folder_channels(headers: dict[str, _Headers]) -> int:
    """3 if any image of any split is in colour, else 1: one count for every split, and gray -> RGB loses nothing."""
    return 3 if any(h.count("colour") for h in headers.values()) else 1


# What decoding does to images with a header property: (one image, several images).
_CONVERSIONS = {
    "gray": ("grayscale image is repeated into RGB", "grayscale images are repeated into RGB"),
    "wide": ("16-bit image keeps the high byte of each sample", "16-bit images keep the high byte of each sample"),
    "alpha": ("image loses its alpha channel", "images lose their alpha channel"),
}


def _folder_notes(root: str, unread: Sequence[str], headers: dict[str, _Headers], channels: int) -> list[str]:
    """One line on the entries not read, one on the images converted, when there are any."""
    lines = []
    if unread:
        lines.append(
            f"image folder {root}: {len(unread)} entries are not read, e.g. {', '.join(unread[:3])} (read are "
            f"{'/'.join(IMAGE_EXTENSIONS)} files in <split>/<class>/ and its subfolders; hidden names are skipped)"
        )
    total = functools.reduce(_Headers.merge, headers.values())
    conversions = []
    for kind, (one, many) in _CONVERSIONS.items():
        if total.count(kind) and (kind != "gray" or channels == 3):
            n, first = total.kinds[kind]
            conversions.append(f"{n} {one if n == 1 else many} (e.g. {os.path.relpath(first, root)})")
    if conversions:
        lines.append(f"image folder {root} ({'1 channel' if channels == 1 else '3 channels'}): "
                     f"{'; '.join(conversions)}")
    return lines


