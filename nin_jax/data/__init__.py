"""The data layer: every dataset as global batches sharded over the data axis, in a topology-independent order.

    from nin_jax import data
    pipeline = data.Pipeline(config, sharding)
    batches = pipeline.train_batches(start_step)

Modules: `order` (which examples and augmentation each process reads at each step), `sources` (datasets
behind one interface), `folders` (image folders), `decode` (PIL decoding and crops), `transforms` (translate
+ flip), `preprocessing` (normalisers, fitted and cached), `cache` (the per-process memo), `workers` (the
decode pool of large images), `loader` (the Pipeline and its two paths: in memory and per example),
`prefetch` (background placement on the devices). See docs/input.md.
"""

from nin_jax.data.cache import PROCESS_CACHE, Cache
from nin_jax.data.loader import DatasetInfo, Pipeline, check_batch_layout, uses_per_example
from nin_jax.data.preprocessing import Normalizer, load_normalizer, save_normalizer
from nin_jax.data.sources import DATASETS


def clear_caches() -> None:
    """Drops decoded datasets, fitted normalizers and normalised arrays cached in this process."""
    PROCESS_CACHE.clear()


__all__ = [
    "DATASETS", "Cache", "DatasetInfo", "Normalizer", "Pipeline", "check_batch_layout", "clear_caches",
    "load_normalizer", "save_normalizer", "uses_per_example",
]
