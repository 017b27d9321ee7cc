"""Normalisation: pylearn2 GCN / ZCA / LCN semantics, per-channel stats, and the on-disk cache of fitted statistics."""

import os

import numpy as np
import pytest
from scipy import signal

from nin_jax import config as config_lib
from nin_jax.config import ConfigError
from nin_jax.data import preprocessing


def _random_images(n=400, shape=(4, 4, 3), seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, *shape), dtype=np.uint8)


def test_gcn_zero_mean_and_norm_55():
    out = preprocessing.global_contrast_normalize(_random_images(10), scale=55.0)
    flat = out.reshape(10, -1)
    np.testing.assert_allclose(flat.mean(axis=1), 0.0, atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(flat, axis=1), 55.0, rtol=1e-5)
    constant = preprocessing.global_contrast_normalize(np.full((1, 4, 4, 3), 7, np.uint8))
    assert np.all(constant == 0.0)  # no division by a ~0 norm


def test_gcn_zca_whitens_fitted_data(tmp_path):
    images = _random_images()  # 400 x 48 features: a well-conditioned covariance
    normalizer = preprocessing.fitted_normalizer(
        "gcn_zca", lambda: images, cache_key={"dataset": "t"}, cache_dirs=[str(tmp_path)]
    )
    out = normalizer(images).reshape(len(images), -1)
    np.testing.assert_allclose(out.mean(axis=0), 0.0, atol=1e-3)
    eigs = np.linalg.eigvalsh(out.T @ out / len(out))
    # GCN removes each image's mean, so one direction has no variance; all others are whitened to ~1
    # (exactly eig / (eig + filter_bias) with eig ~ 55^2 / 48).
    assert eigs[0] < 1e-3
    np.testing.assert_allclose(eigs[1:], 1.0, atol=0.01)
    # Same as pylearn2's formula written out directly.
    x = preprocessing.global_contrast_normalize(images).reshape(len(images), -1).astype(np.float64)
    centered = x - x.mean(axis=0)
    e, v = np.linalg.eigh(centered.T @ centered / len(x) + 0.1 * np.eye(x.shape[1]))
    np.testing.assert_allclose(out, centered @ (v * (1 / np.sqrt(e))) @ v.T, atol=2e-3)


def test_fitted_statistics_are_cached_and_not_refitted(tmp_path, monkeypatch):
    calls = []
    real_fit = preprocessing.fit_zca
    monkeypatch.setattr(preprocessing, "fit_zca", lambda *a, **k: calls.append(1) or real_fit(*a, **k))
    images = _random_images()
    key = {"dataset": "t", "split": "train[:400]", "image_shape": [4, 4, 3]}
    first = preprocessing.fitted_normalizer("gcn_zca", lambda: images, cache_key=key, cache_dirs=[str(tmp_path)])
    files = os.listdir(tmp_path)
    assert len(files) == 1 and files[0].startswith("nin_jax_gcn_zca_") and files[0].endswith(".npz")

    def must_not_fit():
        raise AssertionError("fit_images called although the statistics are cached")

    second = preprocessing.fitted_normalizer("gcn_zca", must_not_fit, cache_key=key, cache_dirs=[str(tmp_path)])
    assert len(calls) == 1
    np.testing.assert_array_equal(first.stats["whitening"], second.stats["whitening"])
    # Other settings are another cache entry.
    preprocessing.fitted_normalizer(
        "gcn_zca", lambda: images, cache_key=key, cache_dirs=[str(tmp_path)], zca_filter_bias=0.5
    )
    assert len(calls) == 2 and len(os.listdir(tmp_path)) == 2


def test_read_only_data_dir_falls_back_to_cache_dir(tmp_path):
    data_dir, cache_dir = tmp_path / "data", tmp_path / "cache"
    data_dir.mkdir()
    data_dir.chmod(0o555)
    try:
        preprocessing.fitted_normalizer(
            "standardize", _random_images, cache_key={"dataset": "t"}, cache_dirs=[str(data_dir), None, str(cache_dir)]
        )
        assert os.listdir(data_dir) == []
        assert len(os.listdir(cache_dir)) == 1
    finally:
        data_dir.chmod(0o755)


def test_standardize_and_scale():
    images = _random_images(50, (5, 5, 3))
    normalizer = preprocessing.fitted_normalizer("standardize", lambda: images, cache_key={}, cache_dirs=[])
    out = normalizer(images)
    np.testing.assert_allclose(out.mean(axis=(0, 1, 2)), 0.0, atol=1e-4)
    np.testing.assert_allclose(out.std(axis=(0, 1, 2)), 1.0, atol=1e-4)
    scaled = preprocessing.Normalizer("scale")(images)
    assert scaled.dtype == np.float32 and scaled.max() <= 1.0 and np.allclose(scaled * 255, images)


def _pylearn2_lcn_channel(x, kernel_size=7, threshold=1e-4):
    """pylearn2 lecun_lcn for one [N, H, W] channel: 'full' convolutions cropped by kernel_size // 2."""
    mid = kernel_size // 2
    grid = np.arange(kernel_size) - mid
    g = np.exp(-(grid[:, None] ** 2 + grid[None, :] ** 2) / (2 * 2.0**2))
    g /= g.sum()
    out = []
    for img in x.astype(np.float64):
        mean = signal.convolve2d(img, g, mode="full")[mid:-mid, mid:-mid]
        denom = np.sqrt(signal.convolve2d(img**2, g, mode="full")[mid:-mid, mid:-mid])
        divisor = np.maximum(np.maximum(denom.mean(), denom), threshold)
        out.append((img - mean) / divisor)
    return np.stack(out)


def test_lecun_lcn_matches_pylearn2():
    x = np.random.default_rng(1).normal(size=(3, 12, 10, 2)).astype(np.float32)
    out = preprocessing.lecun_lcn(x)
    assert out.shape == x.shape and out.dtype == np.float32
    for c in range(2):
        np.testing.assert_allclose(out[..., c], _pylearn2_lcn_channel(x[..., c]), atol=1e-4)
    gcn_lcn = preprocessing.Normalizer("gcn_lcn")(_random_images(4, (12, 12, 3)))
    assert gcn_lcn.shape == (4, 12, 12, 3) and np.isfinite(gcn_lcn).all()


def test_an_unknown_method_is_refused_naming_the_field_and_the_methods():
    config = config_lib.get_config()
    config.preprocess = "pca"
    with pytest.raises(ConfigError, match="config.preprocess='pca' must be one of standardize, gcn_zca, gcn_lcn, scale"):
        config_lib.validate(config)


def test_normalizer_file_round_trip(tmp_path):
    images = _random_images()
    fitted = preprocessing.fitted_normalizer("gcn_zca", lambda: images, cache_key={}, cache_dirs=[], gcn_scale=20.0)
    path = tmp_path / "run" / "normalizer.npz"
    preprocessing.save_normalizer(fitted, path)
    loaded = preprocessing.load_normalizer(path)
    assert (loaded.method, loaded.gcn_scale) == ("gcn_zca", 20.0)
    np.testing.assert_array_equal(loaded(images), fitted(images))
    assert loaded.fingerprint == fitted.fingerprint
    assert preprocessing.Normalizer("gcn_zca", fitted.stats, 55.0).fingerprint != fitted.fingerprint
    with pytest.raises(FileNotFoundError, match="no normaliser file"):
        preprocessing.load_normalizer(tmp_path / "missing.npz")
