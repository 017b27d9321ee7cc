"""Image normalisation, fitted on the training split and cached on disk.

Methods (``config.preprocess``):

* ``scale``: x / 255.
* ``standardize``: per-channel mean/std fitted on the training split.
* ``gcn_zca``: the paper's CIFAR preprocessing (Goodfellow et al.'s maxout scripts, pylearn2 semantics):
  global contrast normalisation per image (subtract the image mean, divide by the L2 norm, multiply by
  ``config.gcn_scale`` = 55), then ZCA whitening ``(x - mean) @ P`` with
  ``P = V diag(1/sqrt(eig + filter_bias)) V^T`` from the eigendecomposition of ``X^T X / N`` after per-feature
  mean subtraction (``config.zca_filter_bias`` = 0.1).
* ``gcn_lcn``: pylearn2's SVHN script: GCN with scale 1, then LeCun local contrast normalisation with a 7x7
  Gaussian (sigma 2) per channel. Both steps are per image, so nothing is fitted.

Fitted statistics (``standardize``, ``gcn_zca``) are computed once on the training split and stored as an
``.npz`` file in the cache directory, keyed by dataset, split, image shape, settings and the content of the data
(the caller's fingerprint); later runs load the file instead of refitting.
`save_normalizer` / `load_normalizer` write and read one normaliser as a file (local or ``gs://``), so a run
can keep the normaliser it trained with next to its checkpoints.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence

import numpy as np
from etils import epath
from scipy import ndimage

from nin_jax.config import ConfigError

# Methods whose statistics come from the training split (and are cached on disk).
FITTED = ("standardize", "gcn_zca")
_CACHE_VERSION = 1
DEFAULT_CACHE_DIR = "~/.cache/nin_jax"  # where fitted statistics and image-folder headers are kept by default


def global_contrast_normalize(x: np.ndarray, scale: float = 55.0, min_divisor: float = 1e-8) -> np.ndarray:
    """pylearn2 ``global_contrast_normalize``: per image, subtract its mean and divide by ||x|| / scale.

    Args:
      x: [N, ...] images of any numeric dtype.
    Returns:
      float32 array with the shape of ``x``.
    """
    flat = x.reshape(len(x), -1).astype(np.float32)
    flat -= flat.mean(axis=1, keepdims=True)
    norms = np.sqrt(np.square(flat).sum(axis=1, keepdims=True)) / scale
    norms[norms < min_divisor] = 1.0  # constant images stay zero instead of dividing by ~0
    return (flat / norms).reshape(x.shape)


def fit_zca(x: np.ndarray, filter_bias: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """pylearn2 ``ZCA.fit``: returns (mean [D], P [D, D]) for flattened rows ``x`` [N, D]."""
    x = x.reshape(len(x), -1)
    mean = x.mean(axis=0, dtype=np.float64)
    cov = np.zeros((x.shape[1], x.shape[1]), np.float64)
    # float32 GEMMs on chunks, accumulated in float64: fast and accurate enough for 3072 features.
    for start in range(0, len(x), 4096):
        chunk = (x[start : start + 4096] - mean).astype(np.float32)
        cov += chunk.T @ chunk
    cov /= len(x)
    eigs, eigv = np.linalg.eigh(cov + filter_bias * np.eye(len(cov)))
    whitening = (eigv * (1.0 / np.sqrt(eigs))) @ eigv.T
    return mean.astype(np.float32), whitening.astype(np.float32)


def _gaussian_1d(kernel_size: int, sigma: float = 2.0) -> np.ndarray:
    # pylearn2's 2-D gaussian_filter, normalised to sum 1, is the outer product of this 1-D kernel.
    offsets = np.arange(kernel_size) - kernel_size // 2
    kernel = np.exp(-np.square(offsets) / (2.0 * sigma**2))
    return (kernel / kernel.sum()).astype(np.float32)


def lecun_lcn(x: np.ndarray, kernel_size: int = 7, threshold: float = 1e-4) -> np.ndarray:
    """pylearn2 ``lecun_lcn`` applied to every channel of [N, H, W, C] images (zero-padded 'same' blur)."""
    x = x.astype(np.float32)
    kernel = _gaussian_1d(kernel_size)

    def blur(v: np.ndarray) -> np.ndarray:
        v = ndimage.correlate1d(v, kernel, axis=1, mode="constant")
        return ndimage.correlate1d(v, kernel, axis=2, mode="constant")

    centered = x - blur(x)
    # pylearn2 takes the local norm of x (not of the centred x), and never divides by less than the image's mean norm.
    denom = np.sqrt(blur(np.square(x)))
    per_image = denom.mean(axis=(1, 2), keepdims=True)
    return centered / np.maximum(np.maximum(per_image, denom), threshold)


@dataclasses.dataclass(frozen=True, eq=False)
class Normalizer:
    """Maps uint8 [N, H, W, C] images to the float32 model input."""

    method: str
    stats: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)
    gcn_scale: float = 55.0

    def __call__(self, images: np.ndarray) -> np.ndarray:
        if self.method == "scale":
            return images.astype(np.float32) / 255.0
        if self.method == "standardize":
            return (images.astype(np.float32) - self.stats["mean"]) / self.stats["std"]
        if self.method == "gcn_zca":
            flat = global_contrast_normalize(images, self.gcn_scale).reshape(len(images), -1)
            return ((flat - self.stats["mean"]) @ self.stats["whitening"]).reshape(images.shape)
        if self.method == "gcn_lcn":
            return lecun_lcn(global_contrast_normalize(images, scale=1.0))
        raise ValueError(f"unknown normalisation method {self.method!r}")

    def pixel_table(self, channels: int) -> np.ndarray | None:
        """float32 [256, channels]: the output for each uint8 value of each channel, for methods that map every
        pixel on its own (``scale``, ``standardize``); None for the per-image methods. Looking pixels up in this
        table gives exactly ``self(images)``, on any device."""
        if self.method not in ("scale", "standardize"):
            return None
        values = np.repeat(np.arange(256, dtype=np.uint8)[:, None, None, None], channels, axis=-1)
        return self(values).reshape(256, channels)

    @functools.cached_property
    def fingerprint(self) -> str:
        """Identifies the mapping by value (method, settings, statistics): a key for normalised arrays."""
        digest = hashlib.sha256(f"{self.method}:{float(self.gcn_scale)!r}".encode())
        for name in sorted(self.stats):
            stat = np.ascontiguousarray(self.stats[name])
            digest.update(f"{name}:{stat.dtype}:{stat.shape}".encode())
            digest.update(stat.tobytes())
        return digest.hexdigest()

    def check_input(self, image_shape: Sequence[int], source: str) -> None:
        """Raises ConfigError when images of ``image_shape`` do not fit the fitted statistics."""
        if self.method == "standardize":
            fitted = (int(self.stats["mean"].shape[-1]),)
            given = (int(image_shape[-1]),)
        elif self.method == "gcn_zca":
            fitted, given = (int(self.stats["mean"].size),), (int(np.prod(image_shape)),)
        else:
            return
        if fitted != given:
            raise ConfigError(
                f"the {self.method} normaliser from {source} was fitted on inputs of {fitted[0]} "
                f"{'channels' if self.method == 'standardize' else 'features'}, but config.dataset / "
                f"config.image_size give images of shape {tuple(image_shape)}; use the config it was fitted with."
            )


def fit_channel_stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std (float32 [C]) of uint8 [N, H, W, C] images."""
    flat = images.reshape(-1, images.shape[-1])
    total = np.zeros(flat.shape[1], np.float64)
    total_sq = np.zeros(flat.shape[1], np.float64)
    for start in range(0, len(flat), 1 << 20):  # chunked so the float copy stays small
        chunk = flat[start : start + (1 << 20)].astype(np.float64)
        total += chunk.sum(axis=0)
        total_sq += np.square(chunk).sum(axis=0)
    mean = total / len(flat)
    std = np.sqrt(np.maximum(total_sq / len(flat) - np.square(mean), 0.0))
    return mean.astype(np.float32), np.maximum(std, 1e-3).astype(np.float32)


def cache_file_name(method: str, key: Mapping[str, object]) -> str:
    """File name of the fitted statistics for ``key`` (dataset, split, image shape, settings, ...)."""
    blob = json.dumps({"version": _CACHE_VERSION, "method": method, **key}, sort_keys=True, default=str)
    digest = hashlib.sha256(blob.encode()).hexdigest()[:16]
    readable = "".join(c if c.isalnum() else "-" for c in f"{key.get('dataset', '')}_{key.get('split', '')}")
    return f"nin_jax_{method}_{readable}_{digest}.npz"


def _is_local(path: str | os.PathLike) -> bool:
    return "://" not in os.fspath(path)


def _local_writable(directory: str) -> bool:
    try:
        os.makedirs(directory, exist_ok=True)
        mode = os.stat(directory).st_mode
    except OSError:
        return False
    # A directory without any write bit is meant read-only even where root could write to it.
    return os.access(directory, os.W_OK) and bool(mode & 0o222)


def _npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _write(path: epath.Path, payload: bytes) -> None:
    """Writes ``payload`` so that concurrent readers never see a partial file."""
    if not _is_local(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(payload)  # object stores (gs://) publish an object only once it is complete
        return
    os.makedirs(path.parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide a shared file from other users
        os.replace(tmp, path)
    except BaseException:
        os.remove(tmp)
        raise


def _read_npz(payload: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(payload)) as data:
        return {k: data[k] for k in data.files}


def cache_read(cache_dirs: Sequence[str | None], name: str) -> bytes | None:
    """The file ``name`` from the first of ``cache_dirs`` (local or ``gs://``; None entries skipped) holding it."""
    for directory in cache_dirs:
        if directory:
            path = epath.Path(os.path.expanduser(directory) if _is_local(directory) else directory) / name
            if path.exists():
                return path.read_bytes()
    return None


def cache_write(cache_dirs: Sequence[str | None], name: str, payload: bytes) -> None:
    """Writes ``payload`` as ``name`` into the first writable of ``cache_dirs``; a cache that cannot be written is
    only slower, so failures pass over to the next directory."""
    for directory in cache_dirs:
        if not directory:
            continue
        if _is_local(directory):
            directory = os.path.expanduser(directory)
            if not _local_writable(directory):
                continue
        try:
            _write(epath.Path(directory) / name, payload)
            return
        except Exception:  # pylint: disable=broad-except  # e.g. a full disk or a read-only bucket: try the next
            continue


def save_normalizer(normalizer: Normalizer, path: str | os.PathLike) -> None:
    """Writes ``normalizer`` (method, settings, fitted statistics) to an ``.npz`` file, local or ``gs://``."""
    arrays = {f"stats/{k}": np.asarray(v) for k, v in normalizer.stats.items()}
    arrays.update(method=np.array(normalizer.method), gcn_scale=np.array(normalizer.gcn_scale, np.float64))
    _write(epath.Path(path), _npz_bytes(arrays))


def load_normalizer(path: str | os.PathLike) -> Normalizer:
    """Reads a normaliser written by `save_normalizer`."""
    path = epath.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no normaliser file {path}")
    arrays = _read_npz(path.read_bytes())
    stats = {k[len("stats/") :]: v for k, v in arrays.items() if k.startswith("stats/")}
    return Normalizer(str(arrays["method"]), stats, float(arrays["gcn_scale"]))


def _fit(method: str, images: np.ndarray, zca_filter_bias: float, gcn_scale: float) -> dict[str, np.ndarray]:
    if method == "standardize":
        mean, std = fit_channel_stats(images)
        return {"mean": mean, "std": std}
    mean, whitening = fit_zca(global_contrast_normalize(images, gcn_scale), zca_filter_bias)
    return {"mean": mean, "whitening": whitening}


def fitted_normalizer(
    method: str,
    fit_images: Callable[[], np.ndarray],
    *,
    cache_key: Mapping[str, object],
    cache_dirs: Sequence[str | None],
    zca_filter_bias: float = 0.1,
    gcn_scale: float = 55.0,
) -> Normalizer:
    """Returns the normalizer for ``method``, loading fitted statistics from the cache when present.

    Args:
      method: one of `config.PREPROCESS_CHOICES`.
      fit_images: returns the uint8 training images to fit on; only called on a cache miss.
      cache_key: identifies the fit (dataset, split, image shape, data location); settings are added here.
      cache_dirs: candidate directories (local or ``gs://``) in order of preference (``None`` entries are
        skipped). The file is looked up in all of them and written to the first writable one.
    """
    if method not in FITTED:
        return Normalizer(method, gcn_scale=gcn_scale)
    key = dict(cache_key)
    if method == "gcn_zca":
        key.update(zca_filter_bias=float(zca_filter_bias), gcn_scale=float(gcn_scale))
    name = cache_file_name(method, key)
    cached = cache_read(cache_dirs, name)
    if cached is not None:
        return Normalizer(method, _read_npz(cached), gcn_scale)
    stats = _fit(method, fit_images(), zca_filter_bias, gcn_scale)
    cache_write(cache_dirs, name, _npz_bytes(stats))
    return Normalizer(method, stats, gcn_scale)
