"""Restoring a run for inference: predict (API and CLI) against evaluation, the digest check, image handling.

The run is trained once per test process (`folder_run`, also used by test_export.py) on an image folder
written here: 3 classes of tinted noise images of random sizes, resized to 8x8 (`config.image_size`), with
the paper's GCN + ZCA preprocessing. Its `test` split holds exactly the three images given to `predict`.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile

import jax
import numpy as np
import pytest
from PIL import Image

from nin_jax import data, train
from nin_jax.config import ConfigError
from nin_jax.tools import evaluate, predict, restore

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ("ant", "bee", "cat")
TINTS = {"ant": (200, 60, 60), "bee": (60, 200, 60), "cat": (60, 60, 200)}
SUBPROCESS_ENV = {"JAX_DISABLE_MOST_OPTIMIZATIONS": "1", "NIN_JAX_NO_REEXEC": "1"}  # as conftest, in-process


def _write_image(path: str, name: str, rng: np.random.Generator) -> None:
    h, w = rng.integers(10, 30, size=2)
    pixels = rng.integers(0, 120, size=(h, w, 3)) + np.array(TINTS[name]) // 2
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path)


def folder_config(data_dir: str, cache_dir: str):
    from nin_jax.config import get_config  # pylint: disable=g-import-not-at-top

    config = get_config()
    config.update_from_flattened_dict({
        "dataset": "image_folder", "run.data_dir": data_dir, "run.cache_dir": cache_dir, "train_split": "train",
        "eval_split": "test", "image_size": 8, "preprocess": "gcn_zca", "augment.translate": 0,
        "augment.flip": False, "model.arch": "nin_digits", "model.blocks": "3:16-12-8, 3:24-24-16, 3:24-24-C",
        "model.batch_norm": True,
        "batch_size": 24, "run.eval_batch_size": 8, "num_train_steps": 16, "optim.learning_rate": 0.05,
        "run.log_every_steps": 4, "run.eval_every_steps": 8, "run.checkpoint_every_steps": 8,
    })
    return config


@functools.cache
def folder_run() -> dict:
    """Trains the image-folder run once per process: {"workdir", "data_dir", "cache_dir", "images", "labels"}."""
    root = tempfile.mkdtemp(prefix="nin_predict_tests_")
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    data_dir, cache_dir, workdir = (os.path.join(root, d) for d in ("data", "cache", "run"))
    rng = np.random.default_rng(0)
    images, labels = [], []
    for split, per_class in (("train", 16), ("test", 1)):
        for label, name in enumerate(CLASSES):
            os.makedirs(os.path.join(data_dir, split, name))
            for i in range(per_class):
                path = os.path.join(data_dir, split, name, f"{i}.png")
                _write_image(path, name, rng)
                if split == "test":
                    images.append(path)
                    labels.append(label)
    data.clear_caches()
    train.train_and_evaluate(folder_config(data_dir, cache_dir), workdir)
    return {"workdir": workdir, "data_dir": data_dir, "cache_dir": cache_dir, "images": images, "labels": labels,
            "root": root}


@pytest.fixture(autouse=True)
def _no_reexec(monkeypatch):
    """CLI mains called in-process must not re-execute the test process (nin_jax.cpu.hostenv)."""
    monkeypatch.setenv("NIN_JAX_NO_REEXEC", "1")


@pytest.fixture(scope="module")
def trained():
    return folder_run()


@pytest.fixture(scope="module")
def run(trained):
    return restore.load_run(trained["workdir"])


def test_api_probabilities_equal_the_evaluation_of_the_same_images(trained, run):
    assert run.class_names == CLASSES and run.image_shape == (8, 8, 3) and run.step == 16
    probs = run.predict(trained["images"])
    assert probs.shape == (3, 3) and np.allclose(probs.sum(-1), 1.0, atol=1e-6)
    labels = np.array(trained["labels"])

    # The evaluation path on the same three images (the run's `test` split): same pixels, inputs, logits.
    ev_run, pipeline = evaluate.restore_for_evaluation(trained["workdir"])
    batch = jax.device_get(next(iter(evaluate.eval_batches(pipeline, "test", with_raw=True))))
    order = np.argsort(batch["label"][:3])  # the folder's split is shuffled; one image per class
    assert (batch["label"][:3][order] == labels).all()
    np.testing.assert_array_equal(batch["raw"][:3][order], run.load_images(trained["images"]))
    np.testing.assert_allclose(batch["image"][:3][order], run.preprocess(trained["images"]), rtol=1e-6, atol=1e-6)
    eval_logits = ev_run.forward(batch["image"][:3][order])["logits"]
    np.testing.assert_allclose(run.logits(trained["images"]), eval_logits, rtol=1e-5, atol=1e-6)

    # ... and its metrics: evaluate's loss is the mean -log p(true class), its top-1 the argmax hits.
    ev = evaluate.evaluate_checkpoint(trained["workdir"], split="test")
    assert ev["num_examples"] == 3 and ev["step"] == 16
    assert ev["eval/loss"] == pytest.approx(float(np.mean(-np.log(probs[np.arange(3), labels]))), rel=1e-5)
    assert ev["eval/top1"] == pytest.approx(float(np.mean(probs.argmax(-1) == labels)))
    with open(os.path.join(trained["workdir"], "results.json")) as f:  # training's own final evaluation
        assert json.load(f)["eval/loss"] == pytest.approx(ev["eval/loss"], rel=1e-5)


@pytest.mark.slow
def test_cli_prints_top_classes_by_name_with_the_api_probabilities(trained, run, capsys):
    probs = run.predict(trained["images"])
    env = {**os.environ, **SUBPROCESS_ENV}
    proc = subprocess.run([sys.executable, "-m", "nin_jax.predict", f"--workdir={trained['workdir']}", "--json",
                           "--top=2", *trained["images"]], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.strip().splitlines()]
    assert [r["image"] for r in rows] == trained["images"]
    for row, p in zip(rows, probs):
        assert [t["class"] for t in row["top"]] == [CLASSES[c] for c in np.argsort(-p)[:2]]
        for t in row["top"]:
            assert t["probability"] == pytest.approx(float(p[t["index"]]), rel=1e-6, abs=1e-7)
        assert row["step"] == 16 and row["checkpoint"].endswith("checkpoints/16")

    # The text form (in-process): each image, then its classes by name, most probable first.
    assert predict.main([f"--workdir={trained['workdir']}", "--top=3", *trained["images"]]) == 0
    out = capsys.readouterr().out.splitlines()
    for k, (image, p) in enumerate(zip(trained["images"], probs)):
        assert out[4 * k] == image
        for j, c in enumerate(np.argsort(-p)):
            assert out[4 * k + 1 + j].split() == [f"{100 * p[c]:.3f}%", CLASSES[c]]


def test_loading_a_run_checks_the_checkpoint_against_its_digest(trained, tmp_path):
    """The tools verify what they restore as training does: a step whose arrays differ from their saved
    digest is passed over by `latest`, naming it, and refused when asked for by number."""
    copy = tmp_path / "run"
    shutil.copytree(trained["workdir"], copy)
    meta_file = copy / "checkpoints" / "16" / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    meta["state_sha256"] = "0" * 64  # as if the arrays had changed since they were written
    meta_file.write_text(json.dumps(meta))
    warnings = []
    run = restore.load_run(str(copy), warn=warnings.append)
    assert run.step == 8 and len(warnings) == 1 and "does not match its saved digest" in warnings[0]
    expected = restore.load_run(trained["workdir"], checkpoint="8").variables
    for a, b in zip(jax.tree.leaves(run.variables), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ConfigError, match=r"\(--checkpoint=16\) is unreadable .* saved digest.* pass --checkpoint=8"):
        restore.load_run(str(copy), checkpoint="16")


@pytest.mark.slow
def test_predict_and_evaluate_work_after_the_training_data_and_caches_are_deleted(trained, run, tmp_path):
    """A copy of the run whose training split, fitted-statistics caches and ~/.cache are gone: the run's
    own record of its preprocessing (preprocessing.npz, dataset.json) is all that is needed."""
    workdir, data_dir, cache_dir = tmp_path / "run", tmp_path / "data", tmp_path / "cache"
    shutil.copytree(trained["workdir"], workdir)
    shutil.copytree(trained["data_dir"], data_dir)
    config = json.loads((workdir / "config.json").read_text())
    config["run"].update(data_dir=str(data_dir), cache_dir=str(cache_dir))  # where this copy's data "lived"
    (workdir / "config.json").write_text(json.dumps(config))
    shutil.rmtree(data_dir / "train")
    for stale in data_dir.glob("nin_jax_*.npz"):  # statistics cached beside the data
        stale.unlink()
    shutil.rmtree(cache_dir, ignore_errors=True)
    images = [str(data_dir / "test" / name / "0.png") for name in CLASSES]
    env = {**os.environ, **SUBPROCESS_ENV, "HOME": str(tmp_path / "home")}  # an empty ~/.cache
    proc = subprocess.run([sys.executable, "-m", "nin_jax.predict", f"--workdir={workdir}", "--json", "--top=3",
                           *images], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    probs = run.predict(trained["images"])
    for row, p in zip((json.loads(line) for line in proc.stdout.strip().splitlines()), probs):
        for t in row["top"]:
            assert t["probability"] == pytest.approx(float(p[t["index"]]), rel=1e-6, abs=1e-7)
    proc = subprocess.run([sys.executable, "-m", "nin_jax.evaluate", f"--workdir={workdir}"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    evaluated, final = json.loads(proc.stdout.strip().splitlines()[-1]), json.loads(
        (workdir / "results.json").read_text())
    assert (evaluated["eval/top1"], evaluated["num_examples"]) == (final["eval/top1"], final["eval/num_examples"])
    assert evaluated["eval/loss"] == pytest.approx(final["eval/loss"], rel=1e-6)


def test_images_of_any_size_and_kind(run, trained, tmp_path):
    """Arrays and files, gray or RGB(A), any size: resized (bilinear) to the model input like the pipeline."""
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (17, 23, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    Image.fromarray(rgb).save(tmp_path / "a.jpg", quality=95)
    expected = np.asarray(Image.fromarray(rgb).resize((8, 8), Image.BILINEAR))
    np.testing.assert_array_equal(run.load_images(rgb)[0], expected)
    np.testing.assert_array_equal(run.load_images(str(tmp_path / "a.png"))[0], expected)
    assert run.load_images(tmp_path / "a.jpg").shape == (1, 8, 8, 3)
    gray, rgba = rgb[..., 0], np.concatenate([rgb, np.full((17, 23, 1), 255, np.uint8)], -1)
    assert run.load_images([gray, rgba, gray[..., None]]).shape == (3, 8, 8, 3)
    np.testing.assert_array_equal(run.load_images(rgba)[0], expected)
    batch = rng.integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    np.testing.assert_array_equal(run.load_images(batch), batch)  # model-size batches pass unchanged
    assert run.predict(batch).shape == (5, 3) and run.class_maps(batch[:2]).shape == (2, 2, 2, 3)
    # A batch larger than the device count and than batch_size: the same probabilities in any split.
    np.testing.assert_allclose(run.predict(batch, batch_size=8), np.concatenate([run.predict(b[None]) for b in batch]),
                               rtol=1e-5, atol=1e-6)
    top = run.top_classes(run.predict(batch[:1]), k=2)
    assert len(top[0]) == 2 and top[0][0][0] in CLASSES and top[0][0][1] >= top[0][1][1]
    with pytest.raises(ConfigError, match="does not exist"):
        run.predict(str(tmp_path / "missing.png"))
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ConfigError, match="cannot decode image .*bad.png"):
        run.predict(str(tmp_path / "bad.png"))
    with pytest.raises(ConfigError, match="uint8"):
        run.predict(rgb.astype(np.float32))


def test_center_crop_matches_the_per_example_eval_path(tmp_path):
    """Runs decoded per example (ImageNet-style): short side resized, central crop, JPEGs decoded at reduced
    scale, as the pipeline's evaluation does them."""
    rng = np.random.default_rng(2)
    paths = []
    for split, per_class in (("train", 3), ("test", 2)):
        for name in CLASSES:
            os.makedirs(tmp_path / split / name)
            for i in range(per_class):
                h, w = rng.integers(40, 130, size=2)
                path = str(tmp_path / split / name / f"{i}.{'jpg' if i == 0 else 'png'}")
                Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
                if split == "test":
                    paths.append(path)
    config = folder_config(str(tmp_path), str(tmp_path / "cache"))
    config.update_from_flattened_dict({"augment.random_resized_crop": True, "augment.eval_resize": 20,
                                       "image_size": 16, "preprocess": "scale", "batch_size": 8})
    mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    pipeline = data.Pipeline(config, jax.sharding.NamedSharding(mesh, jax.P("data")))
    prep = restore.Preprocessing.from_pipeline(pipeline, config)
    assert prep.fit == "center_crop" and prep.image_shape == (16, 16, 3)
    raw = jax.device_get(next(iter(pipeline.eval_batches(with_raw=True))))["raw"][:len(paths)]
    ours = restore.load_images(paths, prep)
    matches = [[k for k in range(len(ours)) if np.array_equal(r, ours[k])] for r in raw]
    assert sorted(m[0] for m in matches if len(m) == 1) == list(range(len(paths))), matches


def test_cli_errors_are_one_line(trained, capsys, tmp_path):
    workdir = trained["workdir"]
    assert predict.main([f"--workdir={workdir}", str(tmp_path / "missing.png")]) == 1
    assert capsys.readouterr().err.strip() == f"error: image {tmp_path / 'missing.png'} does not exist."
    assert predict.main([f"--workdir={workdir}", "--top=0", trained["images"][0]]) == 1
    assert "--top=0 must be >= 1" in capsys.readouterr().err
    assert predict.main([f"--workdir={workdir}", "--checkpoint=3", trained["images"][0]]) == 1
    assert "--checkpoint=3: no such step" in capsys.readouterr().err
    assert predict.main([f"--workdir={tmp_path}", trained["images"][0]]) == 1
    assert "config.json does not exist" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    assert predict.main([f"--workdir={tmp_path}", f"--out={tmp_path / 'file' / 'p.txt'}", trained["images"][0]]) == 1
    assert capsys.readouterr().err.startswith(f"error: --out={tmp_path / 'file' / 'p.txt'} is not writable")
    assert predict.main([f"--workdir={workdir}", "--json", f"--out={tmp_path / 'p.jsonl'}", *trained["images"]]) == 0
    assert len((tmp_path / "p.jsonl").read_text().splitlines()) == 3 and capsys.readouterr().out == ""


def test_output_paths_are_checked_first(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match=r"--out=.*file/maps.png is not writable"):
        restore.check_output_path(str(tmp_path / "file" / "maps.png"))
    with pytest.raises(ConfigError, match="is a directory"):
        restore.check_output_path(str(tmp_path))
    with pytest.raises(ConfigError, match=r"--out=.*file is a file; pass a directory"):
        restore.check_output_path(str(tmp_path / "file"), directory=True)
    restore.check_output_path(str(tmp_path / "new" / "deeper" / "maps.png"))
    assert (tmp_path / "new" / "deeper").is_dir() and not list((tmp_path / "new" / "deeper").iterdir())
