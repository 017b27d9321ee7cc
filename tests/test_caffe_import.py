"""`nin_jax.tools.caffe_import`: .caffemodel files written here with the same runtime schema (random blobs,
one V1 and one new-format file) import into workdirs whose logits equal a NumPy forward pass with Caffe's
semantics; wrong files are one-line errors."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from nin_jax import architectures
from nin_jax.config import ConfigError
from nin_jax.tools import caffe_import as ci
from nin_jax.tools import evaluate, restore

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V1_TYPE = {"Convolution": 4, "Pooling": 17, "ReLU": 18, "Dropout": 6, "Data": 5, "SoftmaxWithLoss": 21}


# ------------------------------------------------------------------------------------------ writing files


def zoo_layers(preset: str, rng: np.random.Generator, pool2: str | None = None) -> list[dict]:
    """The zoo network's layers in Caffe's order, with random (He-scaled) OIHW weights and positive biases;
    `pool2` replaces the preset's pooling after block 2."""
    blocks = architectures.PRESETS[preset]["blocks"]
    names = ci.CAFFE_LAYERS[preset]
    layers, cin, bottom = [{"name": "data", "type": "Data"}], 3, "data"
    pools = 0
    for bi, (block, block_names) in enumerate(zip(blocks, names), start=1):
        widths = block.widths
        for j, (name, width) in enumerate(zip(block_names, widths)):
            k, stride, pad = (block.kernel, block.stride, block.pad) if j == 0 else (1, 1, 0)
            w = (rng.standard_normal((width, cin, k, k)) * np.sqrt(2.0 / (cin * k * k))).astype(np.float32)
            b = rng.uniform(0.0, 0.1, width).astype(np.float32)
            layers.append({"name": name, "type": "Convolution", "blobs": [w, b], "kernel": k, "stride": stride,
                           "pad": pad, "num_output": width, "bottom": bottom})
            layers.append({"name": f"relu_{name}", "type": "ReLU"})
            cin, bottom = width, name
        if block.pool is not None:
            pools += 1
            method = pool2 if bi == 2 and pool2 else block.pool
            layers.append({"name": f"pool{pools}", "type": "Pooling", "method": method, "kernel": 3, "stride": 2})
            layers.append({"name": f"drop{pools}", "type": "Dropout"})
    size = ci._final_map_size(preset)
    layers.append({"name": "pool_last", "type": "Pooling", "method": "avg", "kernel": size, "stride": 1})
    layers.append({"name": "loss", "type": "SoftmaxWithLoss"})
    return layers


def write_caffemodel(path, layers: list[dict], fmt: str) -> str:
    """Serialises `layers` as a NetParameter: fmt 'V1' (layers, enum types, legacy 4-D blob shapes, biases
    1x1x1xO as old Caffe saved them) or 'new' (layer, string types, BlobShape)."""
    messages = ci.caffe_messages()
    net = messages["NetParameter"](name="nin")
    for spec in layers:
        layer = net.layers.add() if fmt == "V1" else net.layer.add()
        layer.name = spec["name"]
        layer.type = V1_TYPE[spec["type"]] if fmt == "V1" else spec["type"]
        for blob_array in spec.get("blobs", []):
            blob = layer.blobs.add()
            if fmt == "V1":
                shape = blob_array.shape if blob_array.ndim == 4 else (1, 1, 1, blob_array.size)
                blob.num, blob.channels, blob.height, blob.width = shape
            else:
                blob.shape.dim.extend(blob_array.shape)
            blob.data.extend(blob_array.ravel().tolist())
        if spec["type"] == "Convolution":
            p = layer.convolution_param
            p.num_output = spec["num_output"]
            p.kernel_size.append(spec["kernel"])
            p.stride.append(spec["stride"])
            if spec["pad"]:
                p.pad.append(spec["pad"])
        if spec["type"] == "Pooling":
            p = layer.pooling_param
            p.pool = {"max": 0, "avg": 1, "stochastic": 2}[spec["method"]]
            p.kernel_size, p.stride = spec["kernel"], spec["stride"]
    with open(path, "wb") as f:
        f.write(net.SerializeToString())
    return str(path)


# --------------------------------------------------------------------------------- the NumPy reference


def _conv(x: np.ndarray, w: np.ndarray, b: np.ndarray, stride: int, pad: int) -> np.ndarray:
    """Caffe's convolution: cross-correlation of NCHW `x` with OIHW `w`, symmetric zero padding."""
    n, c, h, wid = x.shape
    o, _, k, _ = w.shape
    x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    oh, ow = (h + 2 * pad - k) // stride + 1, (wid + 2 * pad - k) // stride + 1
    cols = np.empty((n, c, k, k, oh, ow), x.dtype)
    for i in range(k):
        for j in range(k):
            cols[:, :, i, j] = x[:, :, i:i + stride * oh:stride, j:j + stride * ow:stride]
    return np.einsum("ncijhw,ocij->nohw", cols, w, optimize=True) + b[None, :, None, None]


def _pool(x: np.ndarray, method: str, k: int = 3, s: int = 2) -> np.ndarray:
    """Caffe's unpadded pooling in ceil mode: max over in-bounds pixels; average divided by their count."""
    n, c, h, w = x.shape
    oh, ow = -(-(h - k) // s) + 1, -(-(w - k) // s) + 1
    out = np.empty((n, c, oh, ow), x.dtype)
    for i in range(oh):
        for j in range(ow):
            window = x[:, :, i * s:min(i * s + k, h), j * s:min(j * s + k, w)]
            out[:, :, i, j] = window.max(axis=(2, 3)) if method == "max" else window.mean(axis=(2, 3))
    return out


def caffe_forward(layers: list[dict], x_nchw: np.ndarray) -> np.ndarray:
    """Logits of the Caffe net `layers` for its NCHW input: ReLU after every convolution, the 3x3/2 poolings,
    then the global average of the class maps."""
    x = x_nchw.astype(np.float64)
    for spec in layers:
        if spec["type"] == "Convolution":
            w, b = (a.astype(np.float64) for a in spec["blobs"])
            x = np.maximum(_conv(x, w, b, spec["stride"], spec["pad"]), 0.0)
        elif spec["type"] == "Pooling" and spec["name"] != "pool_last":
            x = _pool(x, spec["method"])
    return x.mean(axis=(2, 3))


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    """A V1-format NIN-CIFAR10 file (pool2 average, as in the zoo) and its layers."""
    layers = zoo_layers("nin_cifar10", np.random.default_rng(0), pool2="avg")
    path = write_caffemodel(tmp_path_factory.mktemp("caffe") / "cifar10_nin.caffemodel", layers, "V1")
    return path, layers


def cifar_config(tmp_path):
    from configs import cifar10  # pylint: disable=g-import-not-at-top

    config = cifar10.get_config()
    config.batch_size = config.run.eval_batch_size = 8
    config.run.cache_dir = str(tmp_path / "cache")
    return config


# ------------------------------------------------------------------------------------------------- tests


def test_schema_uses_caffes_field_numbers():
    m = ci.caffe_messages()

    def numbers(name):
        return {f.name: f.number for f in m[name].DESCRIPTOR.fields}

    assert numbers("NetParameter") == {"name": 1, "layers": 2, "layer": 100}
    assert numbers("BlobProto") == {"num": 1, "channels": 2, "height": 3, "width": 4, "data": 5, "shape": 7,
                                    "double_data": 8}
    assert numbers("BlobShape") == {"dim": 1}
    assert {k: v for k, v in numbers("LayerParameter").items()} == {
        "name": 1, "type": 2, "bottom": 3, "top": 4, "blobs": 7, "convolution_param": 106, "pooling_param": 121}
    assert numbers("V1LayerParameter") == {"bottom": 2, "top": 3, "name": 4, "type": 5, "blobs": 6,
                                           "convolution_param": 10, "pooling_param": 19}
    conv = numbers("ConvolutionParameter")
    assert (conv["num_output"], conv["pad"], conv["kernel_size"], conv["group"], conv["stride"]) == (1, 3, 4, 5, 6)
    pool = numbers("PoolingParameter")
    assert (pool["pool"], pool["kernel_size"], pool["stride"], pool["pad"], pool["global_pooling"]) == (1, 2, 3, 4, 12)
    # Packed floats (BlobProto.data) on the wire: tag (5 << 3) | 2, then the byte length.
    blob = m["BlobProto"](data=[1.0, 2.0])
    assert blob.SerializeToString() == bytes([5 << 3 | 2, 8]) + np.float32([1, 2]).tobytes()


def test_parse_reads_both_formats(tmp_path):
    layers = zoo_layers("nin_cifar10", np.random.default_rng(1), pool2="avg")
    for fmt in ("V1", "new"):
        path = write_caffemodel(tmp_path / f"{fmt}.caffemodel", layers, fmt)
        got_fmt, parsed, sha = ci.read_caffemodel(path)
        assert got_fmt == fmt and sha == hashlib.sha256(open(path, "rb").read()).hexdigest()
        conv2 = next(x for x in parsed if x.name == "conv2")
        assert conv2.type == "Convolution" and conv2.conv == {"kernel": 5, "stride": 1, "pad": 2, "group": 1}
        np.testing.assert_array_equal(conv2.blobs[0], layers[[x["name"] for x in layers].index("conv2")]["blobs"][0])
        assert conv2.blobs[1].shape == ((1, 1, 1, 192) if fmt == "V1" else (192,))
        assert [x.pool["method"] for x in parsed if x.type == "Pooling"] == ["max", "avg", "avg"]
    mean = ci.caffe_messages()["BlobProto"](num=1, channels=3, height=2, width=2)
    mean.data.extend(np.repeat([104.0, 117.0, 123.0], 4).tolist())  # a BGR mean image, NCHW
    (tmp_path / "mean.binaryproto").write_bytes(mean.SerializeToString())
    assert ci.mean_bgr_from_file(str(tmp_path / "mean.binaryproto")) == (104.0, 117.0, 123.0)


def test_cifar10_v1_import_matches_caffe_forward_and_evaluates(cifar, tmp_path):
    path, layers = cifar
    workdir = str(tmp_path / "w")
    with tfds.testing.mock_data(num_examples=16, policy=tfds.testing.MockPolicy.USE_CODE):
        summary = ci.import_caffemodel(path, "nin_cifar10", workdir, config=cifar_config(tmp_path),
                                       data_dir=str(tmp_path / "tfds"))
        out = evaluate.evaluate_checkpoint(workdir)
    assert out["step"] == 0 and out["num_examples"] == 16 and np.isfinite(out["eval/loss"])
    assert out["arch"] == "nin_cifar10"
    saved = json.loads(open(os.path.join(workdir, ci.IMPORT_FILE)).read())
    assert saved["sha256"] == hashlib.sha256(open(path, "rb").read()).hexdigest() == summary["sha256"]
    assert (saved["format"], saved["pool2"], saved["preprocess"]) == ("V1", "avg", "gcn_zca")
    assert saved["layers"]["cccp6"] == "block3/mlp2"

    run = restore.load_run(workdir)
    assert run.config.model.pool2 == "avg" and run.preprocessing.normalizer.method == "gcn_zca"
    images = np.random.default_rng(2).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    x = np.asarray(run.preprocessing.normalizer(images), np.float32)  # Caffe's input: the whitened images
    logits = run.forward(x)["logits"]
    expected = caffe_forward(layers, x.transpose(0, 3, 1, 2))
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    assert np.abs(expected - expected.mean(axis=1, keepdims=True)).max() > 1e-3  # the classes differ

    with pytest.raises(ConfigError, match="is not empty"):
        ci.import_caffemodel(path, "nin_cifar10", workdir, config=cifar_config(tmp_path))


def test_imagenet_new_format_import_reverses_bgr_and_subtracts_the_mean(tmp_path):
    layers = zoo_layers("nin_imagenet", np.random.default_rng(3))
    path = write_caffemodel(tmp_path / "nin_imagenet.caffemodel", layers, "new")
    workdir = str(tmp_path / "w")
    from configs import imagenet  # pylint: disable=g-import-not-at-top

    config = imagenet.get_config()
    if "ema_decay" in config.optim:  # a run keeping a weight average evaluates it: it must be the import too
        config.optim.ema_decay = 0.999
    summary = ci.import_caffemodel(path, "nin_imagenet", workdir, config=config)
    assert (summary["format"], summary["preprocess"], summary["pool2"]) == ("new", "standardize", "max")
    assert summary["layers"]["cccp8-1024"] == "block4/mlp2"
    run = restore.load_run(workdir)
    assert run.num_classes == 1000 and run.image_shape == (224, 224, 3) and run.class_names[0] == "n01440764"
    # 103x103 is the smallest size here whose every pooling overhangs the border (24 -> 12 -> 6 -> 3).
    rgb = np.random.default_rng(4).integers(0, 256, (2, 103, 103, 3), dtype=np.uint8)
    logits = run.forward(run.preprocessing.normalizer(rgb))["logits"]
    bgr = rgb[..., ::-1].astype(np.float64) - np.asarray(ci.IMAGENET_MEAN_BGR)
    expected = caffe_forward(layers, bgr.transpose(0, 3, 1, 2))
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_wrong_files_are_one_line_errors(cifar, tmp_path):
    path, layers = cifar
    workdir = str(tmp_path / "w")
    with pytest.raises(ConfigError, match="does not exist"):
        ci.import_caffemodel(str(tmp_path / "missing.caffemodel"), "nin_cifar10", workdir)
    garbage = tmp_path / "garbage.caffemodel"
    garbage.write_bytes(b"\xff" * 64)
    with pytest.raises(ConfigError, match="cannot be parsed|holds no layers"):
        ci.import_caffemodel(str(garbage), "nin_cifar10", workdir)
    with pytest.raises(ConfigError, match=r"layer conv1 weights .* has shape \(192, 3, 5, 5\), the preset expects "
                                          r"\(96, 3, 11, 11\)"):
        ci.import_caffemodel(path, "nin_imagenet", workdir)
    bad = [dict(x) for x in layers]
    cccp6 = next(x for x in bad if x["name"] == "cccp6")
    cccp6["blobs"] = [cccp6["blobs"][0][:7], cccp6["blobs"][1][:7]]
    with pytest.raises(ConfigError, match=r"layer cccp6 weights .* \(7, 192, 1, 1\).* \(10, 192, 1, 1\)"):
        ci.import_caffemodel(write_caffemodel(tmp_path / "c.caffemodel", bad, "new"), "nin_cifar10", workdir)
    bad = [dict(x, method="avg") if x["name"] == "pool1" else x for x in layers]  # pool2 is avg already
    with pytest.raises(ConfigError, match="pooling layer pool1 is avg pooling, nin_cifar10 has max"):
        ci.import_caffemodel(write_caffemodel(tmp_path / "p.caffemodel", bad, "V1"), "nin_cifar10", workdir)
    from configs import cifar10  # pylint: disable=g-import-not-at-top

    with pytest.raises(ConfigError, match=r"changes the zoo network \(model.batch_norm=True\)"):
        ci.import_caffemodel(path, "nin_cifar10", workdir, config=cifar10.get_config("modern"))
    with pytest.raises(ConfigError, match="--data_dir is required"):
        ci.import_caffemodel(path, "nin_cifar10", workdir, config=cifar_config(tmp_path))
    with pytest.raises(ConfigError, match="not prepared"):  # no dataset there (and no mock)
        ci.import_caffemodel(path, "nin_cifar10", workdir, config=cifar_config(tmp_path),
                             data_dir=str(tmp_path / "empty"))
    assert not os.path.exists(workdir)  # every check comes before anything is written
    os.makedirs(workdir)
    (tmp_path / "w" / "x").write_text("")
    with pytest.raises(ConfigError, match="is not empty"):
        ci.import_caffemodel(path, "nin_cifar10", workdir)


def test_cli_prints_one_line_errors(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-m", "nin_jax.caffe_import", f"--caffemodel={tmp_path / 'no.caffemodel'}",
                           "--preset=nin_cifar10", f"--workdir={tmp_path / 'w'}"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and proc.stdout == ""
    errors = [line for line in proc.stderr.strip().splitlines() if line.startswith("error:")]
    assert errors == proc.stderr.strip().splitlines()[-1:] == [
        f"error: --caffemodel={tmp_path / 'no.caffemodel'} does not exist; pass the downloaded .caffemodel file."]
