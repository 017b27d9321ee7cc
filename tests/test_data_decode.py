"""Large-image decoding: shapes, reduced-scale JPEG decoding, grayscale, and the same crops from every worker."""

import io

import numpy as np
import pytest
from PIL import Image

from nin_jax.config import ConfigError
from nin_jax.data import decode, workers


def _jpeg(width, height, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    # Smooth content (a gradient plus low noise) so that resampling differences are small.
    y, x = np.mgrid[0:height, 0:width]
    base = (x * 255 / width + y * 128 / height) % 256
    pixels = np.clip(base[..., None] + rng.normal(0, 4, (height, width, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95)
    return buffer.getvalue(), np.asarray(image.convert("RGB"))


def test_crop_shapes_and_flip():
    encoded, _ = _jpeg(120, 90)
    train = decode.decode_crop(encoded, "a", 32, 3, rng=np.random.default_rng(3), flip=True, eval_resize=36)
    again = decode.decode_crop(encoded, "a", 32, 3, rng=np.random.default_rng(3), flip=True, eval_resize=36)
    assert train.shape == (32, 32, 3) and train.dtype == np.uint8
    np.testing.assert_array_equal(train, again)  # a seed fixes the crop and the flip
    gray, _ = _jpeg(50, 40, mode="L")
    assert decode.decode_crop(gray, "g", 16, 1, rng=None, flip=False, eval_resize=20).shape == (16, 16, 1)
    assert decode.read_header(gray, "g").gray


def test_reduced_scale_decode_matches_full_scale():
    """A crop much larger than the output is decoded at 1/4 scale; it must look like the full-scale result."""
    encoded, pixels = _jpeg(640, 480)
    assert decode._dct_scale(640, 480, (0, 0, 640, 480), 100) == 4  # pylint: disable=protected-access
    out = decode.decode_crop(encoded, "a", 100, 3, rng=None, flip=False, eval_resize=100)
    side = 480  # eval_resize == size: the center crop is the central square
    reference = np.asarray(Image.fromarray(pixels).resize((100, 100), Image.LANCZOS, box=(80, 0, 80 + side, side)))
    assert np.abs(out.astype(int) - reference).mean() < 3


def test_small_crop_is_upsampled_without_reduced_decode():
    assert decode._dct_scale(100, 80, (0, 0, 40, 40), 64) == 1  # pylint: disable=protected-access


def test_undecodable_bytes_are_named():
    with pytest.raises(ConfigError, match="cannot decode image bad.jpg"):
        decode.decode_crop(b"not an image", "bad.jpg", 8, 3, rng=None, flip=False, eval_resize=8)


def test_worker_processes_decode_what_threads_decode():
    items = [(_jpeg(60 + 7 * i, 45, seed=i)[0], f"{i}", seed) for i, seed in enumerate([5, None, 7, 11, None])]
    spec = decode.CropSpec(size=16, channels=3, flip=True, eval_resize=20)
    threads, processes = workers.DecodePool(0), workers.DecodePool(2)
    try:
        np.testing.assert_array_equal(threads.submit(items, spec).result(), processes.submit(items, spec).result())
    finally:
        threads.close()
        processes.close()
