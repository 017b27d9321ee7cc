"""Configs for tests: one way to override fields, and `config.model` of a preset."""

from __future__ import annotations

from typing import Any

import ml_collections

from nin_jax.config import get_config


def with_overrides(config: ml_collections.ConfigDict, **changes: Any) -> ml_collections.ConfigDict:
    """`config` with fields set by keyword; `a__b=v` sets `config.a.b` (names a dotted field, which must exist)."""
    config.lock()  # a misspelled field raises instead of adding one
    config.update_from_flattened_dict({k.replace("__", "."): v for k, v in changes.items()})
    config.unlock()
    return config


def model_config(arch: str, **overrides: Any) -> ml_collections.ConfigDict:
    """The default `config.model` for preset `arch`, with `overrides` (field=value)."""
    return with_overrides(get_config().model, arch=arch, **overrides)
