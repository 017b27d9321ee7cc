"""Every step's examples and augmentation are the same for any number of processes, devices and decode workers."""

import jax
import numpy as np
import pytest
from data_helpers import make_config, write_image_folder

from nin_jax import data
from nin_jax.data import loader, order


def _sharding(num_devices):
    mesh = jax.make_mesh((num_devices,), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=jax.devices()[:num_devices])
    return jax.sharding.NamedSharding(mesh, jax.P("data"))


def _batches(pipeline, steps=3, start=0):
    it = pipeline.train_batches(start)
    try:
        return [jax.tree.map(np.asarray, next(it)) for _ in range(steps)]
    finally:
        it.close()


@pytest.fixture(scope="module")
def large_config(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("topology")
    root = write_image_folder(tmp / "folder", {"train": 12, "val": 2}, size=None)
    return make_config(
        tmp, dataset="image_folder", run__data_dir=root, eval_split="val", image_size=8, batch_size=8, run__eval_batch_size=8,
        preprocess="scale", augment__random_resized_crop=True, augment__flip=True, augment__eval_resize=10,
    )


def test_same_batches_for_any_device_and_worker_count(large_config):
    reference = _batches(data.Pipeline(large_config, _sharding(8), workers=0))
    for devices, workers in [(1, 0), (2, 0), (4, 2)]:
        pipeline = data.Pipeline(large_config, _sharding(devices), workers=workers)
        try:
            for a, b in zip(reference, _batches(pipeline)):
                np.testing.assert_array_equal(a["image"], b["image"])
                np.testing.assert_array_equal(a["label"], b["label"])
        finally:
            pipeline.close()


@pytest.mark.parametrize("large", [False, True])
def test_process_shards_compose_the_single_process_batch(tmp_path, large_config, large):
    """Each process builds only its rows; stacked in process order they are the one-process batch."""
    config = large_config if large else make_config(tmp_path, augment__translate=2, augment__flip=True)
    pipeline = data.Pipeline(config, _sharding(8))
    path, train, batch = pipeline._path, pipeline._train, config.batch_size  # pylint: disable=protected-access
    for step in (0, 5):
        whole = path.submit_train(train, order.train_indices(len(train), batch, step, config.seed), step,
                                  slice(0, batch)).result()
        for count in (2, 4):
            parts = [
                path.submit_train(
                    train, order.train_indices(len(train), batch, step, config.seed, process_index=p,
                                               process_count=count),
                    step, order.process_rows(batch, p, count),
                ).result()
                for p in range(count)
            ]
            for key in whole:
                np.testing.assert_array_equal(np.concatenate([part[key] for part in parts]), whole[key])
    pipeline.close()


def test_large_images_are_normalised_exactly_on_the_devices(large_config):
    config = large_config.copy_and_resolve_references()
    config.preprocess = "standardize"
    pipeline = data.Pipeline(config, _sharding(8))
    for batch in pipeline.eval_batches(with_raw=True):
        raw = np.asarray(batch["raw"])
        assert raw.dtype == np.uint8
        np.testing.assert_array_equal(np.asarray(batch["image"]), pipeline.normalizer(raw))
    assert loader.uses_per_example(config)
