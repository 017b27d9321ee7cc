"""Image decoding with PIL: whole images for in-memory datasets, crops for large images.

Small images (in-memory datasets) are decoded whole with PIL. Large images are decoded per example to
``size x size``: an Inception-style random-resized crop (+ flip) for training, "resize the short side to
``eval_resize`` (or warp to eval_resize x eval_resize), center-crop ``size``" for evaluation, optionally with
the 4 corner crops and the flips too (`decode_eval_crops`; docs/evaluation.md). PIL reads the header (size,
format); OpenCV decodes (libjpeg-turbo: the same pixels as PIL) at 1/2, 1/4 or 1/8 scale whenever the crop
still keeps ``size`` pixels and resizes only the crop. Per image this costs about half of PIL's decode + antialiased resize, and both
calls release the GIL (measurements in docs/input.md).

Both decoders give the same pixels for every image they accept: grayscale is repeated into RGB for a colour
input, alpha is dropped, and 16-bit samples keep their high byte (``v >> 8``). An image that cannot be used (not
an image, truncated, a directory, over PIL's decompression-bomb limit, 32-bit or float samples) is a
`ConfigError` naming it.
"""

from __future__ import annotations

import dataclasses
import io
import math
from collections.abc import Sequence

import cv2
import numpy as np
from PIL import Image

from nin_jax.config import EVAL_RESIZE_MODES, ConfigError

# PIL modes of one-channel images; "I;16*" are 16-bit grayscale (PNG, TIFF).
GRAY_MODES = ("1", "L", "LA", "La", "I;16", "I;16B", "I;16L", "I;16N")
# 32-bit integer and float samples have no fixed range, so no rule maps them to 8 bits.
_UNRANGED_MODES = ("I", "F")
# Images are decoded one per pool thread or worker process; OpenCV's own threads would only oversubscribe the cores.
cv2.setNumThreads(1)
Box = tuple[float, float, float, float]  # (left, top, right, bottom) in pixels of the original image
# What PIL raises for a file it cannot parse (OSError includes UnidentifiedImageError and truncated files).
_PIL_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


def decode_error(name: str, error: Exception) -> ConfigError:
    """The one-line error for an image that cannot be used, naming it and the fix."""
    if isinstance(error, IsADirectoryError):
        return ConfigError(f"image {name} is a directory, not an image file.")
    if isinstance(error, FileNotFoundError):
        return ConfigError(f"image {name} does not exist.")
    if isinstance(error, Image.DecompressionBombError):
        return ConfigError(
            f"image {name} is too large to decode safely ({str(error).rstrip('.')}); downscale it (a few thousand "
            "pixels a side is more than any crop needs) or remove it."
        )
    return ConfigError(f"cannot decode image {name}: {error}. Remove or replace the file.")


@dataclasses.dataclass(frozen=True)
class Header:
    """What an image's header says, read without decoding pixels."""

    size: tuple[int, int]  # (width, height)
    gray: bool  # one channel (with or without alpha)
    wide: bool  # 16 bits per sample: decoded as the high byte of each sample
    alpha: bool  # an alpha channel, which decoding drops


def open_image(encoded: bytes | str) -> Image.Image:
    """Opens encoded bytes or a file path (lazily: pixels are decoded on first use)."""
    return Image.open(encoded if isinstance(encoded, str) else io.BytesIO(encoded))


def _header_of(image: Image.Image, name: str) -> Header:
    if image.mode in _UNRANGED_MODES:
        raise ConfigError(
            f"image {name} has {'float' if image.mode == 'F' else '32-bit integer'} samples (PIL mode "
            f"{image.mode!r}), which have no fixed range; convert it to an 8- or 16-bit image."
        )
    # 16-bit colour PNGs open as 8-bit modes; their decoder's raw mode ("RGB;16B") tells.
    wide = image.mode.startswith("I;16") or any(";16" in str(tile.args) for tile in image.tile)
    return Header(image.size, image.mode in GRAY_MODES, wide, "A" in image.mode or "transparency" in image.info)


def read_header(encoded: bytes | str, name: str) -> Header:
    """The header of an image (bytes or a path); ConfigError naming ``name`` for a file that cannot be used."""
    try:
        with open_image(encoded) as image:
            return _header_of(image, name)
    except ConfigError:  # a ValueError, already naming the image
        raise
    except _PIL_ERRORS as e:
        raise decode_error(name, e) from e


def _eight_bit(image: Image.Image) -> Image.Image:
    """``image`` with 8-bit samples: 16-bit grayscale keeps the high byte of each sample, as PIL does for 16-bit
    colour and OpenCV for both (`PIL.Image.convert` would clip every value above 255 to 255)."""
    if not image.mode.startswith("I;16"):
        return image
    return Image.fromarray((np.asarray(image) >> 8).astype(np.uint8), "L")


def to_array(image: Image.Image, channels: int) -> np.ndarray:
    """uint8 [H, W, channels] of an 8-bit PIL image: grayscale is repeated into RGB, RGB is reduced to luminance,
    alpha is dropped."""
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
    """Decodes a whole image to uint8 [H, W, channels], resized to size x size when ``size`` is given."""
    try:
        with open_image(encoded) as image:
            _header_of(image, name)
            image = _eight_bit(image).convert("RGB" if channels == 3 else "L")
            if size is not None and image.size != (size, size):
                image = image.resize((size, size), Image.BILINEAR)
            return to_array(image, channels)
    except ConfigError:  # a ValueError, already naming the image
        raise
    except _PIL_ERRORS as e:
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


EVAL_CROPS = (1, 10)  # the center crop; the 4 corner crops + the center crop, each also flipped


def eval_boxes(width: int, height: int, size: int, resize: int, mode: str = "short_side", *,
               corners: bool = False) -> list[Box]:
    """Boxes in the original image that evaluation's size x size crops read: the image resized first (``mode``
    short_side: its short side to ``resize``, aspect kept; square: warped to resize x resize), then the center
    crop, and with ``corners`` also the top-left, top-right, bottom-left and bottom-right crops (in that order).

    The first box of short_side is `center_box`. A crop larger than the resized image is the whole resized side.
    """
    if mode not in EVAL_RESIZE_MODES:
        raise ConfigError(f"config.augment.eval_resize_mode={mode!r} must be one of {', '.join(EVAL_RESIZE_MODES)}")
    f = min(size / resize, 1.0)
    bw, bh = (width * f, height * f) if mode == "square" else (min(width, height) * f,) * 2
    x0, y0 = (width - bw) / 2, (height - bh) / 2
    boxes = [(x0, y0, x0 + bw, y0 + bh)]
    if corners:
        boxes += [(x, y, x + bw, y + bh) for y in (0.0, height - bh) for x in (0.0, width - bw)]
    return boxes


def _dct_scale(width: int, height: int, box: Box, size: int) -> int:
    """The largest of 1, 2, 4, 8 by which libjpeg may shrink the image while the crop keeps ``size`` pixels."""
    wanted_w = math.ceil(width * size / (box[2] - box[0]))
    wanted_h = math.ceil(height * size / (box[3] - box[1]))
    most = min(width // wanted_w, height // wanted_h)
    return next((s for s in (8, 4, 2) if most >= s), 1)


# cv2.imdecode flags by (channels, DCT scale); colour is decoded as RGB. EXIF orientation is ignored, as PIL
# and TFDS do, so that the crop box drawn from the header's size lands where it was drawn.
_REDUCED = {1: 0, 2: cv2.IMREAD_REDUCED_GRAYSCALE_2, 4: cv2.IMREAD_REDUCED_GRAYSCALE_4,
            8: cv2.IMREAD_REDUCED_GRAYSCALE_8}  # the scale bits alone (the GRAYSCALE variants add no colour flag)
_IMREAD = {(channels, scale): bits | (cv2.IMREAD_COLOR_RGB if channels == 3 else cv2.IMREAD_GRAYSCALE)
           | cv2.IMREAD_IGNORE_ORIENTATION for channels in (1, 3) for scale, bits in _REDUCED.items()}


def decode_crop(
    encoded: bytes | str,
    name: str,
    size: int,
    channels: int,
    *,
    rng: np.random.Generator | None,
    flip: bool,
    eval_resize: int,
    eval_resize_mode: str = "short_side",
) -> np.ndarray:
    """Decodes one large image to uint8 [size, size, C]: random-resized crop (+flip) if ``rng``, else center crop
    (of the image resized by ``eval_resize_mode``, see `eval_boxes`).

    The crop box is drawn from the header's size; JPEGs are decoded at 1/2, 1/4 or 1/8 scale when the crop keeps
    ``size`` pixels (so the remaining resize shrinks by less than 2x) and the crop is resized with bicubic
    interpolation (area averaging beyond 2x), by libjpeg-turbo and OpenCV outside the GIL.
    """
    encoded, width, height, is_jpeg = _read_for_crops(encoded, name)
    if rng is not None:
        box = random_resized_box(width, height, rng)
    else:
        box = eval_boxes(width, height, size, eval_resize, eval_resize_mode)[0]
    out = _crop_boxes(encoded, name, width, height, is_jpeg, [box], size, channels)[0]
    if rng is not None and flip and rng.random() < 0.5:
        out = cv2.flip(out, 1)
    return out[..., None] if channels == 1 else out


def decode_eval_crops(encoded: bytes | str, name: str, size: int, channels: int, *, eval_resize: int,
                      eval_resize_mode: str = "short_side", crops: int = 10) -> np.ndarray:
    """uint8 [crops, size, size, C]: evaluation's crops of one large image, decoded once.

    ``crops=1``: the center crop (`decode_crop`'s pixels); ``crops=10``: the center, top-left, top-right,
    bottom-left and bottom-right crops of the resized image (`eval_boxes`), then the same five flipped
    horizontally (Caffe's oversample).
    """
    if crops not in EVAL_CROPS:
        raise ConfigError(f"crops={crops!r} must be one of {EVAL_CROPS}")
    encoded, width, height, is_jpeg = _read_for_crops(encoded, name)
    boxes = eval_boxes(width, height, size, eval_resize, eval_resize_mode, corners=crops == 10)
    outs = _crop_boxes(encoded, name, width, height, is_jpeg, boxes, size, channels)
    if crops == 10:
        outs += [cv2.flip(out, 1) for out in outs]
    out = np.stack(outs)
    return out[..., None] if channels == 1 else out


def _read_for_crops(encoded: bytes | str, name: str) -> tuple[bytes, int, int, bool]:
    """(the encoded bytes, width, height, is JPEG) from the header; ConfigError naming an unusable image."""
    try:
        if isinstance(encoded, str):
            with open(encoded, "rb") as f:
                encoded = f.read()
        with Image.open(io.BytesIO(encoded)) as header:  # parses the header only
            _header_of(header, name)
            width, height = header.size
            is_jpeg = header.format == "JPEG"
    except ConfigError:  # a ValueError, already naming the image
        raise
    except _PIL_ERRORS as e:
        raise decode_error(name, e) from e
    return encoded, width, height, is_jpeg


def _crop_boxes(encoded: bytes, name: str, width: int, height: int, is_jpeg: bool, boxes: Sequence[Box],
                size: int, channels: int) -> list[np.ndarray]:
    """Each box of one decode of ``encoded``, resized to size x size ([size, size] for one channel); the DCT
    scale is chosen for the first box (evaluation's boxes all have its size)."""
    scale = _dct_scale(width, height, boxes[0], size) if is_jpeg else 1
    image = cv2.imdecode(np.frombuffer(encoded, np.uint8), _IMREAD[channels, scale])
    if image is None:
        raise decode_error(name, ValueError("OpenCV cannot decode it"))
    sy, sx = image.shape[0] / height, image.shape[1] / width
    outs = []
    for box in boxes:
        x0, y0 = round(box[0] * sx), round(box[1] * sy)
        x1, y1 = max(x0 + 1, round(box[2] * sx)), max(y0 + 1, round(box[3] * sy))
        crop = image[y0:y1, x0:x1]
        shrink = max(crop.shape[0], crop.shape[1]) / size
        outs.append(cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA if shrink >= 2 else cv2.INTER_CUBIC))
    return outs


@dataclasses.dataclass(frozen=True)
class CropSpec:
    """How `decode_crops` turns encoded large images into model-size uint8 crops."""

    size: int
    channels: int
    flip: bool  # random horizontal flip of training crops
    eval_resize: int
    eval_resize_mode: str = "short_side"  # config.augment.eval_resize_mode (see `eval_boxes`)
    eval_crops: int = 1  # evaluation crops per example: 1, or 10 (`decode_eval_crops`)

    @property
    def item_shape(self) -> tuple[int, ...]:
        """Of one decoded example: [size, size, C], or [eval_crops, size, size, C] for multi-crop evaluation."""
        one = (self.size, self.size, self.channels)
        return one if self.eval_crops == 1 else (self.eval_crops, *one)


def decode_crops(items: Sequence[tuple[bytes | str, str, int | None]], spec: CropSpec,
                 out: np.ndarray | None = None) -> np.ndarray:
    """uint8 [n, *spec.item_shape] of ``(encoded, name, seed)`` items, written into ``out`` if given: a seed
    draws a random-resized crop (+ flip) from ``np.random.default_rng(seed)``, None takes the evaluation center
    crop (or ``spec.eval_crops`` crops). Runs in decode threads or worker processes."""
    if out is None:
        out = np.empty((len(items), *spec.item_shape), np.uint8)
    for i, (encoded, name, seed) in enumerate(items):
        if seed is None and spec.eval_crops != 1:
            out[i] = decode_eval_crops(encoded, name, spec.size, spec.channels, eval_resize=spec.eval_resize,
                                       eval_resize_mode=spec.eval_resize_mode, crops=spec.eval_crops)
            continue
        out[i] = decode_crop(
            encoded, name, spec.size, spec.channels, rng=None if seed is None else np.random.default_rng(seed),
            flip=spec.flip, eval_resize=spec.eval_resize, eval_resize_mode=spec.eval_resize_mode,
        )
    return out
