"""Export for serving: the artifacts reload without nin_jax and give the Flax model's logits.

Uses the image-folder run of test_predict.py (GCN + ZCA preprocessing, trained once per test process), so the
normalisation inside the exported function is the paper's, with fitted statistics.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from nin_jax.config import ConfigError
from nin_jax.cpu import layers as cpu_layers
from nin_jax.tools import export, restore

import test_predict

try:  # the normaliser class, wherever the data layer keeps it
    from nin_jax.data import Normalizer
except ImportError:
    from nin_jax.preprocessing import Normalizer

# Runs in a fresh interpreter that never imports nin_jax (checked): only jax, TensorFlow and numpy.
LOADER = textwrap.dedent("""
    import sys
    import jax
    import numpy as np
    import tensorflow as tf

    folder, images_file, out_file = sys.argv[1:]
    images = np.load(images_file)
    exported = jax.export.deserialize(bytearray(open(folder + "/model.jax_export", "rb").read()))
    from_jax = exported.call(images)
    smaller = exported.call(images[:3])  # the batch dimension is symbolic
    model = tf.saved_model.load(folder + "/saved_model")
    from_tf = model.signatures["serving_default"](images=tf.constant(images))
    assert not any(name.split(".")[0] == "nin_jax" for name in sys.modules), "nin_jax was imported"
    np.savez(out_file, jax_logits=np.asarray(from_jax["logits"]), jax_probs=np.asarray(from_jax["probabilities"]),
             jax_small=np.asarray(smaller["logits"]), tf_logits=from_tf["logits"].numpy(),
             tf_probs=from_tf["probabilities"].numpy(), platforms=np.array(exported.platforms),
             shape=np.array([str(d) for d in exported.in_avals[0].shape]))
""")


@pytest.fixture(scope="module")
def run():
    return restore.load_run(test_predict.folder_run()["workdir"])


@pytest.fixture(autouse=True)
def _no_reexec(monkeypatch):
    monkeypatch.setenv("NIN_JAX_NO_REEXEC", "1")


@pytest.mark.slow
def test_exported_model_reloads_without_nin_jax_and_gives_the_flax_logits(run, tmp_path):
    out = tmp_path / "export"
    assert export.main([f"--workdir={run.workdir}", f"--out={out}", "--saved_model"]) == 0
    desc = json.loads((out / "export.json").read_text())
    assert desc["class_names"] == list(test_predict.CLASSES)
    assert desc["input"]["shape"] == [None, 8, 8, 3] and desc["input"]["dtype"] == "uint8"
    assert "resized to 8x8" in desc["input"]["resize"] and desc["input"]["normalization"].startswith("gcn_zca")
    assert desc["run"]["step"] == 16 and desc["format"]["platforms"] == ["cpu", "cuda", "tpu"]
    readme = (out / "README.md").read_text()
    assert "uint8 [b, 8, 8, 3]" in readme and "2. cat" in readme

    images = np.random.default_rng(0).integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    np.save(tmp_path / "images.npy", images)
    (tmp_path / "loader.py").write_text(LOADER)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, str(tmp_path / "loader.py"), str(out), str(tmp_path / "images.npy"),
                           str(tmp_path / "out.npz")], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = np.load(tmp_path / "out.npz")
    expected = run.outputs(images)  # the Flax model, with the run's numpy normaliser
    np.testing.assert_allclose(got["jax_logits"], expected["logits"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(got["tf_logits"], expected["logits"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(got["jax_probs"], expected["probabilities"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(got["tf_probs"], expected["probabilities"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(got["jax_small"], expected["logits"][:3], rtol=0, atol=1e-5)
    assert list(got["platforms"]) == ["cpu", "cuda", "tpu"] and list(got["shape"]) == ["b", "8", "8", "3"]
    # Served by flax's own layers, whatever the run's model is built from (on CPU nin_jax.cpu's, whose
    # kernels carry custom gradients).
    assert run.model.layers == cpu_layers.model_layers(run.config.run.cpu_kernels)
    assert "custom_vjp_call" not in str(jax.make_jaxpr(export.serving_function(run))(images))


@pytest.mark.parametrize("method", ["scale", "standardize", "gcn_zca", "gcn_lcn"])
def test_normalisation_inside_the_export_equals_the_runs(method):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (4, 9, 7, 3), dtype=np.uint8)
    images[0] = 17  # a constant image: GCN's divisor guard
    d = 9 * 7 * 3
    stats = {"scale": {}, "gcn_lcn": {},
             "standardize": {"mean": rng.uniform(50, 150, 3).astype(np.float32),
                             "std": rng.uniform(20, 80, 3).astype(np.float32)},
             "gcn_zca": {"mean": rng.normal(size=d).astype(np.float32),
                         "whitening": (rng.normal(size=(d, d)) / np.sqrt(d)).astype(np.float32)}}[method]
    normalizer = Normalizer(method, stats, 55.0)
    np.testing.assert_allclose(np.asarray(export.jnp_normalizer(normalizer)(images)), normalizer(images),
                               rtol=1e-5, atol=1e-5)


def test_unwritable_out_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    (tmp_path / "file").write_text("")
    monkeypatch.setattr(restore, "load_run", lambda *a, **k: pytest.fail("restored before checking --out"))
    assert export.main([f"--workdir={tmp_path}", f"--out={tmp_path / 'file'}"]) == 1
    assert capsys.readouterr().err.strip().startswith(f"error: --out={tmp_path / 'file'} is a file")
    with pytest.raises(ConfigError, match="--platforms=gpu"):
        export.export_run(str(tmp_path), str(tmp_path / "out"), platforms=["gpu"])
