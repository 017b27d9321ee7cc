"""Image folders: one class list, channel count and bit depth for every split, decided from every image's header;
what is not read is named; the fitted statistics are keyed by the files' content and kept outside the folder.

Each test writes its own folder; nothing here reads /work/shared or downloads.
"""

import io
import os

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from data_helpers import data_sharding, make_config, write_image_folder
from PIL import Image

from nin_jax import data
from nin_jax.config import ConfigError
from nin_jax.data import decode, folders


@pytest.fixture(autouse=True)
def _fresh_caches():
    data.clear_caches()
    yield
    data.clear_caches()


@pytest.fixture(scope="module")
def sharding():
    return data_sharding()


def _config(tmp_path, root, per_example=False, **overrides):
    """Batches of 8; ``per_example``: the large-image path (decode per batch, crops of 8x8)."""
    if per_example:
        overrides = {"image_size": 8, "augment__random_resized_crop": True, "augment__eval_resize": 8, **overrides}
    return make_config(tmp_path, dataset="image_folder", run__data_dir=str(root), train_split="train",
                       eval_split="test", batch_size=8, run__eval_batch_size=8, **overrides)


def _listed(root, split):
    """The paths of a split in the order TFDS's ImageFolder lists them (its deterministic shuffle)."""
    examples = tfds.folder_dataset.ImageFolder(str(root))._split_examples  # pylint: disable=protected-access
    return [e.image_path for e in examples[split]]


def _raw_eval_images(pipeline, split=None):
    """The uint8 images of one evaluation pass, in the split's listed order."""
    batches = [jax.tree.map(np.asarray, b) for b in pipeline.eval_batches(split, with_raw=True)]
    return np.concatenate([b["raw"][b["mask"] > 0] for b in batches])


# ---------------------------------------------------------------------------------------------------------------
# Channels: from every image of every split, not from the first one listed.


@pytest.mark.parametrize("per_example", [False, True], ids=["in_memory", "per_example"])
def test_a_gray_first_image_does_not_make_a_colour_folder_gray(tmp_path, sharding, capsys, per_example):
    root = write_image_folder(tmp_path / "folder", {"train": 8, "test": 4})
    gray = {}
    for split in ("train", "test"):
        first = _listed(root, split)[0]
        Image.open(first).convert("L").save(first)
        gray[split] = np.asarray(Image.open(first))
    pipeline = data.Pipeline(_config(tmp_path, root, per_example), sharding)
    assert pipeline.info.image_shape == (8, 8, 3)
    assert next(pipeline.train_batches())["image"].shape == (8, 8, 8, 3)
    first_eval = _raw_eval_images(pipeline)[0]
    # Repeated into RGB (the per-example path resizes an 8x8 crop to 8x8, which keeps the pixels).
    np.testing.assert_array_equal(first_eval, np.repeat(gray["test"][..., None], 3, axis=-1))
    assert "(3 channels): 2 grayscale images are repeated into RGB" in capsys.readouterr().err


def test_a_gray_first_training_image_gives_the_eval_split_the_same_shape(tmp_path, sharding):
    """Before: the model was built for 1 channel from the first training image and the first evaluation (after a
    committed checkpoint) failed inside flax on the 3-channel eval split."""
    root = write_image_folder(tmp_path / "folder", {"train": 8, "test": 4})
    first = _listed(root, "train")[0]
    Image.open(first).convert("L").save(first)
    pipeline = data.Pipeline(_config(tmp_path, root), sharding)
    shapes = {next(pipeline.train_batches())["image"].shape[1:], next(pipeline.eval_batches())["image"].shape[1:]}
    assert shapes == {(8, 8, 3)}


def test_a_folder_of_gray_images_is_one_channel_without_a_note(tmp_path, sharding, capsys):
    root = tmp_path / "folder"
    for split, n in (("train", 8), ("test", 4)):
        for name in ("a", "b"):
            os.makedirs(root / split / name)
            for i in range(n):
                Image.fromarray(np.full((8, 8), 10 * i, np.uint8)).save(root / split / name / f"{i}.png")
    assert data.Pipeline(_config(tmp_path, root), sharding).info.image_shape == (8, 8, 1)
    assert "note:" not in capsys.readouterr().err


def test_eval_images_of_another_size_are_refused_before_training(tmp_path, sharding):
    root = write_image_folder(tmp_path / "folder", {"train": 8})
    write_image_folder(tmp_path / "folder", {"test": 4}, size=(6, 6))
    with pytest.raises(ConfigError, match=r"config.eval_split='test' gives images of shape \(6, 6, 3\) but "
                                          r"config.train_split='train' gives \(8, 8, 3\); set config.image_size"):
        data.Pipeline(_config(tmp_path, root), sharding)
    assert data.Pipeline(_config(tmp_path, root, image_size=8), sharding).info.image_shape == (8, 8, 3)


def test_images_of_several_sizes_in_memory_need_an_image_size(tmp_path, sharding):
    root = write_image_folder(tmp_path / "folder", {"train": 8, "test": 4})
    odd = os.path.join(root, "train", "bee", "5.png")
    Image.new("RGB", (9, 7)).save(odd)
    with pytest.raises(ConfigError, match=f"image {odd} is 9x7 pixels but .* is 8x8; set config.image_size"):
        data.Pipeline(_config(tmp_path, root), sharding)


# ---------------------------------------------------------------------------------------------------------------
# Bit depth: 16-bit samples keep their high byte, on both paths and in predict's decoder.


def _png16(values):
    buffer = io.BytesIO()
    Image.fromarray(values.astype(np.uint16)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("per_example", [False, True], ids=["in_memory", "per_example"])
def test_16_bit_images_keep_the_high_byte_of_each_sample(tmp_path, sharding, capsys, per_example):
    rng = np.random.default_rng(0)
    root = tmp_path / "folder"
    for split, n in (("train", 8), ("test", 4)):
        for name in ("a", "b"):
            os.makedirs(root / split / name)
            for i in range(n):
                (root / split / name / f"{i}.png").write_bytes(_png16(rng.integers(0, 65536, (8, 8))))
    pipeline = data.Pipeline(_config(tmp_path, root, per_example, preprocess="scale"), sharding)
    expected = np.stack([np.asarray(Image.open(p)) >> 8 for p in _listed(root, "test")])[..., None]
    np.testing.assert_array_equal(_raw_eval_images(pipeline), expected)  # not clipped to 255
    assert "(1 channel): 24 16-bit images keep the high byte of each sample" in capsys.readouterr().err


def test_predicts_decoders_keep_the_high_byte_of_16_bit_samples():
    values = np.random.default_rng(1).integers(0, 65536, (8, 8))
    encoded = _png16(values)
    high = (values >> 8).astype(np.uint8)[..., None]
    np.testing.assert_array_equal(decode.decode_full(encoded, "a.png", 1, None), high)
    np.testing.assert_array_equal(decode.decode_full(encoded, "a.png", 3, None), np.repeat(high, 3, axis=-1))
    np.testing.assert_array_equal(decode.decode_crop(encoded, "a.png", 8, 1, rng=None, flip=False, eval_resize=8), high)
    assert decode.read_header(encoded, "a.png") == decode.Header((8, 8), gray=True, wide=True, alpha=False)


@pytest.mark.parametrize("mode, image_format", [
    *((mode, "PNG") for mode in ("1", "L", "LA", "P", "RGB", "RGBA", "I;16")),
    *((mode, "BMP") for mode in ("1", "L", "P", "RGB", "RGBA")),
    *((mode, "WEBP") for mode in ("L", "RGB", "RGBA")),
])
def test_both_decoders_give_the_same_pixels(mode, image_format):
    """What the in-memory path (PIL) and the per-example path (OpenCV) make of each kind of image agrees."""
    rng = np.random.default_rng(2)
    rgb = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
    image = (Image.fromarray(rng.integers(0, 65536, (12, 12)).astype(np.uint16)) if mode == "I;16"
             else Image.fromarray(rgb).convert(mode))
    buffer = io.BytesIO()
    image.save(buffer, image_format, **({"lossless": True} if image_format == "WEBP" else {}))
    encoded = buffer.getvalue()
    for channels in (3, 1) if decode.read_header(encoded, "x").gray else (3,):
        np.testing.assert_array_equal(
            decode.decode_full(encoded, "x", channels, None),
            decode.decode_crop(encoded, "x", 12, channels, rng=None, flip=False, eval_resize=12),
        )


def test_images_without_a_fixed_range_are_refused_by_name(tmp_path):
    path = str(tmp_path / "depth.tiff")
    Image.fromarray(np.linspace(0, 3.5, 64, dtype=np.float32).reshape(8, 8)).save(path)
    for call in (lambda: decode.decode_full(path, path, 1, 8),
                 lambda: decode.decode_crop(path, path, 8, 1, rng=None, flip=False, eval_resize=8),
                 lambda: decode.read_header(path, path)):
        with pytest.raises(ConfigError, match=f"^image {path} has float samples .* convert it to an 8- or 16-bit"):
            call()


# ---------------------------------------------------------------------------------------------------------------
# Classes: the same class folders in every split; everything under the splits is read or named.


@pytest.mark.parametrize("test_classes, message", [
    (("ant", "bee", "Cat"), r"test/ lacks cat; train/ lacks Cat \(class names are case-sensitive: Cat vs cat\)"),
    (("ant", "bee", "cat", "dog"), r"different class folders: train/ lacks dog\. "),
])
def test_splits_with_different_class_folders_are_refused(tmp_path, sharding, test_classes, message):
    root = write_image_folder(tmp_path / "folder", {"train": 8})
    write_image_folder(tmp_path / "folder", {"test": 2}, classes=test_classes)
    with pytest.raises(ConfigError, match=message):
        data.Pipeline(_config(tmp_path, root), sharding)


def test_images_in_subfolders_and_bmp_webp_files_are_read(tmp_path, sharding, capsys):
    root = write_image_folder(tmp_path / "folder", {"train": 4, "test": 4})
    pixels = np.random.default_rng(3).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    os.makedirs(os.path.join(root, "train", "ant", "batch2", "deeper"))
    Image.fromarray(pixels).save(os.path.join(root, "train", "ant", "batch2", "deeper", "x.png"))
    Image.fromarray(pixels).save(os.path.join(root, "train", "bee", "y.bmp"))
    Image.fromarray(pixels).save(os.path.join(root, "train", "cat", "z.WEBP"), lossless=True)
    pipeline = data.Pipeline(_config(tmp_path, root), sharding)
    assert pipeline.info.num_train_examples == 3 * 4 + 3
    assert "note:" not in capsys.readouterr().err


def test_entries_that_are_not_read_are_named_in_one_line(tmp_path, sharding, capsys):
    root = write_image_folder(tmp_path / "folder", {"train": 8, "test": 4})
    for split in ("train", "test"):  # Jupyter's checkpoint folders were classes of their own
        os.makedirs(os.path.join(root, split, ".ipynb_checkpoints"))
        Image.new("RGB", (8, 8)).save(os.path.join(root, split, ".ipynb_checkpoints", "0-checkpoint.png"))
    Image.new("RGB", (8, 8)).save(os.path.join(root, "train", "loose.png"))  # outside any class folder
    Image.new("RGB", (8, 8)).save(os.path.join(root, "train", "cat", "scan.tiff"))
    with open(os.path.join(root, "README"), "w") as f:  # beside the split folders: not part of the layout
        f.write("licence")
    pipeline = data.Pipeline(_config(tmp_path, root), sharding)
    assert pipeline.info.class_names == ("ant", "bee", "cat") and pipeline.info.num_train_examples == 24
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert notes == [
        f"note: image folder {root}: 4 entries are not read, e.g. test/.ipynb_checkpoints/, train/.ipynb_checkpoints/, "
        "train/loose.png (read are .jpg/.jpeg/.png/.bmp/.webp files in <split>/<class>/ and its subfolders; hidden "
        "names are skipped)"
    ]
    data.Pipeline(_config(tmp_path, root), sharding)  # the same folder again in this process: no second note
    assert "note:" not in capsys.readouterr().err


def test_the_order_of_a_split_is_tfds_image_folders(tmp_path):
    """Slices such as train[:45000] select the examples they selected when TFDS listed the folder."""
    root = write_image_folder(tmp_path / "folder", {"train": 7, "test": 3}, classes=("b", "a", "c", "d"))
    listing = folders.list_folder(root)
    builder = tfds.folder_dataset.ImageFolder(root)
    for split in ("train", "test"):
        assert list(listing.examples[split].paths) == _listed(root, split)
        names = builder.info.features["label"].names
        assert [names[i] for i in listing.examples[split].labels] == [
            e.label for e in builder._split_examples[split]]  # pylint: disable=protected-access
    assert list(listing.examples["train"].paths) != sorted(listing.examples["train"].paths)  # class-mixed


# ---------------------------------------------------------------------------------------------------------------
# Files that cannot be used: one line naming the file.


@pytest.mark.parametrize("per_example", [False, True], ids=["in_memory", "per_example"])
def test_a_decompression_bomb_is_named_before_training(tmp_path, sharding, monkeypatch, per_example):
    root = write_image_folder(tmp_path / "folder", {"train": 8, "test": 4})
    big = os.path.join(root, "train", "bee", "3.png")
    Image.new("RGB", (64, 64)).save(big)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL refuses images over twice this many pixels
    with pytest.raises(ConfigError, match=f"image {big} is too large to decode safely .*; downscale it"):
        data.Pipeline(_config(tmp_path, root, per_example, image_size=8), sharding)


def test_decoders_name_files_they_cannot_use(tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    cases = {str(tmp_path): "is a directory, not an image file", str(tmp_path / "gone.png"): "does not exist",
             str(text): "cannot decode image .*notes.png: cannot identify image file"}
    for path, message in cases.items():
        for call in (lambda: decode.decode_full(path, path, 3, 8),
                     lambda: decode.decode_crop(path, path, 8, 3, rng=None, flip=False, eval_resize=8)):
            with pytest.raises(ConfigError, match=message):
                call()


def test_an_unreadable_image_is_named_at_start_on_the_per_example_path(tmp_path, sharding):
    """Headers are read at start, so a broken file stops the run before its first step, not in the middle."""
    root = write_image_folder(tmp_path / "folder", {"train": 8, "test": 4})
    bad = os.path.join(root, "test", "ant", "1.png")
    with open(bad, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(ConfigError, match=f"cannot decode image {bad}"):
        data.Pipeline(_config(tmp_path, root, per_example=True), sharding)


# ---------------------------------------------------------------------------------------------------------------
# The statistics cache: keyed by the files' content, in config.run.cache_dir.


def _standardize_mean(tmp_path, root, sharding):
    data.clear_caches()  # as a new process would
    return data.Pipeline(_config(tmp_path, root), sharding).normalizer.stats["mean"]


def test_statistics_are_refitted_when_the_images_change_in_place(tmp_path, sharding):
    root = write_image_folder(tmp_path / "folder", {"train": 8, "test": 4})
    before = _standardize_mean(tmp_path, root, sharding)
    for path in _listed(root, "train"):  # same names, count and shape; other pixels
        Image.fromarray(np.asarray(Image.open(path)) // 4).save(path)
    after = _standardize_mean(tmp_path, root, sharding)
    np.testing.assert_allclose(after, before / 4, atol=1.0)
    assert len([f for f in os.listdir(tmp_path / "cache") if f.endswith(".npz")]) == 2


def test_statistics_are_cached_in_the_cache_dir_not_in_the_data_folder(tmp_path, sharding):
    root = write_image_folder(tmp_path / "folder", {"train": 8, "test": 4})
    _standardize_mean(tmp_path, root, sharding)
    assert sorted(os.listdir(root)) == ["test", "train"]
    assert any(f.startswith("nin_jax_standardize_") for f in os.listdir(tmp_path / "cache"))


def test_headers_are_read_once_per_folder_content(tmp_path, sharding, monkeypatch):
    """Their summary is kept in the cache dir: a restart reads no header until a file changes."""
    root = write_image_folder(tmp_path / "folder", {"train": 8, "test": 4})
    read = []
    real = decode.read_header
    monkeypatch.setattr(decode, "read_header", lambda *a: read.append(a[1]) or real(*a))
    config = _config(tmp_path, root)
    folders.ImageFolder(config, data.Cache())
    assert len(read) == 36
    folders.ImageFolder(config, data.Cache())
    assert len(read) == 36
    changed = _listed(root, "test")[0]
    Image.open(changed).convert("L").save(changed)
    assert folders.ImageFolder(config, data.Cache()).channels == 3
    assert len(read) == 36 + 12  # the test split's headers again
