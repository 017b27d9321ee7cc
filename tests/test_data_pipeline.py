"""The data Pipeline: sources, shapes, sharding, exactly-once evaluation, multi-process shards, resumption, errors.

Offline: TFDS datasets come from `tfds.testing.mock_data`, image folders are written by the tests.
"""

import collections
import os

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from data_helpers import data_sharding, make_config, write_image_folder

from nin_jax import data
from nin_jax.config import ConfigError
from nin_jax.data import order, preprocessing, sources, transforms


@pytest.fixture(autouse=True)
def _fresh_caches():
    data.clear_caches()
    yield
    data.clear_caches()


@pytest.fixture(scope="module")
def sharding():
    return data_sharding()


def _take(iterator, n):
    return [jax.tree.map(np.asarray, next(iterator)) for _ in range(n)]


def _check_batch(batch, sharding, batch_size, image_shape, num_classes):
    assert batch["image"].shape == (batch_size, *image_shape) and batch["image"].dtype == np.float32
    assert batch["label"].shape == (batch_size,) and batch["label"].dtype == np.int32
    assert batch["image"].sharding == sharding and batch["label"].sharding == sharding
    labels = np.asarray(batch["label"])
    assert labels.min() >= 0 and labels.max() < num_classes
    assert np.isfinite(np.asarray(batch["image"])).all()


# ---------------------------------------------------------------------------------------------------------------
# Shapes and dtypes per dataset.


def test_digits(tmp_path, sharding):
    pipeline = data.Pipeline(make_config(tmp_path, train_split="train[:1200]", eval_split="train[1200:]"), sharding)
    assert pipeline.info == data.DatasetInfo(10, (8, 8, 1), 1200, 300, tuple("0123456789"))
    assert pipeline.steps_per_epoch == 1200 // 64
    _check_batch(next(pipeline.train_batches()), sharding, 64, (8, 8, 1), 10)
    batch = next(pipeline.eval_batches(with_raw=True))
    assert batch["raw"].dtype == np.uint8 and batch["raw"].shape == (64, 8, 8, 1)
    assert batch["mask"].dtype == np.float32


@pytest.mark.parametrize(
    "dataset, shape, num_classes, preprocess",
    [
        ("cifar10", (32, 32, 3), 10, "standardize"),
        ("mnist", (28, 28, 1), 10, "scale"),
        ("svhn_cropped", (32, 32, 3), 10, "gcn_lcn"),
    ],
)
def test_tfds_small_datasets(tmp_path, sharding, dataset, shape, num_classes, preprocess):
    config = make_config(
        tmp_path, dataset=dataset, run__data_dir=str(tmp_path / "tfds"), train_split="train[:48]", eval_split="test",
        batch_size=16, run__eval_batch_size=16, preprocess=preprocess,
        augment__translate=2, augment__flip=True,
    )
    with tfds.testing.mock_data(num_examples=56, policy=tfds.testing.MockPolicy.USE_CODE):
        pipeline = data.Pipeline(config, sharding)
        assert pipeline.info.image_shape == shape and pipeline.info.num_classes == num_classes
        assert (pipeline.info.num_train_examples, pipeline.info.num_eval_examples) == (48, 56)
        _check_batch(next(pipeline.train_batches()), sharding, 16, shape, num_classes)
        assert sum(float(b["mask"].sum()) for b in pipeline.eval_batches()) == 56


def test_tfrecord_dataset_is_read_once_into_memory(tmp_path, sharding, monkeypatch):
    """A dataset prepared as TFRecord (no random access) is read through tfds.load instead."""

    def no_random_access(*args, **kwargs):
        raise NotImplementedError("Random access data source for file format FileFormat.TFRECORD is not supported")

    monkeypatch.setattr(tfds, "data_source", no_random_access)
    monkeypatch.setattr(tfds.core.DatasetBuilder, "is_prepared", lambda self: True)
    config = make_config(tmp_path, dataset="cifar10", run__data_dir=str(tmp_path / "tfds"), batch_size=8, run__eval_batch_size=8)
    with tfds.testing.mock_data(num_examples=12):  # the default policy serves tfds.load through tf.data
        pipeline = data.Pipeline(config, sharding)
        assert (pipeline.info.num_train_examples, pipeline.info.num_eval_examples) == (12, 12)
        _check_batch(next(pipeline.train_batches()), sharding, 8, (32, 32, 3), 10)
    config.dataset = "imagenet2012"
    with pytest.raises(ConfigError, match="needs random access.*--file_format=array_record"):
        data.Pipeline(config, sharding)


def test_imagenet_random_sizes(tmp_path, sharding):
    config = make_config(
        tmp_path, dataset="imagenet2012", run__data_dir=str(tmp_path / "tfds"), eval_split="validation", image_size=24,
        batch_size=8, run__eval_batch_size=8, augment__random_resized_crop=True, augment__flip=True,
        augment__eval_resize=28,
    )
    with tfds.testing.mock_data(num_examples=20, policy=tfds.testing.MockPolicy.USE_CODE):
        pipeline = data.Pipeline(config, sharding)
        assert pipeline.info.image_shape == (24, 24, 3) and pipeline.info.num_classes == 1000
        _check_batch(next(pipeline.train_batches()), sharding, 8, (24, 24, 3), 1000)
        batches = list(pipeline.eval_batches(with_raw=True))
    assert len(batches) == 3 and sum(float(b["mask"].sum()) for b in batches) == 20
    assert batches[0]["raw"].shape == (8, 24, 24, 3) and batches[0]["raw"].dtype == np.uint8


def test_image_folder_splits_and_slices(tmp_path, sharding):
    root = write_image_folder(tmp_path / "folder", {"train": 20, "test": 4})
    config = make_config(
        tmp_path, dataset="image_folder", run__data_dir=root, train_split="train[:75%]", eval_split="train[75%:]",
        batch_size=16, run__eval_batch_size=16,
    )
    pipeline = data.Pipeline(config, sharding)
    assert pipeline.info == data.DatasetInfo(3, (8, 8, 3), 45, 15, ("ant", "bee", "cat"))
    _check_batch(next(pipeline.train_batches()), sharding, 16, (8, 8, 3), 3)
    # ImageFolder's deterministic shuffle makes a slice class-mixed.
    eval_labels = np.concatenate([np.asarray(b["label"])[np.asarray(b["mask"]) > 0] for b in pipeline.eval_batches()])
    assert len(eval_labels) == 15 and len(set(eval_labels.tolist())) > 1
    assert sum(float(b["mask"].sum()) for b in pipeline.eval_batches("test")) == 12


def test_image_folder_large_images(tmp_path, sharding):
    root = write_image_folder(tmp_path / "folder", {"train": 6, "val": 2}, size=None)
    config = make_config(
        tmp_path, dataset="image_folder", run__data_dir=root, eval_split="val", image_size=16, batch_size=8,
        run__eval_batch_size=8, augment__random_resized_crop=True, augment__flip=True, augment__eval_resize=20,
    )
    pipeline = data.Pipeline(config, sharding)
    assert pipeline.info.image_shape == (16, 16, 3)
    _check_batch(next(pipeline.train_batches()), sharding, 8, (16, 16, 3), 3)
    assert sum(float(b["mask"].sum()) for b in pipeline.eval_batches()) == 6


def test_large_images_can_travel_as_uint8_and_be_normalised_in_the_step(tmp_path, sharding):
    """normalize=False leaves the crops uint8; `device_normalize`, compiled into a step, gives exactly the batches
    that normalize=True gives, and leaves already normalised images alone."""
    root = write_image_folder(tmp_path / "folder", {"train": 6, "val": 2}, size=None)
    config = make_config(
        tmp_path, dataset="image_folder", run__data_dir=root, eval_split="val", image_size=16, batch_size=8,
        run__eval_batch_size=8, augment__random_resized_crop=True, augment__flip=True, augment__eval_resize=20,
    )
    pipeline = data.Pipeline(config, sharding)
    assert pipeline.transfer_dtype == np.uint8
    normalize = jax.jit(pipeline.device_normalize)
    raw, done = _take(pipeline.train_batches(3, normalize=False), 2), _take(pipeline.train_batches(3), 2)
    eval_raw = _take(pipeline.eval_batches(with_raw=True, normalize=False), 1)[0]
    eval_done = _take(pipeline.eval_batches(), 1)[0]
    for r, d in zip([*raw, eval_raw], [*done, eval_done]):
        assert r["image"].dtype == np.uint8 and d["image"].dtype == np.float32
        np.testing.assert_array_equal(normalize(r["image"]), d["image"])
        np.testing.assert_array_equal(r["label"], d["label"])
    np.testing.assert_array_equal(eval_raw["raw"], eval_raw["image"])
    np.testing.assert_array_equal(normalize(done[0]["image"]), done[0]["image"])

    small = data.Pipeline(make_config(tmp_path), sharding)  # in memory: normalised on the host either way
    assert small.transfer_dtype == np.float32
    np.testing.assert_array_equal(_take(small.train_batches(normalize=False), 1)[0]["image"],
                                  _take(small.train_batches(), 1)[0]["image"])


# ---------------------------------------------------------------------------------------------------------------
# Augmentation, exactly-once evaluation, process shards, resumption.


def test_augmentation_changes_images_not_labels(tmp_path, sharding):
    plain = data.Pipeline(make_config(tmp_path, preprocess="scale"), sharding)
    augmented = data.Pipeline(make_config(tmp_path, preprocess="scale", augment__translate=2, augment__flip=True), sharding)
    for a, b in zip(_take(plain.train_batches(), 3), _take(augmented.train_batches(), 3)):
        np.testing.assert_array_equal(a["label"], b["label"])
        assert not np.allclose(a["image"], b["image"])


def test_translate_and_flip_semantics():
    images = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4, 1) + 1
    centred = transforms.translate_and_flip(images, np.array([1, 1]), np.array([1, 1]), np.array([False, True]), pad=1)
    np.testing.assert_array_equal(centred[0], images[0])
    np.testing.assert_array_equal(centred[1], images[1, :, ::-1])
    shifted = transforms.translate_and_flip(images, np.array([0, 2]), np.array([0, 2]), np.array([False, False]), pad=1)
    np.testing.assert_array_equal(shifted[0, 1:, 1:], images[0, :-1, :-1])  # content moves down-right
    assert np.all(shifted[0, 0] == 0) and np.all(shifted[0, :, 0] == 0)  # zero padding comes in
    np.testing.assert_array_equal(shifted[1, :-1, :-1], images[1, 1:, 1:])


@pytest.mark.parametrize("mode", ["reflect", "edge"])
def test_translation_border_follows_pad_mode(mode):
    images = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4, 1) + 1
    shifted = transforms.translate_and_flip(images, np.array([0, 2]), np.array([0, 2]), np.array([False, False]),
                                            pad=1, pad_mode=mode)
    expected = np.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)), mode=mode)
    np.testing.assert_array_equal(shifted[0], expected[0, :3, :4])  # the border comes from the image itself
    np.testing.assert_array_equal(shifted[1], expected[1, 2:, 2:])
    assert np.all(shifted != 0)


def test_pad_mode_is_checked_before_anything_is_read(tmp_path, sharding):
    with pytest.raises(ConfigError, match=r"config.augment.pad_mode='mirror' must be one of zero, reflect, edge"):
        data.Pipeline(make_config(tmp_path, augment__pad_mode="mirror"), sharding)


def test_reflect_padding_changes_only_the_border_of_training_batches(tmp_path, sharding):
    zero = _take(data.Pipeline(make_config(tmp_path, augment__translate=2), sharding).train_batches(), 1)[0]
    reflect = _take(data.Pipeline(make_config(tmp_path, augment__translate=2, augment__pad_mode="reflect"),
                                  sharding).train_batches(), 1)[0]
    a, b = np.asarray(zero["image"]), np.asarray(reflect["image"])
    np.testing.assert_array_equal(a[:, 2:-2, 2:-2], b[:, 2:-2, 2:-2])  # same crops and flips, same interior
    assert not np.array_equal(a, b)


def test_eval_counts_every_example_once(tmp_path, sharding):
    pipeline = data.Pipeline(make_config(tmp_path, run__eval_batch_size=40), sharding)  # 297 = 7 * 40 + 17
    batches = [jax.tree.map(np.asarray, b) for b in pipeline.eval_batches(with_raw=True)]
    assert len(batches) == 8 and all(b["image"].shape[0] == 40 for b in batches)
    masks = np.concatenate([b["mask"] for b in batches])
    assert masks.sum() == 297 and np.all(masks[:297] == 1) and np.all(masks[297:] == 0)
    seen = collections.Counter(
        (img.tobytes(), int(label))
        for b in batches
        for img, label, m in zip(b["raw"], b["label"], b["mask"])
        if m
    )
    expected = sources.Digits(make_config(tmp_path), data.Cache()).arrays("test")
    assert seen == collections.Counter(
        (img.tobytes(), int(label)) for img, label in zip(expected.images, expected.labels)
    )


def test_process_shards_are_disjoint_and_cover_the_split():
    n, batch, seed = 103, 12, 7
    steps = n // batch
    for step in range(steps):
        shards = [order.train_indices(n, batch, step, seed, process_index=p, process_count=2) for p in range(2)]
        assert len(shards[0]) == len(shards[1]) == 6 and not set(shards[0]) & set(shards[1])
        # The global batch does not depend on the number of processes.
        np.testing.assert_array_equal(np.concatenate(shards), order.train_indices(n, batch, step, seed))
    epoch = np.concatenate(
        [order.train_indices(n, batch, s, seed, process_index=p, process_count=2) for s in range(steps) for p in range(2)]
    )
    assert len(set(epoch.tolist())) == steps * batch  # no duplicates in an epoch; only the remainder is dropped
    next_epoch = order.train_indices(n, batch, steps, seed)
    assert not np.array_equal(next_epoch, order.train_indices(n, batch, 0, seed))  # reshuffled
    counts = collections.Counter()
    for b in range(order.num_eval_batches(n, batch)):
        for p in range(2):
            indices, mask = order.eval_indices(n, batch, b, process_index=p, process_count=2)
            counts.update(indices[mask > 0].tolist())
    assert counts == collections.Counter(range(n))


@pytest.mark.parametrize("large_images", [False, True])
def test_resume_continues_the_same_order(tmp_path, sharding, large_images):
    if large_images:  # per-example decode with random-resized crops
        root = write_image_folder(tmp_path / "folder", {"train": 11}, size=None)
        config = make_config(
            tmp_path, dataset="image_folder", run__data_dir=root, eval_split="train[:8]", image_size=12, batch_size=8,
            augment__random_resized_crop=True, augment__flip=True,
        )
    else:
        config = make_config(tmp_path, augment__translate=2, augment__flip=True)
    pipeline = data.Pipeline(config, sharding)
    k = pipeline.steps_per_epoch - 1  # the resumed run crosses an epoch boundary
    uninterrupted = _take(pipeline.train_batches(0), k + 3)[k:]
    resumed = _take(data.Pipeline(config, sharding).train_batches(start_step=k), 3)
    for a, b in zip(uninterrupted, resumed):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    assert pipeline.data_position(k + 1) == {"epoch": 1, "index_in_epoch": 0}
    assert pipeline.data_position(k) == {"epoch": 0, "index_in_epoch": k * config.batch_size}


def test_seed_changes_order(tmp_path, sharding):
    a = next(data.Pipeline(make_config(tmp_path, seed=0), sharding).train_batches())
    b = next(data.Pipeline(make_config(tmp_path, seed=1), sharding).train_batches())
    assert not np.array_equal(np.asarray(a["label"]), np.asarray(b["label"]))


def test_zca_fitted_on_train_split_only_and_cached(tmp_path, sharding, monkeypatch):
    fitted_rows = []
    real_fit = preprocessing.fit_zca
    monkeypatch.setattr(preprocessing, "fit_zca", lambda x, *a, **k: fitted_rows.append(len(x)) or real_fit(x, *a, **k))
    config = make_config(tmp_path, preprocess="gcn_zca", train_split="train[:1000]", eval_split="test")
    first = data.Pipeline(config, sharding)
    assert fitted_rows == [1000]
    assert len(os.listdir(config.run.cache_dir)) == 1
    data.clear_caches()  # a new process: must load the file, not refit
    config.eval_split = "train[1000:]"  # another eval split does not change the fit
    second = data.Pipeline(config, sharding)
    assert fitted_rows == [1000]
    np.testing.assert_array_equal(
        np.asarray(next(first.train_batches())["image"]), np.asarray(next(second.train_batches())["image"])
    )


# ---------------------------------------------------------------------------------------------------------------
# Bad input.


def test_unknown_dataset_lists_choices(tmp_path, sharding):
    with pytest.raises(ConfigError, match="config.dataset='cifar11'.*digits.*cifar10.*imagenet2012.*image_folder"):
        data.Pipeline(make_config(tmp_path, dataset="cifar11"), sharding)


def test_tfds_dataset_not_prepared(tmp_path, sharding):
    empty = tmp_path / "empty_tfds"
    empty.mkdir()
    config = make_config(tmp_path, dataset="cifar10", run__data_dir=str(empty))
    with pytest.raises(ConfigError, match=r"(?s)not prepared.*tfds build cifar10.*image_folder.*digits"):
        data.Pipeline(config, sharding)
    assert os.listdir(empty) == []  # nothing was downloaded


def test_empty_folder(tmp_path, sharding):
    (tmp_path / "root").mkdir()
    config = make_config(tmp_path, dataset="image_folder", run__data_dir=str(tmp_path / "root"))
    with pytest.raises(ConfigError, match="no split folders"):
        data.Pipeline(config, sharding)
    with pytest.raises(ConfigError, match="does not exist"):
        data.Pipeline(make_config(tmp_path, dataset="image_folder", run__data_dir=str(tmp_path / "missing")), sharding)


def test_class_folder_without_images(tmp_path, sharding):
    root = write_image_folder(tmp_path / "folder", {"train": 3})
    os.makedirs(os.path.join(root, "train", "dog"))
    config = make_config(tmp_path, dataset="image_folder", run__data_dir=root, eval_split="train")
    with pytest.raises(ConfigError, match=r"class folder .*train/dog holds no"):
        data.Pipeline(config, sharding)


def test_corrupt_image_is_named(tmp_path, sharding):
    root = write_image_folder(tmp_path / "folder", {"train": 30})
    bad = os.path.join(root, "train", "bee", "7.png")
    with open(bad, "wb") as f:
        f.write(b"not an image")
    config = make_config(tmp_path, dataset="image_folder", run__data_dir=root, eval_split="train", batch_size=8)
    with pytest.raises(ConfigError, match=f"cannot decode image {bad}"):
        data.Pipeline(config, sharding)


def test_corrupt_image_in_background_decode_is_named(tmp_path, sharding):
    root = write_image_folder(tmp_path / "folder", {"train": 4}, size=None)
    bad = os.path.join(root, "train", "cat", "2.png")
    with open(bad, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n truncated")
    config = make_config(
        tmp_path, dataset="image_folder", run__data_dir=root, eval_split="train", image_size=8, batch_size=8,
        run__eval_batch_size=16, preprocess="scale", augment__random_resized_crop=True,
    )
    with pytest.raises(ConfigError, match=f"cannot decode image {bad}"):
        list(data.Pipeline(config, sharding).eval_batches())  # raised in the decode thread, re-raised here


def test_batch_not_divisible(tmp_path, sharding, monkeypatch):
    with pytest.raises(ConfigError, match=r"config.batch_size=12 .*processes \(1\).*data axis \(8\)"):
        data.Pipeline(make_config(tmp_path, batch_size=12), sharding)
    with pytest.raises(ConfigError, match=r"config.run.eval_batch_size=20 "):
        data.Pipeline(make_config(tmp_path, run__eval_batch_size=20), sharding)
    monkeypatch.setattr(jax, "process_count", lambda: 3)
    with pytest.raises(ConfigError, match=r"config.batch_size=64 .*processes \(3\)"):
        data.Pipeline(make_config(tmp_path), sharding)


def test_bad_split_string(tmp_path, sharding):
    with pytest.raises(ConfigError, match=r"config.eval_split='validation'.*'train': 1500"):
        data.Pipeline(make_config(tmp_path, eval_split="validation"), sharding)
    with pytest.raises(ConfigError, match=r"config.batch_size=64 is larger than config.train_split='train\[:10\]'"):
        data.Pipeline(make_config(tmp_path, train_split="train[:10]"), sharding)


# ---------------------------------------------------------------------------------------------------------------
# A given normaliser (a run's file), evaluation-only pipelines, the cache.


def _eval_arrays(pipeline, split=None):
    return [jax.tree.map(np.asarray, b) for b in pipeline.eval_batches(split, with_raw=True)]


@pytest.mark.parametrize("preprocess", ["gcn_zca", "standardize"])
def test_saved_normalizer_reproduces_batches(tmp_path, sharding, preprocess):
    config = make_config(tmp_path, preprocess=preprocess, train_split="train[:1000]", augment__translate=1)
    fitted = data.Pipeline(config, sharding)
    path = tmp_path / "workdir" / "normalizer.npz"
    data.save_normalizer(fitted.normalizer, path)
    loaded = data.load_normalizer(str(path))
    assert loaded.fingerprint == fitted.normalizer.fingerprint
    data.clear_caches()
    config.run.cache_dir = str(tmp_path / "other_cache")  # no fitted file to find: the given normaliser is used
    given = data.Pipeline(config, sharding, normalizer=loaded)
    assert not os.path.exists(config.run.cache_dir)
    for a, b in zip(_take(fitted.train_batches(), 2), _take(given.train_batches(), 2)):
        np.testing.assert_array_equal(a["image"], b["image"])
    eval_only = data.Pipeline(config, sharding, normalizer=loaded, train=False)
    assert eval_only.info == data.DatasetInfo(10, (8, 8, 1), None, 297, tuple("0123456789"))
    assert eval_only.steps_per_epoch is None
    for a, b in zip(_eval_arrays(fitted), _eval_arrays(eval_only)):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_eval_only_pipeline_never_opens_the_training_split(tmp_path, sharding):
    root = write_image_folder(tmp_path / "folder", {"val": 3}, size=None)  # no train folder at all
    config = make_config(
        tmp_path, dataset="image_folder", run__data_dir=root, train_split="train", eval_split="val", image_size=8,
        batch_size=8, run__eval_batch_size=8, augment__random_resized_crop=True,
    )
    normalizer = data.Normalizer("standardize", {"mean": np.full(3, 100, np.float32), "std": np.full(3, 50, np.float32)})
    pipeline = data.Pipeline(config, sharding, normalizer=normalizer, train=False)
    assert pipeline.info.image_shape == (8, 8, 3) and pipeline.info.num_eval_examples == 9
    assert sum(float(b["mask"].sum()) for b in pipeline.eval_batches()) == 9
    with pytest.raises(ValueError, match="train=False"):
        pipeline.train_batches()
    with pytest.raises(ValueError, match="needs `normalizer`"):
        data.Pipeline(config, sharding, train=False)


def test_normalizer_that_does_not_fit_the_config(tmp_path, sharding):
    zca = data.Pipeline(make_config(tmp_path, preprocess="gcn_zca"), sharding).normalizer
    with pytest.raises(ConfigError, match="fitted on inputs of 64 features.*shape \\(12, 12, 1\\)"):
        data.Pipeline(make_config(tmp_path, preprocess="gcn_zca", image_size=12), sharding, normalizer=zca)
    with pytest.raises(ConfigError, match="normaliser is 'gcn_zca' but config.preprocess='standardize'"):
        data.Pipeline(make_config(tmp_path), sharding, normalizer=zca)


def test_cache_is_keyed_by_content(tmp_path, sharding):
    cache = data.Cache()
    a = data.Pipeline(make_config(tmp_path), sharding, cache=cache)
    b = data.Pipeline(make_config(tmp_path, eval_split="train[:100]"), sharding, cache=cache)
    assert a._train.normalized is b._train.normalized  # pylint: disable=protected-access  # shared, not rebuilt
    c = data.Pipeline(make_config(tmp_path, image_size=10), sharding, cache=cache)
    assert c.info.image_shape == (10, 10, 1)
    fresh = data.Pipeline(make_config(tmp_path), sharding, cache=data.Cache())
    assert fresh._train.normalized is not a._train.normalized  # pylint: disable=protected-access
    np.testing.assert_array_equal(fresh._train.normalized, a._train.normalized)  # pylint: disable=protected-access
