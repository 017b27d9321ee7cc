"""Imports the Caffe model zoo's NIN weights (a `.caffemodel`) into a workdir that every tool reads.

    python -m nin_jax.caffe_import --caffemodel=cifar10_nin.caffemodel --preset=nin_cifar10 \\
        --workdir=/tmp/nin_cifar10_zoo --data_dir=~/tensorflow_datasets
    python -m nin_jax.caffe_import --caffemodel=nin_imagenet.caffemodel --preset=nin_imagenet \\
        --workdir=/tmp/nin_imagenet_zoo

The file is parsed with the protobuf runtime from the subset of Caffe's schema (caffe.proto, Caffe's own
field numbers) that the mapping reads, built at run time (`caffe_messages`): no Caffe, no generated code.
Both the current format (`NetParameter.layer`, string types) and the V1 format of the 2014 model-zoo files
(`NetParameter.layers`, enum types) are read; blobs with the 4-D legacy shape or a `BlobShape`.

Mapping: conv1, cccp1, cccp2, conv2, ... (ImageNet: conv4-1024, cccp7-1024, cccp8-1024) become
`block{i}/conv` (OIHW -> HWIO) and `block{i}/mlp{j}` (the repo's 1x1 layers are Dense: (O, I, 1, 1) ->
(I, O)). Every blob, convolution and pooling layer is checked against the preset; the method of the second
pooling layer sets `config.model.pool2` (the zoo's NIN-CIFAR10 averages there). Anything that does not fit is
one `ConfigError` line naming the layer.

Input: NIN-CIFAR10 was trained on GCN + ZCA whitened images, so the workdir gets `preprocess='gcn_zca'`
fitted on the training split exactly as a training run fits it (the dataset is needed). NIN-ImageNet takes
BGR 0-255 pixels minus the ILSVRC-12 mean pixel: the input channels of conv1's kernel are reversed (the repo's
images are RGB), and the normaliser is `standardize` with the mean pixel (in RGB) as mean and std 1, which
gives the model exactly Caffe's input; nothing is folded into the weights. Caffe's mean *image* is replaced
by its per-channel mean (`--mean_file`, else the usual B 104.0, G 116.7, R 122.7).

The workdir holds config.json, the data record (`data.run_record`), `checkpoints/0` (a fresh
`train.create_train_state` with the imported parameters, saved by `checkpointing.save`) and
`caffe_import.json` (source file, its SHA-256, the mapping); evaluate, predict, analysis and export read it,
and training in it would fine-tune from the imported weights.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
from typing import Any, Sequence

import ml_collections
import numpy as np

from nin_jax import architectures
from nin_jax.config import ConfigError

PRESETS = ("nin_cifar10", "nin_imagenet")
# Caffe layer names of each block: the KxK convolution, then the 1x1 ("cccp") layers.
CAFFE_LAYERS: dict[str, tuple[tuple[str, ...], ...]] = {
    "nin_cifar10": (("conv1", "cccp1", "cccp2"), ("conv2", "cccp3", "cccp4"), ("conv3", "cccp5", "cccp6")),
    "nin_imagenet": (("conv1", "cccp1", "cccp2"), ("conv2", "cccp3", "cccp4"), ("conv3", "cccp5", "cccp6"),
                     ("conv4-1024", "cccp7-1024", "cccp8-1024")),
}
DEFAULT_CONFIGS = {"nin_cifar10": "configs/cifar10.py", "nin_imagenet": "configs/imagenet.py"}
# The ILSVRC-12 mean pixel (B, G, R): the per-channel mean of Caffe's ilsvrc_2012_mean image.
IMAGENET_MEAN_BGR = (104.00698793, 116.66876762, 122.67891434)
IMPORT_FILE = "caffe_import.json"
# Layers without parameters that leave an inference forward pass unchanged (or are the ReLUs NIN expects).
_HARMLESS = {"ReLU", "Dropout", "Data", "Input", "ImageData", "MemoryData", "HDF5Data", "DummyData", "WindowData",
             "Softmax", "SoftmaxWithLoss", "Accuracy", "Split", "Silence", "Flatten"}
# V1LayerParameter.LayerType (caffe.proto): (enum name, number, the new-format type name it became).
_V1_LAYER_TYPES = (
    ("NONE", 0, "None"), ("ACCURACY", 1, "Accuracy"), ("CONCAT", 3, "Concat"), ("CONVOLUTION", 4, "Convolution"),
    ("DATA", 5, "Data"), ("DROPOUT", 6, "Dropout"), ("FLATTEN", 8, "Flatten"), ("HDF5_DATA", 9, "HDF5Data"),
    ("IMAGE_DATA", 12, "ImageData"), ("INNER_PRODUCT", 14, "InnerProduct"), ("LRN", 15, "LRN"),
    ("POOLING", 17, "Pooling"), ("RELU", 18, "ReLU"), ("SIGMOID", 19, "Sigmoid"), ("SOFTMAX", 20, "Softmax"),
    ("SOFTMAX_LOSS", 21, "SoftmaxWithLoss"), ("SPLIT", 22, "Split"), ("TANH", 23, "TanH"),
    ("WINDOW_DATA", 24, "WindowData"), ("MEMORY_DATA", 29, "MemoryData"), ("DUMMY_DATA", 32, "DummyData"),
    ("SILENCE", 36, "Silence"),
)
_V1_TYPES = {number: new for _, number, new in _V1_LAYER_TYPES}
_POOL_METHODS = {0: "max", 1: "avg", 2: "stochastic"}  # PoolingParameter.PoolMethod


# ------------------------------------------------------------------------------------------------ schema


def _schema() -> Any:
    """FileDescriptorProto of the caffe.proto subset read here (field numbers and types as in Caffe)."""
    from google.protobuf import descriptor_pb2  # pylint: disable=g-import-not-at-top

    F = descriptor_pb2.FieldDescriptorProto
    opt, rep = F.LABEL_OPTIONAL, F.LABEL_REPEATED
    proto = descriptor_pb2.FileDescriptorProto(name="nin_jax/caffe_subset.proto", package="caffe", syntax="proto2")

    def message(name, fields, enums=(), parent=None):
        msg = (parent.nested_type if parent is not None else proto.message_type).add(name=name)
        for enum_name, values in enums:
            enum = msg.enum_type.add(name=enum_name)
            for value_name, number in values:
                enum.value.add(name=value_name, number=number)
        for name_, number, ftype, label, *rest in fields:
            field = msg.field.add(name=name_, number=number, type=ftype, label=label)
            extra = rest[0] if rest else {}
            if "type_name" in extra:
                field.type_name = extra["type_name"]
            if "default" in extra:
                field.default_value = extra["default"]
            if extra.get("packed"):
                field.options.packed = True
        return msg

    message("BlobShape", [("dim", 1, F.TYPE_INT64, rep, {"packed": True})])
    message("BlobProto", [
        ("num", 1, F.TYPE_INT32, opt), ("channels", 2, F.TYPE_INT32, opt), ("height", 3, F.TYPE_INT32, opt),
        ("width", 4, F.TYPE_INT32, opt), ("data", 5, F.TYPE_FLOAT, rep, {"packed": True}),
        ("shape", 7, F.TYPE_MESSAGE, opt, {"type_name": ".caffe.BlobShape"}),
        ("double_data", 8, F.TYPE_DOUBLE, rep, {"packed": True}),
    ])
    message("ConvolutionParameter", [
        ("num_output", 1, F.TYPE_UINT32, opt), ("bias_term", 2, F.TYPE_BOOL, opt, {"default": "true"}),
        ("pad", 3, F.TYPE_UINT32, rep), ("kernel_size", 4, F.TYPE_UINT32, rep),
        ("group", 5, F.TYPE_UINT32, opt, {"default": "1"}), ("stride", 6, F.TYPE_UINT32, rep),
        ("pad_h", 9, F.TYPE_UINT32, opt), ("pad_w", 10, F.TYPE_UINT32, opt),
        ("kernel_h", 11, F.TYPE_UINT32, opt), ("kernel_w", 12, F.TYPE_UINT32, opt),
        ("stride_h", 13, F.TYPE_UINT32, opt), ("stride_w", 14, F.TYPE_UINT32, opt),
        ("dilation", 18, F.TYPE_UINT32, rep),
    ])
    message("PoolingParameter", [
        ("pool", 1, F.TYPE_ENUM, opt, {"type_name": ".caffe.PoolingParameter.PoolMethod", "default": "MAX"}),
        ("kernel_size", 2, F.TYPE_UINT32, opt), ("stride", 3, F.TYPE_UINT32, opt, {"default": "1"}),
        ("pad", 4, F.TYPE_UINT32, opt), ("kernel_h", 5, F.TYPE_UINT32, opt), ("kernel_w", 6, F.TYPE_UINT32, opt),
        ("stride_h", 7, F.TYPE_UINT32, opt), ("stride_w", 8, F.TYPE_UINT32, opt),
        ("pad_h", 9, F.TYPE_UINT32, opt), ("pad_w", 10, F.TYPE_UINT32, opt),
        ("global_pooling", 12, F.TYPE_BOOL, opt),
    ], enums=[("PoolMethod", [("MAX", 0), ("AVE", 1), ("STOCHASTIC", 2)])])
    blobs = {"type_name": ".caffe.BlobProto"}
    conv = {"type_name": ".caffe.ConvolutionParameter"}
    pool = {"type_name": ".caffe.PoolingParameter"}
    message("LayerParameter", [
        ("name", 1, F.TYPE_STRING, opt), ("type", 2, F.TYPE_STRING, opt), ("bottom", 3, F.TYPE_STRING, rep),
        ("top", 4, F.TYPE_STRING, rep), ("blobs", 7, F.TYPE_MESSAGE, rep, blobs),
        ("convolution_param", 106, F.TYPE_MESSAGE, opt, conv), ("pooling_param", 121, F.TYPE_MESSAGE, opt, pool),
    ])
    message("V1LayerParameter", [
        ("bottom", 2, F.TYPE_STRING, rep), ("top", 3, F.TYPE_STRING, rep), ("name", 4, F.TYPE_STRING, opt),
        ("type", 5, F.TYPE_ENUM, opt, {"type_name": ".caffe.V1LayerParameter.LayerType"}),
        ("blobs", 6, F.TYPE_MESSAGE, rep, blobs), ("convolution_param", 10, F.TYPE_MESSAGE, opt, conv),
        ("pooling_param", 19, F.TYPE_MESSAGE, opt, pool),
    ], enums=[("LayerType", [(name, number) for name, number, _ in _V1_LAYER_TYPES])])
    message("NetParameter", [
        ("name", 1, F.TYPE_STRING, opt),
        ("layers", 2, F.TYPE_MESSAGE, rep, {"type_name": ".caffe.V1LayerParameter"}),
        ("layer", 100, F.TYPE_MESSAGE, rep, {"type_name": ".caffe.LayerParameter"}),
    ])
    return proto


_MESSAGES: dict[str, type] | None = None


def caffe_messages() -> dict[str, type]:
    """Message classes of the caffe.proto subset, by name (NetParameter, BlobProto, LayerParameter, ...),
    built once in a private descriptor pool (an installed Caffe's own `caffe_pb2` is not touched)."""
    global _MESSAGES
    if _MESSAGES is None:
        from google.protobuf import descriptor_pool, message_factory  # pylint: disable=g-import-not-at-top

        pool = descriptor_pool.DescriptorPool()
        proto = _schema()
        pool.Add(proto)
        get = getattr(message_factory, "GetMessageClass", None)
        if get is None:  # protobuf < 4.21
            factory = message_factory.MessageFactory(pool)
            get = factory.GetPrototype
        _MESSAGES = {m.name: get(pool.FindMessageTypeByName(f"caffe.{m.name}")) for m in proto.message_type}
    return _MESSAGES


# ----------------------------------------------------------------------------------------------- reading


@dataclasses.dataclass(frozen=True)
class CaffeLayer:
    """What the mapping reads of one layer; `conv` / `pool` hold (kernel, stride, pad) and the pooling method."""

    name: str
    type: str  # the new-format type name ("Convolution", "Pooling", ...), also for V1 files
    blobs: tuple[np.ndarray, ...]
    conv: dict[str, int] | None = None  # kernel, stride, pad, group
    pool: dict[str, Any] | None = None  # method, kernel, stride, pad, global


def blob_array(blob: Any, where: str) -> np.ndarray:
    """float32 array of a BlobProto: its `shape` if set, else the legacy (num, channels, height, width)."""
    if blob.HasField("shape"):
        shape = tuple(int(d) for d in blob.shape.dim)
    else:
        shape = (int(blob.num), int(blob.channels), int(blob.height), int(blob.width))
    values = np.asarray(blob.data, np.float32) if len(blob.data) else np.asarray(blob.double_data, np.float32)
    if values.size != int(np.prod(shape)):
        raise ConfigError(f"{where} holds {values.size} values for its shape {shape}; the file is damaged or not "
                          "a Caffe model.")
    return values.reshape(shape)


def _first(repeated: Any, single: int, default: int) -> int:
    return int(single) if single else int(repeated[0]) if len(repeated) else default


def _conv_params(p: Any, name: str) -> dict[str, int]:
    kernel, stride, pad = (_first(p.kernel_size, p.kernel_h, 0), _first(p.stride, p.stride_h, 1),
                           _first(p.pad, p.pad_h, 0))
    across = (_first(p.kernel_size[1:] or p.kernel_size, p.kernel_w, 0), _first(p.stride[1:] or p.stride, p.stride_w, 1),
              _first(p.pad[1:] or p.pad, p.pad_w, 0))
    dilation = max(list(p.dilation) or [1])
    if (kernel, stride, pad) != across or dilation != 1:
        raise ConfigError(f"layer {name} is a non-square or dilated convolution (kernel {kernel}x{across[0]}, stride "
                          f"{stride}/{across[1]}, pad {pad}/{across[2]}, dilation {dilation}); NIN's are not.")
    return {"kernel": kernel, "stride": stride, "pad": pad, "group": int(p.group)}


def _pool_params(p: Any) -> dict[str, Any]:
    return {"method": _POOL_METHODS.get(int(p.pool), str(p.pool)), "kernel": int(p.kernel_h or p.kernel_size),
            "stride": int(p.stride_h or p.stride), "pad": int(p.pad_h or p.pad), "global": bool(p.global_pooling)}


def parse_caffemodel(payload: bytes, source: str = "the file") -> tuple[str, list[CaffeLayer]]:
    """('new' | 'V1', the layers in file order) of a serialised NetParameter; `ConfigError` if it is not one."""
    from google.protobuf import message as pb_message  # pylint: disable=g-import-not-at-top

    net = caffe_messages()["NetParameter"]()
    try:
        net.ParseFromString(payload)
    except (pb_message.DecodeError, RuntimeError, ValueError) as e:
        raise ConfigError(f"{source} cannot be parsed as a Caffe NetParameter ({type(e).__name__}: {e}); pass the "
                          ".caffemodel file itself (binary protobuf).") from e
    if len(net.layer):
        fmt, raw = "new", list(net.layer)
    elif len(net.layers):
        fmt, raw = "V1", list(net.layers)
    else:
        raise ConfigError(f"{source} holds no layers: it is not a Caffe model (.caffemodel), or it is empty.")
    layers = []
    for i, layer in enumerate(raw):
        if fmt == "V1":
            if not layer.name and not layer.type and not len(layer.blobs):
                raise ConfigError(f"{source} is in Caffe's V0 format (layer {i} has no V1 fields); convert it with "
                                  "Caffe's upgrade_net_proto_binary first.")
            kind = _V1_TYPES.get(int(layer.type), f"V1 type {int(layer.type)}")
        else:
            kind = layer.type
        name = layer.name or f"#{i}"
        blobs = tuple(blob_array(b, f"{source}: blob {j} of layer {name}") for j, b in enumerate(layer.blobs))
        conv = _conv_params(layer.convolution_param, name) if kind == "Convolution" else None
        pool = _pool_params(layer.pooling_param) if kind == "Pooling" else None
        layers.append(CaffeLayer(name, kind, blobs, conv, pool))
    return fmt, layers


def read_caffemodel(path: str | os.PathLike) -> tuple[str, list[CaffeLayer], str]:
    """(format, layers, SHA-256 of the file) of a `.caffemodel`; a missing or unreadable file is `ConfigError`."""
    from etils import epath  # pylint: disable=g-import-not-at-top

    p = epath.Path(os.path.expanduser(os.fspath(path)))
    if not p.exists():
        raise ConfigError(f"--caffemodel={path} does not exist; pass the downloaded .caffemodel file.")
    if p.is_dir():
        raise ConfigError(f"--caffemodel={path} is a directory; pass the .caffemodel file.")
    try:
        payload = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"--caffemodel={path} cannot be read ({type(e).__name__}: {e}).") from e
    fmt, layers = parse_caffemodel(payload, f"--caffemodel={path}")
    return fmt, layers, hashlib.sha256(payload).hexdigest()


# ----------------------------------------------------------------------------------------------- mapping


def _preset_blocks(preset: str) -> list[architectures.BlockSpec]:
    return list(architectures.PRESETS[preset]["blocks"])


def _final_map_size(preset: str) -> int:
    """Height of the class maps at the preset's input size (the zoo's last average pool covers them)."""
    spec = architectures.PRESETS[preset]
    rows = architectures.layer_table(_preset_blocks(preset), spec["input_shape"], num_classes=spec["num_classes"])
    return [r for r in rows if r.macs][-1].out_shape[0]


def _check_blob(where: str, found: tuple[int, ...], expected: tuple[int, ...], what: str, source: str) -> None:
    if found != expected:
        raise ConfigError(f"{source}: layer {where} {what} has shape {found}, the preset expects {expected}; this "
                          "file is not that network (choose the matching --preset).")


def map_layers(layers: Sequence[CaffeLayer], preset: str, *, source: str = "the file",
               bgr_to_rgb: bool = False) -> tuple[dict[str, Any], str | None, dict[str, str]]:
    """(Flax `params` of the preset as NumPy float32, the file's pooling after block 2 or None when the file
    has no pooling layers, {caffe layer: flax path}); `ConfigError` naming the first layer that does not fit.

    `bgr_to_rgb` reverses the input channels of the first convolution (Caffe's ImageNet nets read BGR).
    """
    if preset not in CAFFE_LAYERS:
        raise ConfigError(f"--preset={preset!r} is unknown; choose one of {list(CAFFE_LAYERS)}.")
    blocks = _preset_blocks(preset)
    by_name = {layer.name: layer for layer in layers}
    expected_names = {n for names in CAFFE_LAYERS[preset] for n in names}
    for layer in layers:
        if layer.blobs and layer.name not in expected_names:
            raise ConfigError(f"{source}: layer {layer.name} ({layer.type}) has learned parameters that {preset} has no "
                              "place for; this file is not that network (choose the matching --preset).")
        if not layer.blobs and layer.type not in _HARMLESS | {"Convolution", "Pooling"}:
            raise ConfigError(f"{source}: layer {layer.name} is a {layer.type} layer, which {preset} does not have; "
                              "this file is not that network.")
    params: dict[str, Any] = {}
    mapping: dict[str, str] = {}
    channels = architectures.PRESETS[preset]["input_shape"][-1]
    for bi, (block, names) in enumerate(zip(blocks, CAFFE_LAYERS[preset]), start=1):
        widths = block.widths
        tree: dict[str, Any] = {}
        for j, (name, width) in enumerate(zip(names, widths)):
            layer = by_name.get(name)
            if layer is None:
                convs = [x.name for x in layers if x.type == "Convolution"]
                raise ConfigError(f"{source} has no layer {name!r} (its convolutions: {', '.join(convs) or 'none'}); "
                                  f"this file is not {preset} (choose the matching --preset).")
            if layer.type != "Convolution":
                raise ConfigError(f"{source}: layer {name} is a {layer.type} layer, {preset} expects a convolution.")
            k, stride, pad = (block.kernel, block.stride, block.pad) if j == 0 else (1, 1, 0)
            if len(layer.blobs) != 2:
                raise ConfigError(f"{source}: layer {name} has {len(layer.blobs)} blobs, {preset} expects 2 (weights, "
                                  "bias).")
            weights, bias = layer.blobs
            _check_blob(name, tuple(weights.shape), (width, channels, k, k), "weights (O, I, kH, kW)", source)
            if bias.size != width or sorted(bias.shape)[:-1] != [1] * (bias.ndim - 1):
                _check_blob(name, tuple(bias.shape), (width,), "bias", source)
            conv = layer.conv or {}  # a kernel of 0: not recorded in the file (the blob's shape is checked above)
            found = (conv.get("kernel") or k, conv.get("stride", stride), conv.get("pad", pad), conv.get("group", 1))
            if found != (k, stride, pad, 1):
                raise ConfigError(f"{source}: layer {name} has kernel {found[0]}, stride {found[1]}, pad {found[2]}, "
                                  f"group {found[3]}; {preset} expects kernel {k}, stride {stride}, pad {pad}, group 1.")
            bias = bias.reshape(width)
            if j == 0:
                kernel = weights.transpose(2, 3, 1, 0)  # OIHW -> HWIO
                if bi == 1 and bgr_to_rgb:
                    kernel = kernel[:, :, ::-1, :]
                tree["conv"] = {"kernel": np.ascontiguousarray(kernel), "bias": bias}
                mapping[name] = f"block{bi}/conv"
            else:
                tree[f"mlp{j}"] = {"kernel": np.ascontiguousarray(weights[:, :, 0, 0].T), "bias": bias}
                mapping[name] = f"block{bi}/mlp{j}"
            channels = width
        params[f"block{bi}"] = tree
    return params, _check_pooling(layers, preset, source), mapping


def _check_pooling(layers: Sequence[CaffeLayer], preset: str, source: str) -> str | None:
    """The method of the pooling after block 2 (config.model.pool2), after checking every pooling layer."""
    pools = [layer for layer in layers if layer.type == "Pooling"]
    if not pools:
        return None
    blocks = _preset_blocks(preset)
    inner = [(i, b) for i, b in enumerate(blocks, start=1) if b.pool is not None]
    if len(pools) != len(inner) + 1:
        raise ConfigError(f"{source} has {len(pools)} pooling layers ({', '.join(p.name for p in pools)}), {preset} "
                          f"has {len(inner) + 1}; this file is not that network.")
    pool2 = None
    for layer, (bi, block) in zip(pools, inner):
        p = layer.pool
        if (p["kernel"], p["stride"], p["pad"], p["global"]) != (3, 2, 0, False):
            raise ConfigError(f"{source}: pooling layer {layer.name} is {p['kernel']}x{p['kernel']}/{p['stride']} pad "
                              f"{p['pad']}{' global' if p['global'] else ''}; {preset} pools 3x3/2 without padding.")
        if p["method"] not in ("max", "avg"):
            raise ConfigError(f"{source}: pooling layer {layer.name} is {p['method']} pooling; only max and average "
                              "are supported.")
        if bi == 2:
            pool2 = p["method"]
        elif p["method"] != block.pool:
            raise ConfigError(f"{source}: pooling layer {layer.name} is {p['method']} pooling, {preset} has {block.pool} "
                              f"pooling after block {bi}; this file is not that network.")
    last = pools[-1].pool
    size = _final_map_size(preset)
    if last["method"] != "avg" or not (last["global"] or (last["kernel"] == size and last["stride"] == 1
                                                          and last["pad"] == 0)):
        raise ConfigError(f"{source}: the last pooling layer {pools[-1].name} is {last['method']} "
                          f"{last['kernel']}x{last['kernel']}/{last['stride']}; {preset} ends in a global average "
                          f"({size}x{size} average pooling).")
    return pool2


# -------------------------------------------------------------------------------------------------- config


def prepare_config(preset: str, config: ml_collections.ConfigDict | None = None, *,
                   pool2: str | None = None, data_dir: str | None = None) -> ml_collections.ConfigDict:
    """The config of the imported run: `config` (default: the preset's config file, Caffe recipe) with the
    preset's architecture, float32 and the zoo's input preprocessing; `ConfigError` if it asks for another net."""
    from nin_jax import config as config_lib  # pylint: disable=g-import-not-at-top

    if config is None:
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        config = config_lib.load_config_file(os.path.join(root, DEFAULT_CONFIGS[preset]))
    config = ml_collections.ConfigDict(config.to_dict())
    m = config.model
    if m.arch != preset:
        raise ConfigError(f"the config has model.arch={m.arch!r} but --preset={preset}; pass a config of {preset} "
                          f"(e.g. {DEFAULT_CONFIGS[preset]}) or drop --config.")
    wrong = [f"model.{k}={m[k]!r}" for k, v in (("head", "gap"), ("mlp_layers", -1), ("width", 1.0), ("blocks", ""),
                                                ("batch_norm", False), ("class_map_relu", True)) if m[k] != v]
    if wrong:
        raise ConfigError(f"the config changes the zoo network ({', '.join(wrong)}); the Caffe weights need the plain "
                          f"{preset} preset: use {DEFAULT_CONFIGS[preset]} (its default recipe).")
    if pool2 is not None:
        preset_pool = _preset_blocks(preset)[1].pool
        current = preset_pool if m.pool2 == "preset" else m.pool2
        if current != pool2:
            m.pool2 = pool2
    if preset == "nin_cifar10":
        if config.preprocess != "gcn_zca":
            raise ConfigError(f"config.preprocess={config.preprocess!r}, but the zoo's NIN-CIFAR10 was trained on GCN + "
                              "ZCA whitened images: use config.preprocess='gcn_zca' (configs/cifar10.py's default).")
    else:
        config.preprocess = "standardize"  # with the mean pixel and std 1: Caffe's mean subtraction
        config.image_size = architectures.PRESETS[preset]["input_shape"][0]
    config.half_precision = False  # Caffe computed in float32
    if data_dir is not None:
        config.run.data_dir = data_dir
    config_lib.validate(config)
    return config


def mean_bgr_from_file(path: str) -> tuple[float, float, float]:
    """The per-channel mean (B, G, R) of a Caffe mean image (`.binaryproto`, a BlobProto [1, 3, H, W])."""
    from etils import epath  # pylint: disable=g-import-not-at-top
    from google.protobuf import message as pb_message  # pylint: disable=g-import-not-at-top

    p = epath.Path(os.path.expanduser(path))
    if not p.exists() or p.is_dir():
        raise ConfigError(f"--mean_file={path} does not exist; pass Caffe's mean image (.binaryproto) or drop it.")
    blob = caffe_messages()["BlobProto"]()
    try:
        blob.ParseFromString(p.read_bytes())
    except (pb_message.DecodeError, RuntimeError, ValueError) as e:
        raise ConfigError(f"--mean_file={path} cannot be parsed as a Caffe BlobProto ({type(e).__name__}).") from e
    mean = blob_array(blob, f"--mean_file={path}")
    if mean.ndim < 3 or mean.shape[-3] != 3:
        raise ConfigError(f"--mean_file={path} has shape {mean.shape}; expected a 3-channel mean image [1, 3, H, W].")
    return tuple(float(v) for v in mean.reshape(-1, 3, *mean.shape[-2:]).mean(axis=(0, 2, 3)))


# ---------------------------------------------------------------------------------------------- workdir


def _check_workdir(workdir: str) -> None:
    from etils import epath  # pylint: disable=g-import-not-at-top

    from nin_jax.runtime import remote  # pylint: disable=g-import-not-at-top

    remote.check_access(workdir, "--workdir")
    path = epath.Path(workdir)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--workdir={workdir} is a file; pass a new directory.")
    if path.exists() and any(path.iterdir()):
        raise ConfigError(f"--workdir={workdir} is not empty; the import writes a new workdir: pass a new or empty "
                          "directory.")


def _imagenet_data(config: ml_collections.ConfigDict, mean_bgr: Sequence[float]) -> tuple[Any, tuple[str, ...],
                                                                                      tuple[int, ...]]:
    """(normaliser, class names, input shape) for ImageNet without the dataset: the mean-pixel normaliser and
    TFDS imagenet2012's class names (WordNet ids in sorted order, Caffe's synset order)."""
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    from nin_jax.data import preprocessing  # pylint: disable=g-import-not-at-top

    try:
        names = tuple(tfds.builder("imagenet2012", data_dir=config.run.data_dir).info.features["label"].names)
    except Exception:  # noqa: BLE001 — the builder's metadata comes with tfds itself; the data dir is optional
        names = tuple(tfds.builder("imagenet2012").info.features["label"].names)
    mean_rgb = np.asarray(mean_bgr, np.float32)[::-1].copy()
    normalizer = preprocessing.Normalizer("standardize", {"mean": mean_rgb, "std": np.ones(3, np.float32)},
                                          config.gcn_scale)
    shape = tuple(architectures.PRESETS["nin_imagenet"]["input_shape"])
    return normalizer, names, shape


def _cifar_data(config: ml_collections.ConfigDict, mesh: Any) -> tuple[Any, tuple[str, ...], tuple[int, ...]]:
    """(normaliser, class names, input shape) of a training run's pipeline (`train.setup`), which fits GCN + ZCA
    on config.train_split."""
    from nin_jax import data, mesh as mesh_lib  # pylint: disable=g-import-not-at-top

    if not config.run.data_dir:
        raise ConfigError("--data_dir is required for nin_cifar10: the zoo's net reads GCN + ZCA whitened images, "
                          "fitted on CIFAR-10's training split (the TFDS data dir holding cifar10).")
    try:
        pipeline = data.Pipeline(config, mesh_lib.data_sharding(mesh))
    except FileNotFoundError as e:
        raise ConfigError(f"the dataset {config.dataset!r} cannot be read from --data_dir={config.run.data_dir} "
                          f"({type(e).__name__}: {e}).") from e
    pipeline.close()
    return pipeline.normalizer, pipeline.info.class_names, pipeline.info.image_shape


def import_caffemodel(caffemodel: str, preset: str, workdir: str, *, config: ml_collections.ConfigDict | None = None,
                      data_dir: str | None = None, mean_file: str | None = None) -> dict[str, Any]:
    """Writes the workdir of `caffemodel` imported as `preset` (see the module docstring); returns the record
    written to caffe_import.json. Everything is checked before the workdir is created."""
    if preset not in PRESETS:
        raise ConfigError(f"--preset={preset!r} is unknown; choose one of {list(PRESETS)}.")
    _check_workdir(workdir)
    fmt, layers, sha256 = read_caffemodel(caffemodel)
    imagenet = preset == "nin_imagenet"
    params, pool2, mapping = map_layers(layers, preset, source=f"--caffemodel={caffemodel}", bgr_to_rgb=imagenet)
    config = prepare_config(preset, config, pool2=pool2, data_dir=data_dir)
    mean_bgr = (mean_bgr_from_file(mean_file) if mean_file else IMAGENET_MEAN_BGR) if imagenet else None

    # Imported only now: the checks above answer without starting jax or TensorFlow.
    import jax  # pylint: disable=g-import-not-at-top
    import optax  # pylint: disable=g-import-not-at-top

    from nin_jax import checkpointing, mesh as mesh_lib, models, train  # pylint: disable=g-import-not-at-top
    from nin_jax.data import run_record  # pylint: disable=g-import-not-at-top
    from nin_jax.runtime import record  # pylint: disable=g-import-not-at-top

    mesh = mesh_lib.create_mesh(jax.local_devices())
    normalizer, class_names, image_shape = (_imagenet_data(config, mean_bgr) if imagenet
                                            else _cifar_data(config, mesh))
    num_classes = architectures.PRESETS[preset]["num_classes"]
    if len(class_names) != num_classes:
        raise ConfigError(f"config.dataset={config.dataset!r} has {len(class_names)} classes, the {preset} "
                          f"weights {num_classes}; use the dataset the weights were trained on.")
    model = models.create_model(config.model, num_classes)
    image_shape = tuple(image_shape)
    state = train.create_train_state(config, model, image_shape, optax.constant_schedule(0.0), mesh)
    fresh = jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), jax.device_get(state.params))
    imported = jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), params)
    if fresh != imported:  # the mapping and the model disagree: a bug here, not the user's file
        raise AssertionError(f"imported parameters {imported} do not match the model's {fresh}")
    state = state.replace(params=jax.device_put(params, mesh_lib.replicated(mesh)))
    if hasattr(state, "ema"):  # a config keeping a weight average (config.optim.ema_decay): it starts at the import
        state = state.replace(ema={"params": jax.device_put(params, mesh_lib.replicated(mesh)),
                                   "batch_stats": state.batch_stats})

    summary = {
        "source": os.path.abspath(os.path.expanduser(caffemodel)), "sha256": sha256, "format": fmt, "preset": preset,
        "layers": mapping, "preprocess": config.preprocess,
        "pool2": _preset_blocks(preset)[1].pool if config.model.pool2 == "preset" else config.model.pool2,
        "input": ("RGB 0-255 minus the mean pixel (conv1's input channels reversed from Caffe's BGR)" if imagenet
                  else "GCN + ZCA fitted on config.train_split, as training fits it"),
        **({"mean_bgr": list(mean_bgr)} if imagenet else {}),
    }
    from etils import epath  # pylint: disable=g-import-not-at-top

    path = epath.Path(workdir)
    path.mkdir(parents=True, exist_ok=True)
    record.write_atomic(path / "config.json", config.to_json_best_effort(indent=2))
    run_record.save(path, normalizer, class_names, image_shape, config)
    mngr = checkpointing.create_manager(path / "checkpoints", keep=config.run.keep_checkpoints,
                                        best_metric=config.run.best_metric)
    try:
        meta = {"step": 0, "train_metrics_window": {}, "epoch": 0, "index_in_epoch": 0, "caffe_import": summary}
        checkpointing.save(mngr, 0, state, meta)
        mngr.wait_until_finished()
    finally:
        mngr.close()
    record.write_atomic(path / IMPORT_FILE, json.dumps(summary, indent=1))
    return summary


# ------------------------------------------------------------------------------------------ command line


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--caffemodel", required=True, help="the .caffemodel file (model zoo NIN)")
    parser.add_argument("--preset", required=True, choices=PRESETS)
    parser.add_argument("--workdir", required=True, help="a new (or empty) directory to write")
    parser.add_argument("--config", default=None, help="config file[:arg] (default: configs/cifar10.py or "
                        "configs/imagenet.py)")
    parser.add_argument("--data_dir", default=None, help="sets config.run.data_dir (CIFAR-10: needed to fit GCN+ZCA)")
    parser.add_argument("--mean_file", default=None, help="ImageNet: Caffe's mean image (.binaryproto); its "
                        "per-channel mean replaces the default mean pixel")
    args = parser.parse_args(argv)
    try:
        from nin_jax import config as config_lib  # pylint: disable=g-import-not-at-top
        from nin_jax.cpu import hostenv  # pylint: disable=g-import-not-at-top

        config = None
        if args.config:
            file, _, arg = args.config.partition(":")
            config = config_lib.load_config_file(file, arg or None)
        hostenv.prepare(config or config_lib.get_config())  # before jax starts its backends, as the tools do
        summary = import_caffemodel(args.caffemodel, args.preset, args.workdir, config=config,
                                    data_dir=args.data_dir, mean_file=args.mean_file)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps({"workdir": args.workdir, **{k: summary[k] for k in ("preset", "format", "pool2", "sha256")}},
                     sort_keys=True), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
