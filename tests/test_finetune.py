"""Fine-tuning (`config.init_from`): a run starts from another run's weights, with a fresh class-map layer when
the class count differs; it resumes from its own checkpoints; bad sources are refused in one line, early."""

import json
import os

import jax
import numpy as np
import pytest
from flax import traverse_util
from PIL import Image

from config_helpers import with_overrides
from configs import digits
from nin_jax import finetune, mesh as mesh_lib, models, optim, train
from nin_jax.config import ConfigError
from nin_jax.tools import restore


def _config(**overrides):
    return with_overrides(digits.get_config(), model__width=0.25, model__dropout_rate=0.0, num_train_steps=4,
                          optim__warmup_epochs=0.0, run__log_every_steps=2, run__eval_every_steps=4,
                          run__checkpoint_every_steps=2, **overrides)


def _gray_folder(root, classes, channels=1):
    """root/{train,test}/<class>/<i>.png: 8x8 images, gray (one channel) or RGB."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("test", 4)):
        for name in classes:
            os.makedirs(root / split / name, exist_ok=True)
            for i in range(n):
                shape = (8, 8) if channels == 1 else (8, 8, 3)
                Image.fromarray(rng.integers(0, 256, shape, np.uint8)).save(root / split / name / f"{i}.png")
    return str(root)


def _folder_config(root, source, **overrides):
    return _config(dataset="image_folder", run__data_dir=root, train_split="train", eval_split="test",
                   init_from=str(source), batch_size=8, run__eval_batch_size=8, **overrides)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("source")
    train.train_and_evaluate(_config(), str(workdir))
    return workdir


def _leaves(tree):
    return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(jax.device_get(tree)).items()}


def test_a_new_class_count_keeps_every_weight_but_the_class_map_layer(source, tmp_path):
    config = _folder_config(_gray_folder(tmp_path / "folder", ("ant", "bee", "cat")), source)
    mesh = mesh_lib.create_mesh()
    model = models.create_model(config.model, 3)
    lr_fn = optim.create_learning_rate_fn(config, steps_per_epoch=3, total_steps=4)
    fresh = train.create_train_state(config, model, (8, 8, 1), lr_fn, mesh)
    state, summary = finetune.initialize(config, fresh, model, mesh)
    theirs = _leaves(restore.load_run(str(source)).variables["params"])
    ours, new = _leaves(state.params), _leaves(fresh.params)
    layer, norm = ("/".join(p) for p in models.class_count_paths(model))
    head = {n for n in {**ours, **_leaves(state.batch_stats)} if n.startswith((layer + "/", norm + "/"))}
    assert {f"{layer}/kernel", f"{norm}/mean", f"{norm}/var"} <= head
    assert (summary["workdir"], summary["step"], sorted(summary["fresh"])) == (str(source), 4, sorted(head))
    for name, value in ours.items():
        if name.startswith((layer, norm)):
            np.testing.assert_array_equal(value, new[name])  # 3 classes here, 10 there: fresh
            assert value.shape[-1] == 3 and theirs[name].shape[-1] == 10
        else:
            np.testing.assert_array_equal(value, theirs[name])
    stats, theirs_stats = _leaves(state.batch_stats), _leaves(restore.load_run(str(source)).variables["batch_stats"])
    for name, value in stats.items():  # BatchNorm statistics likewise
        np.testing.assert_array_equal(value, _leaves(fresh.batch_stats)[name] if name.startswith(norm)
                                      else theirs_stats[name])


def test_a_fine_tuning_run_trains_records_its_source_and_resumes_by_itself(source, tmp_path):
    config = _folder_config(_gray_folder(tmp_path / "folder", ("ant", "bee")), source)
    workdir = tmp_path / "run"
    results = train.train_and_evaluate(config, str(workdir))
    assert results["init_from"]["workdir"] == str(source) and results["init_from"]["step"] == 4
    assert results["eval/num_examples"] == 8
    longer = with_overrides(config, num_train_steps=6)  # extends from step 4: the run's own checkpoint, not the source
    again = train.train_and_evaluate(longer, str(workdir))
    assert again["resumed_from_step"] == 4 and again["init_from"] == results["init_from"]
    assert json.loads((workdir / "results.json").read_text())["init_from"]["step"] == 4


def test_bad_sources_are_refused_in_one_line_before_any_data_is_read(source, tmp_path):
    folder = _gray_folder(tmp_path / "folder", ("ant", "bee"))
    cases = {
        str(tmp_path / "missing"): "holds no trained run",
        str(tmp_path): "holds no trained run",
    }
    for path, message in cases.items():
        with pytest.raises(ConfigError, match=f"^config.init_from={path} {message}"):
            train.train_and_evaluate(_folder_config(folder, path), str(tmp_path / "w1"))
    with pytest.raises(ConfigError, match="config.init_checkpoint='soon'; choose latest, best or a step number"):
        train.train_and_evaluate(_folder_config(folder, source, init_checkpoint="soon"), str(tmp_path / "w2"))
    rgb = _gray_folder(tmp_path / "rgb", ("ant", "bee"), channels=3)
    with pytest.raises(ConfigError, match=r"block1/conv/kernel has shape \(3, 3, 1, \d+\) there and \(3, 3, 3, \d+\) "
                       "here; fine-tuning keeps config.model and the number of image channels"):
        train.train_and_evaluate(_folder_config(rgb, source), str(tmp_path / "w3"))
    with pytest.raises(ConfigError, match="is another architecture: .* exist in only one of the two models"):
        train.train_and_evaluate(_folder_config(folder, source, model__mlp_layers=1), str(tmp_path / "w4"))
