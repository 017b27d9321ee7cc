"""What a run keeps of its data in the workdir, so that it can be evaluated and used without the dataset.

Training writes, at its first start, `preprocessing.npz` (the fitted normaliser: per-channel statistics or
the GCN+ZCA matrix) and `dataset.json` (class names, model input shape, how evaluation fits an image to it:
`per_example`, `eval_resize` and `eval_resize_mode`, which a record older than that field lacks: short_side).
A resumed run normalises with the saved statistics instead of refitting them, and evaluation, prediction,
analysis and export read both files instead of the training split.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence

import ml_collections
from etils import epath

from nin_jax.data import loader, preprocessing

PREPROCESSING_FILE = "preprocessing.npz"
DATASET_FILE = "dataset.json"


@dataclasses.dataclass(frozen=True)
class RunData:
    normalizer: preprocessing.Normalizer
    class_names: tuple[str, ...]
    image_shape: tuple[int, int, int]  # the model input (H, W, C)
    per_example: bool  # large images fitted by resize + center crop (else resized whole)
    eval_resize: int  # the short side (or the square's side) before the center crop, when `per_example`
    # config.augment.eval_resize_mode: short_side | square; records written before it existed are short_side.
    eval_resize_mode: str = "short_side"


def save(workdir: str | epath.Path, normalizer: preprocessing.Normalizer, class_names: Sequence[str],
         image_shape: Sequence[int], config: ml_collections.ConfigDict) -> None:
    """Writes the run's data record into `workdir` (call on one process): its normaliser, class names and model
    input shape (a `Pipeline`'s `normalizer` and `info`), and how `config` fits an image to that input."""
    workdir = epath.Path(workdir)
    preprocessing.save_normalizer(normalizer, workdir / PREPROCESSING_FILE)
    (workdir / DATASET_FILE).write_text(json.dumps({
        "dataset": config.dataset, "class_names": list(class_names), "image_shape": list(image_shape),
        "per_example": loader.uses_per_example(config), "eval_resize": int(config.augment.eval_resize),
        "eval_resize_mode": config.augment.eval_resize_mode,
    }, indent=1))


def load(workdir: str | epath.Path) -> RunData | None:
    """The record `save` wrote, or None for a workdir without one (a run that has not started)."""
    workdir = epath.Path(workdir)
    if not ((workdir / PREPROCESSING_FILE).exists() and (workdir / DATASET_FILE).exists()):
        return None
    meta = json.loads((workdir / DATASET_FILE).read_text())
    return RunData(
        normalizer=preprocessing.load_normalizer(workdir / PREPROCESSING_FILE),
        class_names=tuple(meta["class_names"]), image_shape=tuple(meta["image_shape"]),
        per_example=bool(meta["per_example"]), eval_resize=int(meta["eval_resize"]),
        eval_resize_mode=str(meta.get("eval_resize_mode", "short_side")),
    )
