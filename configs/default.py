"""Every configuration field, with its default (defined once, in `nin_jax/config.py`).

    python -m nin_jax.main --config=configs/default.py --workdir=/tmp/nin_default

trains NIN-CIFAR10 on TFDS `cifar10` (prepared beforehand, see the README) with the modern recipe.
Prefer the dataset configs (`configs/cifar10.py`, ...), whose docstrings give expected results.
"""

from nin_jax.config import get_config  # noqa: F401
