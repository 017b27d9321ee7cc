"""Layer tables of the Network-in-Network presets and the ablation switches that edit them.

A network is a list of `BlockSpec`s, one per mlpconv layer. The presets are the original networks layer for
layer (author's cuda-convnet configs and the Caffe model zoo, see the README for sources); `resolve_blocks`
applies the ablation fields of `config.model` (`mlp_layers`, `width`, `blocks`, `pool2`) to a preset.

Everything here is plain Python so that shapes, parameter counts and FLOPs can be computed analytically,
without building the Flax model.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Sequence

from nin_jax.config import ConfigError

CLASSES = "C"  # in a block spec string, the width that equals the number of classes


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """One mlpconv layer: a KxK conv, then `len(widths) - 1` 1x1 layers, then optional pooling/dropout.

    `widths[0]` is the KxK conv's output channels, `widths[1:]` the 1x1 layers'. The last block's last width
    is the number of classes (the class maps) for the GAP head.
    """

    kernel: int
    widths: tuple[int, ...]
    stride: int = 1
    padding: int | None = None  # None: kernel // 2 ("same" for stride 1)
    pool: str | None = "max"  # 'max' | 'avg' | None; 3x3 stride 2, Caffe ceil mode
    dropout: bool = True  # dropout on the block's output (after pooling)
    init_std: tuple[float, ...] | None = None  # Caffe Gaussian std per layer (len == len(widths))

    @property
    def pad(self) -> int:
        return self.kernel // 2 if self.padding is None else self.padding

    @property
    def spec(self) -> str:
        """The block in `config.model.blocks` syntax, e.g. '5:192-160-96:max'."""
        stride = f"s{self.stride}" if self.stride != 1 else ""
        pad = f"p{self.padding}" if self.padding is not None else ""
        return f"{self.kernel}{stride}{pad}:{'-'.join(map(str, self.widths))}:{self.pool or 'none'}"


def _block(kernel, widths, *, stride=1, padding=None, pool="max", dropout=True, std=0.05):
    stds = tuple(std) if isinstance(std, (tuple, list)) else (std,) * len(widths)
    return BlockSpec(kernel, tuple(widths), stride, padding, pool, dropout, stds)


def _cifar(num_classes: int, first_stds=(0.05, 0.05, 0.05)) -> list[BlockSpec]:
    # cuda-convnet NIN/cifar-10_def: pool1 max, pool2 max (the Caffe gist uses avg for pool2: model.pool2='avg').
    return [
        _block(5, (192, 160, 96), std=first_stds),
        _block(5, (192, 192, 192)),
        _block(3, (192, 192, num_classes), pool=None, dropout=False),
    ]


PRESETS: dict[str, dict[str, Any]] = {
    # NIN-CIFAR10: 966,986 parameters.
    "nin_cifar10": dict(blocks=_cifar(10), num_classes=10, input_shape=(32, 32, 3)),
    # NIN-CIFAR100 (cifar-100_def): 984,356 parameters; smaller init for the first block.
    "nin_cifar100": dict(
        blocks=_cifar(100, first_stds=(0.001, 0.01, 0.01)), num_classes=100, input_shape=(32, 32, 3)
    ),
    # NIN-SVHN (svhn_def): 1,986,026 parameters; conv3 is 5x5.
    "nin_svhn": dict(
        blocks=[
            _block(5, (128, 96, 64)),
            _block(5, (320, 256, 128)),
            _block(5, (384, 256, 10), pool=None, dropout=False),
        ],
        num_classes=10,
        input_shape=(32, 32, 3),
    ),
    # NIN-MNIST (mnist_def): 349,674 parameters; 28 -> 14 -> 7, global average over 7x7.
    "nin_mnist": dict(
        blocks=[
            _block(5, (96, 64, 48)),
            _block(5, (128, 96, 48)),
            _block(5, (128, 96, 10), pool=None, dropout=False),
        ],
        num_classes=10,
        input_shape=(28, 28, 1),
    ),
    # NIN-ImageNet (Caffe model zoo): 7,595,176 parameters; 224 -> 54 -> 27 -> 13 -> 6; one dropout after pool3.
    "nin_imagenet": dict(
        blocks=[
            _block(11, (96, 96, 96), stride=4, padding=0, dropout=False, std=(0.01, 0.05, 0.05)),
            _block(5, (256, 256, 256), dropout=False),
            _block(3, (384, 384, 384), dropout=True, std=(0.01, 0.05, 0.05)),
            _block(3, (1024, 1024, 1000), pool=None, dropout=False, std=(0.05, 0.05, 0.01)),
        ],
        num_classes=1000,
        input_shape=(224, 224, 3),
    ),
    # A small NIN for scikit-learn's 8x8 digits (8 -> 4 -> 2), the offline default.
    "nin_digits": dict(
        blocks=[
            _block(3, (64, 48, 32)),
            _block(3, (96, 96, 64)),
            _block(3, (96, 96, 10), pool=None, dropout=False),
        ],
        num_classes=10,
        input_shape=(8, 8, 1),
    ),
}

_BLOCK_RE = re.compile(
    r"^(?P<k>\d+)(?:s(?P<s>\d+))?(?:p(?P<p>\d+))?:(?P<widths>[\dC]+(?:-[\dC]+)*)(?::(?P<pool>max|avg|none))?$"
)


def parse_blocks(spec: str, num_classes: int) -> list[BlockSpec]:
    """Parses `config.model.blocks`, e.g. "5:192-160-96:max, 5:192-192-192:avg, 3:192-192-C".

    Each comma-separated block is `K[sS][pP]:W0-W1-...[:max|avg|none]`: kernel K, optional stride S and padding
    P (default K//2), the KxK conv width W0 then one width per 1x1 layer (`C` = number of classes), then the
    pooling after the block (default: max for all but the last block, none for the last). Dropout follows
    every block but the last, as in the paper. Init std is 0.05 for every layer (the Caffe value).
    """
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    if not parts:
        raise ConfigError(f"config.model.blocks={spec!r} is empty; give e.g. '5:192-160-96, 3:192-192-C'.")
    blocks = []
    for i, part in enumerate(parts):
        m = _BLOCK_RE.match(part)
        if not m:
            raise ConfigError(
                f"config.model.blocks: cannot parse block {i + 1} {part!r}; expected 'K[sS][pP]:W0-W1-...[:max|avg|none]',"
                " e.g. '5:192-160-96:max' or '11s4p0:96-96-96'."
            )
        last = i == len(parts) - 1
        widths = tuple(num_classes if w == CLASSES else int(w) for w in m["widths"].split("-"))
        for what, value in (("kernel", int(m["k"])), ("stride", int(m["s"] or 1)), ("width", min(widths))):
            if value < 1:
                raise ConfigError(
                    f"config.model.blocks: block {i + 1} {part!r} has {what} {value}; kernels, strides and widths "
                    "must be >= 1 (e.g. '3:96-96-C')."
                )
        pool = m["pool"] or (None if last else "max")
        blocks.append(
            _block(
                int(m["k"]),
                widths,
                stride=int(m["s"] or 1),
                padding=None if m["p"] is None else int(m["p"]),
                pool=None if pool == "none" else pool,
                dropout=not last,
            )
        )
    return blocks


def _with_mlp_layers(widths: tuple[int, ...], n: int) -> tuple[int, ...]:
    """Keeps the block's output width and conv width; truncates or extends the hidden 1x1 widths to n layers."""
    if n == 0:
        return (widths[-1],)
    hidden = list(widths[:-1])
    while len(hidden) < n:
        hidden.append(hidden[-1])
    return tuple(hidden[:n]) + (widths[-1],)


def resolve_blocks(model_cfg: Any, num_classes: int) -> list[BlockSpec]:
    """The block list for `config.model`, with the ablation switches applied.

    Order: preset (or `model.blocks`) -> `pool2` -> `mlp_layers` -> `width` -> class count on the last layer.
    Each field holds a value `config.validate_model` accepts; `ConfigError` when the blocks do not fit together.
    """
    arch = model_cfg.arch
    spec = model_cfg.blocks
    if spec:
        blocks = parse_blocks(spec, num_classes)
    else:  # a preset's class-map layer follows the dataset's class count
        blocks = list(PRESETS[arch]["blocks"])
        blocks[-1] = dataclasses.replace(blocks[-1], widths=blocks[-1].widths[:-1] + (num_classes,))

    pool2 = model_cfg.pool2
    if pool2 != "preset" and len(blocks) > 1 and blocks[1].pool is not None:
        blocks[1] = dataclasses.replace(blocks[1], pool=pool2)

    n = model_cfg.mlp_layers
    if n >= 0:
        blocks = [
            dataclasses.replace(b, widths=_with_mlp_layers(b.widths, n), init_std=_with_mlp_layers(b.init_std, n))
            for b in blocks
        ]

    width = model_cfg.width
    if width != 1.0:
        last = len(blocks) - 1
        blocks = [
            dataclasses.replace(
                b,
                widths=tuple(
                    w if (i == last and j == len(b.widths) - 1) else max(1, int(round(w * width)))
                    for j, w in enumerate(b.widths)
                ),
            )
            for i, b in enumerate(blocks)
        ]

    head = model_cfg.head
    if head == "gap" and blocks[-1].widths[-1] != num_classes:
        raise ConfigError(
            f"config.model.head='gap' needs the last layer to emit one map per class ({num_classes}), but the last "
            f"block ends in {blocks[-1].widths[-1]} channels; fix config.model.blocks (end it in 'C') or use head='fc'."
        )
    if head == "fc":
        fc_input = model_cfg.fc_input
        if fc_input == "features" and len(blocks[-1].widths) < 2:
            raise ConfigError(
                "config.model.fc_input='features' drops the last block's class-map layer, but that block has no "
                "other layer (config.model.mlp_layers=0); use fc_input='class_maps' or mlp_layers >= 1."
            )
    return blocks


def ceil_pool_size(size: int, window: int = 3, stride: int = 2) -> int:
    """Caffe's pooling output size: ceil((size - window) / stride) + 1."""
    return int(math.ceil((size - window) / stride)) + 1


def conv_out_size(size: int, kernel: int, stride: int, pad: int) -> int:
    return (size + 2 * pad - kernel) // stride + 1


@dataclasses.dataclass(frozen=True)
class LayerRow:
    name: str
    kind: str
    out_shape: tuple[int, int, int]
    params: int
    macs: int


def layer_table(
    blocks: Sequence[BlockSpec],
    input_shape: tuple[int, int, int],
    *,
    num_classes: int,
    head: str = "gap",
    fc_input: str = "class_maps",
    batch_norm: bool = False,
) -> list[LayerRow]:
    """Analytic per-layer output shape, parameter count and multiply-accumulates (per image).

    MACs count every kernel tap, padded borders included (the usual convention; XLA's cost analysis skips
    padded taps and reports ~10% less). Pooling, ReLU and BN arithmetic are not counted. Raises `ConfigError`
    naming the block if the blocks shrink the input to nothing.
    """
    h, w, c = input_shape
    rows: list[LayerRow] = []
    cccp = 0
    drop_last = head == "fc" and fc_input == "features"

    def check_size(bi: int, b: BlockSpec, what: str) -> None:
        if h < 1 or w < 1:
            raise ConfigError(
                f"config.model (blocks or arch): block {bi} '{b.spec}' leaves nothing of the "
                f"{input_shape[0]}x{input_shape[1]} images after its {what} ({h}x{w}); too many pooling or strided "
                "blocks for this image size: end a block with ':none' in config.model.blocks, use fewer blocks, "
                "or larger images (config.image_size)."
            )

    for bi, b in enumerate(blocks, start=1):
        widths = b.widths[:-1] if (drop_last and bi == len(blocks)) else b.widths
        for j, cout in enumerate(widths):
            if j == 0:
                h, w = conv_out_size(h, b.kernel, b.stride, b.pad), conv_out_size(w, b.kernel, b.stride, b.pad)
                check_size(bi, b, f"{b.kernel}x{b.kernel}/{b.stride} conv")
                k2 = b.kernel * b.kernel
                name, kind = f"conv{bi}", f"conv {b.kernel}x{b.kernel}/{b.stride}"
            else:
                k2 = 1
                cccp += 1
                name, kind = f"cccp{cccp}", "1x1"
            # Bias is dropped when BN follows (BN's beta plays its role); BN adds scale+bias.
            params = k2 * c * cout + (2 * cout if batch_norm else cout)
            rows.append(LayerRow(name, kind, (h, w, cout), params, h * w * k2 * c * cout))
            c = cout
        if b.pool is not None:
            h, w = ceil_pool_size(h), ceil_pool_size(w)
            check_size(bi, b, f"{b.pool} pooling")
            rows.append(LayerRow(f"pool{bi}", f"{b.pool} 3x3/2", (h, w, c), 0, 0))
    if head == "gap":
        rows.append(LayerRow("gap", "global avg", (1, 1, c), 0, 0))
    else:
        fan_in = h * w * c
        rows.append(LayerRow("fc", "dense", (1, 1, num_classes), fan_in * num_classes + num_classes, fan_in * num_classes))
    return rows


def forward_flops_per_image(rows: Sequence[LayerRow]) -> float:
    """Model FLOPs of one forward pass (2 per MAC)."""
    return 2.0 * sum(r.macs for r in rows)


def train_flops_per_image(rows: Sequence[LayerRow]) -> float:
    """Forward + backward FLOPs: 3x forward, less the input gradient of the first layer (nobody needs it)."""
    first = next(r for r in rows if r.macs)
    return 3.0 * forward_flops_per_image(rows) - 2.0 * first.macs


def format_table(rows: Sequence[LayerRow], title: str) -> str:
    """A printable table with totals, model size in fp32, and FLOPs."""
    lines = [title, f"{'layer':<8} {'type':<14} {'output':>15} {'params':>12} {'MFLOPs':>10}"]
    for r in rows:
        shape = "x".join(map(str, r.out_shape))
        lines.append(f"{r.name:<8} {r.kind:<14} {shape:>15} {r.params:>12,} {2 * r.macs / 1e6:>10.1f}")
    total = sum(r.params for r in rows)
    lines.append(
        f"total params {total:,} = {total * 4 / 1e6:.2f} MB = {total * 4 / 2**20:.2f} MiB (float32); "
        f"forward {forward_flops_per_image(rows) / 1e9:.3f} GFLOPs/image, "
        f"train {train_flops_per_image(rows) / 1e9:.3f} GFLOPs/image"
    )
    return "\n".join(lines)
