"""A trained run, restored for analysis from its workdir: predictions and class maps of any images.

    from nin_jax.tools import restore
    run = restore.load_run("gs://bucket/nin_cifar10", checkpoint="best")   # or "latest", or a step
    probs = run.predict(["cat.jpg", "ship.png"])        # float32 [2, num_classes]
    run.top_classes(probs, k=3)                          # [[("cat", 0.91), ("dog", 0.05), ...], ...]
    maps = run.class_maps(images)                        # float32 [N, h, w, num_classes]

`load_run` reads the config saved in the workdir (config.json), builds the model from it, and restores the
checkpoint's training state onto a mesh over this machine's devices, whatever topology the run was trained
on, verified against its digest as training verifies it (`nin_jax.runtime.recovery`); it keeps the
parameters and BatchNorm statistics. Images are uint8 HWC arrays or file paths of any size: they are resized or
center-cropped to the model's input as the run's evaluation path does, then normalised with the run's fitted
preprocessing.

Reading a checkpoint: `latest` falls back to the newest step that reads (with a one-line warning naming the
unreadable one); `best` or a step number that cannot be read raises `CheckpointError` naming the exact
`--checkpoint=` that would work, and so does a step whose parameters are not finite. Logits that are not
finite raise `ConfigError` instead of being returned. Nothing in the workdir is modified.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import math
import os
from typing import Any, Callable, Sequence

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from PIL import Image

from nin_jax import data, mesh as mesh_lib, models, train
from nin_jax.config import ConfigError
from nin_jax.cpu import layers as cpu_layers
from nin_jax.data import decode, run_record
from nin_jax.runtime import record, recovery, remote

CHECKPOINT_CHOICES = recovery.CHOICES
_GRAY_MODES = ("1", "L", "I", "I;16", "F")
ImageLike = Any  # a path (str / os.PathLike), or a uint8 array [H, W], [H, W, C]; or a uint8 batch [N, H, W, C]


# ------------------------------------------------------------------------------------------------ workdir


def load_saved_config(workdir: str, *, arch: str | None = None) -> ml_collections.ConfigDict:
    """The config.json a training run wrote in `workdir`; with `arch`, checks that it trained that arch."""
    remote.check_access(workdir, "--workdir")
    path = epath.Path(workdir) / "config.json"
    if not path.exists():
        raise ConfigError(
            f"{path} does not exist: --workdir={workdir} holds no training run "
            "(train first with `python -m nin_jax.main --config=... --workdir=...`)."
        )
    config = record.read_config(epath.Path(workdir))
    if arch is not None and arch != config.model.arch:
        raise ConfigError(
            f"--arch={arch} does not match the checkpoint in {workdir}, which was trained as "
            f"model.arch={config.model.arch!r} (config.json); drop --arch or pass --arch={config.model.arch}."
        )
    return config


def check_output_path(path: str, flag: str = "--out", *, directory: bool = False) -> None:
    """Raises ConfigError unless `path` (a file, or with `directory` a folder) can be written; creates parents.

    Called by the command-line tools before any work, so that a long computation never ends on a bad path.
    """
    remote.check_access(path, flag)
    target = epath.Path(path)
    folder = target if directory else target.parent
    if not directory and target.is_dir():
        raise ConfigError(f"{flag}={path} is a directory; pass a file path.")
    if directory and target.exists() and not target.is_dir():
        raise ConfigError(f"{flag}={path} is a file; pass a directory path.")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".nin_jax_write_test.{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"{flag}={path} is not writable ({type(e).__name__}: {e}); pass a path you can write to.") \
            from e


# ------------------------------------------------------------------------------------------ checkpoints


@flax.struct.dataclass
class InferenceState:
    """What evaluation reads of a TrainState (`train.eval_step` takes it in place of one)."""

    params: Any
    batch_stats: Any


def restore_variables(workdir: str, checkpoint: str, model: models.NIN, config: ml_collections.ConfigDict,
                      image_shape: Sequence[int], mesh: jax.sharding.Mesh, *,
                      warn: Callable[[str], None] | None = None) -> tuple[dict, int, str]:
    """The {"params", "batch_stats"} of checkpoint `checkpoint` (latest | best | a step) in `workdir` (their
    moving average when the run keeps one), restored replicated over `mesh` by `recovery.restore_readonly`;
    returns (variables, step, step directory)."""
    target = train.abstract_train_state(config, model, tuple(image_shape), None, mesh)
    state, step, path = recovery.restore_readonly(workdir, target, str(checkpoint), warn=warn,
                                                  best_metric=config.run.best_metric)
    return train.inference_variables(state), step, path


# --------------------------------------------------------------------------------------------- images


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """How the run turns a uint8 image into the model's input, and what the outputs mean."""

    normalizer: Any  # callable: uint8 [N, H, W, C] -> float32 model input; has .method, .stats, .gcn_scale
    image_shape: tuple[int, int, int]  # the model's input H, W, C
    class_names: tuple[str, ...]
    # How an image of another size becomes H x W: "resize" (the whole image, bilinear: in-memory datasets)
    # or "center_crop" (resized by `eval_resize_mode`, central H x W: per-example decoding, ImageNet).
    fit: str = "resize"
    eval_resize: int = 256
    # "center_crop" only: "short_side" (the short side to `eval_resize`, aspect kept) or "square" (warped to
    # eval_resize x eval_resize, Caffe's protocol); config.augment.eval_resize_mode, docs/evaluation.md.
    eval_resize_mode: str = "short_side"

    @classmethod
    def from_pipeline(cls, pipeline: Any, config: ml_collections.ConfigDict) -> "Preprocessing":
        return cls(
            normalizer=pipeline.normalizer,
            image_shape=tuple(int(d) for d in pipeline.info.image_shape),
            class_names=tuple(pipeline.info.class_names),
            fit="center_crop" if data.uses_per_example(config) else "resize",
            eval_resize=int(config.augment.eval_resize),
            eval_resize_mode=config.augment.eval_resize_mode,
        )

    @classmethod
    def from_record(cls, record: run_record.RunData) -> "Preprocessing":
        return cls(normalizer=record.normalizer, image_shape=record.image_shape, class_names=record.class_names,
                   fit="center_crop" if record.per_example else "resize", eval_resize=record.eval_resize,
                   eval_resize_mode=record.eval_resize_mode)

    def describe_fit(self) -> str:
        h, w, c = self.image_shape
        colour = "grayscale (PIL mode L)" if c == 1 else "RGB"
        if self.fit == "center_crop" and self.eval_resize_mode == "square":
            return (f"{colour}; the image warped to {self.eval_resize}x{self.eval_resize} and the central {h}x{w} "
                    "cropped (one resize of that box)")
        if self.fit == "center_crop":
            return (f"{colour}; the short side resized to {self.eval_resize} and the central {h}x{w} cropped "
                    "(one bilinear resize of that box)")
        return f"{colour}; the whole image resized to {h}x{w} (bilinear) unless it is already that size"


def _preprocessing(workdir: str, config: ml_collections.ConfigDict) -> Preprocessing:
    """The run's fitted normaliser, model input shape and class names: the one place they are obtained.

    From the record training wrote into the workdir (`data.run_record`); for a run older than that record,
    by rebuilding the data pipeline, which refits the normaliser from the (then required) training split.
    """
    record = run_record.load(workdir)
    if record is not None:
        return Preprocessing.from_record(record)
    mesh = jax.make_mesh((1,), (mesh_lib.DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=jax.local_devices()[:1])
    config = ml_collections.ConfigDict(config.to_dict())
    config.batch_size = config.run.eval_batch_size = max(jax.process_count(), 1)  # no batch is read here
    remote.check_access(config.run.data_dir, "config.run.data_dir")
    try:
        pipeline = data.Pipeline(config, mesh_lib.data_sharding(mesh))
    except (ValueError, FileNotFoundError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(
            f"cannot rebuild the preprocessing of the run: its normaliser is refitted from "
            f"config.train_split={config.train_split!r} of config.dataset={config.dataset!r} "
            f"(config.run.data_dir={config.run.data_dir!r}), which must be readable ({recovery.short_error(e)}); "
            "pass --data_dir if the data moved.") from e
    return Preprocessing.from_pipeline(pipeline, config)


def _as_pil(array: np.ndarray, name: str) -> Image.Image:
    array = np.asarray(array)
    if array.dtype != np.uint8:
        raise ConfigError(f"image {name} is an array of {array.dtype}; pass uint8 pixels (0-255).")
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ConfigError(f"image {name} has shape {array.shape}; pass [H, W], [H, W, 1], [H, W, 3] or [H, W, 4].")
    return Image.fromarray(array)


def _image_list(images: Any) -> list[Any]:
    if isinstance(images, (str, os.PathLike)):
        return [images]
    if isinstance(images, np.ndarray):
        if images.ndim == 4:
            return list(images)
        return [images]
    return list(images)


def check_image_file(image: str | os.PathLike) -> epath.Path:
    """`image` as a path, or ConfigError unless it names an existing file (not a directory)."""
    remote.check_access(image, "image")
    path = epath.Path(image)
    if not path.exists():
        raise ConfigError(f"image {image} does not exist.")
    if path.is_dir():
        raise ConfigError(f"image {image} is a directory; pass image files (e.g. {path / '*.jpg'}).")
    return path


def _read_image(image: str | os.PathLike) -> bytes:
    path = check_image_file(image)
    try:
        return path.read_bytes()
    except OSError as e:  # e.g. no permission to read it
        raise ConfigError(f"image {image} cannot be read ({type(e).__name__}: {e.strerror or e}); pass a file you "
                          "can read.") from e


def load_images(images: Any, prep: Preprocessing) -> np.ndarray:
    """uint8 [N, H, W, C] model-size images from paths or uint8 arrays of any size (see `Preprocessing.fit`),
    decoded and fitted by the data layer's own functions, as the run's evaluation does."""
    items = _image_list(images)
    if not items:
        raise ConfigError("no images given.")
    h, _, c = prep.image_shape
    out = []
    for i, item in enumerate(items):
        if isinstance(item, np.ndarray):
            buffer = io.BytesIO()
            _as_pil(item, f"#{i}").save(buffer, "PNG")  # lossless: the array's pixels, in the decoders' input form
            encoded, name = buffer.getvalue(), f"#{i}"
        else:
            encoded, name = _read_image(item), str(item)
        if prep.fit == "center_crop":
            out.append(decode.decode_crop(encoded, name, h, c, rng=None, flip=False, eval_resize=prep.eval_resize,
                                          eval_resize_mode=prep.eval_resize_mode))
        else:
            out.append(decode.decode_full(encoded, name, c, h))
    return np.stack(out)


# ------------------------------------------------------------------------------------------------ the run


@dataclasses.dataclass
class TrainedRun:
    """A run restored for inference: model, variables (replicated over `mesh`), preprocessing, class names."""

    workdir: str
    config: ml_collections.ConfigDict
    model: models.NIN
    variables: dict  # {"params": ..., "batch_stats": ... (BN only)}: what `model.apply` takes
    step: int
    checkpoint: str  # the step directory restored
    preprocessing: Preprocessing
    mesh: jax.sharding.Mesh

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.preprocessing.class_names

    @property
    def num_classes(self) -> int:
        return len(self.preprocessing.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.preprocessing.image_shape

    @property
    def state(self) -> InferenceState:
        """Parameters and BN statistics in the form `train.eval_step` reads."""
        return InferenceState(self.variables["params"], self.variables.get("batch_stats", {}))

    def load_images(self, images: Any) -> np.ndarray:
        """uint8 [N, H, W, C]: paths or uint8 arrays of any size, brought to the model's input size."""
        return load_images(images, self.preprocessing)

    def preprocess(self, images: Any) -> np.ndarray:
        """float32 [N, H, W, C] model inputs: `load_images`, then the run's normalisation.

        Every image goes through the evaluation's resize or crop: for a "resize" run a model-size image is
        unchanged; a "center_crop" run crops it like any other (use `forward` for inputs already prepared).
        """
        return np.asarray(self.preprocessing.normalizer(self.load_images(images)), np.float32)

    @functools.cached_property
    def _apply(self) -> Callable:
        repl, batch = mesh_lib.replicated(self.mesh), mesh_lib.data_sharding(self.mesh)

        def forward(variables, x):
            logits, maps = self.model.apply(variables, x, train=False, return_class_maps=True)
            logits = logits.astype(jnp.float32)
            return logits, jax.nn.softmax(logits, axis=-1), maps

        return jax.jit(forward, in_shardings=(repl, batch), out_shardings=repl)

    def forward(self, x: np.ndarray, *, batch_size: int | None = None) -> dict[str, np.ndarray]:
        """{"logits", "probabilities": [N, classes], "class_maps": [N, h, w, channels]} of float32 model inputs
        `x` [N, H, W, C] (already normalised), in batches of `batch_size` (default: config.run.eval_batch_size)."""
        x = np.asarray(x, np.float32)
        devices = self.mesh.size
        batch = _round_up(batch_size or self.config.run.eval_batch_size, devices)
        parts = []
        for start in range(0, len(x), batch):
            chunk = x[start:start + batch]
            n = len(chunk)
            padded = _round_up(n, devices)  # every device gets rows; the padding is dropped below
            if padded != n:
                chunk = np.concatenate([chunk, np.zeros((padded - n, *chunk.shape[1:]), chunk.dtype)])
            out = jax.device_get(self._apply(self.variables, chunk))
            parts.append([o[:n] for o in out])
        logits, probs, maps = (np.concatenate(p) for p in zip(*parts))
        bad = np.flatnonzero(~np.isfinite(logits).all(axis=-1))
        if bad.size:  # the variables are finite (checked at restore): the inputs or their normalisation overflow
            raise ConfigError(f"{self.checkpoint} gives NaN or infinite logits for {bad.size} of {len(x)} inputs "
                              f"(the first is input #{bad[0]}): its variables are finite, so those inputs or the "
                              f"run's normalisation ({run_record.PREPROCESSING_FILE}) are not; check them.")
        return {"logits": logits, "probabilities": probs, "class_maps": maps}

    def outputs(self, images: Any, *, batch_size: int | None = None) -> dict[str, np.ndarray]:
        """`forward` of `images` (paths or uint8 arrays of any size), plus "images": the uint8 model-size inputs."""
        raw = self.load_images(images)
        out = self.forward(self.preprocessing.normalizer(raw), batch_size=batch_size)
        return {**out, "images": raw}

    def logits(self, images: Any, *, batch_size: int | None = None) -> np.ndarray:
        """float32 [N, num_classes]."""
        return self.outputs(images, batch_size=batch_size)["logits"]

    def predict(self, images: Any, *, batch_size: int | None = None) -> np.ndarray:
        """Class probabilities, float32 [N, num_classes] (softmax of the logits)."""
        return self.outputs(images, batch_size=batch_size)["probabilities"]

    def class_maps(self, images: Any, *, batch_size: int | None = None) -> np.ndarray:
        """float32 [N, h, w, num_classes]: the last mlpconv layer's per-class maps (their means are the logits)."""
        maps = self.outputs(images, batch_size=batch_size)["class_maps"]
        self.check_class_maps(maps.shape[-1])
        return maps

    def check_class_maps(self, channels: int) -> None:
        if channels != self.num_classes:
            raise ConfigError(
                f"{self.workdir} trained model.head={self.config.model.head!r} with "
                f"model.fc_input={self.config.model.fc_input!r}: its last layer has {channels} channels, not one "
                f"map per class ({self.num_classes}); class maps need head='gap' or fc_input='class_maps'."
            )

    def top_classes(self, probabilities: np.ndarray, k: int = 5) -> list[list[tuple[str, float]]]:
        """Per row of `probabilities`: the `k` most probable (class name, probability), best first."""
        probabilities = np.asarray(probabilities)
        k = max(1, min(int(k), probabilities.shape[-1]))
        order = np.argsort(-probabilities, axis=-1, kind="stable")[:, :k]
        return [[(self.class_names[int(c)], float(row[c])) for c in idx] for row, idx in zip(probabilities, order)]


def _round_up(n: int, multiple: int) -> int:
    return int(math.ceil(n / multiple) * multiple)


def load_run(workdir: str, checkpoint: str | int = "latest", *, config: ml_collections.ConfigDict | None = None,
             arch: str | None = None, data_dir: str | None = None, mesh: jax.sharding.Mesh | None = None,
             preprocessing: Preprocessing | None = None,
             warn: Callable[[str], None] | None = None) -> TrainedRun:
    """Restores `checkpoint` (latest | best | a step) of the run in `workdir` (local or gs://) for inference.

    Args:
      config: replaces the saved config.json (default: that file).
      arch: expected `model.arch`; a run of another architecture raises ConfigError.
      data_dir: replaces the saved `config.run.data_dir` (the data moved).
      mesh: where the variables live (default: every local device; batches are split over them).
      preprocessing: the run's preprocessing, when the caller already has it (e.g. from its own pipeline).
      warn: receives the one-line warning when `latest` falls back to an older step (default: stderr).
    """
    config = load_saved_config(workdir, arch=arch) if config is None else ml_collections.ConfigDict(config.to_dict())
    if data_dir is not None:
        config.run.data_dir = data_dir
    if mesh is None:
        mesh = mesh_lib.create_mesh(jax.local_devices())
    prep = preprocessing or _preprocessing(workdir, config)
    bad = sorted(k for k, v in dict(prep.normalizer.stats).items() if not np.isfinite(np.asarray(v, float)).all())
    if bad:  # every output would be NaN
        raise ConfigError(f"the fitted preprocessing statistics {bad} of the run in --workdir={workdir} "
                          f"({run_record.PREPROCESSING_FILE}) hold NaN or infinite values; restore that file from a "
                          "copy of the run.")
    model = models.create_model(config.model, len(prep.class_names), dtype=train.compute_dtype(config),
                                layers=cpu_layers.model_layers(config.run.cpu_kernels))
    variables, step, path = restore_variables(workdir, str(checkpoint), model, config, prep.image_shape, mesh,
                                              warn=warn)
    return TrainedRun(str(workdir), config, model, variables, step, path, prep, mesh)
