"""Image decoding with PIL: whole images for in-memory datasets, crops for large images.

Large images are decoded per example to ``size x size``: an Inception-style random-resized crop (+ flip) for
training, "resize the short side to ``eval_resize``, center-crop ``size``" for evaluation. Only the crop box
is resampled (``Image.resize(box=...)``), and JPEGs are decoded at 1/2, 1/4 or 1/8 scale by libjpeg (``draft``)
whenever the crop still keeps at least ``size`` pixels, so no output pixel is upsampled from a reduced decode.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image

from nin_jax.config import ConfigError

GRAY_MODES = ("1", "L", "I", "I;16", "F")  # PIL modes decoded as one channel
Box = tuple[float, float, float, float]  # (left, top, right, bottom) in pixels of the original image


def decode_error(name: str, error: Exception) -> ConfigError:
    return ConfigError(f"cannot decode image {name}: {error}. Remove or replace the file.")


def open_image(encoded: bytes | str) -> Image.Image:
    """Opens encoded bytes or a file path (lazily: pixels are decoded on first use)."""
    return Image.open(encoded if isinstance(encoded, str) else io.BytesIO(encoded))


def channels_of(encoded: bytes | str, name: str) -> int:
    """1 for grayscale images, else 3."""
    try:
        with open_image(encoded) as image:
            return 1 if image.mode in GRAY_MODES else 3
    except (OSError, SyntaxError, ValueError) as e:  # PIL's errors for unreadable / truncated files
        raise decode_error(name, e) from e


def to_array(image: Image.Image, channels: int) -> np.ndarray:
    array = np.asarray(image.convert("L" if channels == 1 else "RGB"))
    return array[..., None] if channels == 1 else array


def resize_array(image: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of one uint8 [H, W, C] image to size x size."""
    channels = image.shape[-1]
    pil = Image.fromarray(image[..., 0] if channels == 1 else image).resize((size, size), Image.BILINEAR)
    return to_array(pil, channels)


def resize_all(images: np.ndarray, size: int | None) -> np.ndarray:
    """Resizes uint8 [N, H, W, C] to size x size (unchanged when ``size`` is None or already matches)."""
    if size is None or images.shape[1:3] == (size, size):
        return images
    return np.stack([resize_array(image, size) for image in images])


def decode_full(encoded: bytes | str, name: str, channels: int, size: int | None) -> np.ndarray:
    """Decodes a whole image to uint8 HWC, resized to size x size when ``size`` is given."""
    try:
        with open_image(encoded) as image:
            if size is not None and image.size != (size, size):
                image = image.convert("RGB" if channels == 3 else "L").resize((size, size), Image.BILINEAR)
            return to_array(image, channels)
    except (OSError, SyntaxError, ValueError) as e:
        raise decode_error(name, e) from e


def random_resized_box(width: int, height: int, rng: np.random.Generator) -> Box:
    """Inception-style crop: area in [8%, 100%], aspect ratio in [3/4, 4/3] (torchvision's 10-try rule)."""
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(0.08, 1.0)
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        w, h = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            x0, y0 = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
            return x0, y0, x0 + w, y0 + h
    w, h = width, height  # fallback: the largest centred crop with a ratio inside the range
    if width / height < 3 / 4:
        h = round(width * 4 / 3)
    elif width / height > 4 / 3:
        w = round(height * 4 / 3)
    x0, y0 = (width - w) // 2, (height - h) // 2
    return x0, y0, x0 + w, y0 + h


def center_box(width: int, height: int, size: int, resize: int) -> Box:
    """Box that 'resize the short side to ``resize``, then center-crop size x size' reads from the original."""
    side = min(width, height) * min(size / resize, 1.0)
    x0, y0 = (width - side) / 2, (height - side) / 2
    return x0, y0, x0 + side, y0 + side


def decode_crop(
    encoded: bytes | str,
    name: str,
    size: int,
    channels: int,
    *,
    rng: np.random.Generator | None,
    flip: bool,
    eval_resize: int,
) -> np.ndarray:
    """Decodes one large image to uint8 [size, size, C]: random-resized crop (+flip) if ``rng``, else center crop."""
    try:
        with open_image(encoded) as image:
            width, height = image.size
            box = random_resized_box(width, height, rng) if rng is not None else center_box(width, height, size, eval_resize)
            if image.format == "JPEG":
                # Let libjpeg decode at 1/2, 1/4 or 1/8 scale while the crop keeps at least `size` pixels.
                wanted = (math.ceil(width * size / (box[2] - box[0])), math.ceil(height * size / (box[3] - box[1])))
                image.draft("RGB", wanted)
                sx, sy = image.size[0] / width, image.size[1] / height
                box = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
            image = image.convert("L" if channels == 1 else "RGB").resize((size, size), Image.BILINEAR, box=box)
            array = to_array(image, channels)
    except (OSError, SyntaxError, ValueError) as e:
        raise decode_error(name, e) from e
    if rng is not None and flip and rng.random() < 0.5:
        array = array[:, ::-1]
    return array
