"""Network in Network (Lin, Chen & Yan, 2014) in Flax linen: mlpconv blocks and global average pooling.

`python -m nin_jax.models --arch=nin_imagenet` prints the per-layer table (output shape, parameters, MFLOPs).
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Callable, Protocol, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from nin_jax import architectures, config as config_lib
from nin_jax.architectures import BlockSpec
from nin_jax.config import ConfigError, get_config

BN_EPSILON = 1e-3  # as in the Torch NIN block (BatchNorm after every conv)
BN_MOMENTUM = 0.9  # running-average decay; Torch's momentum=0.1


def _kernel_init(init: str, std: float) -> nn.initializers.Initializer:
    if init == "caffe":
        return nn.initializers.normal(stddev=std)
    if init == "he":
        return nn.initializers.variance_scaling(2.0, "fan_in", "truncated_normal")
    if init == "pytorch":  # torch.nn.Conv2d/Linear's default, kaiming_uniform(a=sqrt(5)): U(+-1/sqrt(fan_in))
        return nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
    raise ValueError(f"unknown init {init!r}")  # `config.validate` names the field and its choices


ModuleDef = Callable[..., nn.Module]
Padding = tuple[tuple[int, int], tuple[int, int]]  # ((top, bottom), (left, right))


class NormReLU(Protocol):
    """`Layers.norm_relu`: BatchNorm named `name` (batch statistics when `train`), then ReLU if `relu`."""

    def __call__(self, x: jax.Array, *, train: bool, relu: bool, momentum: float, epsilon: float,
                 axis_name: str | None, dtype: Any, name: str) -> jax.Array: ...


class Pool(Protocol):
    """`Layers.pool`: `kind` ('max' or 'avg') pooling, `window` x `window` with `stride`, over `padding`."""

    def __call__(self, x: jax.Array, kind: str, window: int, stride: int, padding: Padding) -> jax.Array: ...


def flax_batch_norm_relu(x: jax.Array, *, train: bool, relu: bool, momentum: float, epsilon: float,
                         axis_name: str | None, dtype: Any, name: str) -> jax.Array:
    """`nn.BatchNorm` named `name` (batch statistics when `train`, else the running averages), then ReLU if
    `relu`. Called inside the caller's compact method, so the BatchNorm's variables are the caller's `name`."""
    x = nn.BatchNorm(use_running_average=not train, momentum=momentum, epsilon=epsilon, axis_name=axis_name,
                     dtype=dtype, param_dtype=jnp.float32, name=name)(x)
    return nn.relu(x) if relu else x


def flax_pool(x: jax.Array, kind: str, window: int, stride: int, padding: Padding) -> jax.Array:
    """`nn.max_pool` (the padding never wins the max) or `nn.avg_pool` over the in-bounds pixels only."""
    if kind == "max":
        return nn.max_pool(x, (window, window), (stride, stride), padding)
    return nn.avg_pool(x, (window, window), (stride, stride), padding, count_include_pad=False)


@dataclasses.dataclass(frozen=True)
class Layers:
    """The layer definitions NIN is built from; the defaults are flax's own.

    `conv` (the KxK convolutions) and `dense` (the 1x1 layers) take `nn.Conv`'s and `nn.Dense`'s fields.
    `norm_relu` and `pool` are called inside the model's compact methods, where the modules they create are
    the model's own (named `name`). Other bundles compute the same values with the same variables.
    """

    conv: ModuleDef = nn.Conv
    dense: ModuleDef = nn.Dense
    norm_relu: NormReLU = flax_batch_norm_relu
    pool: Pool = flax_pool


def caffe_pool(x: jax.Array, kind: str, pool: Pool = flax_pool, *, window: int = 3, stride: int = 2) -> jax.Array:
    """Pooling with Caffe's ceil-mode output size (32 -> 16 -> 8 for 3x3/2), by `pool` (`Layers.pool`).

    The extra window at the bottom/right border overhangs the image; max ignores the overhang and average
    counts only in-bounds pixels, as Caffe does for unpadded pooling.
    """
    if kind not in ("max", "avg"):
        raise ValueError(f"unknown pooling {kind!r}; choose 'max' or 'avg'.")
    h, w = x.shape[1:3]
    oh, ow = architectures.ceil_pool_size(h, window, stride), architectures.ceil_pool_size(w, window, stride)
    pad = ((0, (oh - 1) * stride + window - h), (0, (ow - 1) * stride + window - w))
    return pool(x, kind, window, stride, pad)


class MLPConv(nn.Module):
    """An mlpconv layer: a KxK conv, then `len(widths) - 1` 1x1 layers, each followed by (BN and) ReLU.

    The 1x1 layers are channel-mixing dense layers: the same math (and parameters, up to a reshape) as a 1x1
    convolution, written as the matrix product over channels that it is.
    `len(widths) == 1` is the plain convolution ("GLM") of the paper's ablation.
    `final_relu=False` leaves the last layer linear (used for class maps when `class_map_relu` is off).
    """

    widths: Sequence[int]
    kernel_size: int
    stride: int = 1
    padding: int = 0
    batch_norm: bool = False
    init_scheme: str = "he"
    init_std: Sequence[float] | None = None
    final_relu: bool = True
    layers: Layers = Layers()
    bn_axis_name: str | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        stds = self.init_std or (0.05,) * len(self.widths)
        for j, width in enumerate(self.widths):
            kinit = _kernel_init(self.init_scheme, stds[j])
            if j == 0:
                k, p = self.kernel_size, self.padding
                x = self.layers.conv(
                    width, (k, k), (self.stride, self.stride), ((p, p), (p, p)), use_bias=not self.batch_norm,
                    kernel_init=kinit, dtype=self.dtype, param_dtype=jnp.float32, name="conv",
                )(x)
            else:
                x = self.layers.dense(
                    width, use_bias=not self.batch_norm, kernel_init=kinit, dtype=self.dtype,
                    param_dtype=jnp.float32, name=f"mlp{j}",
                )(x)
            relu = self.final_relu or j < len(self.widths) - 1
            if self.batch_norm:
                x = self.layers.norm_relu(x, train=train, relu=relu, momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
                                          axis_name=self.bn_axis_name, dtype=self.dtype, name=f"bn{j}")
            elif relu:
                x = nn.relu(x)
        return x


class NIN(nn.Module):
    """Network in Network: mlpconv blocks, then global average pooling (or an FC head for the ablation).

    With `head='gap'` the last block emits one map per class and the logits are their spatial means.
    With `head='fc'`, `fc_input='class_maps'` flattens those maps, `fc_input='features'` drops the class-map
    layer and flattens the last hidden features; either feeds Dense(num_classes), after dropout `fc_dropout`.
    """

    # The fields of `config.model` (their defaults and meaning: nin_jax/config.py), then the dataset's class
    # count and execution settings. `create_model` builds it from a config.
    arch: str
    head: str
    fc_input: str
    fc_dropout: float
    mlp_layers: int
    batch_norm: bool
    width: float
    blocks: str
    dropout_rate: float
    pool2: str
    class_map_relu: bool
    init_scheme: str  # config.model.init (`init` is Module.init)
    num_classes: int
    layers: Layers = Layers()  # the layer definitions (same math and variables in every bundle)
    bn_axis_name: str | None = None  # set for a per-device (shard_map) step: BN statistics over the batch
    dtype: Any = jnp.float32

    @property
    def block_specs(self) -> list[BlockSpec]:
        """The mlpconv blocks after the ablation switches (`architectures.resolve_blocks`)."""
        return architectures.resolve_blocks(self, self.num_classes)

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool, return_class_maps: bool = False):
        if not jnp.issubdtype(x.dtype, jnp.floating):  # e.g. uint8 pixels that skipped their normalisation
            raise TypeError(f"NIN takes normalised floating-point images, got {x.dtype}; batches taken with "
                            "normalize=False need data.Pipeline.device_normalize first")
        x = x.astype(self.dtype)
        specs = self.block_specs
        n = len(specs)
        for i, b in enumerate(specs, start=1):
            last = i == n
            widths, stds = b.widths, b.init_std
            if last and self.head == "fc" and self.fc_input == "features":
                widths, stds = widths[:-1], stds and stds[:-1]
            x = MLPConv(
                widths, b.kernel, b.stride, b.pad, batch_norm=self.batch_norm, init_scheme=self.init_scheme, init_std=stds,
                final_relu=self.class_map_relu or not last, layers=self.layers,
                bn_axis_name=self.bn_axis_name, dtype=self.dtype, name=f"block{i}",
            )(x, train=train)
            if b.pool is not None:
                x = caffe_pool(x, b.pool, self.layers.pool)
            if b.dropout and self.dropout_rate > 0:
                x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        class_maps = x.astype(jnp.float32)
        if self.head == "gap":
            logits = jnp.mean(class_maps, axis=(1, 2))
        else:
            h = class_maps.reshape(x.shape[0], -1)
            if self.fc_dropout > 0:
                h = nn.Dropout(self.fc_dropout, deterministic=not train)(h)
            logits = nn.Dense(
                self.num_classes, dtype=jnp.float32, param_dtype=jnp.float32,
                kernel_init=_kernel_init(self.init_scheme, 0.01), name="fc",
            )(h)
        return (logits, class_maps) if return_class_maps else logits


def output_layer_path(model: NIN) -> tuple[str, ...]:
    """Parameter path of the layer that produces the logits' inputs (Caffe's cccp6 / cccp8, or the FC layer)."""
    if model.head == "fc":
        return ("fc",)
    specs = model.block_specs
    n_mlp = len(specs[-1].widths) - 1
    return (f"block{len(specs)}", f"mlp{n_mlp}" if n_mlp else "conv")


def class_count_paths(model: NIN) -> tuple[tuple[str, ...], ...]:
    """Parameter paths whose shapes follow the class count: the output layer and, in a block, its BatchNorm."""
    path = output_layer_path(model)
    if path == ("fc",):
        return (path,)
    block, layer = path
    return path, (block, f"bn{layer.removeprefix('mlp') if layer != 'conv' else 0}")


def create_model(model_cfg: ml_collections.ConfigDict, num_classes: int, *, dtype: Any = jnp.float32,
                 layers: Layers = Layers(), bn_axis_name: str | None = None) -> NIN:
    """The NIN described by `config.model` for `num_classes` classes, built from `layers`; bad fields raise
    `ConfigError` here."""
    config_lib.validate_model(model_cfg)
    architectures.resolve_blocks(model_cfg, num_classes)  # blocks that fit together and end in the classes
    fields = dict(model_cfg)
    fields["init_scheme"] = fields.pop("init")
    return NIN(**fields, num_classes=num_classes, layers=layers, bn_axis_name=bn_axis_name, dtype=dtype)


def variables(params: Any, batch_stats: Any) -> dict[str, Any]:
    """What `NIN.apply` takes: the parameters, and the BatchNorm statistics when the model has BN."""
    return {"params": params, "batch_stats": batch_stats} if batch_stats else {"params": params}


def model_layer_table(model: NIN, input_shape: tuple[int, int, int]) -> list[architectures.LayerRow]:
    """`architectures.layer_table` for a built model."""
    return architectures.layer_table(
        model.block_specs, input_shape, num_classes=model.num_classes, head=model.head, fc_input=model.fc_input,
        batch_norm=model.batch_norm,
    )


def count_params(params: Any) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(params))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="nin_cifar10", choices=sorted(architectures.PRESETS))
    parser.add_argument("--head", default="gap", choices=["gap", "fc"])
    parser.add_argument("--fc_input", default="class_maps", choices=["class_maps", "features"])
    parser.add_argument("--mlp_layers", type=int, default=-1)
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--batch_norm", action="store_true")
    parser.add_argument("--blocks", default="")
    args = parser.parse_args(argv)
    preset = architectures.PRESETS[args.arch]
    cfg = get_config().model
    cfg.update(arch=args.arch, head=args.head, fc_input=args.fc_input, mlp_layers=args.mlp_layers,
               width=args.width, batch_norm=args.batch_norm, blocks=args.blocks)
    try:
        model = create_model(cfg, preset["num_classes"])
    except ConfigError as e:
        parser.error(str(e))
    rows = model_layer_table(model, preset["input_shape"])
    print(architectures.format_table(rows, f"{args.arch}: input {'x'.join(map(str, preset['input_shape']))}"))


if __name__ == "__main__":
    main()
