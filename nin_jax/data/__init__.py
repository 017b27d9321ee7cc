from nin_jax.input_pipeline import DATASETS, DatasetInfo, Pipeline, clear_caches  # noqa: F401  (until nin_jax/data lands)
