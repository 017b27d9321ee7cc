"""Helpers for the data tests: small configs, an 8-device data sharding and tiny image folders."""

from __future__ import annotations

import os

import jax
import ml_collections
import numpy as np
from PIL import Image

from config_helpers import with_overrides


def make_config(tmp_path: os.PathLike, **overrides) -> ml_collections.ConfigDict:
    """configs/default.py with a small batch and the cache in ``tmp_path``; ``a__b=v`` sets ``config.a.b``."""
    from configs import default  # pylint: disable=g-import-not-at-top

    config = default.get_config()
    config.dataset = "digits"
    config.train_split = "train"
    config.eval_split = "test"
    config.preprocess = "standardize"
    config.run.cache_dir = str(tmp_path / "cache")
    config.batch_size = 64
    config.run.eval_batch_size = 64
    config.augment.translate = 0
    config.augment.flip = False
    return with_overrides(config, **overrides)


def data_sharding() -> jax.sharding.NamedSharding:
    mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    return jax.sharding.NamedSharding(mesh, jax.P("data"))


def write_image_folder(
    root: os.PathLike,
    splits: dict[str, int],
    classes: tuple[str, ...] = ("ant", "bee", "cat"),
    size: tuple[int, int] | None = (8, 8),
    seed: int = 0,
) -> str:
    """Writes ``root/<split>/<class>/<i>.png`` with ``splits[split]`` random RGB images per class.

    ``size=None`` gives every image a random size (as large-image datasets have).
    """
    rng = np.random.default_rng(seed)
    for split, per_class in splits.items():
        for name in classes:
            os.makedirs(os.path.join(root, split, name), exist_ok=True)
            for i in range(per_class):
                h, w = size if size else rng.integers(12, 40, size=2)
                pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(os.path.join(root, split, name, f"{i}.png"))
    return str(root)
