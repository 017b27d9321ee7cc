"""Exports a trained run for serving: `python -m nin_jax.export --workdir=W --out=DIR [--saved_model]`.

Writes into DIR:

* `model.jax_export`: a serialized `jax.export.Exported` (StableHLO with the weights embedded) of
  `serve(images) -> {"logits", "probabilities"}`, where `images` is uint8 [b, H, W, C] with a symbolic batch
  size `b` and the run's normalisation (its fitted statistics included) is part of the function. Lowered
  for CPU, CUDA and TPU by default (`--platforms`). Load it anywhere jax runs, without nin_jax:
  `jax.export.deserialize(bytearray(open(path, "rb").read())).call(images)`.
* `saved_model/` (with `--saved_model`): the same function as a TensorFlow SavedModel (jax2tf), signature
  `serving_default(images: uint8 [None, H, W, C]) -> {"logits", "probabilities"}`.
* `export.json` and `README.md`: inputs (shape, dtype, channel order, how to resize an image to H x W),
  outputs, class names, the run and checkpoint exported.

Resizing and cropping are not in the artifact (their input size varies): bring images to H x W as
`export.json`'s "resize" says (what the run's evaluation did) before calling it.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from nin_jax import models
from nin_jax.config import ConfigError
from nin_jax.cpu import hostenv
from nin_jax.tools import restore

DEFAULT_PLATFORMS = ("cpu", "cuda", "tpu")
ARTIFACT = "model.jax_export"
SAVED_MODEL = "saved_model"
LCN_KERNEL_SIZE, LCN_SIGMA, LCN_THRESHOLD = 7, 2.0, 1e-4  # nin_jax's gcn_lcn (pylearn2's SVHN settings)


def _gcn(x: jax.Array, scale: float, min_divisor: float = 1e-8) -> jax.Array:
    """pylearn2 global contrast normalisation per image, as the run's numpy normaliser computes it."""
    flat = x.reshape(x.shape[0], -1)
    flat = flat - flat.mean(axis=1, keepdims=True)
    norms = jnp.sqrt(jnp.square(flat).sum(axis=1, keepdims=True)) / scale
    norms = jnp.where(norms < min_divisor, 1.0, norms)
    return (flat / norms).reshape(x.shape)


def _lcn(x: jax.Array) -> jax.Array:
    """LeCun local contrast normalisation per channel with a 7x7 Gaussian (sigma 2), zero-padded 'same'."""
    offsets = np.arange(LCN_KERNEL_SIZE) - LCN_KERNEL_SIZE // 2
    kernel = np.exp(-np.square(offsets) / (2.0 * LCN_SIGMA**2))
    kernel = (kernel / kernel.sum()).astype(np.float32)
    pad = LCN_KERNEL_SIZE // 2

    def blur(v):
        h, w = v.shape[1:3]
        v = jnp.pad(v, ((0, 0), (pad, pad), (0, 0), (0, 0)))
        v = sum(float(k) * v[:, i:i + h] for i, k in enumerate(kernel))
        v = jnp.pad(v, ((0, 0), (0, 0), (pad, pad), (0, 0)))
        return sum(float(k) * v[:, :, i:i + w] for i, k in enumerate(kernel))

    centered = x - blur(x)
    denom = jnp.sqrt(blur(jnp.square(x)))
    per_image = denom.mean(axis=(1, 2), keepdims=True)
    return centered / jnp.maximum(jnp.maximum(per_image, denom), LCN_THRESHOLD)


def jnp_normalizer(normalizer: Any) -> Callable[[jax.Array], jax.Array]:
    """The run's normaliser (`method`, fitted `stats`, `gcn_scale`) as a jax function of uint8 [N, H, W, C]."""
    method, stats = normalizer.method, {k: np.asarray(v, np.float32) for k, v in dict(normalizer.stats).items()}
    gcn_scale = float(normalizer.gcn_scale)

    def normalize(images: jax.Array) -> jax.Array:
        x = images.astype(jnp.float32)
        if method == "scale":
            return x / 255.0
        if method == "standardize":
            return (x - stats["mean"]) / stats["std"]
        if method == "gcn_zca":
            flat = _gcn(x, gcn_scale).reshape(x.shape[0], -1)
            return ((flat - stats["mean"]) @ stats["whitening"]).reshape(x.shape)
        if method == "gcn_lcn":
            return _lcn(_gcn(x, 1.0))
        raise ConfigError(f"config.preprocess={method!r} cannot be exported (no jax form).")

    return normalize


def serving_function(run: restore.TrainedRun) -> Callable[[jax.Array], dict[str, jax.Array]]:
    """uint8 [b, H, W, C] -> {"logits", "probabilities"} (float32 [b, classes]), weights as constants.

    Built from flax's own layers (`models.Layers()`, whatever the run trained with), so the program runs on any
    backend.
    """
    model = run.model.clone(layers=models.Layers())
    variables = jax.tree.map(np.asarray, jax.device_get(run.variables))
    normalize = jnp_normalizer(run.preprocessing.normalizer)

    def serve(images: jax.Array) -> dict[str, jax.Array]:
        logits = model.apply(variables, normalize(images), train=False).astype(jnp.float32)
        return {"logits": logits, "probabilities": jax.nn.softmax(logits, axis=-1)}

    return serve


def _description(run: restore.TrainedRun, platforms: Sequence[str], saved_model: bool) -> dict[str, Any]:
    h, w, c = run.image_shape
    prep = run.preprocessing
    return {
        "format": {"jax_export": ARTIFACT, "saved_model": SAVED_MODEL if saved_model else None,
                   "platforms": list(platforms), "jax_version": jax.__version__},
        "input": {
            "name": "images", "dtype": "uint8", "shape": [None, h, w, c], "layout": "NHWC (batch, height, width, "
            "channels)", "channels": "grayscale (PIL mode L: 0.299 R + 0.587 G + 0.114 B)" if c == 1 else "RGB",
            "value_range": [0, 255], "resize": prep.describe_fit(),
            "normalization": f"{prep.normalizer.method} (inside the model; its fitted statistics are embedded)",
        },
        "outputs": {
            "logits": {"dtype": "float32", "shape": [None, len(run.class_names)]},
            "probabilities": {"dtype": "float32", "shape": [None, len(run.class_names)],
                              "meaning": "softmax of the logits; column i is class_names[i]"},
        },
        "class_names": list(run.class_names),
        "model": {"arch": run.config.model.arch, "head": run.config.model.head,
                  "batch_norm": bool(run.config.model.batch_norm), "half_precision": bool(run.config.half_precision)},
        "run": {"workdir": run.workdir, "step": run.step, "checkpoint": run.checkpoint,
                "dataset": run.config.dataset, "preprocess": run.config.preprocess},
    }


def _readme(desc: dict[str, Any]) -> str:
    inp, names = desc["input"], desc["class_names"]
    shape = f"[b, {', '.join(str(d) for d in inp['shape'][1:])}]"
    lines = [
        f"# {desc['model']['arch']} exported from {desc['run']['workdir']} (step {desc['run']['step']})",
        "",
        f"Input `images`: {inp['dtype']} {shape} ({inp['layout']}), {inp['channels']}, values 0-255, any batch "
        "size b.",
        f"Resize each image first: {inp['resize']}.",
        f"Normalization: {inp['normalization']}.",
        f"Outputs: `logits` and `probabilities`, float32 [b, {len(names)}]; column i is class i below.",
        "",
        "```python",
        "import jax, numpy as np",
        f"exported = jax.export.deserialize(bytearray(open('{ARTIFACT}', 'rb').read()))",
        f"out = exported.call(np.zeros((2, {', '.join(str(d) for d in inp['shape'][1:])}), np.uint8))"
        "  # {'logits': ..., 'probabilities': ...}",
        "```",
    ]
    if desc["format"]["saved_model"]:
        lines += ["", "```python", "import tensorflow as tf",
                  f"model = tf.saved_model.load('{SAVED_MODEL}')",
                  "out = model.signatures['serving_default'](images=tf.constant(images_uint8))", "```"]
    lines += ["", f"Platforms: {', '.join(desc['format']['platforms'])} (jax {desc['format']['jax_version']}).", "",
              "Classes:", ""] + [f"{i}. {n}" for i, n in enumerate(names)]
    return "\n".join(lines) + "\n"


def export_run(workdir: str, out: str, *, checkpoint: str = "latest", saved_model: bool = False,
               platforms: Sequence[str] = DEFAULT_PLATFORMS, data_dir: str | None = None,
               run: restore.TrainedRun | None = None) -> dict[str, Any]:
    """Writes the serving artifacts of `workdir`'s `checkpoint` into the folder `out`; returns export.json's dict."""
    restore.check_output_path(out, "--out", directory=True)
    platforms = tuple(platforms)
    unknown = [p for p in platforms if p not in ("cpu", "cuda", "rocm", "tpu")]
    if not platforms or unknown:
        raise ConfigError(f"--platforms={','.join(platforms)}: choose among cpu, cuda, rocm, tpu.")
    run = run or restore.load_run(workdir, checkpoint, data_dir=data_dir)
    serve = serving_function(run)
    h, w, c = run.image_shape
    (batch,) = jax.export.symbolic_shape("b")
    spec = jax.ShapeDtypeStruct((batch, h, w, c), jnp.uint8)
    exported = jax.export.export(jax.jit(serve), platforms=platforms)(spec)
    folder = epath.Path(out)
    (folder / ARTIFACT).write_bytes(bytes(exported.serialize()))
    if saved_model:
        _write_saved_model(serve, run.image_shape, platforms, str(folder / SAVED_MODEL))
    desc = _description(run, platforms, saved_model)
    (folder / "export.json").write_text(json.dumps(desc, indent=2))
    (folder / "README.md").write_text(_readme(desc))
    return desc


def _write_saved_model(serve: Callable, image_shape: Sequence[int], platforms: Sequence[str], path: str) -> None:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top  (only for this format)
    from jax.experimental import jax2tf  # pylint: disable=g-import-not-at-top

    h, w, c = image_shape
    converted = jax2tf.convert(serve, polymorphic_shapes=[f"(b, {h}, {w}, {c})"], with_gradient=False,
                               native_serialization_platforms=tuple(p for p in platforms if p != "rocm"))
    module = tf.Module()
    module.serve = tf.function(converted, autograph=False,
                               input_signature=[tf.TensorSpec([None, h, w, c], tf.uint8, name="images")])
    tf.saved_model.save(module, path, signatures={"serving_default": module.serve})


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="a training workdir (local or gs://)")
    parser.add_argument("--out", required=True, help="folder for the artifacts (created)")
    parser.add_argument("--checkpoint", default="latest", help=restore.CHECKPOINT_CHOICES)
    parser.add_argument("--saved_model", action="store_true", help="also write a TensorFlow SavedModel (jax2tf)")
    parser.add_argument("--platforms", default=",".join(DEFAULT_PLATFORMS),
                        help="comma-separated platforms to lower for (cpu, cuda, rocm, tpu)")
    parser.add_argument("--data_dir", default=None, help="replaces the saved config.run.data_dir (data moved)")
    args = parser.parse_args(argv)
    try:
        restore.check_output_path(args.out, "--out", directory=True)
        hostenv.prepare(restore.load_saved_config(args.workdir))  # before jax's backends start, as in training
        desc = export_run(args.workdir, args.out, checkpoint=args.checkpoint, saved_model=args.saved_model,
                          platforms=[p.strip() for p in args.platforms.split(",") if p.strip()],
                          data_dir=args.data_dir)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps({"out": args.out, "files": sorted(p.name for p in epath.Path(args.out).iterdir()),
                      "step": desc["run"]["step"], "input": desc["input"]["shape"],
                      "platforms": desc["format"]["platforms"]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
