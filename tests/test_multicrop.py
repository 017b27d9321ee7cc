"""Test-time evaluation protocols of large images: `--crops=1|10`, `--resize=short_side|square`.

One tiny run is trained per test process on an image folder written here (non-square JPEGs larger than the
16x16 model input, decoded per example). Every expected number is formed by the test itself: crop boxes from
the resize-then-crop geometry, cropped from the decoded image, normalised with the run's normaliser and
forwarded through `restore.load_run(...).forward`; loss, top-1 and top-5 computed in numpy.
"""

from __future__ import annotations

import json
import os

import cv2
import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

from nin_jax import config as config_lib, data, train
from nin_jax.config import ConfigError
from nin_jax.data import decode, run_record
from nin_jax.tools import evaluate, restore

pytestmark = pytest.mark.cpu  # trains on the 8 host devices of conftest

CLASSES = ("a", "b", "c", "d", "e", "f")
SIZE, RESIZE = 16, 20  # config.image_size, config.augment.eval_resize
# (height, width) of the test images: non-square, both sides < 2 * RESIZE (so JPEGs decode at full scale) and
# no crop box edge at a half pixel (so rounding the box is unambiguous; checked in `_boxes`).
TEST_SIZES = ((24, 37), (33, 22), (27, 38), (38, 26), (23, 31), (29, 21))


def _write_jpeg(path: str, h: int, w: int, label: int, rng: np.random.Generator) -> None:
    """A smooth image (gradients tinted by the class) with a little noise: resizes of it are close."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    tint = np.array([(37 * label) % 256, (91 * label + 40) % 256, (53 * label + 120) % 256], np.float32)
    pixels = tint * 0.5 + np.stack([200 * x / w, 200 * y / h, 100 * (x + y) / (w + h)], -1) * 0.5
    pixels += rng.normal(0, 4, pixels.shape)
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=95)


def _config(data_dir: str, cache_dir: str) -> ml_collections.ConfigDict:
    config = config_lib.get_config()
    config.update_from_flattened_dict({
        "dataset": "image_folder", "run.data_dir": data_dir, "run.cache_dir": cache_dir, "train_split": "train",
        "eval_split": "test", "image_size": SIZE, "preprocess": "standardize", "augment.translate": 0,
        "augment.random_resized_crop": True, "augment.eval_resize": RESIZE, "augment.flip": True,
        "model.arch": "nin_digits", "model.blocks": "3:16-12-8, 3:24-24-16, 3:24-24-C", "model.dropout_rate": 0.0,
        "batch_size": 8, "run.eval_batch_size": 8, "num_train_steps": 2, "optim.learning_rate": 0.05,
        "run.log_every_steps": 1, "run.eval_every_steps": 2, "run.checkpoint_every_steps": 2,
    })
    return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("multicrop")
    data_dir, workdir = root / "data", root / "run"
    rng = np.random.default_rng(0)
    images = []  # (path, label) of the test split
    for split, per_class in (("train", 2), ("test", 2)):
        for label, name in enumerate(CLASSES):
            os.makedirs(data_dir / split / name)
            for i in range(per_class):
                h, w = TEST_SIZES[(label + i) % len(TEST_SIZES)] if split == "test" else rng.integers(24, 60, 2)
                path = str(data_dir / split / name / f"{i}.jpg")
                _write_jpeg(path, int(h), int(w), label, rng)
                if split == "test":
                    images.append((path, label))
    data.clear_caches()
    results = train.train_and_evaluate(_config(str(data_dir), str(root / "cache")), str(workdir))
    return {"workdir": str(workdir), "images": images, "results": results, "root": root}


@pytest.fixture(autouse=True)
def _no_reexec(monkeypatch):
    monkeypatch.setenv("NIN_JAX_NO_REEXEC", "1")  # evaluate.main runs in this process


@pytest.fixture(scope="module")
def run(trained):
    return restore.load_run(trained["workdir"])


# ---------------------------------------------------------------------------------------- the test's own crops


def _boxes(width: int, height: int, resize: str, ten: bool) -> list[tuple[int, int, int, int]]:
    """Integer (x0, y0, x1, y1) in the original image of the SIZE x SIZE crops of the image resized to
    RESIZE on its short side (short_side) or to RESIZE x RESIZE (square): the center crop, and with `ten` the
    four corner crops too (their flips are added by `_crops`)."""
    if resize == "short_side":
        sx = sy = RESIZE / min(width, height)
    else:
        sx, sy = RESIZE / width, RESIZE / height
    rw, rh = width * sx, height * sy  # the resized image
    lefts_tops = [((rw - SIZE) / 2, (rh - SIZE) / 2)]
    if ten:
        lefts_tops += [(0, 0), (rw - SIZE, 0), (0, rh - SIZE), (rw - SIZE, rh - SIZE)]
    out = []
    for left, top in lefts_tops:
        edges = (left / sx, top / sy, (left + SIZE) / sx, (top + SIZE) / sy)  # back in the original's pixels
        assert all(abs(e % 1 - 0.5) > 1e-3 for e in edges), (width, height, edges)  # no rounding tie
        out.append(tuple(int(round(e)) for e in edges))
    return out


def _crops(path: str, resize: str, ten: bool) -> np.ndarray:
    """uint8 [1 or 10, SIZE, SIZE, 3]: the crops of one image, each a bicubic resize of its box."""
    image = cv2.imdecode(np.fromfile(path, np.uint8), cv2.IMREAD_COLOR_RGB)
    height, width = image.shape[:2]
    crops = [cv2.resize(image[y0:y1, x0:x1], (SIZE, SIZE), interpolation=cv2.INTER_CUBIC)
             for x0, y0, x1, y1 in _boxes(width, height, resize, ten)]
    if ten:
        crops += [c[:, ::-1] for c in crops]
    return np.stack(crops)


def _expected(run, images, resize: str, ten: bool) -> dict[str, float]:
    """Metrics of the mean logits over each image's crops, by the test's own crops and numpy."""
    crops = np.stack([_crops(path, resize, ten) for path, _ in images])  # [N, k, h, w, c]
    n, k = crops.shape[:2]
    x = run.preprocessing.normalizer(crops.reshape(n * k, *crops.shape[2:]))
    logits = run.forward(x)["logits"].astype(np.float64).reshape(n, k, -1).mean(axis=1)
    labels = np.array([label for _, label in images])
    z = logits - logits.max(-1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(-1, keepdims=True))
    order = np.argsort(-logits, axis=-1, kind="stable")
    return {"eval/loss": float(-log_p[np.arange(n), labels].mean()),
            "eval/top1": float((order[:, 0] == labels).mean()),
            "eval/top5": float((order[:, :5] == labels[:, None]).any(-1).mean()), "logits": logits}


def _assert_matches(out: dict, expected: dict) -> None:
    assert out["num_examples"] == len(expected["logits"])
    assert out["eval/top1"] == pytest.approx(expected["eval/top1"], abs=1e-6)
    assert out["eval/top5"] == pytest.approx(expected["eval/top5"], abs=1e-6)
    assert out["eval/loss"] == pytest.approx(expected["eval/loss"], rel=1e-5)


# ------------------------------------------------------------------------------------------------------ tests


def test_ten_crops_are_the_mean_logits_of_the_corner_and_center_crops_and_their_flips(trained, run, capsys):
    assert run.class_names == CLASSES and run.image_shape == (SIZE, SIZE, 3)
    assert evaluate.main([f"--workdir={trained['workdir']}", "--crops=10"]) == 0
    out = json.loads(capsys.readouterr().out.strip())
    assert (out["crops"], out["resize"], out["eval_resize"]) == (10, "short_side", RESIZE)
    expected = _expected(run, trained["images"], "short_side", ten=True)
    _assert_matches(out, expected)
    # ... and not one crop's numbers: the 10 crops give other logits than the center crop alone.
    center = _expected(run, trained["images"], "short_side", ten=False)
    assert not np.allclose(expected["logits"], center["logits"], rtol=1e-4, atol=1e-5)
    assert out["eval/loss"] != pytest.approx(center["eval/loss"], rel=1e-5)
    # The two flags combine: 10 crops of the warped image.
    both = evaluate.evaluate_checkpoint(trained["workdir"], crops=10, resize="square")
    assert (both["crops"], both["resize"]) == (10, "square")
    _assert_matches(both, _expected(run, trained["images"], "square", ten=True))


def test_one_crop_is_todays_evaluation(trained, run):
    default = evaluate.evaluate_checkpoint(trained["workdir"])
    explicit = evaluate.evaluate_checkpoint(trained["workdir"], crops=1, resize="short_side")
    assert (default["crops"], default["resize"]) == (1, "short_side")
    for key in ("eval/top1", "eval/top5", "eval/loss", "num_examples", "step"):
        assert default[key] == explicit[key]
    results = trained["results"]  # training's own final evaluation
    assert default["eval/top1"] == results["eval/top1"] and default["num_examples"] == results["eval/num_examples"]
    assert default["eval/loss"] == pytest.approx(results["eval/loss"], rel=1e-5)
    _assert_matches(default, _expected(run, trained["images"], "short_side", ten=False))
    # The center box is `center_box`'s, as before eval_resize_mode existed, for any image and sizes.
    for width, height, size, resize in ((37, 24, 16, 20), (500, 375, 224, 256), (31, 90, 32, 28), (64, 64, 8, 8)):
        assert decode.eval_boxes(width, height, size, resize)[0] == decode.center_box(width, height, size, resize)


def test_square_warps_the_image_and_differs_from_short_side(trained, run):
    square = evaluate.evaluate_checkpoint(trained["workdir"], resize="square")
    short = evaluate.evaluate_checkpoint(trained["workdir"], resize="short_side")
    assert (square["crops"], square["resize"]) == (1, "square")
    assert square["eval/loss"] != pytest.approx(short["eval/loss"], rel=1e-6)  # non-square images: other pixels
    _assert_matches(square, _expected(run, trained["images"], "square", ten=False))
    # The run's predict path follows the protocol too, and so do its boxes: a warp to 20x20 then a central
    # 16x16 crop of it is close to the one resize of the box (smooth images), the short-side crop is not.
    prep = restore.Preprocessing.from_record(run_record.load(trained["workdir"]))
    assert prep.eval_resize_mode == "short_side"
    warped_prep = restore.Preprocessing(**{**prep.__dict__, "eval_resize_mode": "square"})
    paths = [p for p, _ in trained["images"]]
    ours = restore.load_images(paths, warped_prep)
    np.testing.assert_array_equal(ours, np.stack([_crops(p, "square", False)[0] for p in paths]))
    lo = (RESIZE - SIZE) // 2
    literal = np.stack([cv2.resize(cv2.imdecode(np.fromfile(p, np.uint8), cv2.IMREAD_COLOR_RGB), (RESIZE, RESIZE),
                                   interpolation=cv2.INTER_AREA)[lo:lo + SIZE, lo:lo + SIZE] for p in paths])
    short_side = restore.load_images(paths, prep)
    err_square = np.abs(ours.astype(float) - literal).mean()
    err_short = np.abs(short_side.astype(float) - literal).mean()
    assert err_square < 2.5 and err_square < err_short / 2, (err_square, err_short)
    assert "warped to 20x20" in warped_prep.describe_fit()


def test_the_resize_protocol_is_a_config_field_saved_in_the_run_record(trained, tmp_path):
    config = config_lib.get_config()
    assert config.augment.eval_resize_mode == "short_side"
    config.augment.eval_resize_mode = "warp"
    with pytest.raises(ConfigError, match=r"config.augment.eval_resize_mode='warp' must be one of short_side, "
                                          r"square"):
        config_lib.validate(config)
    with open(os.path.join(trained["workdir"], run_record.DATASET_FILE)) as f:
        meta = json.load(f)
    assert meta["eval_resize_mode"] == "short_side"
    # A record written before the field existed still loads, as short_side.
    old = tmp_path / "old"
    old.mkdir()
    with open(os.path.join(trained["workdir"], run_record.PREPROCESSING_FILE), "rb") as f:
        (old / run_record.PREPROCESSING_FILE).write_bytes(f.read())
    del meta["eval_resize_mode"]
    (old / run_record.DATASET_FILE).write_text(json.dumps(meta))
    assert run_record.load(old).eval_resize_mode == "short_side"


def _one_line_error(capsys, argv) -> str:
    assert evaluate.main(argv) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1, captured.err
    return lines[0]


def test_bad_values_and_small_image_datasets_are_one_line_errors(trained, tmp_path, capsys):
    workdir = trained["workdir"]
    line = _one_line_error(capsys, [f"--workdir={workdir}", "--crops=5"])
    assert line.startswith("error: --crops=5 is not an evaluation protocol: pass --crops=1")
    line = _one_line_error(capsys, [f"--workdir={workdir}", "--crops=ten"])
    assert line.startswith("error: --crops=ten is not an evaluation protocol")
    line = _one_line_error(capsys, [f"--workdir={workdir}", "--resize=warp"])
    assert line.startswith("error: --resize=warp is not a resize protocol: pass --resize=short_side")
    with pytest.raises(ConfigError, match="--crops=5 is not an evaluation protocol"):
        evaluate.evaluate_checkpoint(workdir, crops=5)

    # A small-image run (digits: whole-array splits): only config.json is read before the flags are refused.
    small = tmp_path / "digits_run"
    small.mkdir()
    config = config_lib.get_config()
    config.dataset, config.model.arch = "digits", "nin_digits"
    (small / "config.json").write_text(config.to_json())
    line = _one_line_error(capsys, [f"--workdir={small}", "--crops=10"])
    assert line.startswith("error: --crops=10 needs large images to crop: config.dataset='digits' holds small "
                           "images") and line.endswith("drop --crops.")
    line = _one_line_error(capsys, [f"--workdir={small}", "--resize=square"])
    assert line.startswith("error: --resize=square needs large images to resize") and line.endswith("drop --resize.")
    for dataset in ("cifar10", "mnist"):
        config.dataset = dataset
        with pytest.raises(ConfigError, match=f"--crops=10 needs large images.*'{dataset}'"):
            evaluate.check_protocol(config, 10, None)
        assert evaluate.check_protocol(config, "1", "short_side") == (1, None)


def test_training_evaluation_and_the_pipeline_follow_the_config_mode(trained, tmp_path):
    """config.augment.eval_resize_mode reaches the Pipeline's evaluation crops (what training evaluates)."""
    root = trained["root"]
    config = _config(str(root / "data"), str(tmp_path / "cache"))
    config.augment.eval_resize_mode = "square"
    mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    pipeline = data.Pipeline(config, jax.sharding.NamedSharding(mesh, jax.P("data")))
    try:
        rows = [row for batch in pipeline.eval_batches(with_raw=True)
                for row, keep in zip(jax.device_get(batch["raw"]), jax.device_get(batch["mask"])) if keep]
        ten = jax.device_get(next(iter(pipeline.eval_batches(with_raw=True, crops=10)))["raw"])
    finally:
        pipeline.close()
    expected = [_crops(path, "square", False)[0] for path, _ in trained["images"]]
    assert len(rows) == len(expected)
    assert all(any(np.array_equal(row, e) for e in expected) for row in rows)
    assert ten.shape == (8, 10, SIZE, SIZE, 3)
    tens = [_crops(path, "square", True) for path, _ in trained["images"]]
    assert all(any(np.array_equal(row, e) for e in tens) for row in ten)
    config.augment.eval_resize_mode = "warp"
    with pytest.raises(ConfigError, match="eval_resize_mode='warp' must be one of short_side, square"):
        data.Pipeline(config, jax.sharding.NamedSharding(mesh, jax.P("data")))


def test_ten_crops_of_one_decode(tmp_path):
    """`decode_eval_crops`: the center crop first (`decode_crop`'s pixels), the flips of the five last; gray too."""
    rng = np.random.default_rng(1)
    path = str(tmp_path / "g.png")
    Image.fromarray(rng.integers(0, 256, (30, 45), dtype=np.uint8)).save(path)
    for mode in ("short_side", "square"):
        ten = decode.decode_eval_crops(path, "g.png", 16, 1, eval_resize=20, eval_resize_mode=mode, crops=10)
        one = decode.decode_crop(path, "g.png", 16, 1, rng=None, flip=False, eval_resize=20, eval_resize_mode=mode)
        assert ten.shape == (10, 16, 16, 1) and ten.dtype == np.uint8
        np.testing.assert_array_equal(ten[0], one)
        np.testing.assert_array_equal(ten[5:], ten[:5, :, ::-1])
        assert len({t.tobytes() for t in ten}) == 10  # five boxes, two orientations: ten different crops
        np.testing.assert_array_equal(
            decode.decode_eval_crops(path, "g.png", 16, 1, eval_resize=20, eval_resize_mode=mode, crops=1)[0], one)
